"""Does the long-answer verification rank a study's front as the search did?

    python benchmarks/verify_rank.py --study S [--studies-dir DIR]

Reads a study whose front was verified (`run` does it at the end, or `python -m optimizer
verify --pareto`) and prints, for each verified trial, its search refusals (short answers on the
scoring prompts, by the study's judge) and its verified refused + broken (long answers on held-out
prompts), the rank of each, and how many trials change rank. Last line machine-readable.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import optuna


def ranks(values: list[float]) -> list[int]:
    """Competition ranks (1 = best = lowest; ties share the lower rank)."""
    return [1 + sum(other < value for other in values) for value in values]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", required=True)
    parser.add_argument("--studies-dir", default="studies")
    args = parser.parse_args()
    study = optuna.load_study(study_name=args.study, storage=f"sqlite:///{args.studies_dir}/{args.study}.db")
    trials = sorted((t for t in study.trials if "verify" in t.user_attrs), key=lambda t: t.number)
    if not trials:
        raise SystemExit(f"no verified trials in study {args.study!r}; run `python -m optimizer verify --pareto` first")
    search = [t.values[0] for t in trials]
    verified = [t.user_attrs["verify"]["counts"]["refused"] + t.user_attrs["verify"]["counts"]["broken"] for t in trials]
    by_search, by_verify = ranks(search), ranks([float(v) for v in verified])
    print("| trial | search refusals | search KL | verified refused+broken | held-out KL | rank (search) | rank (verified) |")
    print("|---|---|---|---|---|---|---|")
    for t, v, a, b in zip(trials, verified, by_search, by_verify):
        n, kl = t.user_attrs["verify"]["n_harmful"], t.user_attrs["verify"]["kl"]
        print(f"| {t.number} | {t.user_attrs.get('refusals')} | {t.values[1]:.4f} | {v}/{n} | {kl:.4f} | {a} | {b} |")
    moved = sum(a != b for a, b in zip(by_search, by_verify))
    swapped = sum(
        (search[i] - search[j]) * (verified[i] - verified[j]) < 0 for i in range(len(trials)) for j in range(i + 1, len(trials))
    )
    pairs = len(trials) * (len(trials) - 1) // 2
    # on the verified scores (refused + broken, held-out KL), which trials does another one dominate?
    points = [(v, t.user_attrs["verify"]["kl"]) for t, v in zip(trials, verified)]
    dominated = [
        t.number for t, p in zip(trials, points)
        if any(q[0] <= p[0] and q[1] <= p[1] and q != p for q in points)
    ]  # fmt: skip
    recommended = study.user_attrs.get("recommended_trial")
    print(f"{moved} of {len(trials)} trials change rank; {swapped} of {pairs} pairs are ordered the other way round; "
          f"dominated on the verified scores: {dominated or 'none'}; recommended trial {recommended}")  # fmt: skip
    print(f"rank_changes={moved} swapped_pairs={swapped} pairs={pairs} dominated_when_verified={len(dominated)} "
          f"verified={len(trials)} recommended={recommended}")  # fmt: skip


if __name__ == "__main__":
    main()
