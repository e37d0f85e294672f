"""Refusal/KL trade-off on held-out prompts: our default space, ours with k = 1, ours restricted to
mean-diff, and heretic 1.4, on one or more models.

    python benchmarks/quality.py [--models default second] [--trials 60] [--seeds 0 1 2]
                                 [--variants ours k1 meandiff np heretic] [--scoring-prompts 16]
                                 [--direction-prompts 64] [--max-new-tokens 12] [--heldout-prompts 32]
                                 [--workdir DIR] [--report-only]

Models: `default` (the bundled Qwen2.5-Coder-0.5B-Instruct), `second` (the synthetic refusing
SmolLM2-135M of benchmarks/make_refusing_model.py, built on first use), or a model folder.
Variants, each one study per model and seed with the same budget, scoring prompts, response cap and
markers:

- `ours`: `optimizer run` with its defaults (refusal subspaces up to k = 4, seeded starts, the
  contrastive, discriminant and fitted direction methods, alpha tuned);
- `k1`: the same with `--subspace-max 1` (one direction per layer: the space before subspaces);
- `meandiff`: `--direction-methods mean_diff --subspace-max 1` (no principal component anywhere);
- `np`: the defaults with `--norm-preserving --projected-directions`, the two choices heretic 1.4
  makes by default (row norms kept, directions orthogonal to the harmless mean); not run unless
  named in `--variants`;
- `k1w`: k = 1 with `--min-weight 0.8` (heretic's floor on the peak weight; not run unless named);
- `kf`: the defaults with `--kl-floor 0.01` (heretic's kl_divergence_target; not run unless named);
- `sw`: the defaults with `--separation-weighted` (per-layer edits scaled by each layer's separation
  of the two sets; not run unless named);
- `pl`: the defaults with `--direction-scopes per_layer` (every layer its own direction, the scope of
  heretic's front trials on the second model; the seeded starts reduced to the per-layer one; not run
  unless named);
- `bl`: the defaults with `--blended-directions` (per-layer directions moved towards the best-separated
  layer's where their own layer separates the sets less; not run unless named);
- `plb`: `pl` and `bl` together (not run unless named);
- `pj`: the defaults with `--projected-directions` (each direction made orthogonal to its layer's
  harmless mean; not run unless named);
- `rd`: the defaults with `--refused-directions` (directions from the harmful prompts the unedited
  model refuses and the harmless ones it answers; the same as `ours` since it became the default);
- `ad`: the defaults with `--no-refused-directions` (every direction prompt, as before that);
- `nl`: the defaults with `--normed-last-direction` (the last layer's direction from its output after the
  model's final norm, as transformers' last hidden state and heretic's; not run unless named);
- `plnl`: `pl` and `nl` together (only per-layer edits use the last layer's own direction; not run unless named);
- the later ones (TPE rules `sc`, `o4`, `o5`, `kq`; directions `ds`, `dm`, `dp`, `dq`, `md`; start-up
  trials `s10`, `s30`; statistics `w995`, `w999`, `sw995`; the fitted direction `ft` (now the defaults), `fo`, and
  the defaults before it `cd`; the GP sampler
  `gp`): each described by its label in VARIANTS
  below; not run unless named;
- `heretic`: heretic 1.4 in its own venv (benchmarks/heretic_runner.py), seeded starts off by
  construction (it has none).

Every Pareto-front trial of each study is then scored on the bundled held-out splits, which no
study reads: ours by `optimizer eval --pareto --refusals` (the study's judge and response cap),
heretic's by re-applying the trial through heretic's own code and counting with its own counter at
the same cap and markers. Hypervolume of the held-out (refusal rate, KL) points with one reference per
model: (the unedited model's held-out refusal rate, KL 1.0). Also the best held-out refusal rate at
KL <= 0.1 / 0.3 / 1.0, which k, direction method and alpha our front trials used, and the
hypervolume of every trial on the study's own scoring prompts (what the search saw: a tool can lead
there and trail on held-out prompts, or the reverse).
`--report-only` prints the tables from the results a workdir keeps (studies run apart, gathered
into one `results/` folder) and runs nothing; a missing study is named and left out.

Each study's result is kept as WORKDIR/results/<model>-<variant>-<seed>-<budget>.json and reused when
the script runs again with the same WORKDIR (a finished study is never run twice), so seeds can be
added run by run. The study itself (and heretic's working folder) is named by the same budget, so a
run with another budget (e.g. `--startup-trials 60`, random search) starts its own study instead of
resuming one made with another. Prints a table per model, writes benchmarks/quality.png, and ends with one
machine-readable line.
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
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.heretic_runner import DEFAULT_VENV, ensure_heretic_venv, run_heretic
from optimizer.config import DEFAULT_REFUSAL_MARKERS
from optimizer.prompts import bundled_path, load_prompts, split_prompts

KL_LIMITS = (0.1, 0.3, 1.0)
KL_REFERENCE = 1.0
# variant -> (label, extra `optimizer run` arguments); None: heretic
VARIANTS: dict[str, tuple[str, list[str] | None]] = {
    "ours": ("ours (defaults)", []),
    "kl102": ("ours, KL on 102 harmless prompts (the scoring split's all)", ["--kl-prompts", "102"]),
    "ff3": ("ours, every third trial after start-up fills the front's widest gap", ["--front-fill", "3"]),
    "k1": ("ours, k = 1", ["--subspace-max", "1"]),
    "meandiff": ("ours, mean-diff only", ["--direction-methods", "mean_diff", "--subspace-max", "1", "--no-searched-projection"]),
    "np": ("ours, norm-preserving + projected", ["--norm-preserving", "--projected-directions"]),
    "k1w": ("ours, k = 1, peak weight >= 0.8", ["--subspace-max", "1", "--min-weight", "0.8"]),
    "kf": ("ours, KL floor 0.01", ["--kl-floor", "0.01"]),
    "sw": ("ours, separation-weighted per-layer edits", ["--separation-weighted"]),
    "pl": ("ours, per-layer directions only", ["--direction-scopes", "per_layer"]),
    "bl": ("ours, per-layer directions blended with the best layer's", ["--blended-directions"]),
    "plb": ("ours, per-layer only, blended", ["--direction-scopes", "per_layer", "--blended-directions"]),
    "pj": ("ours, projected directions", ["--projected-directions"]),
    "rd": ("ours, directions from refused harmful prompts (now the default)", ["--refused-directions"]),
    "ad": ("ours, directions from all direction prompts (before --refused-directions)", ["--no-refused-directions"]),
    "nl": ("ours, the last layer's direction after the final norm", ["--normed-last-direction"]),
    "plnl": (
        "ours, per-layer only, the last layer's after the final norm",
        ["--direction-scopes", "per_layer", "--normed-last-direction"],
    ),
    "sc": ("ours, TPE kernel widths by Optuna 4's rule (heretic's)", ["--tpe-bandwidth", "scott"]),
    "o4": ("ours, Optuna 4's TPE rules (heretic's sampler)", ["--tpe-bandwidth", "scott", "--tpe-weights", "hypervolume"]),
    "o5": (
        "ours, Optuna 5's TPE rules (the defaults before Optuna 4's)",
        ["--tpe-bandwidth", "neighbour", "--tpe-weights", "uniform"],
    ),
    "ds": (
        "ours, the discriminant in place of the mean difference",
        ["--direction-methods", "contrastive,discriminant", "--no-searched-projection"],
    ),
    "dm": (
        "ours, the discriminant beside the mean difference",
        ["--direction-methods", "contrastive,mean_diff,discriminant", "--no-searched-projection"],
    ),
    "dp": (
        "ours, the discriminant in place of the mean difference, projected",
        ["--direction-methods", "contrastive,discriminant", "--projected-directions"],
    ),
    "dq": (
        "ours, the discriminant in place of the mean difference, projection searched (the defaults since 2026-11-28)",
        ["--direction-methods", "contrastive,discriminant", "--searched-projection"],
    ),
    "md": (
        "ours, the defaults before 2026-11-28 (contrastive and mean difference, no projection)",
        ["--direction-methods", "contrastive,mean_diff", "--no-searched-projection"],
    ),
    "s10": ("ours, 10 start-up trials (seeded starts and the baseline among them)", ["--startup-trials", "10"]),
    "s30": ("ours, 30 start-up trials (seeded starts and the baseline among them)", ["--startup-trials", "30"]),
    "w995": ("ours, residuals winsorized at the 0.995 quantile (--winsorize 0.995)", ["--winsorize", "0.995"]),
    "w999": ("ours, residuals winsorized at the 0.999 quantile (--winsorize 0.999)", ["--winsorize", "0.999"]),
    "sw995": (
        "ours, each trial choosing residuals as they are or winsorized at the 0.995 quantile (--searched-winsorize 0.995)",
        ["--searched-winsorize", "0.995"],
    ),
    "kq": ("ours, TPE reading KL on a square-root scale (--tpe-kl-scale sqrt)", ["--tpe-kl-scale", "sqrt"]),
    "gp": ("ours, Gaussian-process sampler (--sampler gp)", ["--sampler", "gp"]),
    "ft": (
        "ours, the fitted direction beside the defaults' methods",
        ["--direction-methods", "contrastive,discriminant,fitted"],
    ),
    "fo": ("ours, the fitted direction only", ["--direction-methods", "fitted"]),
    "cd": (
        "ours, contrastive and discriminant (the defaults before the fitted direction joined them)",
        ["--direction-methods", "contrastive,discriminant"],
    ),
    "heretic": ("heretic 1.4", None),
}


def hypervolume(points: list[tuple[float, float]], reference: tuple[float, float]) -> float:
    """Area dominated by (refusal rate, KL) points, both minimised, up to `reference`."""
    inside = sorted(p for p in points if p[0] < reference[0] and p[1] < reference[1])
    area, best_kl = 0.0, reference[1]
    for i, (rate, kl) in enumerate(inside):
        best_kl = min(best_kl, kl)
        next_rate = inside[i + 1][0] if i + 1 < len(inside) else reference[0]
        area += (next_rate - rate) * (reference[1] - best_kl)
    return area


def model_folder(name: str) -> Path:
    if name == "default":
        from optimizer.fetch import ensure_model_folder

        return ensure_model_folder()
    if name == "second":
        from benchmarks.make_refusing_model import refusing_model_folder

        return refusing_model_folder()
    path = Path(name)
    if not (path / "config.json").exists():
        raise SystemExit(f"--models: {name!r} is neither `default`, `second` nor a model folder with a config.json")
    return path


def run(command: list[str]) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "optimizer", *command],
        check=False,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        cwd=ROOT,
    )
    if result.returncode != 0:
        raise SystemExit(f"`optimizer {' '.join(command[:3])}` failed:\n{result.stderr[-3000:]}")
    return result.stderr


def ours(name: str, model: Path, workdir: Path, args, seed: int, extra: list[str]) -> dict:
    import optuna

    studies = workdir / "studies"
    common = ["--study", name, "--studies-dir", str(studies)]
    start = time.perf_counter()
    run(
        [
            "run",
            "--model",
            str(model),
            *common,
            "--trials",
            str(args.trials),
            "--seed",
            str(seed),
            "--startup-trials",
            str(args.startup_trials),
            "--scoring-prompts",
            str(args.scoring_prompts),
            "--direction-prompts",
            str(args.direction_prompts),
            "--max-new-tokens",
            str(args.max_new_tokens),
            "--no-verify",
            *extra,
        ]
    )
    wall = time.perf_counter() - start
    run(["eval", *common, "--pareto", "--refusals", "--limit", str(args.heldout_prompts)])
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{studies}/{name}.db")
    n = args.heldout_prompts
    front = []
    for t in study.best_trials:
        if t.user_attrs.get("baseline"):
            continue
        k = int(t.user_attrs["heldout_refusals"].split("/")[0])
        front.append(
            {
                "number": t.number,
                "rate": k / n,
                "kl": t.user_attrs["heldout_kl_divergence"],
                "params": t.params,
                "alpha": t.user_attrs.get("alpha"),
                "direction": t.user_attrs.get("direction"),
                "k": t.params.get("subspace_k", 1),
                "method": t.params.get("direction_method", "mean_diff"),
                "seeded": t.user_attrs.get("seeded"),
            }
        )
    base = int(study.user_attrs["heldout_baseline_refusals"].split("/")[0]) / n
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    scoring = {
        "baseline_rate": next(t.values[0] for t in done if t.user_attrs.get("baseline")),
        "points": [list(t.values) for t in done if not t.user_attrs.get("baseline")],
    }
    return {"front": front, "baseline_rate": base, "wall_s": wall, "scoring": scoring}


def heretic(model: Path, workdir: Path, args, seed: int, heldout: tuple[Path, Path]) -> dict:
    python = ensure_heretic_venv(DEFAULT_VENV)
    start = time.perf_counter()
    result = run_heretic(
        python,
        model,
        bundled_path("harmful"),
        bundled_path("harmless"),
        n_direction=args.direction_prompts,
        n_scoring=args.scoring_prompts,
        max_response_tokens=args.max_new_tokens,
        n_trials=args.trials,
        workdir=workdir,
        timeout_s=6 * 3600,
        batch_size=args.batch_size,
        refusal_markers=list(DEFAULT_REFUSAL_MARKERS),
        n_startup_trials=args.startup_trials,
        seed=seed,
        heldout_harmful=heldout[0],
        heldout_harmless=heldout[1],
    )
    if result["returncode"] != 0 or not result.get("heldout"):
        raise SystemExit(f"heretic failed ({result['status']}); see {result['log_path']}")
    h = result["heldout"]
    front = [
        {"number": t["number"], "rate": t["refusals"] / h["n_harmful"], "kl": t["kl"], "params": t.get("params")}
        for t in h["trials"]
    ]
    done = [t for t in result["trials"] if t["state"] == "TrialState.COMPLETE" and t["refusals"] is not None]
    scoring = (
        None
        if result["baseline_refusals"] is None or not done
        else {  # None: not found in heretic's output
            "baseline_rate": result["baseline_refusals"] / done[0]["n_bad_prompts"],
            "points": [[t["refusals"] / t["n_bad_prompts"], t["kl_divergence"]] for t in done],
        }
    )
    return {
        "front": front,
        "baseline_rate": h["baseline_refusals"] / h["n_harmful"],
        "wall_s": time.perf_counter() - start,
        "scoring": scoring,
    }


def summarise(result: dict, reference_rate: float) -> dict:
    points = [(p["rate"], p["kl"]) for p in result["front"]]
    best = {limit: min((r for r, kl in points if kl <= limit), default=None) for limit in KL_LIMITS}
    return {"hv": hypervolume(points, (reference_rate, KL_REFERENCE)), "best": best}


def scoring_hv(result: dict) -> float | None:
    """Hypervolume of all the study's trials on its own scoring prompts (reference: the unedited
    model's scoring refusal rate, KL 1): how well the search did on what it saw, apart from how its
    front carries over to held-out prompts. None for a result kept before it was recorded."""
    scoring = result.get("scoring")
    if scoring is None:
        return None
    return hypervolume([tuple(p) for p in scoring["points"]], (scoring["baseline_rate"], KL_REFERENCE))


def composition(runs: list[dict]) -> str:
    """Which k, direction method and alpha our front trials used, over all seeds."""
    front = [p for r in runs for p in r["front"]]
    if not front:
        return "empty front"
    ks = Counter(p["k"] for p in front)
    methods = Counter(p["method"] for p in front)
    alphas = sorted(round(p["alpha"], 2) for p in front if p.get("alpha") is not None)
    seeded = Counter(p["seeded"] for p in front if p.get("seeded"))
    return (
        f"{len(front)} front trials: k "
        + ", ".join(f"{k}: {n}" for k, n in sorted(ks.items()))
        + "; "
        + ", ".join(f"{m}: {n}" for m, n in sorted(methods.items()))
        + f"; alphas {alphas}"
        + (f"; seeded starts {dict(seeded)}" if seeded else "")
    )


def plot(by_model: dict[str, dict[str, list[dict]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(by_model), figsize=(6.5 * len(by_model), 4.5), squeeze=False)
    for ax, (model, results) in zip(axes[0], by_model.items()):
        for (label, runs), marker in zip(results.items(), "osdv^"):
            points = [(p["rate"], p["kl"]) for run_ in runs for p in run_["front"]]
            ax.scatter([p[0] for p in points], [p[1] for p in points], label=label, marker=marker, alpha=0.7)
        ax.set_xlabel("held-out refusal rate")
        ax.set_ylabel("held-out KL divergence")
        ax.set_yscale("symlog", linthresh=0.01)
        ax.axhline(KL_REFERENCE, color="grey", lw=0.5)
        ax.legend()
        ax.set_title(f"{model}: Pareto-front trials on held-out prompts")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def keep(path: Path, result: dict) -> dict:
    """Write a finished study's result where a later run of the script finds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".tmp").write_text(json.dumps(result, indent=1, default=str))
    path.with_suffix(".tmp").replace(path)
    return result


