"""Shrinkage-LDA directions against the mean difference, at fixed kernels and a sweep of weights.

Ablating a unit direction v moves every harmless activation x by w v (v^T x): the KL an edit costs
grows with how much harmless text varies along v, the refusals it removes with how far the harmful
mean sits from the harmless one along v. The mean difference r ignores the first. Fisher's linear
discriminant v ~ Sigma_w^-1 r (Sigma_w the within-set covariance, harmful about its own mean plus
harmless about its own) is the direction along which the sets are furthest apart in units of that
variation. With 64 prompts per set Sigma_w is rank-deficient, so it is shrunk towards a multiple of
the identity: Sigma_rho = (1 - rho) Sigma_w + rho (tr Sigma_w / d) I; rho = 1 is the mean difference.
Everything lives in the cached low-rank basis Q (r = Q c, Sigma_w = Q (K_b - c c^T + K_g) Q^T), so a
direction costs one m x m solve (`optimizer.directions.discriminant_directions`, which trials use too).
Per-layer directions; refusals on held-out prompts by the default
markers, KL of the first token on held-out harmless prompts.

    python benchmarks/lda_sweep.py [--model DIR] [--prompts 64] [--weights W ...] [--rhos R ...] [--kernels NAME ...]
        [--projected] [--no-mean-diff]
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.fixed_kernels import arguments, open_sweep
from optimizer.directions import discriminant_directions
from optimizer.params import build_plan


def main() -> None:
    p = arguments([0.35, 0.5, 0.7, 0.9, 1.2], kernels=["p.75 f.25"])
    p.add_argument("--rhos", type=float, nargs="+", default=[0.5, 0.1, 0.01])
    p.add_argument("--projected", action="store_true", help="also each direction with its harmless-mean part removed")
    p.add_argument("--no-mean-diff", action="store_true", help="leave out the mean-difference rows")
    a = p.parse_args()
    sweep = open_sweep(a, "lda")
    bench = sweep.bench
    stats = bench.stats.to("cpu")
    unit_r = torch.nn.functional.normalize(stats.mean_diff, dim=-1)
    print(sweep.header)
    for rho in a.rhos:
        cosines = (discriminant_directions(stats, rho) * unit_r).sum(-1).tolist()
        print(f"# rho {rho}: cos with r per layer " + " ".join(f"{x:.2f}" for x in cosines))
    print("| kernel | w | direction | refusals | KL |")
    print("|---|---|---|---|---|")
    rows = [] if a.no_mean_diff else [("mean-diff", "mean_diff", None)]
    rows += [(f"lda rho {r}", "discriminant", r) for r in a.rhos]
    projections = [False, True] if a.projected else [False]
    for kname, w, (name, method, rho), projected, ratio in itertools.product(
        a.kernels, a.weights, rows, projections, a.mlp_ratios
    ):
        plan, _ = build_plan(sweep.params(kname, w, method, shrinkage=rho, mlp_ratio=ratio), bench.stats, projected=projected)
        ref, kl = sweep.score_plan(plan)
        label = f"{name}, projected" if projected else name
        label += f", MLP x {ratio:g}" if len(a.mlp_ratios) > 1 else ""
        print(f"| {kname} | {w} | {label} | {ref}/{a.prompts} | {kl:.4f} |", flush=True)


if __name__ == "__main__":
    main()
