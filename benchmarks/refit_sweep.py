"""Directions refitted layer by layer on the edited model, against the unedited model's, at fixed kernels.

Every direction of a study comes from the unedited model's residuals. But an edit at layer j < l
changes what reaches layer l: where the early layers have already removed part of the refusal
signal, layer l's unedited direction still points at the whole of it, and ablating that direction
there removes little more refusal while it still moves every harmless activation by w v (v^T x).
Refitting asks instead which direction separates the sets *after* the edits upstream: layer l's
direction from the residuals of the model with layers < l already edited, in order from the first
edited layer to the last (one residual pass per edited layer here; a study would need one per
trial, since the directions then depend on the kernel).

Same model, prompts, statistics filter (the refused harmful and answered harmless direction
prompts, judged as the study judges them) and direction rule (the shrinkage discriminant, with
the harmless-mean part removed when `--projected`) on both rows; only the residuals the directions
come from differ. The first refitted layer sees no edit, so its direction must equal the study's:
checked before the sweep.

    python benchmarks/refit_sweep.py [--rho 0.9] [--projected] [--weights W ...] [--kernels NAME ...]
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.fixed_kernels import arguments, kept_direction_texts, open_sweep
from optimizer.ablation import AblationPlan
from optimizer.directions import compute_stats, discriminant_directions, project_out_harmless_mean
from optimizer.params import build_plan
from optimizer.residuals import collect_residuals, layer_residuals


def direction_at(sweep, kept, layer: int, rho: float, projected: bool) -> torch.Tensor:
    """Layer `layer`'s discriminant direction from the residuals of the model as it is now hooked."""
    loaded, bs = sweep.bench.loaded, sweep.bench.batch_size
    harmful, harmless = (layer_residuals(collect_residuals(loaded, t, bs), False)[layer : layer + 1] for t in kept)
    stats = compute_stats(harmful, harmless)
    v = discriminant_directions(stats, rho)
    return project_out_harmless_mean(stats, v, [0]) if projected else v


def main() -> None:
    p = arguments([0.5, 0.7, 1.0], kernels=["p.75 f.25", "p.6 f.45"])
    p.add_argument("--rho", type=float, default=0.9)
    p.add_argument("--projected", action="store_true")
    a = p.parse_args()
    sweep = open_sweep(a, "refit")
    bench = sweep.bench
    kept = kept_direction_texts(sweep)
    print(sweep.header + f"; direction prompts kept {len(kept[0])} harmful, {len(kept[1])} harmless")
    print("| kernel | w | directions | refusals | KL |")
    print("|---|---|---|---|---|")
    for kname, w in itertools.product(a.kernels, a.weights):
        params = sweep.params(kname, w, "discriminant", shrinkage=a.rho)
        plan, _ = build_plan(params, bench.stats, projected=float(a.projected))
        ref, kl = sweep.score_plan(plan)
        print(f"| {kname} | {w} | unedited model's | {ref}/{a.prompts} | {kl:.4f} |", flush=True)
        edited = sorted({i for ws in plan.weights.values() for i, x in enumerate(ws) if x})
        study_directions = plan.directions["attn"]
        refit = study_directions.clone()
        for layer in edited:
            upstream = {c: [x if i < layer else 0.0 for i, x in enumerate(ws)] for c, ws in plan.weights.items()}
            with sweep.hooked(AblationPlan({c: refit for c in plan.directions}, upstream)):
                refit[layer] = direction_at(sweep, kept, layer, a.rho, a.projected)
            if layer == edited[0]:  # nothing upstream is edited: the study's direction
                cos = float(refit[layer] @ study_directions[layer])
                assert cos > 0.999, f"the first refitted direction is not the study's (cosine {cos:.4f})"
        plan = AblationPlan({c: refit for c in plan.directions}, plan.weights)
        ref, kl = sweep.score_plan(plan)
        print(f"| {kname} | {w} | refitted | {ref}/{a.prompts} | {kl:.4f} |", flush=True)


if __name__ == "__main__":
    main()
