"""Time to a good Pareto front, ours against heretic 1.4: one model, one machine, one run of each.

    python benchmarks/time_to_front.py [--model DIR] [--trials 100] [--startup-trials 20] [--seed 0]
                                       [--scoring-prompts 32] [--direction-prompts 64] [--max-new-tokens 16]
                                       [--batch-size 32] [--device cpu|cuda] [--random-weights]
                                       [--init-range X] [--markers a,b,c]
                                       [--heretic-python PATH] [--prefix-detection] [--workdir DIR] [--plot PATH]
                                       [--quick]

Each tool runs one study from a cold start, as a user would: a fresh process, an empty study, no
cache. Every finished trial is placed on a wall clock that starts when the tool's process does:
ours from the trials' `datetime_complete` in the study's SQLite file less the time our process was
launched; heretic's from the `trial_end` events of heretic_runner's wrapper, whose clock starts at
the wrapper's first statement (after the interpreter has started, tens of ms after launch; before
torch and heretic are imported). So each clock includes everything the tool does before its first
trial: imports, model load, directions, the unedited model's evaluation. After each finish, the
hypervolume of all (refusal rate, KL) points finished so far is computed with quality.py's
`hypervolume`, with one reference for both tools: (our unedited model's refusal rate, KL 1.0).
Measured: the wall time each tool needs to reach the hypervolume heretic ends with, and the ratio
heretic's / ours (time_to_front_speedup; 0 when ours never reaches it). Prints a table, writes a
plot (default benchmarks/time_to_front.png) and WORKDIR/time_to_front.json; the last line is
machine-readable.

Matched between the tools, as in trial_speed.py: model, device and dtype (float32 on CPU, bfloat16
on CUDA), our direction and scoring prompt splits, our refusal markers, the response cap, the batch
size, the number of edited trials (our study also holds the unedited baseline trial, scored from
the cache; it adds no area, and it is counted in our --trials and --startup-trials, so both are
passed one higher), random startup trials and the seed number (the samplers differ, so the same
seed is not the same draw), and no response-prefix detection in either (heretic_runner disables
heretic's; ours gets --response-prefix "", unless --prefix-detection: a one-time generation pass
that puts a fixed cost before our first trial and finds no prefix on the default model). Not
matched: the search spaces and the ablation itself (that is what is compared); ours stops trials
early that cannot reach the front (its default, reported in the table with an estimate of the
generation time it saved) and begins with its seeded starts (its default: a few edits known to
work, enqueued before the random start-up trials and counted in them; `--no-seeded-starts` leaves
them out); see heretic_runner's docstring for the rest. `--random-weights` and
`--device cuda` work as in trial_speed.py. Random weights at the default initialisation repeat one
token and never refuse, so the hypervolume is 0; `--init-range 0.3 --markers q,z,x` makes a
synthetic yardstick for GPU machines that hold no checkpoint: weights large enough that greedy
answers vary token by token, and "refusals" that are answers holding one of those letters. Some
answers are then decided early, some not; edits move the count and KL, so both tools get a front to
find and ours has trials to stop. It says nothing about refusal, only about time.

Both tools judge by plain substring markers (ours `--judge markers:plain`, as heretic does) and ours
skips the verification of its front at the end (`--no-verify`: it comes after every trial).

Caveat: the time a tool needs to reach a hypervolume depends on its search (its search space, its
sampler, which edits it happens to try first) as much as on its seconds per trial, and one run is
one draw: a different seed can move either time a lot. Read the result with trial_speed.py's
seconds per trial beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.heretic_runner import DEFAULT_VENV, ensure_heretic_venv, run_heretic
from benchmarks.quality import hypervolume
from optimizer.config import DEFAULT_REFUSAL_MARKERS
from optimizer.prompts import bundled_path
from optimizer.report import EarlyStops

STUDY = "ttf-ours"
KL_REFERENCE = 1.0
TOLERANCE = 1e-12
HERETIC_TIMEOUT_S = 12 * 3600


def run_ours(model: Path, workdir: Path, args: argparse.Namespace) -> dict:
    """Our study as a user runs it; finish times from the trials' datetime_complete."""
    import optuna
    from optuna.trial import TrialState

    studies = workdir / "studies"
    for stale in (studies / f"{STUDY}.db", studies / STUDY):  # a previous run in this workdir: start cold
        if stale.is_dir():
            shutil.rmtree(stale)
        elif stale.exists():
            stale.unlink()
    command = [
        sys.executable, "-m", "optimizer", "run", "--model", str(model), "--study", STUDY, "--studies-dir", str(studies),
        "--trials", str(args.trials + 1),  # + the baseline trial, which is scored from the cache
        "--startup-trials", str(args.startup_trials + 1),  # the baseline is a finished trial to the sampler too
        "--seed", str(args.seed), "--scoring-prompts", str(args.scoring_prompts),
        "--direction-prompts", str(args.direction_prompts), "--max-new-tokens", str(args.max_new_tokens),
        "--device", args.device, "--dtype", args.dtype, "--judge", "markers:plain", "--no-verify",
    ]  # fmt: skip
    if args.markers:
        config = workdir / "markers.toml"
        workdir.mkdir(parents=True, exist_ok=True)
        config.write_text(f"refusal_markers = {json.dumps(args.markers)}\n")
        command += ["--config", str(config)]
    if not args.prefix_detection:
        command += ["--response-prefix", ""]  # as heretic is run (heretic_runner's default): no detection pass
    if args.batch_size:
        command += ["--batch-size", str(args.batch_size)]
    if args.no_seeded_starts:
        command += ["--no-seeded-starts"]
    log_path = workdir / "ours.log"
    workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w", encoding="utf-8") as log:
        start_epoch = time.time()  # datetime_complete is a naive local datetime; .timestamp() reads it as local time
        start = time.perf_counter()
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=ROOT) as proc:
            assert proc.stdout is not None
            for raw in iter(proc.stdout.readline, b""):  # each line stamped with seconds since launch, as heretic.log
                log.write(f"[{time.perf_counter() - start:9.3f}] {raw.decode('utf-8', 'replace').rstrip()}\n")
                log.flush()
            returncode = proc.wait()
        wall = time.perf_counter() - start
    if returncode != 0:
        raise SystemExit(f"our run failed (rc {returncode}); see {log_path}:\n{log_path.read_text()[-3000:]}")

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=STUDY, storage=f"sqlite:///{studies}/{STUDY}.db")
    trials = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        trials.append(
            {
                "number": t.number,
                "finish_s": round(t.datetime_complete.timestamp() - start_epoch, 3),
                "point": [t.values[0], t.values[1]],
                "baseline": bool(t.user_attrs.get("baseline")),
                "early_stop": t.user_attrs.get("early_stop"),
                "refusals_s": (t.user_attrs.get("timings") or {}).get("refusals_s"),
            }
        )
    trials.sort(key=lambda t: t["finish_s"])
    baseline = next((t for t in trials if t["baseline"]), None)
    if baseline is None:
        raise SystemExit(f"our study holds no finished baseline trial; see {log_path}")
    stops = EarlyStops.of(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    return {
        "trials": trials,
        "early_stop": {**asdict(stops), "stopped": stops.stopped},
        "baseline_rate": baseline["point"][0],
        "baseline_refusals": study.user_attrs.get("baseline_refusals"),
        "wall_s": round(wall, 3),
        "command": command,
        "log_path": str(log_path),
        "storage": f"sqlite:///{studies}/{STUDY}.db",
    }


# Our start-up, step by step, read off our log's stamped lines: (name, the first line that starts with
# or contains the text marks the step's end). A step whose line is absent (cached, or not taken) is left out.
STARTUP_MILESTONES = (
    ("imports and settings", "Loading model"),
    ("weights loaded", "Ablation sites in"),
    ("response prefix, fast paths, batch size", "no cached directions yet"),
    ("filter and statistics", "Contrastive-PCA statistics"),
    ("baseline and study", "Study '"),
)


def startup_steps(log_text: str) -> list[tuple[str, float]]:
    """Seconds each start-up step took (`STARTUP_MILESTONES`), from the launch on."""
    stamps = []
    for line in log_text.splitlines():
        if line.startswith("[") and "]" in line:
            stamp, _, text = line[1:].partition("]")
            stamps.append((float(stamp), text.strip()))
    steps, last = [], 0.0
    for name, marker in STARTUP_MILESTONES:
        at = next((t for t, text in stamps if marker in text), None)
        if at is not None:
            steps.append((name, round(at - last, 3)))
            last = at
    return steps


def run_heretic_study(model: Path, workdir: Path, args: argparse.Namespace) -> dict:
    """heretic's study through heretic_runner; finish times from its trial_end events."""
    python = args.heretic_python or ensure_heretic_venv(DEFAULT_VENV)
    result = run_heretic(
        python, model, bundled_path("harmful"), bundled_path("harmless"),
        n_direction=args.direction_prompts, n_scoring=args.scoring_prompts, max_response_tokens=args.max_new_tokens,
        n_trials=args.trials, workdir=workdir, timeout_s=HERETIC_TIMEOUT_S, batch_size=args.batch_size or 0,
        refusal_markers=args.markers or list(DEFAULT_REFUSAL_MARKERS), n_startup_trials=args.startup_trials, seed=args.seed,
        device=args.device,
    )  # fmt: skip
    if result["returncode"] != 0 or not result["trials"]:
        raise SystemExit(f"heretic failed ({result['status']}); see {result['log_path']}")
    events = [json.loads(line) for line in Path(result["timings_path"]).read_text().splitlines() if line.strip()]
    # `t`: seconds since the wrapper's first statement (its T0), i.e. since heretic's process started
    ends = {e["number"]: e["t"] for e in events if e["event"] == "trial_end"}
    trials = []
    for t in result["trials"]:
        if "COMPLETE" not in str(t["state"]) or t["number"] not in ends or t["refusals"] is None:
            continue
        if t.get("n_bad_prompts") not in (None, args.scoring_prompts):
            print(
                f"# warning: heretic trial {t['number']} scored {t['n_bad_prompts']} harmful prompts, not {args.scoring_prompts}"
            )
        trials.append(
            {
                "number": t["number"],
                "finish_s": round(ends[t["number"]], 3),
                "point": [t["refusals"] / args.scoring_prompts, t["kl_divergence"]],
            }
        )
    if not trials:
        raise SystemExit(f"heretic finished no trial with a trial_end event; see {result['timings_path']}")
    trials.sort(key=lambda t: t["finish_s"])
    base = result["baseline_refusals"]
    return {
        "trials": trials,
        "baseline_rate": base / args.scoring_prompts if base is not None else None,
        "baseline_refusals": base,
        "wall_s": result["wall_seconds"],
        "phase_seconds": result["phase_seconds"],
        "trial_seconds": result["trial_seconds"],
        "breakdown": result["breakdown"],
        "log_path": result["log_path"],
        "timings_path": result["timings_path"],
        "config_path": result["config_path"],
        "system_prompt_matched": result["system_prompt_matched"],
    }


def hv_curve(trials: list[dict], reference: tuple[float, float]) -> list[tuple[float, float]]:
    """(finish seconds, hypervolume of every point finished by then), one entry per trial."""
    points: list[tuple[float, float]] = []
    curve = []
    for t in sorted(trials, key=lambda t: t["finish_s"]):
        points.append((t["point"][0], t["point"][1]))
        curve.append((t["finish_s"], hypervolume(points, reference)))
    return curve


def time_to_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    return next((s for s, hv in curve if hv >= target - TOLERANCE), None)


def plot(
    curves: dict[str, list[tuple[float, float]]],
    walls: dict[str, float],
    reach: dict[str, float | None],
    target: float,
    path: Path,
    title: str,
) -> bool:
    try:
        import matplotlib
    except ImportError:
        print("# plot skipped: matplotlib is not installed (pip install -e '.[bench]')")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for (label, curve), color in zip(curves.items(), ("C0", "C1")):
        xs = [0.0] + [s for s, _ in curve] + [max(walls[label], curve[-1][0])]
        ys = [0.0] + [hv for _, hv in curve] + [curve[-1][1]]
        ax.step(xs, ys, where="post", color=color, label=label)
        ax.plot(xs[1:-1], ys[1:-1], "o", color=color, ms=2.5)
        if reach[label] is not None:
            ax.axvline(reach[label], color=color, ls=":", lw=1.2)
            ax.annotate(
                f"{reach[label]:.0f} s",
                (reach[label], target),
                textcoords="offset points",
                xytext=(3, -12),
                color=color,
                fontsize=8,
            )
    ax.axhline(target, color="grey", ls="--", lw=1, label="heretic's final hypervolume")
    ax.set_xlabel("wall seconds since the tool's process started")
    ax.set_ylabel("hypervolume of (refusal rate, KL) so far")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.legend(loc="best")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="model folder (default: the bundled Qwen2.5-Coder-0.5B-Instruct)")
    parser.add_argument("--trials", type=int, default=100, help="edited trials per tool")
    parser.add_argument("--startup-trials", type=int, default=20, help="random trials before TPE, per tool")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scoring-prompts", type=int, default=32, help="scoring prompts per set")
    parser.add_argument("--direction-prompts", type=int, default=64, help="direction prompts per set")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32, help="both tools (0: each picks its own)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--random-weights", action="store_true", help="same architecture and tokenizer, random weights")
    parser.add_argument(
        "--init-range", type=float,
        help="with --random-weights: the weights' standard deviation (config initializer_range; 0.3 gives varied answers)",
    )  # fmt: skip
    parser.add_argument(
        "--markers", type=lambda text: [m for m in text.split(",") if m],
        help="comma-separated refusal markers for both tools (default: ours); with random weights, e.g. q,z,x",
    )  # fmt: skip
    parser.add_argument(
        "--heretic-python", type=Path, help="interpreter that imports heretic 1.4 (default: the benchmark's venv)"
    )
    parser.add_argument(
        "--prefix-detection", action="store_true",
        help="let ours detect a response prefix once (its default; heretic_runner always disables heretic's)",
    )  # fmt: skip
    parser.add_argument("--no-seeded-starts", action="store_true", help="ours without its seeded starts (on by default)")
    parser.add_argument("--workdir", type=Path, help="raw results (default: a new temporary folder)")
    parser.add_argument("--plot", type=Path, default=ROOT / "benchmarks" / "time_to_front.png", help="PNG to write")
    parser.add_argument(
        "--quick", action="store_true",
        help="30 trials (10 random), 16 scoring and 32 direction prompts, 12 new tokens, batch 16: under 20 min on 2 CPU cores",
    )  # fmt: skip
    args = parser.parse_args()
    if args.quick:
        args.trials, args.startup_trials, args.scoring_prompts = 30, 10, 16
        args.direction_prompts, args.max_new_tokens, args.batch_size = 32, 12, 16
    args.dtype = "float32" if args.device == "cpu" else "bfloat16"
    if args.model is None:
        from optimizer.fetch import ensure_model_folder

        args.model = ensure_model_folder()
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="time-to-front-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    threads = os.cpu_count() or 1
    if args.random_weights:
        import torch

        from benchmarks.random_model import save_random_model

        dtype = getattr(torch, args.dtype)
        config = args.model / "config.json"
        if args.init_range is not None:
            settings = json.loads(config.read_text())
            config = workdir / "random-config.json"
            config.write_text(json.dumps({**settings, "initializer_range": args.init_range}))
        torch.manual_seed(args.seed)
        args.model = save_random_model(config, args.model, workdir / "random-model", dtype, args.device)

    ours = run_ours(args.model, workdir, args)
    heretic = run_heretic_study(args.model, workdir / "heretic", args)

    reference = (ours["baseline_rate"], KL_REFERENCE)
    curves = {"optimizer": hv_curve(ours["trials"], reference), "heretic 1.4": hv_curve(heretic["trials"], reference)}
    target = curves["heretic 1.4"][-1][1]
    reach = {label: time_to_reach(curve, target) for label, curve in curves.items()}
    heretic_s, ours_s = reach["heretic 1.4"], reach["optimizer"]
    speedup = heretic_s / ours_s if ours_s is not None and ours_s > 0 else 0.0  # heretic always reaches its own final value
    stops = ours["early_stop"]

    if args.device == "cuda":
        import torch

        where = f"{torch.cuda.get_device_name()} bfloat16"
    else:
        where = f"cpu float32 ({threads} cores)"
    weights = " (random weights)" if args.random_weights else ""
    title = f"{args.model.name}{weights}, {where}, {args.trials} trials ({args.startup_trials} random), seed {args.seed}"
    plotted = plot(
        curves,
        {"optimizer": ours["wall_s"], "heretic 1.4": heretic["wall_s"]},
        reach,
        target,
        args.plot,
        f"Hypervolume over wall time\n{title}",
    )

    ours_edited = [t for t in ours["trials"] if not t["baseline"]]
    ours_base_finish = next(t["finish_s"] for t in ours["trials"] if t["baseline"])
    h_base = heretic["baseline_rate"]
    print(
        f"# model {title}; {args.scoring_prompts} scoring and {args.direction_prompts} direction prompts per set, "
        f"{args.max_new_tokens} new tokens, batch size {args.batch_size or 'auto'}; response-prefix detection "
        f"{'in ours only' if args.prefix_detection else 'off in both'}"
    )
    print(
        f"# hypervolume reference: (refusal rate {reference[0]:.3f} = our baseline {ours['baseline_refusals']}, "
        f"KL {KL_REFERENCE}); "
        f"heretic's baseline refusal rate {'-' if h_base is None else f'{h_base:.3f}'} "
        f"({heretic['baseline_refusals']}/{args.scoring_prompts})"
        + ("" if h_base is None or abs(h_base - reference[0]) < TOLERANCE else " -- MISMATCH")
    )
    print(
        "| tool | trials | total wall s | s until first trial finished | final HV | s to reach heretic's final HV "
        "| trials stopped early (share) | est. s saved |"
    )
    print("|---|---|---|---|---|---|---|---|")
    kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(stops["kinds"].items()))
    share = stops["stopped"] / stops["edited"] if stops["edited"] else 0.0
    stopped = f"{stops['stopped']}/{stops['edited']} ({share:.0%}{': ' + kinds if kinds else ''})"
    rows = [
        ("optimizer", len(ours_edited), ours["wall_s"], ours_edited[0]["finish_s"] if ours_edited else None, curves["optimizer"],
         ours_s, stopped, f"~{stops['saved_s']:.0f} (estimate)"),
        ("heretic 1.4", len(heretic["trials"]), heretic["wall_s"], heretic["trials"][0]["finish_s"], curves["heretic 1.4"],
         heretic_s, "- (no early stop)", "-"),
    ]  # fmt: skip
    for label, n, wall, first, curve, reached, stop_text, saved in rows:
        first_text = "-" if first is None else f"{first:.1f}"
        reached_text = "never" if reached is None else f"{reached:.1f}"
        print(f"| {label} | {n} | {wall:.1f} | {first_text} | {curve[-1][1]:.4f} | {reached_text} | {stop_text} | {saved} |")
    median = stops["median_full_s"]
    median_text = "-" if median is None else f"{median:.2f} s"
    if target <= TOLERANCE:
        print(
            "# heretic's final hypervolume is 0 (no trial inside the reference box: random weights, or an unedited model "
            "that refuses nothing): the times only say when each tool's first trial finished (ours: its baseline trial)"
        )
    if ours_s is None:
        print(f"# ours never reached heretic's final hypervolume ({target:.4f}); its best was {curves['optimizer'][-1][1]:.4f}")
    print(
        f"# ours: first trial = first edited trial (the baseline trial finished at {ours_base_finish:.1f} s); est. s saved = "
        f"for each stopped trial, the median answer-generation time of the fully scored trials "
        f"({median_text}) less its own"
    )
    print(
        "# clocks: ours from its process launch; heretic's from its wrapper's first statement (interpreter start-up not "
        "counted, tens of ms)"
    )
    steps = startup_steps(Path(ours["log_path"]).read_text(encoding="utf-8"))
    print("# our start-up (s, from our log): " + ", ".join(f"{name} {seconds:.1f}" for name, seconds in steps))

    raw = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "device": where,
        "reference": reference,
        "heretic_final_hv": target,
        "seconds_to_heretic_final_hv": reach,
        "speedup": speedup,
        "ours": {**ours, "hv_curve": curves["optimizer"], "startup_steps": steps},
        "heretic": {**heretic, "hv_curve": curves["heretic 1.4"]},
    }
    (workdir / "time_to_front.json").write_text(json.dumps(raw, indent=1, default=str))
    print(f"# raw: {workdir} (time_to_front.json, ours.log, studies/, heretic/)" + (f"; plot: {args.plot}" if plotted else ""))
    ours_text = "inf" if ours_s is None else f"{ours_s:.1f}"
    print(
        f"time_to_front_speedup={speedup:.2f} ours_s={ours_text} heretic_s={heretic_s:.1f} trials={args.trials} "
        f"device={args.device}"
    )


if __name__ == "__main__":
    main()
