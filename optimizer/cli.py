"""Command line: `python -m optimizer run ...`."""

from __future__ import annotations

import argparse
import sys
import warnings

from rich.console import Console

from optimizer.errors import UserError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    # every default is None: unset flags fall through to the TOML file, then to Settings' defaults
    add = parser.add_argument
    add("--model", help="HF hub id, local model folder or .gguf file (default: the bundled Qwen2.5-Coder-0.5B-Instruct)")
    add("--study", help="study name (default: default)")
    add("--storage", help="Optuna storage URL (default: sqlite:///studies/<study>.db)")
    add("--studies-dir", help="folder for SQLite studies and caches (default: studies)")
    add("--trials", type=int, help="finished trials the study should hold in total (default: 200)")
    add("--startup-trials", type=int, help="random trials before TPE takes over (default: 40)")
    add("--harmful", help="harmful prompts: .txt/.jsonl/.csv file or dataset:NAME[:SPLIT[:COLUMN]] (default: bundled)")
    add("--harmless", help="harmless prompts, same forms (default: bundled)")
    add("--direction-prompts", type=int, help="prompts per set for the directions (default: 128)")
    add("--scoring-prompts", type=int, help="prompts per set for scoring each trial (default: 64)")
    add("--max-new-tokens", type=int, help="response length cap for refusal detection (default: 16)")
    add("--system-prompt", help="system prompt for every chat (default: the template's own)")
    add("--chat-template", help="Jinja chat template file, for models without one")
    add("--device", help="auto, cpu, cuda, cuda:N (default: auto)")
    add("--dtype", help="auto, float32, bfloat16, float16 (default: bfloat16 on CUDA, float32 on CPU)")
    add("--batch-size", type=int, help="prompts per forward pass (default: 0 = automatic)")
    add("--seed", type=int, help="sampler seed (default: 0)")
    add("--alpha-max", type=float, help="upper end of the contrastive strength alpha (default: 4.0)")
    add("--direction-methods", type=lambda s: s.split(","), help="comma-separated: contrastive,mean_diff (default: both)")
    add("--config", help="TOML file with the same keys as these flags")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m optimizer", description="Abliteration tuned with Optuna.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run (or resume) a study")
    _add_run_arguments(run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # set_metric_names and TPE's `group` are stable in practice; their notices only add noise
    warnings.filterwarnings("ignore", message=".*experimental.*")
    console = Console(stderr=True)
    try:
        if args.command == "run":
            from optimizer.config import build_settings
            from optimizer.study import run_study

            values = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
            run_study(build_settings(values, args.config), console)
    except UserError as e:
        console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        return EXIT_USAGE
    except KeyboardInterrupt:
        console.print("\n[yellow]Interrupted.[/] Finished trials are saved; run the same command again to resume.")
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
