"""What the extra directions of a refusal subspace add: each front trial with k > 1, scored again
with its first direction only (issue 15).

    python benchmarks/subspace_ablation.py --study NAME --studies-dir DIR [--cache-dir DIR]

For every Pareto-front trial of the study that ablates a subspace (k > 1), the same parameters are
scored twice on the study's own scoring prompts, model, judge and cache: with all k directions, and
with k = 1 (the same first direction and layer weights, the k - 1 contrastive components dropped).
Every generation runs to the end (no early stop), so both counts are exact. Also printed: how much
of the harmful-harmless mean difference each extra component carries (|cos(r_i, mean diff)| at
the trial's peak attention layer), since components orthogonal to r_1 can only add what the mean
difference does not already hold. Last line: `subspace_ablation trials=<n> dominated_without_extra=<a>
better_without_extra=<b>`.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import sys
from pathlib import Path

import torch
from rich.console import Console

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from optimizer.params import build_plan, replay_params
from optimizer.report import front_trials
from optimizer.stored import open_study
from optimizer.workbench import prepare_scoring, resolve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", required=True)
    parser.add_argument("--studies-dir", default="studies")
    parser.add_argument("--cache-dir", help="the study's cache folder (default: the study's own)")
    args = parser.parse_args()
    stored = open_study(args.study, None, args.studies_dir)
    settings = stored.settings
    if args.cache_dir:
        settings = dataclasses.replace(settings, cache_dir=args.cache_dir)
    trials = [t for t in front_trials(stored.study) if t.params.get("subspace_k", 1) > 1]
    if not trials:
        raise SystemExit(f"no front trial of {args.study!r} ablates a subspace (k > 1)")
    scorer = prepare_scoring(resolve(settings, Console(file=io.StringIO())), settings.cache_path())
    stats, n_layers = scorer.prepared.stats, scorer.spec.loaded.n_layers
    n = len(scorer.baseline_refusals.refused)
    print(f"# study {args.study}: {len(trials)} front trials with k > 1; {n} scoring prompts, every answer generated to the end")
    print(
        "| trial | k, alpha, gamma | recorded (refusals, KL) | all k directions | first direction only "
        "| |cos(r_i, mean diff)| i = 2..k |"
    )
    print("|---|---|---|---|---|---|")
    dominated = better = 0
    for t in trials:
        params = replay_params(t.params, n_layers, settings)
        full, _ = build_plan(params, stats, settings.projected_directions)
        first, _ = build_plan(dataclasses.replace(params, k=1, gamma=None), stats, settings.projected_directions)
        scores = [scorer.score(plan) for plan in (full, first)]
        (rf, kf), (r1, k1) = [(s.refusals, s.kl) for s in scores]
        dominated += int(rf <= r1 and kf <= k1 and (rf, kf) != (r1, k1))
        better += int(r1 <= rf and k1 <= kf and (rf, kf) != (r1, k1))
        layer = min(n_layers - 1, round(params.kernels["attn"].peak_layer))
        assert full.extra is not None
        mean_diff = torch.nn.functional.normalize(stats.mean_diff[layer], dim=0)
        cosines = ", ".join(f"{abs(float(v @ mean_diff)):.3f}" for v in full.extra["attn"][layer])
        recorded = f"{t.user_attrs.get('refusals')}, {t.values[1]:.4f}"
        print(
            f"| {t.number} | {params.k}, {params.alpha:.2f}, {params.gamma:.2f} | {recorded} "
            f"| {rf}/{n}, {kf:.4f} | {r1}/{n}, {k1:.4f} | {cosines} (layer {layer}) |",
            flush=True,
        )
    print(f"subspace_ablation trials={len(trials)} dominated_without_extra={dominated} better_without_extra={better}")


if __name__ == "__main__":
    main()
