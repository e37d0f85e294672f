"""The discriminant shrunk towards the model's Fisher metric instead of the identity, at fixed kernels.

Ablating a unit direction v at layer l moves a harmless residual x by delta = -w v (v^T x). To second
order the first-token KL that costs is 1/2 delta^T F delta = 1/2 w^2 (v^T x)^2 (v^T F v), with F the
Fisher information of the next-token distribution with respect to layer l's residual (how much the
output reads each direction). Averaged over harmless prompts (x and F taken as independent) the cost
is (v^T S v)(v^T F v), S the residuals' second moment; the refusals removed grow with (v^T r)^2.
By AM-GM, (v^T S v)(v^T F v) <= (v^T (S / a + a F) v)^2 / 4 with equality at a = sqrt(v^T S v / v^T F v),
so the best v for that ratio is, for some a, v ~ (S / a + a F)^-1 r: a one-parameter family between
"little harmless variation along v" and "the output hardly reads v". The project's shrinkage
discriminant v ~ ((1 - rho) Sigma_w + rho tau I)^-1 r is this family with F taken as isotropic (a
model that reads every direction alike); this sweep puts the measured F there instead, scaled to the
same trace: ((1 - rho) Sigma_w + rho tau F / tau_F)^-1 r, tau_F = tr F / d.

F per layer is estimated on the kept harmless direction prompts (the residual statistics' prompts)
at the position that predicts the first answer token: for each prompt, tokens y sampled from the
unedited model's first-token distribution and g = d log p(y) / d h_l, F = E[g g^T] (the Fisher's
definition; `--samples` per prompt). Everything else is the study's (`fixed_kernels.py`), and the
identity-target rows are checked against `optimizer.directions.discriminant_directions` first.

    python benchmarks/fisher_sweep.py [--rhos R ...] [--samples 16] [--projected] [--weights W ...] [--kernels NAME ...]
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.fixed_kernels import arguments, kept_direction_texts, open_sweep
from optimizer.ablation import AblationPlan
from optimizer.directions import discriminant_directions, project_out_harmless_mean
from optimizer.params import build_plan
from optimizer.residuals import collect_residuals, layer_residuals, tokenize


def batches_with_graph(loaded, texts: list[str], batch_size: int):
    """Per batch: the first-token logits (n, vocab) and every block's output (n, T, d), in one
    autograd graph (the weights do not require gradients: the embeddings' output starts it)."""
    for start in range(0, len(texts), batch_size):
        kept: list[torch.Tensor] = []

        def keep(_module, _inputs, output, kept=kept):
            kept.append(output[0] if isinstance(output, tuple) else output)

        handles = [layer.register_forward_hook(keep) for layer in loaded.layers]
        handles.append(loaded.model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out.requires_grad_()))
        try:
            with torch.enable_grad():
                logits = loaded.model(**tokenize(loaded, texts[start : start + batch_size]), use_cache=False).logits[:, -1]
                yield logits.float(), kept
        finally:
            for h in handles:
                h.remove()


def fisher(loaded, texts: list[str], batch_size: int, samples: int) -> torch.Tensor:
    """(L, d, d): E[g g^T] over prompts and sampled first tokens, g the gradient of log p(y) with
    respect to each block's output at the prompt's last position."""
    d = loaded.hidden_size
    total = torch.zeros(len(loaded.layers), d, d)
    generator = torch.Generator().manual_seed(0)
    for logits, kept in batches_with_graph(loaded, texts, batch_size):
        with torch.enable_grad():
            logp = torch.log_softmax(logits, dim=-1)
            for _ in range(samples):
                y = torch.multinomial(logp.detach().exp(), 1, generator=generator)
                grads = torch.autograd.grad(logp.gather(1, y).sum(), kept, retain_graph=True)
                for layer, g in enumerate(grads):
                    last = g[:, -1].float()
                    total[layer] += last.T @ last
    return total / (len(texts) * samples)


