"""Command line: `python -m optimizer run ...`."""

from __future__ import annotations

import argparse
import sys
import warnings

from rich.console import Console

from optimizer import signals
from optimizer.config import FIELDS, add_setting_arguments, help_text
from optimizer.errors import UserError
from optimizer.signals import Terminated

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, what shells and schedulers expect


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    # flags generated from the Settings fields; every default is None: unset flags fall through to the TOML file,
    # then to Settings' defaults
    add_setting_arguments(parser)
    parser.add_argument("--config", help="TOML file with the same keys as these flags")


# for export, eval and chat: --model and --device only stand in for the study's own
_LOADING_HELP = {
    "model": "where the study's model is now, if it moved (checked by fingerprint)",
    "device": "auto, cpu, cuda (default: the study's)",
}


def _add_study_arguments(parser: argparse.ArgumentParser, with_trial: bool = False) -> None:
    add_setting_arguments(parser, ("study", "storage", "studies_dir"))
    # the study is located from these alone: their defaults are filled in here, not from a record or a TOML file
    parser.set_defaults(study=FIELDS["study"].default, studies_dir=FIELDS["studies_dir"].default)
    if with_trial:
        parser.add_argument("--trial", type=int, help="trial number (see `show`)")
        add_setting_arguments(parser, ("model", "device"), help=_LOADING_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m optimizer", description="Abliteration tuned with Optuna.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run (or resume) a study")
    _add_run_arguments(run)
    show = commands.add_parser("show", help="settings, baseline, trial counts and Pareto-optimal trials of a study")
    _add_study_arguments(show)
    export = commands.add_parser(
        "export", help="write a trial's edited model: a Hugging Face folder, a GGUF file or a LoRA adapter"
    )
    _add_study_arguments(export, with_trial=True)
    export.add_argument("--out", required=True, help="new (or empty) output folder; a new .gguf file with --format gguf")
    export.add_argument(
        "--format", default="hf", choices=["hf", "gguf", "lora"],
        help="hf: model folder with the edit baked in; gguf: one file for llama.cpp/Ollama; lora: PEFT adapter (default: hf)",
    )  # fmt: skip
    export.add_argument("--dtype", help="hf only: float32, bfloat16, float16 (default: the checkpoint's own)")
    export.add_argument(
        "--gguf-type", choices=["f16", "bf16", "q8_0", "f32", "same"],
        help="gguf only: encoding of the written tensors (default: same as a GGUF source's, else f16)",
    )  # fmt: skip
    evaluate = commands.add_parser("eval", help="lm-eval benchmarks or held-out refusals of trials, stored on the study")
    _add_study_arguments(evaluate, with_trial=True)
    evaluate.add_argument("--pareto", action="store_true", help="every Pareto-optimal trial")
    evaluate.add_argument(
        "--tasks", type=lambda s: s.split(","), help="comma-separated lm-eval tasks, e.g. optimizer_everyday_mc,mmlu"
    )
    evaluate.add_argument("--limit", type=int, help="items per task (or prompts per set with --refusals)")
    evaluate.add_argument("--refusals", action="store_true", help="refusals and KL on prompts the study never saw")
    evaluate.add_argument("--harmful", help="held-out harmful prompts (default: the bundled held-out split)")
    evaluate.add_argument("--harmless", help="held-out harmless prompts (default: the bundled held-out split)")
    verify = commands.add_parser(
        "verify", help="long answers of trials on held-out prompts, judged (refused/hedged/complied/broken), stored on the study"
    )
    _add_study_arguments(verify, with_trial=True)
    verify.add_argument("--pareto", action="store_true", help="every Pareto-optimal trial")
    verify.add_argument("--judge", help="judge for the answers (default: the study's): " + help_text("judge").split(" (")[0])
    verify.add_argument(
        "--max-new-tokens", type=int, help=f"answer length cap (default: {FIELDS['verify_max_new_tokens'].default})"
    )
    verify.add_argument("--harmful", help="held-out harmful prompts (default: the bundled held-out split)")
    verify.add_argument("--harmless", help="held-out harmless prompts (default: the bundled held-out split)")
    verify.add_argument("--limit", type=int, help="prompts per set (default: all)")
    verify.add_argument("--max-kl", type=float, help=help_text("max_kl"))
    chat = commands.add_parser("chat", help="chat with a trial's edited model (reads stdin; /reset, /quit)")
    _add_study_arguments(chat, with_trial=True)
    chat.add_argument("--max-new-tokens", type=int, default=512)
    dashboard = commands.add_parser("dashboard", help="serve optuna-dashboard for the study on loopback")
    _add_study_arguments(dashboard)
    dashboard.add_argument("--port", type=int, help="port (default: a free one)")
    return parser


def _dispatch(args: argparse.Namespace, console: Console) -> None:
    if args.command == "run":
        from optimizer.config import build_settings
        from optimizer.study import run_study

        values = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
        run_study(build_settings(values, args.config), console)
        return
    from optimizer.stored import open_study  # without torch: the dashboard starts sooner

    stored = open_study(args.study, args.storage, args.studies_dir)
    if args.command == "dashboard":
        from optimizer.dashboard import serve

        serve(stored.settings.storage_url(), port=args.port)
    elif args.command == "show":
        from optimizer.report import show_study

        show_study(stored.study, console)
    elif args.command == "export":
        from pathlib import Path

        from optimizer.export import export_trial

        if args.trial is None:
            raise UserError("export needs --trial N (see `python -m optimizer show`)")
        export_trial(
            stored, args.trial, Path(args.out), console, model=args.model, device=args.device, save_dtype=args.dtype,
            fmt=args.format, gguf_type=args.gguf_type,
        )  # fmt: skip
    elif args.command == "chat":
        from optimizer.chat import chat
        from optimizer.trials import load_edited_model

        if args.trial is None:
            raise UserError("chat needs --trial N (see `python -m optimizer show`)")
        chat(load_edited_model(stored, args.trial, console, model=args.model, device=args.device), args.max_new_tokens)
    elif args.command == "verify":
        from optimizer.verify import verify_command

        verify_command(stored, args, console)
    elif args.command == "eval":
        from optimizer import evaluate
        from optimizer.trials import load_edited_model
        from optimizer.workbench import cpu_fast_paths

        if not args.tasks and not args.refusals:
            raise UserError(f"eval needs --tasks T1,T2 (e.g. {evaluate.LOCAL_TASK}) or --refusals")
        trials = evaluate.select_trials(stored.study, args.trial, args.pareto)
        edited = load_edited_model(stored, trials[0].number, console, model=args.model, device=args.device)
        if args.refusals:
            paths = cpu_fast_paths(edited.prepared.spec)
            table = evaluate.evaluate_refusals(stored, edited, trials, args.harmful, args.harmless, args.limit, console, paths)
            console.print(table)
        if args.tasks:
            console.print(evaluate.evaluate_tasks(stored, edited, trials, args.tasks, args.limit, console))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # set_metric_names and TPE's `group` are stable in practice; their notices only add noise
    warnings.filterwarnings("ignore", message=".*experimental.*")
    # a log file gets a wide console, so that tables are not folded into 80 columns
    console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
    try:
        with signals.handled():
            _dispatch(args, console)
            signals.raise_pending()  # exit as asked, even where the signal landed in code that could not pass it on
    except UserError as e:
        console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        return EXIT_USAGE
    except KeyboardInterrupt as e:
        said, code = (
            ("Terminated (SIGTERM).", EXIT_TERMINATED) if isinstance(e, Terminated) else ("Interrupted.", EXIT_INTERRUPTED)
        )
        resume = " Finished trials are saved; run the same command again to resume." if args.command == "run" else ""
        console.print(f"\n[yellow]{said}[/]{resume}")
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
