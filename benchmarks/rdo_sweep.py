"""Directions optimised by gradient descent on what the edit should do, against the defaults', at fixed kernels.

Every direction rule tried so far is a statistic of the residuals (a mean difference, a
discriminant, a projection of one): it says where the sets differ, not what removing that
difference does to the answers. Wollschlaeger et al. (2025, "The geometry of refusal in large
language models: concept cones and representational independence", refusal direction
optimisation) fit the direction to the outcome instead: with the edit in place, make the answers
that an already abliterated model gives to the harmful prompts likely, and keep the harmless
prompts' next-token distribution where it was. Here, per layer l edited by the kernel (weight w_l),
every edited site's output y becomes y - w_l u_l (u_l . y), u_l = v_l / |v_l|, and the v_l are
fitted by Adam to

    loss = CE(target answers | harmful prompts, edited) + lambda * KL(unedited || edited)

- targets: the first `--target-tokens` tokens of the greedy answers of the model edited by the
  defaults' direction at a strong weight (`--target-weight`, the same kernel) to the kept harmful
  direction prompts, those of them the markers do not judge refusals;
- KL: of the first answer token on the kept harmless direction prompts (the study's KL objective);
- start: the defaults' directions (the shrinkage discriminant, rho 0.9, harmless-mean part removed);
  `--shared`: one direction for every edited layer, started from the kernel's peak layer's.

Trained on the direction prompts only (the split the statistics come from); scored, as every sweep
here, on the held-out prompts at several weights, beside the defaults' directions at the same
weights. A direction fitted at one weight is used at all of them, as a study would.

    python benchmarks/rdo_sweep.py [--lambdas L ...] [--steps N] [--train-weight W] [--shared]
"""

from __future__ import annotations

import itertools
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.fixed_kernels import KERNELS, arguments, kept_direction_texts, open_sweep
from optimizer.ablation import AblationPlan
from optimizer.fitting import padded
from optimizer.params import build_plan
from optimizer.scoring import generate_and_classify


@dataclass(frozen=True)
class Batches:
    """The fit's data: harmful prompts + target answers (labels on the answers only), harmless prompts
    and their unedited first-token log-probabilities, all left-padded."""

    ids: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor
    harmless_ids: torch.Tensor
    harmless_mask: torch.Tensor
    base: torch.Tensor


def logits_of(model, ids, mask):
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits


def batches(sweep, harmful: list[str], harmless: list[str], target_plan: AblationPlan, n_target: int) -> Batches:
    """Targets: the answers of the model edited by `target_plan` that the markers do not judge refusals."""
    loaded, bs, tok = sweep.bench.loaded, sweep.bench.batch_size, sweep.bench.loaded.tokenizer
    answers = sweep_answers(sweep, harmful, target_plan, n_target)
    keep = [i for i, r in enumerate(answers.refused) if not r]
    targets = [answers.responses[i] for i in keep]
    print(f"# targets: {len(keep)}/{len(harmful)} answered, e.g. {targets[0][:60]!r}")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids, mask, labels = padded(tok, [harmful[i] for i in keep], targets, n_target, pad)
    hids, hmask, _ = padded(tok, harmless, [""] * len(harmless), 0, pad)
    with torch.inference_mode():
        base = torch.cat([logits_of(loaded.model, hids[i : i + bs], hmask[i : i + bs])[:, -1] for i in range(0, len(hids), bs)])
    return Batches(ids, mask, labels, hids, hmask, base.float().log_softmax(-1))


def sweep_answers(sweep, texts: list[str], plan: AblationPlan, n_target: int):
    """Greedy answers to `texts` with `plan` hooked in, each to `n_target` tokens (not stopped when decided)."""
    with sweep.hooked(plan):
        return generate_and_classify(sweep.bench.loaded, texts, n_target, sweep.judge, sweep.bench.batch_size, stop_early=False)


