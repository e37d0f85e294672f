"""Seeded starts and refusal subspaces at equal trial budgets: hypervolume after N trials (issue 15).

    python benchmarks/search_variants.py [--model DIR] [--trials 40] [--seeds 0 1] [--at 10 20 30 40]
                                         [--scoring-prompts 32] [--direction-prompts 64] [--max-new-tokens 16]
                                         [--variants default no-seeds one-direction] [--workdir DIR]

Each variant runs one study per seed, as a user would (`python -m optimizer run`, the run's own
defaults otherwise, no verification), on the same prompts, cap and judge. The studies share one
cache folder, so the residuals are computed once. For each study, in trial-number order, the
hypervolume of the (refusal rate, KL) points on the scoring prompts after the first N trials
(the unedited baseline trial included; it adds no area), with the reference (the unedited
model's refusal rate, KL 1). Trials stopped early count with their recorded values, a lower
bound that never puts them on the front (optimizer/front.py), as the study itself counts them.
Then, for the front of each study: how many of its trials are seeded starts, refusal subspaces
(k > 1), contrastive directions, and the k, alpha and gamma they used.

Variants (flags added to `run`):
  default        the run's defaults (seeded starts, subspaces up to --subspace-max 4)
  no-seeds       --no-seeded-starts
  one-direction  --subspace-max 1 --no-seeded-starts (the search space before issue 15)
  one-seeded     --subspace-max 1

Last line: `search_variants trials=<n> seeds=<s> hv_<variant>_<N>=<mean> ...`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.quality import hypervolume

VARIANTS = {
    "default": [],
    "no-seeds": ["--no-seeded-starts"],
    "one-direction": ["--subspace-max", "1", "--no-seeded-starts"],
    "one-seeded": ["--subspace-max", "1"],
}
KL_REFERENCE = 1.0


def run_study(name: str, flags: list[str], seed: int, args: argparse.Namespace) -> dict:
    import optuna
    from optuna.trial import TrialState

    studies = args.workdir / "studies"
    command = [
        sys.executable, "-m", "optimizer", "run", "--study", name, "--studies-dir", str(studies),
        "--cache-dir", str(args.workdir / "cache"), "--trials", str(args.trials), "--seed", str(seed),
        "--scoring-prompts", str(args.scoring_prompts), "--direction-prompts", str(args.direction_prompts),
        "--max-new-tokens", str(args.max_new_tokens), "--no-verify", *flags,
    ]  # fmt: skip
    if args.model:
        command += ["--model", str(args.model)]
    start = time.perf_counter()
    log = args.workdir / f"{name}.log"
    with open(log, "w") as out:
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        result = subprocess.run(command, check=False, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"{name} failed (rc {result.returncode}); see {log}:\n{log.read_text()[-3000:]}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{studies}/{name}.db")
    trials = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number)
    baseline = next(t for t in trials if t.user_attrs.get("baseline"))
    reference = (baseline.values[0], KL_REFERENCE)
    hv = {n: hypervolume([tuple(t.values) for t in trials[:n]], reference) for n in args.at}
    front = [t for t in study.best_trials if not t.user_attrs.get("baseline")]
    return {
        "hv": hv,
        "wall_s": round(time.perf_counter() - start, 1),
        "baseline_rate": reference[0],
        "front": [
            {"number": t.number, "values": t.values, "seeded": t.user_attrs.get("seeded"), "params": t.params} for t in front
        ],
    }


def describe(front: list[dict]) -> str:
    seeded = sum(1 for t in front if t["seeded"])
    subspace = [t for t in front if t["params"].get("subspace_k", 1) > 1]
    contrastive = [t for t in front if t["params"].get("direction_method", "contrastive") == "contrastive"]
    detail = ", ".join(
        f"#{t['number']} k={t['params']['subspace_k']} a={t['params'].get('alpha', 0):.2f} g={t['params']['subspace_gamma']:.2f}"
        for t in subspace
    )
    subspaces = f"{len(subspace)} k>1" + (f" ({detail})" if detail else "")
    return f"{len(front)} trials: {seeded} seeded, {subspaces}, {len(contrastive)} contrastive"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="model folder (default: the bundled default model)")
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--at", type=int, nargs="+", default=[10, 20, 30, 40], help="trial counts to report")
    parser.add_argument("--scoring-prompts", type=int, default=32)
    parser.add_argument("--direction-prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--variants", nargs="+", default=["default", "no-seeds", "one-direction"], choices=list(VARIANTS))
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    args.at = [n for n in args.at if n <= args.trials]
    args.workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="search-variants-"))).resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = {}
    for seed in args.seeds:  # seeds outermost: a cut-short run still compares every variant on its seeds
        for variant in args.variants:
            result = run_study(f"{variant}-{seed}", VARIANTS[variant], seed, args)
            results.setdefault(variant, []).append(result)
            print(
                f"# {variant} seed {seed}: "
                + ", ".join(f"HV@{n} {v:.4f}" for n, v in result["hv"].items())
                + f"; {result['wall_s']:.0f} s; front {describe(result['front'])}",
                flush=True,
            )
            (args.workdir / "search_variants.json").write_text(json.dumps(results, indent=1))

    print(
        f"\n# {args.trials} trials per study, seeds {args.seeds}; {args.scoring_prompts} scoring and {args.direction_prompts} "
        f"direction prompts per set, {args.max_new_tokens} new tokens; hypervolume on the scoring prompts, reference "
        f"(unedited refusal rate, KL {KL_REFERENCE}); mean (min-max over seeds)"
    )
    print("| variant | " + " | ".join(f"HV after {n}" for n in args.at) + " | front |")
    print("|---|" + "---|" * (len(args.at) + 1))
    summary = []
    for variant, runs in results.items():
        cells = []
        for n in args.at:
            values = [r["hv"][n] for r in runs]
            cells.append(f"{statistics.mean(values):.4f} ({min(values):.4f}-{max(values):.4f})")
            summary.append(f"hv_{variant.replace('-', '_')}_{n}={statistics.mean(values):.4f}")
        fronts = "; ".join(describe(r["front"]) for r in runs)
        print(f"| {variant} | " + " | ".join(cells) + f" | {fronts} |")
    print(f"# raw: {args.workdir}/search_variants.json, logs and studies there")
    print(f"search_variants trials={args.trials} seeds={len(args.seeds)} " + " ".join(summary))


if __name__ == "__main__":
    main()
