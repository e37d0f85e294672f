"""`optimizer eval --refusals` on the plain path against the CPU's fast paths (packed linear
weights, the packed prefill), on one finished study: wall time and the stored results of each.

    python benchmarks/eval_speed.py --study NAME --studies-dir DIR [--trials 2] [--limit 32]

The study's front trials (the first `--trials` of them) are scored on `--limit` held-out prompts
per set, plain, then through `cpu_fast_paths`, then plain again with the weights unpacked (so that
a warm-up advantage of the second run shows as a difference between the two plain runs). Each
run's held-out refusals and KL must agree. Last line: machine-readable.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    import torch
    from rich.console import Console

    from optimizer.cpu_linear import unpack_linear_layers
    from optimizer.evaluate import evaluate_refusals
    from optimizer.report import front_trials
    from optimizer.stored import open_study
    from optimizer.trials import load_edited_model
    from optimizer.workbench import FastPaths, cpu_fast_paths

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", required=True)
    parser.add_argument("--studies-dir", required=True)
    parser.add_argument("--trials", type=int, default=2, help="front trials to score (after the original model)")
    parser.add_argument("--limit", type=int, default=32, help="held-out prompts per set")
    args = parser.parse_args()

    quiet = Console(file=io.StringIO())
    stored = open_study(args.study, None, args.studies_dir)
    trials = front_trials(stored.study)[: args.trials]
    edited = load_edited_model(stored, trials[0].number, quiet)

    def timed(paths: FastPaths) -> tuple[float, list[tuple[str, float]]]:
        start = time.perf_counter()
        evaluate_refusals(stored, edited, trials, None, None, args.limit, quiet, paths)
        seconds = time.perf_counter() - start
        fresh = open_study(args.study, None, args.studies_dir).study
        return seconds, [(fresh.trials[t.number].user_attrs["heldout_refusals"],
                          fresh.trials[t.number].user_attrs["heldout_kl_divergence"]) for t in trials]  # fmt: skip

    plain_s, plain = timed(FastPaths())
    paths = cpu_fast_paths(edited.prepared.spec)
    fast_s, fast = timed(paths)
    unpack_linear_layers(edited.prepared.loaded.model)
    again_s, again = timed(FastPaths())
    agree = [p[0] == f[0] and abs(p[1] - f[1]) <= 1e-3 * max(p[1], 1e-6) for p, f in zip(plain, fast)]

    print(f"# {args.study}: {edited.prepared.loaded.source}, {len(trials)} front trials + the original model, "
          f"{args.limit} held-out prompts per set, batch {edited.prepared.batch_size}, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")  # fmt: skip
    print(f"# fast paths: {paths.packed_linears} packed linear weights, packed prefill {paths.packed_prefill}")
    print("| run | wall s | held-out refusals, KL per trial |")
    print("|---|---|---|")
    for label, seconds, result in (("plain", plain_s, plain), ("CPU fast paths", fast_s, fast), ("plain again", again_s, again)):
        print(f"| {label} | {seconds:.1f} | {', '.join(f'{r} {kl:.4f}' for r, kl in result)} |")
    plain_mean = (plain_s + again_s) / 2
    print(f"eval_plain_s={plain_mean:.1f} eval_fast_s={fast_s:.1f} speedup={plain_mean / fast_s:.2f} "
          f"same_results={all(agree)} trials={len(trials)} limit={args.limit}")  # fmt: skip


if __name__ == "__main__":
    main()
