"""Seconds a sampler takes to choose one trial of our search space, by how many trials the study holds.

    python benchmarks/sampler_time.py [--trials 60 100 200] [--repeats 3] [--layers 24]

For each sampler (`--sampler tpe` and `gp`, built by `study.make_sampler` as a run builds them) and
each study size N: a study of N finished trials of the real search space (sampled at random, flat,
with synthetic values: refusals falling and KL growing with the peak weights), copied, and one
`ask` + `suggest_params` timed on the copy; the median of `--repeats` (each with its own seed) is
reported. Threads: as torch is set (OMP_NUM_THREADS). Prints a table and, last, a machine-readable
line `sampler_time tpe@N=<s> gp@N=<s> ... device=cpu`.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import numpy as np
import optuna

from optimizer.config import Settings
from optimizer.params import suggest_params
from optimizer.study import make_sampler, samples_flat


def finished_trials(n: int, layers: int, settings: Settings) -> list[optuna.trial.FrozenTrial]:
    rng = np.random.default_rng(0)
    study = optuna.create_study(directions=["minimize"] * 2, sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(n):
        trial = study.ask()
        params = suggest_params(trial, layers, settings, flat=True)
        w = params.kernels["attn"].peak_weight + params.kernels["mlp"].peak_weight
        study.tell(trial, [float(np.clip(1 - w / 2 + 0.1 * rng.normal(), 0, 1)), float(np.exp(2 * w - 3))])
    return study.trials


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, nargs="+", default=[60, 100, 200])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=24)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    results: dict[tuple[str, int], float] = {}
    for n in args.trials:
        done = finished_trials(n, args.layers, Settings(sampler="gp"))  # the same study for both samplers
        for name in ("tpe", "gp"):
            settings = Settings(sampler=name, startup_trials=10)
            times = []
            for seed in range(args.repeats):
                study = optuna.create_study(directions=["minimize"] * 2, sampler=make_sampler(settings, seed=seed))
                study.add_trials(done)
                start = time.perf_counter()
                suggest_params(study.ask(), args.layers, settings, flat=samples_flat(settings))
                times.append(time.perf_counter() - start)
            results[(name, n)] = statistics.median(times)
    print("| finished trials | tpe s per trial | gp s per trial |")
    print("|---|---|---|")
    for n in args.trials:
        print(f"| {n} | {results[('tpe', n)]:.3f} | {results[('gp', n)]:.3f} |")
    print("sampler_time " + " ".join(f"{name}@{n}={s:.3f}" for (name, n), s in results.items()) + " device=cpu")


if __name__ == "__main__":
    main()
