"""Seconds per trial, ours against heretic 1.4, same model, prompts, response length and machine.

    python benchmarks/trial_speed.py [--model DIR] [--trials 3] [--prompts 32] [--direction-prompts 64]
                                     [--max-new-tokens 16] [--batch-size 16] [--quick]
                                     [--device cpu|cuda] [--random-weights] [--heretic-python PATH]

heretic runs in its own venv (benchmarks/.venv-heretic, made on first use) through
benchmarks/heretic_runner.py, with our refusal markers, our prompt splits and the model's default
system prompt, so that the unedited model's refusal counts can be compared. Settings that cannot be
matched are listed in heretic_runner's docstring. Prints a table; the last line is machine-readable.

On a GPU (`--device cuda`) both tools load the model in bfloat16. `--random-weights` times a model of
the same architecture with random weights (its config.json and tokenizer from `--model`, weights
drawn on the device and saved once for both tools): for machines that hold no checkpoint. Such a
model never emits EOS or a refusal marker, so neither tool can stop a generation early and the
baseline refusal counts mean nothing. `--heretic-python` runs heretic with another interpreter
than the venv's (one that imports heretic 1.4).
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

from benchmarks.heretic_runner import DEFAULT_VENV, ensure_heretic_venv, run_heretic
from optimizer.config import DEFAULT_REFUSAL_MARKERS
from optimizer.prompts import bundled_path


def run_ours(model: Path, workdir: Path, args: argparse.Namespace) -> dict:
    """Our study as a user runs it; per-trial timings come from the trials' user attributes."""
    import optuna

    studies = workdir / "studies"
    command = [
        sys.executable,
        "-m",
        "optimizer",
        "run",
        "--model",
        str(model),
        "--studies-dir",
        str(studies),
        "--study",
        "speed",
        "--trials",
        str(args.trials + 1),  # + the baseline trial, which is scored from the cache
        "--direction-prompts",
        str(args.direction_prompts),
        "--scoring-prompts",
        str(args.prompts),
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--seed",
        "0",
        "--device",
        args.device,
        "--dtype",
        args.dtype,
    ]
    if args.random_weights:
        command += ["--response-prefix", ""]  # as heretic is run: no detection pass
    if args.batch_size:
        command += ["--batch-size", str(args.batch_size)]
    start = time.perf_counter()
    offline = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, check=False, capture_output=True, text=True, env=offline, cwd=ROOT)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"our run failed:\n{result.stderr[-3000:]}")
    study = optuna.load_study(study_name="speed", storage=f"sqlite:///{studies}/speed.db")
    trials = [t for t in study.trials if not t.user_attrs.get("baseline")]
    phases = {
        k: statistics.median(t.user_attrs["timings"].get(k, 0.0) for t in trials)
        for k in ("directions_s", "apply_s", "kl_s", "refusals_s")
    }
    return {
        "trial_seconds": [t.user_attrs["timings"]["total_s"] for t in trials],
        "phases": phases,
        "baseline_refusals": study.user_attrs["baseline_refusals"],
        "baseline_kl": study.trials[0].values[1],
        "refusals": [t.user_attrs["refusals"] for t in trials],
        "wall_seconds": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="model folder (default: the bundled Qwen2.5-Coder-0.5B-Instruct)")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=32, help="scoring prompts per set")
    parser.add_argument("--direction-prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16, help="both tools (0: each picks its own)")
    parser.add_argument("--quick", action="store_true", help="2 trials, 8 prompts per set")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--random-weights", action="store_true", help="same architecture and tokenizer, random weights")
    parser.add_argument(
        "--heretic-python", type=Path, help="interpreter that imports heretic 1.4 (default: the benchmark's venv)"
    )
    args = parser.parse_args()
    args.dtype = "float32" if args.device == "cpu" else "bfloat16"
    if args.quick:
        args.trials, args.prompts, args.direction_prompts = 2, 8, 8
    if args.model is None:
        from optimizer.fetch import ensure_model_folder

        args.model = ensure_model_folder()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="trial-speed-"))
    threads = os.cpu_count() or 1
    if args.random_weights:
        import torch

        from benchmarks.random_model import save_random_model

        dtype = getattr(torch, args.dtype)
        args.model = save_random_model(args.model / "config.json", args.model, workdir / "random-model", dtype, args.device)

    ours = run_ours(args.model, workdir / "ours", args)
    python = args.heretic_python or ensure_heretic_venv(DEFAULT_VENV)
    heretic = run_heretic(
        python,
        args.model,
        bundled_path("harmful"),
        bundled_path("harmless"),
        n_direction=args.direction_prompts,
        n_scoring=args.prompts,
        max_response_tokens=args.max_new_tokens,
        n_trials=args.trials,
        workdir=workdir / "heretic",
        timeout_s=7200,
        batch_size=args.batch_size or 0,
        refusal_markers=list(DEFAULT_REFUSAL_MARKERS),
        n_startup_trials=args.trials,
        device=args.device,
    )
    if heretic["returncode"] != 0 or not heretic["trial_seconds"]:
        raise SystemExit(f"heretic failed ({heretic['status']}); see {heretic['log_path']}")

    ours_s = statistics.median(ours["trial_seconds"])
    heretic_s = statistics.median(heretic["trial_seconds"])
    hb = heretic["breakdown"]
    heretic_phases = {
        k: statistics.median(b[k] for b in hb) for k in ("abliterate", "kl_logprobs", "count_refusals", "reset_model")
    }
    if args.device == "cuda":
        import torch

        device = torch.cuda.get_device_name()
        where = f"{device} bfloat16"
    else:
        device, where = "cpu", f"cpu float32 ({threads} cores)"
    weights = " (random weights)" if args.random_weights else ""
    print(
        f"# model {args.model.name}{weights}, {where}, {args.trials} trials, {args.prompts} scoring prompts per set, "
        f"{args.direction_prompts} direction prompts per set, {args.max_new_tokens} new tokens, "
        f"batch size {args.batch_size or 'auto'}"
    )
    print("| tool | s/trial (median) | trials (s) | phases (median s) | baseline refusals | baseline KL |")
    print("|---|---|---|---|---|---|")
    p = ours["phases"]
    print(
        f"| optimizer | {ours_s:.2f} | {', '.join(f'{s:.1f}' for s in ours['trial_seconds'])} | "
        f"directions {p['directions_s']:.3f}, apply {p['apply_s']:.4f}, KL {p['kl_s']:.2f}, refusals {p['refusals_s']:.2f} | "
        f"{ours['baseline_refusals']} | {ours['baseline_kl']:.1f} |"
    )
    h = heretic_phases
    print(
        f"| heretic 1.4 | {heretic_s:.2f} | {', '.join(f'{s:.1f}' for s in heretic['trial_seconds'])} | "
        f"abliterate {h['abliterate']:.2f}, KL {h['kl_logprobs']:.2f}, refusals {h['count_refusals']:.2f}, "
        f"reset {h['reset_model']:.2f} | "
        f"{heretic['baseline_refusals']}/{args.prompts} | 0 (by construction) |"
    )
    print(
        f"# ratio heretic/ours: {heretic_s / ours_s:.2f}; per-trial refusals ours {ours['refusals']}, heretic "
        f"{[t['refusals'] for t in heretic['trials']]}; raw: {workdir}"
    )
    (workdir / "summary.json").write_text(json.dumps({"ours": ours, "heretic": heretic}, indent=1, default=str))
    print(
        f"trial_speedup_vs_heretic={heretic_s / ours_s:.2f} ours_s_per_trial={ours_s:.2f} heretic_s_per_trial={heretic_s:.2f} "
        f"device={device.replace(' ', '_')}"
    )


if __name__ == "__main__":
    main()
