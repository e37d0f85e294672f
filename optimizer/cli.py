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
    add("--cache-dir", help="folder of the study's one-time computations (default: studies/<study>); share it between workers")
    add("--trials", type=int, help="finished trials the study should hold in total (default: 200)")
    add("--startup-trials", type=int, help="random trials before TPE takes over (default: 40)")
    add("--harmful", help="harmful prompts: .txt/.jsonl/.csv file or dataset:NAME[:SPLIT[:COLUMN]] (default: bundled)")
    add("--harmless", help="harmless prompts, same forms (default: bundled)")
    add("--direction-prompts", type=int, help="prompts per set for the directions (default: 128)")
    add("--scoring-prompts", type=int, help="prompts per set for scoring each trial (default: 64)")
    add("--max-new-tokens", type=int, help="response length cap for refusal detection (default: 16)")
    add("--system-prompt", help="system prompt for every chat (default: the template's own)")
    add("--chat-template", help="Jinja chat template file, for models without one")
    add("--chat-template-kwargs", help='JSON object of extra chat template variables, e.g. \'{"reasoning_effort": "low"}\'')
    add("--no-thinking", action="store_true", default=None, help="pass enable_thinking=False to the chat template (Qwen3-style templates)")
    add("--response-prefix", help="text appended to every chat-formatted prompt, where answers start (default: detected once per study; '' for none)")
    add("--device", help="auto, cpu, cuda, cuda:N (default: auto)")
    add("--dtype", help="auto, float32, bfloat16, float16 (default: bfloat16 on CUDA, float32 on CPU)")
    add("--batch-size", type=int, help="prompts per forward pass (default: 0 = automatic)")
    add("--seed", type=int, help="sampler seed (default: 0)")
    add("--alpha-max", type=float, help="upper end of the contrastive strength alpha (default: 4.0)")
    add("--direction-methods", type=lambda s: s.split(","), help="comma-separated: contrastive,mean_diff (default: both)")
    add("--projected-directions", action="store_true", default=None, help="remove each direction's component along the harmless mean")
    add("--norm-preserving", action="store_true", default=None, help="keep the norm of every edited weight row (dense models)")
    add("--winsorize", type=float, help="clip residuals per layer at this quantile of |value|, e.g. 0.995, for massive activations (default: 0 = off)")
    add("--allow-missing-components", action="store_true", default=None, help="leave blocks whose attention/MLP output is not found unablated")
    add("--quantization", choices=["4bit"], help="load the model in 4-bit (bitsandbytes, CUDA only)")
    add("--heartbeat-interval", type=int, help="seconds between worker heartbeats on server storages (default: 30)")
    add("--heartbeat-grace", type=int, help="seconds without heartbeat before a RUNNING trial is failed and retried (default: 120)")
    add("--config", help="TOML file with the same keys as these flags")


def _add_study_arguments(parser: argparse.ArgumentParser, with_trial: bool = False) -> None:
    parser.add_argument("--study", default="default", help="study name (default: default)")
    parser.add_argument("--storage", help="Optuna storage URL (default: sqlite:///studies/<study>.db)")
    parser.add_argument("--studies-dir", default="studies", help="folder of SQLite studies and caches (default: studies)")
    if with_trial:
        parser.add_argument("--trial", type=int, help="trial number (see `show`)")
        parser.add_argument("--model", help="where the study's model is now, if it moved (checked by fingerprint)")
        parser.add_argument("--device", help="auto, cpu, cuda (default: the study's)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m optimizer", description="Abliteration tuned with Optuna.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run (or resume) a study")
    _add_run_arguments(run)
    show = commands.add_parser("show", help="settings, baseline, trial counts and Pareto-optimal trials of a study")
    _add_study_arguments(show)
    export = commands.add_parser("export", help="write a trial's edited model as a Hugging Face folder")
    _add_study_arguments(export, with_trial=True)
    export.add_argument("--out", required=True, help="new (or empty) output folder")
    export.add_argument("--dtype", help="float32, bfloat16, float16 (default: the checkpoint's own)")
    evaluate = commands.add_parser("eval", help="lm-eval benchmarks or held-out refusals of trials, stored on the study")
    _add_study_arguments(evaluate, with_trial=True)
    evaluate.add_argument("--pareto", action="store_true", help="every Pareto-optimal trial")
    evaluate.add_argument("--tasks", type=lambda s: s.split(","), help="comma-separated lm-eval tasks, e.g. optimizer_everyday_mc,mmlu")
    evaluate.add_argument("--limit", type=int, help="items per task (or prompts per set with --refusals)")
    evaluate.add_argument("--refusals", action="store_true", help="refusals and KL on prompts the study never saw")
    evaluate.add_argument("--harmful", help="held-out harmful prompts (default: the bundled held-out split)")
    evaluate.add_argument("--harmless", help="held-out harmless prompts (default: the bundled held-out split)")
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
    from optimizer.trials import open_study

    if args.command == "dashboard":
        from optimizer.dashboard import serve

        study, settings = open_study(args.study, args.storage, args.studies_dir)
        serve(settings.resolved_storage(), port=args.port)
        return
    study, settings = open_study(args.study, args.storage, args.studies_dir)
    if args.command == "show":
        from optimizer.study import show_study

        show_study(study, console)
    elif args.command == "export":
        from pathlib import Path

        from optimizer.export import export_trial

        if args.trial is None:
            raise UserError("export needs --trial N (see `python -m optimizer show`)")
        export_trial(study, settings, args.trial, Path(args.out), console, model=args.model, device=args.device, save_dtype=args.dtype)
    elif args.command == "chat":
        from optimizer.chat import chat
        from optimizer.trials import load_edited_model

        if args.trial is None:
            raise UserError("chat needs --trial N (see `python -m optimizer show`)")
        chat(load_edited_model(study, settings, args.trial, console, model=args.model, device=args.device), args.max_new_tokens)
    elif args.command == "eval":
        from optimizer import evaluate
        from optimizer.trials import load_edited_model

        if not args.tasks and not args.refusals:
            raise UserError(f"eval needs --tasks T1,T2 (e.g. {evaluate.LOCAL_TASK}) or --refusals")
        trials = evaluate.select_trials(study, args.trial, args.pareto)
        edited = load_edited_model(study, settings, trials[0].number, console, model=args.model, device=args.device)
        if args.refusals:
            console.print(evaluate.evaluate_refusals(study, edited, trials, args.harmful, args.harmless, args.limit, console))
        if args.tasks:
            console.print(evaluate.evaluate_tasks(study, edited, trials, args.tasks, args.limit, console))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # set_metric_names and TPE's `group` are stable in practice; their notices only add noise
    warnings.filterwarnings("ignore", message=".*experimental.*")
    # a log file gets a wide console, so that tables are not folded into 80 columns
    console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
    try:
        _dispatch(args, console)
    except UserError as e:
        console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        return EXIT_USAGE
    except KeyboardInterrupt:
        console.print("\n[yellow]Interrupted.[/] Finished trials are saved; run the same command again to resume.")
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
