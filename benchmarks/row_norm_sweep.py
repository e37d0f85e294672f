"""Heretic's row-normalised edit against our exact projection, at fixed kernels and a sweep of weights.

Heretic 1.4 edits each output projection W (d_out x d_in) with `row_normalization = "full"`: it
normalises W's rows (one per output dimension) to unit length, removes w v (v^T W_n) from the
normalised matrix, normalises the rows again and restores their original norms (then stores a
rank-3 SVD of the change as a LoRA adapter; this script applies the exact matrix instead). As an
edit of the output y = W x that is y <- s * (y - w (D v)(v^T D^-1 y)), D the row norms, s each
row's renormalising factor: an oblique projection and a per-dimension rescale, where ours is
y <- y - w v (v^T y). The question: is heretic's edit a better refusal/KL trade-off on the models
where its fronts lead ours? Both edits share the directions (mean difference per layer, or one
layer's with --global-index) and the kernels; refusals on held-out prompts by the default markers,
KL of the first token on held-out harmless prompts.

    python benchmarks/row_norm_sweep.py [--model DIR] [--prompts 64] [--weights W ...] [--kernels NAME ...] [--global-index L]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.fixed_kernels import arguments, open_sweep
from optimizer.params import build_plan


def rownorm(W: torch.Tensor, v: torch.Tensor, w: float) -> torch.Tensor:
    """Heretic's "full" row normalisation, exactly (its own code keeps a rank-3 SVD of the change)."""
    norms = W.norm(dim=1, keepdim=True)
    Wn = W / norms
    u = v @ Wn
    Wn2 = Wn - w * torch.outer(v, u)
    return Wn2 / Wn2.norm(dim=1, keepdim=True) * norms


def main() -> None:
    p = arguments([0.2, 0.35, 0.5, 0.7, 0.9, 1.2, 1.5])
    p.add_argument("--global-index", type=float, default=None, help="one direction, this (fractional) layer's")
    a = p.parse_args()
    sweep = open_sweep(a, "row-norm")
    bench = sweep.bench
    print(f"{sweep.header}; global index {a.global_index}")
    print("| kernel | w | edit | refusals | KL |")
    print("|---|---|---|---|---|")
    sites = list(bench.loaded.discovery.present())
    for kname in a.kernels:
        for w in a.weights:
            plan, _ = build_plan(sweep.params(kname, w, direction_index=a.global_index), bench.stats)
            for edit in ("exact", "rownorm"):
                saved = {}
                if edit == "exact":
                    bench.hooks.apply(plan)
                else:
                    with torch.no_grad():
                        for site in sites:
                            ww = plan.weight_at(site)
                            if ww == 0:
                                continue
                            v = plan.directions[site.component][site.layer].float()
                            v = v / v.norm()
                            W = site.module.weight
                            saved[site.module] = W.detach().clone()
                            W.copy_(rownorm(W.float(), v, ww).to(W.dtype))
                ref, kl = sweep.score()
                if edit == "exact":
                    bench.hooks.clear()
                else:
                    with torch.no_grad():
                        for m, W in saved.items():
                            m.weight.copy_(W)
                print(f"| {kname} | {w} | {edit} | {ref}/{a.prompts} | {kl:.4f} |", flush=True)


if __name__ == "__main__":
    main()