def report(model_name: str, model: Path, results: dict[str, list[dict]], args) -> dict[str, float]:
    reference_rate = statistics.mean(r["baseline_rate"] for r in next(iter(results.values())))
    print(
        f"\n# {model_name} ({model.name}), cpu, {args.trials} trials per study ({args.startup_trials} random), seeds "
        f"{args.seeds}, {args.scoring_prompts} scoring prompts per set, {args.max_new_tokens} new tokens; held-out: "
        f"{args.heldout_prompts} prompts per set; hypervolume reference (refusal rate {reference_rate:.3f}, KL {KL_REFERENCE})"
    )
    print(
        "| approach | held-out HV (mean ± half range) | per seed | best refusal rate at KL <= 0.1 | <= 0.3 | <= 1.0 "
        "| front size | scoring-prompt HV | wall s per study |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    hv_means, best01 = {}, {}
    for variant, runs in results.items():
        summaries = [summarise(r, reference_rate) for r in runs]
        hvs = [s["hv"] for s in summaries]
        hv_means[variant] = statistics.mean(hvs)
        best01[variant] = [s["best"][0.1] for s in summaries]
        spread = (max(hvs) - min(hvs)) / 2
        best = [
            "/".join("-" if s["best"][limit] is None else f"{s['best'][limit]:.3f}" for s in summaries) for limit in KL_LIMITS
        ]
        fronts = "/".join(str(len(r["front"])) for r in runs)
        wall = statistics.mean(r["wall_s"] for r in runs)
        per_seed = "/".join(f"{h:.4f}" for h in hvs)
        seen = "/".join("-" if h is None else f"{h:.4f}" for h in map(scoring_hv, runs))
        print(
            f"| {VARIANTS[variant][0]} | {hv_means[variant]:.4f} ± {spread:.4f} | {per_seed} | {best[0]} | {best[1]} | "
            f"{best[2]} | {fronts} | {seen} | {wall:.0f} |"
        )
    for variant in [v for v in VARIANTS if v != "heretic"]:
        if variant in results:
            print(f"# {VARIANTS[variant][0]}: {composition(results[variant])}")
    if "ours" in hv_means and "heretic" in hv_means and hv_means["heretic"] > 0:
        ratio = hv_means["ours"] / hv_means["heretic"]
        ours01 = [b for b in best01["ours"] if b is not None]
        heretic01 = [b for b in best01["heretic"] if b is not None]
        usable = ours01 and heretic01 and statistics.mean(heretic01) > 0
        rate_ratio = statistics.mean(ours01) / statistics.mean(heretic01) if usable else float("nan")
        print(
            f"# targets: HV ours / heretic = {ratio:.3f} (>= 1.10 wanted); best rate at KL <= 0.1, mean over seeds, "
            f"ours / heretic = {rate_ratio:.3f} (<= 0.70 wanted)"
        )
    return hv_means


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["default"], help="default, second, or model folders")
    parser.add_argument("--variants", nargs="+", default=["ours", "k1", "meandiff", "heretic"], choices=list(VARIANTS))
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--startup-trials", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--scoring-prompts", type=int, default=16)
    parser.add_argument("--direction-prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--heldout-prompts", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16, help="heretic's (ours measures its own)")
    parser.add_argument("--workdir", type=Path, help="studies and results; rerun with the same one to add seeds")
    parser.add_argument("--report-only", action="store_true", help="tables from the workdir's kept results; run nothing")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="quality-"))
    workdir.mkdir(parents=True, exist_ok=True)
    heldout_files = []
    for kind in ("harmful", "harmless"):
        path = workdir / f"heldout_{kind}.txt"
        path.write_text("\n".join(split_prompts(load_prompts(None, kind)).heldout[: args.heldout_prompts]) + "\n")
        heldout_files.append(path)

    def budget(flags: list[str]) -> str:  # a variant's own --startup-trials (s10, s30) names its budget
        startup = flags[flags.index("--startup-trials") + 1] if "--startup-trials" in flags else args.startup_trials
        return (
            f"t{args.trials}-s{startup}-p{args.scoring_prompts}-d{args.direction_prompts}"
            f"-n{args.max_new_tokens}-h{args.heldout_prompts}"
        )

    by_model: dict[str, dict[str, list[dict]]] = {}
    last: list[str] = []
    for model_name in args.models:
        model = model_folder(model_name)
        tag = Path(model_name).name
        results: dict[str, list[dict]] = {v: [] for v in args.variants}
        for seed in args.seeds:
            for variant in args.variants:
                extra = VARIANTS[variant][1]
                path = workdir / "results" / f"{tag}-{variant}-{seed}-{budget(extra or [])}.json"
                state = "kept" if path.exists() else "missing, skipped" if args.report_only else "running"
                print(f"# {tag} {variant} seed {seed}: {state}", flush=True)
                if path.exists():
                    result = json.loads(path.read_text())
                elif args.report_only:
                    continue
                elif extra is None:
                    result = keep(
                        path, heretic(model, workdir / f"heretic-{tag}-{seed}-{budget([])}", args, seed, tuple(heldout_files))
                    )
                else:
                    result = keep(path, ours(f"q-{tag}-{variant}-{seed}-{budget(extra)}", model, workdir, args, seed, extra))
                results[variant].append(result)
        results = {v: runs for v, runs in results.items() if runs}
        if not results:
            continue
        by_model[tag] = {VARIANTS[v][0]: runs for v, runs in results.items()}
        hv = report(tag, model, results, args)
        last += [f"hv_{v}@{tag}={hv[v]:.4f}" for v in results]
    plot(by_model, ROOT / "benchmarks" / "quality.png")
    print(f"# plot: benchmarks/quality.png; raw: {workdir}")
    print(" ".join(last) + f" trials={args.trials} seeds={len(args.seeds)} device=cpu")  # seeds asked for; tables say which ran


if __name__ == "__main__":
    main()
