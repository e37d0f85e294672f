"""A keyed edit (ROME's rank-one rule) against directional ablation, at fixed kernels.

Directional ablation edits each output projection y = W a as y <- y - w r (r^T W a): whatever input
a is, its write along r is removed, from harmless text as much as from harmful. The KL an edit costs
comes from the harmless inputs' writes along r. A rank-one edit y <- y - w r (u^T a) with another key
u can remove the harmful inputs' write and leave the harmless ones' as they are: ROME's rule
(Meng et al. 2022) picks the u of least effect on the inputs' second moment C for a given effect on
one key k, u = C^-1 k (k^T W^T r) / (k^T C^-1 k), so that u^T k = r^T W k. Here k is the harmful
direction prompts' mean input at the position that predicts the first answer token and C the
harmless direction prompts' second moment over every position (the edit acts at every position),
shrunk towards its mean eigenvalue: C_lambda = C + lambda (tr C / n) I, lambda -> infinity gives
u ~ k. At w = 1 the harmful mean's write along r is removed exactly; a harmless input moves by
its C^-1-similarity to k instead of by its own write along r.

The same model, kernels, directions (the defaults' discriminant, rho 0.9, projected) and prompts as
`lda_sweep.py` (`fixed_kernels.py`); the direction prompts kept by `--refused-directions`
(`fixed_kernels.kept_direction_texts`).

`--keep Q ...` adds rows of ablation masked to a share Q of the input features (`masked_rows`).

    python benchmarks/keyed_sweep.py [--lambdas L ...] [--keep Q ...] [--weights W ...] [--kernels NAME ...]
"""

from __future__ import annotations

import itertools
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.fixed_kernels import arguments, forward_with_hooks, kept_direction_texts, open_sweep
from optimizer.params import build_plan
from optimizer.residuals import tokenize


@dataclass(frozen=True)
class Inputs:
    """Per site (module -> vector or matrix) what the keyed and masked edits read of its inputs."""

    harmful_last: dict  # the kept harmful prompts' mean input at the last position: k
    harmless_last: dict  # the kept harmless prompts' mean input at the last position
    harmless_moment: dict  # the kept harmless prompts' input second moment over every position: C


@torch.inference_mode()
def input_moments(loaded, sites, harmful: list[str], harmless: list[str], batch_size: int) -> Inputs:
    sums: dict[str, dict] = {name: {s.module: 0.0 for s in sites} for name in ("harmful", "harmless", "moment")}
    counts = {"harmful": 0, "harmless": 0, "moment": 0}
    for name, texts in (("harmful", harmful), ("harmless", harmless)):
        for start in range(0, len(texts), batch_size):
            batch = tokenize(loaded, texts[start : start + batch_size])
            mask = batch["attention_mask"].bool()

            def keep(module, inputs, _output, name=name, mask=mask):
                a = inputs[0].float()
                sums[name][module] = sums[name][module] + a[:, -1].sum(0)
                if name == "harmless":
                    rows = a[mask]
                    sums["moment"][module] = sums["moment"][module] + rows.T @ rows

            forward_with_hooks(loaded, sites, keep, batch)
            counts[name] += mask.shape[0]
            counts["moment"] += int(mask.sum()) if name == "harmless" else 0
    mean = {name: {m: v / counts[name] for m, v in sums[name].items()} for name in sums}
    return Inputs(mean["harmful"], mean["harmless"], mean["moment"])


def key_rows(sites, plan, inputs: Inputs, lam: float) -> dict:
    """Per edited site, u by ROME's rule: u = C^-1 k (k^T W^T r) / (k^T C^-1 k), C shrunk by lambda."""
    rows = {}
    for s in sites:
        if plan.weight_at(s):
            r = plan.directions[s.component][s.layer].float()
            k, c = inputs.harmful_last[s.module], inputs.harmless_moment[s.module]
            shrunk = c + lam * c.diagonal().mean() * torch.eye(c.shape[0])
            ck = torch.cholesky_solve(k[:, None], torch.linalg.cholesky(shrunk))[:, 0]
            rows[s.module] = ck * ((r @ s.module.weight.float() @ k) / (k @ ck))
    return rows


def masked_rows(sites, plan, inputs: Inputs, keep: float) -> dict:
    """Per edited site, ablation's u = W^T r restricted to the input features that write the most
    refusal along r per unit of harmless cost: feature j writes (k_j - g_j) c_j more along r for the
    harmful prompts than for the harmless (c = W^T r, g the harmless last-position mean) and costs
    about c_j^2 E[a_j^2] (its harmless write along r, squared); the `keep` share of features with the
    largest positive ratio (k_j - g_j) c_j / (c_j^2 E[a_j^2]) is kept."""
    rows = {}
    for s in sites:
        if plan.weight_at(s):
            c = s.module.weight.float().T @ plan.directions[s.component][s.layer].float()
            delta = inputs.harmful_last[s.module] - inputs.harmless_last[s.module]
            ratio = delta * c / (c.square() * inputs.harmless_moment[s.module].diagonal()).clamp_min(1e-12)
            chosen = ratio.topk(max(1, round(keep * len(c)))).indices
            mask = torch.zeros_like(c)
            mask[chosen] = (ratio[chosen] > 0).float()
            rows[s.module] = c * mask
    return rows


def rank_one_hooks(sites, plan, rows: dict):
    """Forward hooks y <- y - w r (u^T a), u per site from `rows`."""
    handles = []
    for s in sites:
        if s.module in rows:
            r, u, w = plan.directions[s.component][s.layer].float(), rows[s.module], plan.weight_at(s)

            def hook(_module, inputs, output, r=r, u=u, w=w):
                return output - w * (inputs[0].float() @ u).unsqueeze(-1) * r

            handles.append(s.module.register_forward_hook(hook))
    return handles


def main() -> None:
    p = arguments([0.5, 0.7, 1.0, 1.5], kernels=["p.75 f.25", "p.6 f.45"])
    p.add_argument("--rho", type=float, default=0.9)
    p.add_argument("--lambdas", type=float, nargs="*", default=[0.01, 0.1, 1.0, 100.0])
    p.add_argument("--keep", type=float, nargs="*", default=[], help="masked ablation rows: shares of features kept")
    a = p.parse_args()
    sweep = open_sweep(a, "keyed")
    bench, loaded, bs = sweep.bench, sweep.bench.loaded, sweep.bench.batch_size
    sites = [s for s in loaded.discovery.present() if s.is_single_projection]
    inputs = input_moments(loaded, sites, *kept_direction_texts(sweep), bs)
    print(sweep.header)
    print("| kernel | w | edit | refusals | KL |")
    print("|---|---|---|---|---|")
    for kname, w in itertools.product(a.kernels, a.weights):
        plan, _ = build_plan(sweep.params(kname, w, "discriminant", shrinkage=a.rho), bench.stats, projected=1.0)
        ref, kl = sweep.score_plan(plan)
        print(f"| {kname} | {w} | ablation | {ref}/{a.prompts} | {kl:.4f} |", flush=True)
        variants = [(f"keyed, lambda {lam:g}", key_rows(sites, plan, inputs, lam)) for lam in a.lambdas]
        variants += [(f"masked, keep {q:g}", masked_rows(sites, plan, inputs, q)) for q in a.keep]
        for label, rows in variants:
            handles = rank_one_hooks(sites, plan, rows)
            try:
                ref, kl = sweep.score()
            finally:
                for h in handles:
                    h.remove()
            print(f"| {kname} | {w} | {label} | {ref}/{a.prompts} | {kl:.4f} |", flush=True)


if __name__ == "__main__":
    main()
