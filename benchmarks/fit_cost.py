"""What the fitted direction (`optimizer.fitting`) loses when its fit is made cheaper.

The fit is `FIT_STEPS` forward and backward passes over the first FIT_PROMPTS direction prompts
per set (harmful, with their target answers, and harmless), once per study: on this CPU the largest
one-time cost of a study with `fitted` among its methods (paid in its first trial of the method,
`workbench.FittedDirection`). Two ways to pay less:
fewer steps (or fewer at a larger learning rate), and fewer prompts per set. Each run here
(`--runs P,STEPS,LR`: the first P harmful and P harmless direction prompts, P <= FIT_PROMPTS, STEPS
Adam steps at learning rate LR, the product's other constants) fits the direction with
`fitting.fitted_direction`, times it, and at each of `--snapshots` steps scores the direction so
far as the sweeps here score an edit: held-out refusals (markers, first `--cap` tokens) and
first-token KL on held-out prompts, the direction at every layer of fixed kernels (`--kernels`,
`--weights`), with its cosine to the first run's final direction and to `--reference` (a study's
cached `fitted_direction.safetensors`, when given).

    python benchmarks/fit_cost.py [--model DIR] --runs 64,30,0.01 32,30,0.01 [--reference FILE]

Last line: `fit_cost model=... runs=...` with each run's seconds and cosine to the first run.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.fixed_kernels import Sweep, arguments, open_sweep
from optimizer import fitting
from optimizer.ablation import AblationPlan
from optimizer.params import build_plan
from optimizer.response_prefix import answer_part
from optimizer.workbench import load_judge


def fitted_plan(sweep: Sweep, kernel: str, weight: float, direction: torch.Tensor) -> AblationPlan:
    """`direction` at every layer `kernel` edits, with its weights (as a trial of the method `fitted`)."""
    return build_plan(sweep.params(kernel, weight, "fitted"), sweep.bench.stats, fitted=direction)[0]


def score_row(sweep: Sweep, a, label: str, direction: torch.Tensor, against: dict[str, torch.Tensor]) -> None:
    cells = []
    for kernel in a.kernels:
        for w in a.weights:
            refusals, kl = sweep.score_plan(fitted_plan(sweep, kernel, w, direction))
            cells.append(f"{refusals}/{a.prompts}, {kl:.4f}")
    cosines = [f"{float(torch.dot(direction, ref)):.4f}" for ref in against.values()]
    print(f"| {label} | {' | '.join(cosines)} | {' | '.join(cells)} |", flush=True)


def fit_run(sweep: Sweep, a, run: str, judge) -> tuple[torch.Tensor, dict[int, torch.Tensor], float]:
    """One run `P,STEPS,LR`: `fitting.fitted_direction` on the first P direction prompts per set, and
    the direction after each of `--snapshots` steps (and the last); the seconds it took."""
    bench = sweep.bench
    texts, prefix = bench.spec.texts, answer_part(bench.spec.settings.response_prefix or "")
    n, steps, lr = int(run.split(",")[0]), int(run.split(",")[1]), float(run.split(",")[2])
    if n > fitting.FIT_PROMPTS:
        raise SystemExit(f"{run}: the fit reads at most FIT_PROMPTS = {fitting.FIT_PROMPTS} prompts per set")
    snaps: dict[int, torch.Tensor] = {}
    first_step: list[float] = []  # when the first step ended: the answers and one step before it

    def keep(step: int, ce: float, kl: float, direction: torch.Tensor) -> None:
        if not first_step:
            first_step.append(time.perf_counter())
        if step + 1 in a.snapshots or step + 1 == steps:
            snaps[step + 1] = direction.clone()
            print(f"# {run}: step {step + 1} CE {ce:.4f} KL {kl:.5f}", flush=True)

    start = time.perf_counter()
    harmful = (texts.direction_harmful[:n], texts.direction_prompts[0][:n])
    fit = fitting.fitted_direction(
        bench.loaded, bench.hooks, bench.stats, harmful, texts.direction_harmless[:n], judge, bench.batch_size, prefix,
        keep, steps, lr,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    if not fit.targets:
        raise SystemExit(f"{run}: the start edit leaves every harmful direction prompt refused; nothing to fit towards")
    per_step = (start + seconds - first_step[0]) / max(steps - 1, 1)
    print(f"# {run}: {fit.targets} targets of {fit.prompts}; {seconds:.0f} s, {per_step:.1f} s a step after the first")
    return fit.direction, snaps, seconds


def main() -> None:
    p = arguments([0.7, 1.0], kernels=["p.6 f.45", "p.5 f1"])
    p.add_argument("--runs", nargs="+", default=["64,30,0.01"], help="P,STEPS,LR: prompts per set, Adam steps, learning rate")
    p.add_argument("--snapshots", type=int, nargs="+", default=[5, 10, 15, 20, 30], help="steps after which to score")
    p.add_argument("--reference", type=Path, help="a study's cached fitted_direction.safetensors, to compare with")
    a = p.parse_args()
    sweep = open_sweep(a, "fitcost")
    texts = sweep.bench.spec.texts
    judge = load_judge(sweep.bench.spec.settings, sweep.bench.loaded)
    against: dict[str, torch.Tensor] = {}
    if a.reference:
        against["reference"] = load_file(a.reference)["direction"].float()
    print(sweep.header + f"; {len(texts.direction_harmful)} + {len(texts.direction_harmless)} direction prompts")
    summary = []
    for run in a.runs:
        final, snaps, seconds = fit_run(sweep, a, run, judge)
        against.setdefault("first run", final)
        cols = " | ".join(f"cos to {k}" for k in against)
        kcols = " | ".join(f"{k} w {w}" for k in a.kernels for w in a.weights)
        print(f"| {run} after step | {cols} | {kcols} |")
        print("|---" * (1 + len(against) + len(a.kernels) * len(a.weights)) + "|")
        for step, direction in sorted(snaps.items()):
            score_row(sweep, a, f"{run} @{step}", direction, against)
        summary.append(f"{run}:{seconds:.0f}s:cos{float(torch.dot(final, against['first run'])):.4f}")
    if a.reference:
        score_row(sweep, a, "reference", against["reference"], against)
    print(f"fit_cost model={Path(a.model).name} runs={' '.join(summary)}")


if __name__ == "__main__":
    main()
