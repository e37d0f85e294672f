"""One study on a large model's shape with random bf16 weights: seconds per trial at the default
prompt counts, the one-time work, and what 200 trials take on this GPU.

    python benchmarks/trial_32b.py [--config benchmarks/configs/qwen2.5-32b.json] [--tokenizer DIR]
                                   [--trials 3] [--device cuda] [--dtype auto]

Configs: `qwen2.5-32b.json` (dense, 32.8B parameters, 65 GB in bf16) and `qwen3-30b-a3b.json`
(Qwen3-30B-A3B's MoE: 48 layers of 128 fused experts, 8 routed per token; 30.5B parameters, 61 GB;
the ablation edits every expert's down projection, as a real Qwen3 MoE is edited).

Runs our study engine in-process (`optimizer.study.run_study`, SQLite in a temporary folder), with
the model built from the config on the device instead of read from a checkpoint (a 65 GB folder
does not fit these machines' disks). Random weights never stop a generation early, so each trial
generates the full response length for every harmful prompt: the slowest trial a real model gives.
The response-prefix detection is skipped (`--response-prefix ''`; random answers share no prefix).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.random_model import model_folder, random_weights_in_optimizer
from optimizer import workbench
from optimizer.config import Settings


def timed_methods(record: dict[str, float], names: list[str]) -> None:
    """Record the seconds each of the one-time steps takes (cache misses: all computed)."""
    for name in names:
        original = getattr(workbench._CacheUse, name)

        def wrapper(self, *args, _original=original, _name=name, **kwargs):
            start = time.perf_counter()
            result = _original(self, *args, **kwargs)
            if self.spec.loaded.device.type == "cuda":
                torch.cuda.synchronize()
            record[_name] = time.perf_counter() - start
            if _name == "batch_size":
                record["batch_size_value"] = result
            return result

        setattr(workbench._CacheUse, name, wrapper)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "benchmarks" / "configs" / "qwen2.5-32b.json")
    parser.add_argument("--tokenizer", type=Path, help="folder with the tokenizer files (default: the bundled model's)")
    parser.add_argument("--trials", type=int, default=3, help="trials after the baseline trial")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--direction-prompts", type=int, default=Settings.direction_prompts)
    parser.add_argument("--scoring-prompts", type=int, default=Settings.scoring_prompts)
    parser.add_argument("--max-new-tokens", type=int, default=Settings.max_new_tokens)
    parser.add_argument("--budget", type=int, default=200, help="trials of the projected study")
    parser.add_argument(
        "--no-early-stop", action="store_true",
        help="score every trial to the end (random weights refuse nothing: the unedited baseline dominates every edit)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.tokenizer is None:
        from optimizer.fetch import ensure_model_folder

        args.tokenizer = ensure_model_folder()

    from rich.console import Console

    from optimizer.study import run_study

    work = Path(tempfile.mkdtemp(prefix="trial-32b-"))
    folder = model_folder(args.config, args.tokenizer, work / "model")
    settings = Settings(
        model=str(folder),
        study="shape",
        studies_dir=str(work / "studies"),
        trials=args.trials + 1,
        device=args.device,
        dtype=args.dtype,
        direction_prompts=args.direction_prompts,
        scoring_prompts=args.scoring_prompts,
        max_new_tokens=args.max_new_tokens,
        response_prefix="",
        verify=False,
        early_stop=not args.no_early_stop,
    )
    one_time: dict[str, float] = {}
    timed_methods(one_time, ["stats", "batch_size", "baseline"])
    console = Console(stderr=True, width=160)
    start = time.perf_counter()
    with random_weights_in_optimizer() as built:
        study = run_study(settings, console)
    wall = time.perf_counter() - start

    trials = [t for t in study.trials if not t.user_attrs.get("baseline") and "timings" in t.user_attrs]
    seconds = [t.user_attrs["timings"]["total_s"] for t in trials]
    phases = {
        k: statistics.median(t.user_attrs["timings"].get(k, 0.0) for t in trials)
        for k in ("directions_s", "apply_s", "kl_s", "refusals_s")
    }
    trial_s = statistics.median(seconds)
    fixed = wall - sum(seconds)  # model build, residuals, statistics, batch size, baseline, study bookkeeping
    projected = fixed + args.budget * trial_s
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else float("nan")
    batch = one_time.get("batch_size_value", settings.batch_size or "-")
    print(
        f"# {args.config.name} with random weights on {device}; {args.direction_prompts} direction and "
        f"{args.scoring_prompts} scoring "
        f"prompts per set, {args.max_new_tokens} new tokens; peak GPU memory {peak:.1f} GiB; batch size {batch}"
    )
    print("| step | seconds |")
    print("|---|---|")
    print(f"| build the model on the device (random weights) | {built.get('build_s', float('nan')):.1f} |")
    for name, label in (
        ("stats", "residuals + contrastive-PCA statistics"),
        ("batch_size", "batch size measurement"),
        ("baseline", "baseline (KL reference, refusals)"),
    ):
        print(f"| {label} | {one_time.get(name, float('nan')):.1f} |")
    print(f"| one-time total (wall minus trials) | {fixed:.1f} |")
    print(f"| trial (median of {len(seconds)}: {', '.join(f'{s:.2f}' for s in seconds)}) | {trial_s:.2f} |")
    print(
        f"|   directions / apply / KL / refusals | {phases['directions_s']:.3f} / {phases['apply_s']:.4f} / "
        f"{phases['kl_s']:.2f} / {phases['refusals_s']:.2f} |"
    )
    print(f"| {args.budget} trials, projected from the measured figures | {projected:.0f} ({projected / 3600:.2f} h) |")
    print(
        f"trial_s={trial_s:.2f} one_time_s={fixed:.1f} projected_{args.budget}_trials_h={projected / 3600:.2f} "
        f"device={device.replace(' ', '_')}"
    )


if __name__ == "__main__":
    main()