def refusal_moment(loaded, texts: list[str], batch_size: int, mean_harmless: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """(L, d, d): E[sym((x - mu_g) g^T)] over the harmful prompts, x a block's output at the last
    position and g the gradient there of the refusal log-odds: log P(first token in T) - log P(not
    in T), T the first tokens the unedited model answers these prompts with. Projecting v out of
    the residuals moves the log-odds by about -w E[(v^T x)(v^T g)] = -w v^T M v."""
    refusal_tokens = sorted({int(t) for logits, _ in batches_with_graph(loaded, texts, batch_size) for t in logits.argmax(-1)})
    total = torch.zeros(len(loaded.layers), loaded.hidden_size, loaded.hidden_size)
    for logits, kept in batches_with_graph(loaded, texts, batch_size):
        with torch.enable_grad():
            logp = torch.log_softmax(logits, dim=-1)
            inside = torch.logsumexp(logp[:, refusal_tokens], dim=-1)
            odds = inside - torch.log1p(-inside.exp().clamp(max=1 - 1e-6))
            grads = torch.autograd.grad(odds.sum(), kept)
        for layer, (g, x) in enumerate(zip(grads, kept, strict=True)):
            outer = (x[:, -1].detach().float() - mean_harmless[layer]).T @ g[:, -1].float()
            total[layer] += (outer + outer.T) / 2
    return total / len(texts), refusal_tokens


def top_generalized(m: torch.Tensor, b: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Per layer the unit v maximising v^T M v / v^T B v (B positive definite), oriented along r."""
    chol = torch.linalg.cholesky(b)
    inv = torch.linalg.solve_triangular(chol, torch.eye(b.shape[-1]).expand_as(b).contiguous(), upper=False)
    _, vectors = torch.linalg.eigh(inv @ m @ inv.mT)
    v = torch.nn.functional.normalize((inv.mT @ vectors[..., -1:]).squeeze(-1), dim=-1)
    return v * torch.sign((v * r).sum(-1, keepdim=True))


def directions_with_target(sigma_w, r, target, rho: float) -> torch.Tensor:
    """Unit ((1 - rho) Sigma_w + rho tau T / tau_T)^-1 r per layer, oriented along r."""
    d = r.shape[-1]
    tau = sigma_w.diagonal(dim1=-2, dim2=-1).sum(-1) / d
    tau_t = target.diagonal(dim1=-2, dim2=-1).sum(-1) / d
    shrunk = (1 - rho) * sigma_w + rho * (tau / tau_t)[:, None, None] * target
    v = torch.stack([torch.cholesky_solve(b[:, None], torch.linalg.cholesky(m))[:, 0] for m, b in zip(shrunk, r)])
    v = torch.nn.functional.normalize(v, dim=-1)
    return v * torch.sign((v * r).sum(-1, keepdim=True))


def main() -> None:
    p = arguments([0.5, 0.7, 1.0], kernels=["p.75 f.25", "p.6 f.45"])
    p.add_argument("--rhos", type=float, nargs="*", default=[0.5, 0.9, 0.97])
    p.add_argument(
        "--gradient-rhos", type=float, nargs="*", default=[], help="rows from the refusal gradient (see refusal_moment)"
    )
    p.add_argument("--identity-rho", type=float, default=0.9, help="the study's family, the reference rows")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--ridge", type=float, default=1e-3, help="F + ridge * tau_F I: F from finitely many samples")
    p.add_argument("--projected", action="store_true")
    a = p.parse_args()
    sweep = open_sweep(a, "fisher")
    bench, loaded, bs = sweep.bench, sweep.bench.loaded, sweep.bench.batch_size
    kept_b, kept_g = kept_direction_texts(sweep)
    harmful = layer_residuals(collect_residuals(loaded, kept_b, bs), False).cpu()
    harmless = layer_residuals(collect_residuals(loaded, kept_g, bs), False).cpu()
    centred = lambda x: x - x.mean(1, keepdim=True)
    sigma_w = sum(centred(x).mT @ centred(x) / x.shape[1] for x in (harmful, harmless))
    r = harmful.mean(1) - harmless.mean(1)
    d = r.shape[-1]
    eye = torch.eye(d).expand_as(sigma_w).contiguous()
    stats = bench.stats.to("cpu")
    reference = discriminant_directions(stats, a.identity_rho)
    mine = directions_with_target(sigma_w, r, eye, a.identity_rho)
    cos = (reference * mine).sum(-1).min()
    assert cos > 0.999, f"the identity-target directions are not the study's discriminant (min cosine {cos:.4f})"
    f = fisher(loaded, kept_g, bs, a.samples)
    tau_f = f.diagonal(dim1=-2, dim2=-1).sum(-1) / d
    f = f + a.ridge * tau_f[:, None, None] * eye
    spectrum = torch.linalg.eigvalsh(f)
    print(sweep.header + f"; kept {len(kept_b)} harmful, {len(kept_g)} harmless; {a.samples} samples per prompt")
    for layer in range(0, stats.n_layers, 4):
        top = spectrum[layer].flip(0)
        share = float(top[:16].sum() / top.sum())
        print(f"# layer {layer}: F's top 16 eigenvalues hold {share:.2f} of its trace")
    rows = [(f"identity rho {a.identity_rho}", mine)]
    for rho in a.rhos:
        v = directions_with_target(sigma_w, r, f, rho)
        rows.append((f"Fisher rho {rho}", v))
        print(
            f"# Fisher rho {rho}: cos with the reference per layer " + " ".join(f"{x:.2f}" for x in (v * mine).sum(-1).tolist())
        )
    if a.gradient_rhos:
        moment, tokens = refusal_moment(loaded, kept_b, bs, harmless.mean(1))
        print(f"# refusal tokens: {[loaded.tokenizer.decode([t]) for t in tokens]}")
        sigma_g = centred(harmless).mT @ centred(harmless) / harmless.shape[1]
        trace = lambda x: x.diagonal(dim1=-2, dim2=-1).sum(-1)[:, None, None] / d
        for rho in a.gradient_rhos:
            b = (1 - rho) * sigma_g / trace(sigma_g) + rho * f / trace(f) + a.ridge * eye
            v = top_generalized(moment, b, r)
            rows.append((f"refusal gradient rho {rho}", v))
            cosines = " ".join(f"{x:.2f}" for x in (v * mine).sum(-1).tolist())
            print(f"# refusal gradient rho {rho}: cos with the reference per layer {cosines}")
    print("| kernel | w | directions | refusals | KL |")
    print("|---|---|---|---|---|")
    everything = list(range(stats.n_layers))
    for kname, w, (name, v) in itertools.product(a.kernels, a.weights, rows):
        plan, _ = build_plan(sweep.params(kname, w, "discriminant", shrinkage=a.identity_rho), bench.stats)
        v = project_out_harmless_mean(stats, v, everything) if a.projected else v
        ref, kl = sweep.score_plan(AblationPlan({c: v.to(loaded.device) for c in plan.directions}, plan.weights))
        print(f"| {kname} | {w} | {name}{', projected' if a.projected else ''} | {ref}/{a.prompts} | {kl:.4f} |", flush=True)


if __name__ == "__main__":
    main()
