"""`python -m optimizer eval`: lm-eval benchmarks and held-out refusals for trials, stored on the study."""

from __future__ import annotations

import tempfile
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import optuna
from optuna.trial import FrozenTrial
from rich.console import Console
from rich.table import Table

from optimizer.errors import UserError
from optimizer.report import front_trials
from optimizer.response_prefix import answer_part
from optimizer.scoring import first_token_logprobs, generate_and_classify, kl_divergence
from optimizer.stored import StoredStudy, finished_trial
from optimizer.trials import EditedModel
from optimizer.verify import heldout_prompts
from optimizer.workbench import FastPaths, load_judge

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager

LOCAL_TASK = "optimizer_everyday_mc"
LOCAL_TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def local_task_dir() -> Path:
    """A folder with the bundled offline task's YAML, pointing at its JSONL by absolute path."""
    data = Path(str(resources.files("optimizer") / "data" / "tasks" / "everyday_mc.jsonl"))
    folder = Path(tempfile.mkdtemp(prefix="optimizer-tasks-"))
    (folder / f"{LOCAL_TASK}.yaml").write_text(LOCAL_TASK_YAML.format(name=LOCAL_TASK, data=data))
    return folder


def apply_trial(edited: EditedModel, trial: FrozenTrial | None) -> None:
    """Point the hooks at `trial`'s ablation, or clear them for the original model (None)."""
    if trial is None:
        edited.prepared.hooks.clear()
        return
    edited.prepared.hooks.apply(edited.plan_of(trial))


def task_manager(tasks: list[str]) -> TaskManager:
    """lm-eval's task index with the bundled offline task added; refuses task names it lacks.
    Building it reads every task YAML lm-eval ships (seconds), so one serves all of a run's evaluations."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(local_task_dir()))
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(
            f"unknown lm-eval task(s) {', '.join(unknown)}; try {LOCAL_TASK} (offline) or names from `lm-eval ls tasks`"
        )
    return manager


def run_lm_eval(
    edited: EditedModel, tasks: list[str], limit: int | None, batch_size: int, manager: TaskManager
) -> dict[str, float]:
    """Scores (first numeric metric of each task) of the model in its current hooked state; `manager`
    from `task_manager(tasks)`."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    loaded = edited.prepared.loaded
    lm = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=batch_size, device=str(loaded.device))
    results = lm_eval.simple_evaluate(
        model=lm, tasks=tasks, limit=limit, task_manager=manager, log_samples=False, verbosity="ERROR"
    )
    scores = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            if isinstance(value, float) and not key.endswith("_stderr,none") and "stderr" not in key:
                scores[f"{task}/{key.split(',')[0]}"] = value
                break
    return scores


def evaluate_tasks(
    stored: StoredStudy,
    edited: EditedModel,
    trials: list[FrozenTrial],
    tasks: list[str],
    limit: int | None,
    console: Console,
) -> Table:
    """lm-eval scores of the original model and each trial, stored as user attributes."""
    study, batch_size = stored.study, edited.prepared.batch_size
    manager = task_manager(tasks)
    apply_trial(edited, None)
    with console.status("lm-eval: original model..."):
        original = run_lm_eval(edited, tasks, limit, batch_size, manager)
    for key, value in original.items():
        study.set_user_attr(f"eval_original/{key}", value)
    table = Table(title="lm-eval scores" + (f" (limit {limit})" if limit else ""))
    table.add_column("metric")
    table.add_column("original")
    columns = []
    for trial in trials:
        apply_trial(edited, trial)
        with console.status(f"lm-eval: trial {trial.number}..."):
            scores = run_lm_eval(edited, tasks, limit, batch_size, manager)
        for key, value in scores.items():
            stored.annotate(trial, f"eval/{key}", value)
        table.add_column(f"trial {trial.number}")
        columns.append(scores)
    apply_trial(edited, None)
    for key, value in original.items():
        table.add_row(key, f"{value:.4f}", *(f"{c.get(key, float('nan')):.4f}" for c in columns))
    return table


def evaluate_refusals(
    stored: StoredStudy,
    edited: EditedModel,
    trials: list[FrozenTrial],
    harmful: str | None,
    harmless: str | None,
    limit: int | None,
    console: Console,
    paths: FastPaths,
) -> Table:
    """Refusals k/N and KL on prompts the study never saw (default: the bundled held-out splits),
    generated through `paths` (workbench.cpu_fast_paths; `FastPaths()` for the plain path)."""
    study, settings, loaded = stored.study, edited.prepared.settings, edited.prepared.loaded
    answer = answer_part(settings.response_prefix or "")
    judge = load_judge(settings, loaded)
    held = heldout_prompts(edited.prepared, harmful, harmless, limit)
    harmful_texts, harmless_texts, source = held.harmful_texts, held.harmless_texts, held.source
    batch, cap, packed = edited.prepared.batch_size, settings.max_new_tokens, paths.packed_prefill
    refusals = lambda: generate_and_classify(
        loaded, harmful_texts, cap, judge, batch, held.harmful, answer_prefix=answer, packed=packed
    )
    logprobs = lambda: first_token_logprobs(loaded, harmless_texts, batch, packed)
    apply_trial(edited, None)
    with console.status("Held-out prompts: original model..."):
        base_logprobs = logprobs()
        base = refusals()
    study.set_user_attr("heldout_baseline_refusals", f"{base.count}/{len(base.refused)}")
    table = Table(title=f"Held-out refusals and KL ({source})")
    for column in ("trial", "refusals", "KL divergence"):
        table.add_column(column)
    table.add_row("original", f"{base.count}/{len(base.refused)}", "0")
    for trial in trials:
        apply_trial(edited, trial)
        with console.status(f"Held-out prompts: trial {trial.number}..."):
            kl = kl_divergence(base_logprobs, logprobs())
            result = refusals()
        stored.annotate(trial, "heldout_refusals", f"{result.count}/{len(result.refused)}")
        stored.annotate(trial, "heldout_kl_divergence", round(kl, 6))
        stored.annotate(trial, "heldout_prompts", source)
        table.add_row(str(trial.number), f"{result.count}/{len(result.refused)}", f"{kl:.4f}")
    apply_trial(edited, None)
    return table


def select_trials(study: optuna.Study, number: int | None, pareto: bool) -> list[FrozenTrial]:
    if pareto:
        trials = front_trials(study)
        if not trials:
            raise UserError("the study has no Pareto-optimal edited trials yet; run more trials first")
        return trials
    if number is None:
        raise UserError("give --trial N or --pareto")
    return [finished_trial(study, number)]
