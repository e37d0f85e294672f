"""Refusal/KL trade-off on held-out prompts: ours (alpha tuned), ours restricted to mean-diff, heretic 1.4.

    python benchmarks/quality.py [--model DIR] [--trials 60] [--seeds 0 1 2] [--scoring-prompts 16]
                                 [--direction-prompts 64] [--max-new-tokens 12] [--heldout-prompts 32]

Three studies per seed with the same budget, scoring prompts, response cap and markers; every
Pareto-front trial of each is then scored on the bundled held-out splits, which no study reads.
Prints a table, writes benchmarks/quality.png, and ends with one machine-readable line.
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

from benchmarks.heretic_runner import DEFAULT_VENV, ensure_heretic_venv, run_heretic  # noqa: E402
from optimizer.config import DEFAULT_REFUSAL_MARKERS  # noqa: E402
from optimizer.prompts import bundled_path, load_prompts, split_prompts  # noqa: E402

KL_LIMITS = (0.1, 0.3, 1.0)
KL_REFERENCE = 1.0


def hypervolume(points: list[tuple[float, float]], reference: tuple[float, float]) -> float:
    """Area dominated by (refusal rate, KL) points, both minimised, up to `reference`."""
    inside = sorted(p for p in points if p[0] < reference[0] and p[1] < reference[1])
    area, best_kl = 0.0, reference[1]
    for i, (rate, kl) in enumerate(inside):
        best_kl = min(best_kl, kl)
        next_rate = inside[i + 1][0] if i + 1 < len(inside) else reference[0]
        area += (next_rate - rate) * (reference[1] - best_kl)
    return area


def run(command: list[str]) -> str:
    result = subprocess.run([sys.executable, "-m", "optimizer", *command], capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"`optimizer {' '.join(command[:3])}` failed:\n{result.stderr[-3000:]}")
    return result.stderr


def ours(name: str, workdir: Path, args, seed: int, extra: list[str]) -> dict:
    import optuna

    studies = workdir / "studies"
    common = ["--study", name, "--studies-dir", str(studies)]
    start = time.perf_counter()
    run(["run", "--model", str(args.model), *common, "--trials", str(args.trials), "--seed", str(seed),
         "--startup-trials", str(args.startup_trials), "--scoring-prompts", str(args.scoring_prompts),
         "--direction-prompts", str(args.direction_prompts), "--max-new-tokens", str(args.max_new_tokens), *extra])
    wall = time.perf_counter() - start
    run(["eval", *common, "--pareto", "--refusals", "--limit", str(args.heldout_prompts)])
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{studies}/{name}.db")
    n = args.heldout_prompts
    front = []
    for t in study.best_trials:
        if t.user_attrs.get("baseline"):
            continue
        k = int(t.user_attrs["heldout_refusals"].split("/")[0])
        front.append({"number": t.number, "rate": k / n, "kl": t.user_attrs["heldout_kl_divergence"], "params": t.params,
                      "alpha": t.user_attrs.get("alpha"), "direction": t.user_attrs.get("direction")})
    base = int(study.user_attrs["heldout_baseline_refusals"].split("/")[0]) / n
    return {"front": front, "baseline_rate": base, "wall_s": wall}


def heretic(workdir: Path, args, seed: int, heldout: tuple[Path, Path]) -> dict:
    python = ensure_heretic_venv(DEFAULT_VENV)
    start = time.perf_counter()
    result = run_heretic(
        python, args.model, bundled_path("harmful"), bundled_path("harmless"), n_direction=args.direction_prompts,
        n_scoring=args.scoring_prompts, max_response_tokens=args.max_new_tokens, n_trials=args.trials,
        workdir=workdir, timeout_s=6 * 3600, batch_size=args.batch_size, refusal_markers=list(DEFAULT_REFUSAL_MARKERS),
        n_startup_trials=args.startup_trials, seed=seed, heldout_harmful=heldout[0], heldout_harmless=heldout[1],
    )
    if result["returncode"] != 0 or not result.get("heldout"):
        raise SystemExit(f"heretic failed ({result['status']}); see {result['log_path']}")
    h = result["heldout"]
    front = [{"number": t["number"], "rate": t["refusals"] / h["n_harmful"], "kl": t["kl"], "params": t.get("params")} for t in h["trials"]]
    return {"front": front, "baseline_rate": h["baseline_refusals"] / h["n_harmful"], "wall_s": time.perf_counter() - start}


def summarise(result: dict, reference_rate: float) -> dict:
    points = [(p["rate"], p["kl"]) for p in result["front"]]
    best = {limit: min((r for r, kl in points if kl <= limit), default=None) for limit in KL_LIMITS}
    return {"hv": hypervolume(points, (reference_rate, KL_REFERENCE)), "best": best}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (label, runs), marker in zip(results.items(), "osd"):
        points = [(p["rate"], p["kl"]) for run_ in runs for p in run_["front"]]
        ax.scatter([p[0] for p in points], [p[1] for p in points], label=label, marker=marker, alpha=0.75)
    ax.set_xlabel("held-out refusal rate")
    ax.set_ylabel("held-out KL divergence")
    ax.set_yscale("symlog", linthresh=0.01)
    ax.axhline(KL_REFERENCE, color="grey", lw=0.5)
    ax.legend()
    ax.set_title("Pareto-front trials scored on held-out prompts")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--startup-trials", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--scoring-prompts", type=int, default=16)
    parser.add_argument("--direction-prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--heldout-prompts", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16, help="heretic's (ours measures its own)")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--skip-heretic", action="store_true")
    args = parser.parse_args()
    if args.model is None:
        from optimizer.fetch import ensure_model_folder

        args.model = ensure_model_folder()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="quality-"))
    workdir.mkdir(parents=True, exist_ok=True)
    heldout_files = []
    for kind in ("harmful", "harmless"):
        path = workdir / f"heldout_{kind}.txt"
        path.write_text("\n".join(split_prompts(load_prompts(None, kind)).heldout[: args.heldout_prompts]) + "\n")
        heldout_files.append(path)

    results: dict[str, list[dict]] = {"ours (alpha tuned)": [], "ours, mean-diff only": [], "heretic 1.4": []}
    for seed in args.seeds:
        results["ours (alpha tuned)"].append(ours(f"q-ours-{seed}", workdir, args, seed, []))
        results["ours, mean-diff only"].append(ours(f"q-md-{seed}", workdir, args, seed, ["--direction-methods", "mean_diff"]))
        if not args.skip_heretic:
            results["heretic 1.4"].append(heretic(workdir / f"heretic-{seed}", args, seed, tuple(heldout_files)))
    results = {k: v for k, v in results.items() if v}
    (workdir / "quality.json").write_text(json.dumps(results, indent=1, default=str))

    reference_rate = statistics.mean(r["baseline_rate"] for r in results["ours (alpha tuned)"])
    print(f"# {args.model.name}, cpu, {args.trials} trials per study ({args.startup_trials} random), seeds {args.seeds}, "
          f"{args.scoring_prompts} scoring prompts per set, {args.max_new_tokens} new tokens; held-out: {args.heldout_prompts} prompts "
          f"per set; hypervolume reference (refusal rate {reference_rate:.3f}, KL {KL_REFERENCE})")
    print("| approach | held-out HV (mean ± spread) | best refusal rate at KL <= 0.1 | <= 0.3 | <= 1.0 | front size | wall s per study |")
    print("|---|---|---|---|---|---|---|")
    hv_means = {}
    for label, runs in results.items():
        summaries = [summarise(r, reference_rate) for r in runs]
        hvs = [s["hv"] for s in summaries]
        hv_means[label] = statistics.mean(hvs)
        spread = (max(hvs) - min(hvs)) / 2 if len(hvs) > 1 else 0.0
        best = ["/".join("-" if s["best"][limit] is None else f"{s['best'][limit]:.3f}" for s in summaries) for limit in KL_LIMITS]
        fronts = "/".join(str(len(r["front"])) for r in runs)
        wall = statistics.mean(r["wall_s"] for r in runs)
        print(f"| {label} | {hv_means[label]:.4f} ± {spread:.4f} | {best[0]} | {best[1]} | {best[2]} | {fronts} | {wall:.0f} |")
    alphas = sorted(p["alpha"] for r in results["ours (alpha tuned)"] for p in r["front"] if p.get("alpha") is not None)
    methods = [p["direction"] for r in results["ours (alpha tuned)"] for p in r["front"]]
    print(f"# ours (alpha tuned): front directions {methods}; alphas of cPCA front trials {[round(a, 2) for a in alphas]}")
    plot(results, ROOT / "benchmarks" / "quality.png")
    print(f"# plot: benchmarks/quality.png; raw: {workdir}")
    print(f"hv_ours={hv_means.get('ours (alpha tuned)', 0):.4f} hv_meandiff={hv_means.get('ours, mean-diff only', 0):.4f} "
          f"hv_heretic={hv_means.get('heretic 1.4', float('nan')):.4f} trials={args.trials} device=cpu")


if __name__ == "__main__":
    main()