def fit(
    loaded, start: AblationPlan, data: Batches, lam: float, steps: int, lr: float, shared: bool, batch_size: int
) -> torch.Tensor:
    """Per-layer unit directions (L, d) fitted by Adam with `start`'s weights, from `start`'s directions
    (`shared`: one direction for every layer, from the peak layer's). Per-layer fits keep `start`'s
    directions (zero) at the layers its kernel leaves unedited."""
    weights, init = start.weights, start.directions["attn"].float().clone()
    edited = sorted({i for ws in weights.values() for i, x in enumerate(ws) if x})
    peak = max(edited, key=lambda i: weights["attn"][i])
    v = (init[peak].clone() if shared else init.clone()).requires_grad_(True)
    opt = torch.optim.Adam([v], lr=lr)
    unit = lambda layer: F.normalize(v if shared else v[layer], dim=0)

    def hook(site):
        w = weights[site.component][site.layer]

        def edit(_module, _inputs, out):
            u = unit(site.layer)  # normalised once per call, not once per use
            return out - w * (out @ u).unsqueeze(-1) * u

        return edit

    sites = [s for s in loaded.discovery.present() if weights[s.component][s.layer]]
    handles = [s.module.register_forward_hook(hook(s)) for s in sites]
    n_tok, n_harmless, t0 = int((data.labels != -100).sum()), len(data.harmless_ids), time.time()
    try:
        for step in range(steps):
            opt.zero_grad()
            ce_sum = kl_sum = 0.0
            for i in range(0, len(data.ids), batch_size):
                sl = slice(i, i + batch_size)
                logits = logits_of(loaded.model, data.ids[sl], data.mask[sl])
                ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), data.labels[sl, 1:].flatten(), reduction="sum")
                (ce / n_tok).backward()
                ce_sum += float(ce.detach())
            for i in range(0, n_harmless, batch_size):
                sl = slice(i, i + batch_size)
                lp = logits_of(loaded.model, data.harmless_ids[sl], data.harmless_mask[sl])[:, -1].float().log_softmax(-1)
                kl = F.kl_div(lp, data.base[sl], reduction="sum", log_target=True)
                (lam * kl / n_harmless).backward()
                kl_sum += float(kl.detach())
            opt.step()
            if step % 5 == 0 or step == steps - 1:
                line = f"CE {ce_sum / n_tok:.3f} KL {kl_sum / n_harmless:.4f} ({time.time() - t0:.0f} s)"
                print(f"  lambda {lam} step {step}: {line}", flush=True)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():  # shared: the one direction at every layer, so other kernels use it everywhere they edit
        fitted = unit(peak).expand_as(init).clone() if shared else init.clone()
        for i in edited:
            fitted[i] = unit(i)
    cos = [float(fitted[i] @ init[i]) for i in edited]
    print(f"  cosine with the defaults' over edited layers: min {min(cos):.3f} mean {sum(cos) / len(cos):.3f}")
    return fitted


def main() -> None:
    p = arguments([0.5, 0.7, 1.0], kernels=["p.75 f.25"])
    p.add_argument("--rho", type=float, default=0.9)
    p.add_argument("--lambdas", type=float, nargs="+", default=[3.0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--train-weight", type=float, default=1.0)
    p.add_argument("--target-weight", type=float, default=1.5)
    p.add_argument("--target-tokens", type=int, default=16)
    p.add_argument("--shared", action="store_true")
    p.add_argument("--save-dir", type=Path, help="save each fitted direction set here (torch.save, (L, d))")
    p.add_argument("--eval-kernels", nargs="+", default=["p.75 f.25", "p.6 f.45"], choices=list(KERNELS))
    a = p.parse_args()
    torch.manual_seed(0)
    sweep = open_sweep(a, "rdo")
    bench = sweep.bench
    harmful, harmless = kept_direction_texts(sweep)
    bench.loaded.model.requires_grad_(False)  # only the directions are fitted
    print(sweep.header + f"; direction prompts kept {len(harmful)} harmful, {len(harmless)} harmless")
    defaults = lambda kname, w: build_plan(sweep.params(kname, w, "discriminant", shrinkage=a.rho), bench.stats, projected=1.0)[0]
    for kname in a.kernels:
        print(f"# fitted on {kname} at w {a.train_weight}; targets from w {a.target_weight}")
        data = batches(sweep, harmful, harmless, defaults(kname, a.target_weight), a.target_tokens)
        for lam in a.lambdas:
            fitted = fit(bench.loaded, defaults(kname, a.train_weight), data, lam, a.steps, a.lr, a.shared, bench.batch_size)
            if a.save_dir:
                a.save_dir.mkdir(parents=True, exist_ok=True)
                torch.save(fitted, a.save_dir / f"{kname.replace(' ', '_')}-lambda{lam:g}{'-shared' if a.shared else ''}.pt")
            print("| kernel | w | directions | refusals | KL |")
            print("|---|---|---|---|---|")
            for ename, w in itertools.product(a.eval_kernels, a.weights):
                ref = defaults(ename, w)
                plan = AblationPlan({c: fitted for c in ref.directions}, ref.weights)
                for label, edit in (("defaults", ref), (f"optimised lambda {lam}{' shared' if a.shared else ''}", plan)):
                    r, kl = sweep.score_plan(edit)
                    print(f"| {ename} (fitted on {kname}) | {w} | {label} | {r}/{a.prompts} | {kl:.4f} |", flush=True)


if __name__ == "__main__":
    main()
