"""The Optuna study of a run: creation and resume (the init handshake), the objective, the stop rule.

Storage, counting and heartbeats are `optimizer.storage`'s; whether a study may take this run's
trials is `optimizer.identity`'s; tables are `optimizer.report`'s; the search space is
`optimizer.params.suggest_params`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console

from optimizer import signals
from optimizer.config import Settings
from optimizer.dashboard import trial_note
from optimizer.errors import UserError
from optimizer.fill import FrontFill
from optimizer.front import Front
from optimizer.locks import file_lock
from optimizer.optuna_adapter import (
    is_told_elsewhere,
    use_capped_objective,
    use_hypervolume_weights,
    use_scott_bandwidth,
    use_sqrt_objective,
)
from optimizer.params import baseline_params, seeded_starts, suggest_params
from optimizer.report import best_tradeoff, bound_warnings, early_stop_line, front_trials, pareto_table, refusals_text, trial_line
from optimizer.storage import (
    check_url,
    connect,
    counted_trials,
    fail_stale_running_trials,
    is_interrupted,
    redacted,
    retried_numbers,
    sqlite_path,
    wait_for_initialisation,
)
from optimizer.verify import VerifyOptions, run_verification
from optimizer.workbench import RunSpec, Scorer, prepare_scoring, progress_bar, resolve

OBJECTIVES = ("refusal_rate", "kl_divergence")
MAX_CONSECUTIVE_FAILURES = 3


def run_record(settings: Settings) -> dict:
    """The settings a study stores (`run_settings`): everything needed to rebuild its trials, with
    the storage URL's password masked (the dashboard shows study attributes to anyone)."""
    record = dataclasses.asdict(settings)
    if settings.storage:
        record["storage"] = redacted(settings.storage)
    return record


def _connect(settings: Settings) -> optuna.storages.RDBStorage:
    return connect(settings.storage_url(), settings.heartbeat_interval, settings.heartbeat_grace, settings.db_retry_s)


def samples_flat(settings: Settings) -> bool:
    """Whether trials sample the flat space (`params.suggest_params`): the GP sampler models only the
    parameters every trial has."""
    return settings.sampler == "gp"


def make_sampler(settings: Settings, seed: int | None) -> optuna.samplers.BaseSampler:
    """The study's sampler: multivariate TPE with the rules `--tpe-bandwidth`, `--tpe-weights` and
    `--tpe-kl-scale` choose (`optuna_adapter`), or with `--sampler gp` Optuna's Gaussian-process
    sampler reading KL up to `--kl-limit`."""
    if settings.sampler == "gp":
        gp = optuna.samplers.GPSampler(seed=seed, n_startup_trials=settings.startup_trials)
        use_capped_objective(gp, OBJECTIVES.index("kl_divergence"), settings.kl_limit)
        return gp
    sampler = optuna.samplers.TPESampler(
        multivariate=True, group=True, constant_liar=True, n_startup_trials=settings.startup_trials, seed=seed
    )
    if settings.tpe_bandwidth == "scott":
        use_scott_bandwidth(sampler)
    if settings.tpe_weights == "hypervolume":
        use_hypervolume_weights(sampler)
    if settings.tpe_kl_scale == "sqrt":
        use_sqrt_objective(sampler, OBJECTIVES.index("kl_divergence"))
    return sampler


def _existing_attrs(storage: optuna.storages.BaseStorage, name: str) -> dict | None:
    """The attributes of the study `name` once its creator has written them; None if there is none."""
    if name not in {s.study_name for s in storage.get_all_studies()}:
        return None
    return wait_for_initialisation(storage, storage.get_study_id_from_name(name))


def load_or_create_study(
    storage: optuna.storages.BaseStorage, spec: RunSpec, starts: dict[str, dict]
) -> tuple[optuna.Study, bool]:
    """The study for this run. Creation is atomic (unique study name), so of several workers
    starting at once exactly one creates the study and enqueues the baseline trial, then the
    seeded `starts` (name -> parameters)."""
    settings, loaded = spec.settings, spec.loaded
    name = settings.study
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    attrs = _existing_attrs(storage, name)  # check before writing anything
    created = attrs is None
    if created:
        try:
            storage.create_new_study([optuna.study.StudyDirection.MINIMIZE] * 2, name)
        except optuna.exceptions.DuplicatedStudyError:
            created = False
            attrs = wait_for_initialisation(storage, storage.get_study_id_from_name(name))
    if attrs is not None:
        spec.identity.check_study(attrs, name)
    seed = settings.seed
    if seed is not None and not created:
        # a resumed run must not replay earlier random trials, nor two workers sample the same ones
        seed += len(storage.get_all_trials(storage.get_study_id_from_name(name), deepcopy=False))
        if not settings.storage_url().startswith("sqlite"):
            seed += os.getpid()
    study = optuna.load_study(study_name=name, storage=storage, sampler=make_sampler(settings, seed))
    if created:
        study.set_metric_names(list(OBJECTIVES))
        for key, value in spec.identity.attrs().items():
            study.set_user_attr(key, value)
        study.set_user_attr("run_settings", run_record(settings))
        study.set_user_attr("n_layers", loaded.n_layers)
        study.enqueue_trial(baseline_params(loaded.n_layers, settings), user_attrs={"baseline": True})
        for start, params in starts.items():
            study.enqueue_trial(params, user_attrs={"seeded": start})
        study.set_user_attr("initialised", True)
    return study, created


def feasible(trial: FrozenTrial) -> bool:
    """Optuna's rule: every constraint the trial set (`REFUSES_LESS`, --kl-floor's) is at most 0."""
    return all(value <= 0 for value in trial.constraints.values())


# A trial is feasible only if it refuses less often than the unedited model. The baseline trial (the
# unedited model, enqueued first for reference) has KL 0, which no edit beats, so it sat on every
# Pareto front, and the TPE sampler builds its density of good parameters from front trials: with
# ceil(10%) of the trials in that set, the baseline was one of its three from trial 21 to 30 of a
# 60-trial study, and the sampler proposed edits near weight 0 that changed nothing. On the second
# benchmark model one seed spent 41 of 59 trials there (benchmarks/RESULTS.md). Optuna's sampler
# puts infeasible trials among the bad ones, and `best_trials` leaves them out; an edit that
# refuses as often as the unedited model is no trade-off anyway. The value is in refusal rates with
# half a prompt of margin: one refusal fewer than the baseline is feasible, as many is not.
REFUSES_LESS = "refuses_less"


def finished_front(study: optuna.Study, n_harmful: int) -> Front:
    """The feasible trials finished so far (by any worker), and the baseline, for early stopping:
    the Pareto front (`study.best_trials`) is made of feasible trials only, so only they may settle
    another's place; the baseline may too, since a trial it dominates refuses at least as often,
    before and after the stop, and is infeasible either way."""
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return Front.of((t.values for t in done if feasible(t) or t.user_attrs.get("baseline")), n_harmful)


def make_objective(scorer: Scorer) -> Callable[[optuna.Trial], tuple[float, float]]:
    spec = scorer.spec
    settings = spec.settings
    n_harmful = len(scorer.baseline_refusals.refused)
    baseline_rate = scorer.baseline_refusals.count / n_harmful

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        # Ctrl-C or SIGTERM anywhere in the trial, the writes of its results included: not counted, re-run
        try:
            signals.raise_pending()  # one that landed where Python could only print it, in the last trial
            return score_and_record(trial)
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)
            raise

    def score_and_record(trial: optuna.Trial) -> tuple[float, float]:
        start = time.perf_counter()
        with warnings.catch_warnings():
            if trial.user_attrs.get("baseline"):  # its weight 0 lies below a --min-weight range on purpose
                warnings.filterwarnings("ignore", message="Fixed parameter .* out of range")
            params = suggest_params(trial, spec.loaded.n_layers, settings, flat=samples_flat(settings))
        plan, info = scorer.prepared.plan(params)
        directions_s = time.perf_counter() - start
        front = finished_front(trial.study, n_harmful) if settings.early_stop else None
        scores = scorer.score(plan, front)
        timings = {"directions_s": round(directions_s, 4), **{k: round(v, 3) for k, v in scores.timings.items()}}
        timings["total_s"] = round(time.perf_counter() - start, 3)
        refusals = {
            None: f"{scores.refusals}/{scores.n_harmful}",
            "dominated": f">={scores.refusals}/{scores.n_harmful}",
            "kl_limit": f"not counted (KL above --kl-limit {settings.kl_limit:g})",
        }[scores.stopped]
        trial.set_user_attr("refusals", refusals)
        if scores.stopped:
            trial.set_user_attr("early_stop", scores.stopped)
        trial.set_user_attr("kl_divergence", round(scores.kl, 6))
        trial.set_constraint(REFUSES_LESS, scores.refusal_rate - baseline_rate + 0.5 / n_harmful)
        if settings.kl_floor > 0:
            trial.set_constraint("kl_floor", settings.kl_floor - scores.kl)
        trial.set_user_attr("alpha", params.alpha)
        trial.set_user_attr("direction", params.describe_direction())
        trial.set_user_attr("fallback_layers", info.fallback_layers)
        trial.set_user_attr("timings", timings)
        trial.set_user_attr("scored_from_cache", scores.from_cache)
        trial.set_user_attr("sample_responses", [{"prompt": p, "response": r} for p, r in scores.responses])
        trial_note(trial, scores.responses, refusals, scores.kl, stopped=scores.stopped)
        return scores.refusal_rate, scores.kl

    return objective


class StopAtBudget:
    """Stop once the study holds `total` counted trials, or after repeated failures in a row."""

    def __init__(self, total: int):
        self.total = total
        self.failures_in_a_row = 0

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        # a trial cut off (taken over by another worker, interrupted) says nothing about the setup
        failed = trial.state == TrialState.FAIL and not is_interrupted(trial, retried_numbers(study.get_trials(deepcopy=False)))
        self.failures_in_a_row = self.failures_in_a_row + 1 if failed else 0
        if counted_trials(study) >= self.total:
            study.stop()
        elif self.failures_in_a_row >= MAX_CONSECUTIVE_FAILURES:
            study.stop()
            raise UserError(
                f"{self.failures_in_a_row} trials failed in a row (last: trial {trial.number}); see the log above for the error"
            )


def with_stored_response_prefix(settings: Settings) -> Settings:
    """The settings with the response prefix the study recorded, unless one is given: detecting it
    again could give another answer on another device or dtype, and every process must format the
    prompts alike. A study recorded before prefixes were detected appended none."""
    url = settings.storage_url()
    db = sqlite_path(url)
    if settings.response_prefix is not None or (db is not None and not db.exists()):
        return settings
    attrs = _existing_attrs(_connect(settings), settings.study)
    if attrs is None:
        return settings
    return dataclasses.replace(settings, response_prefix=attrs.get("run_settings", {}).get("response_prefix", ""))


def run_study(settings: Settings, console: Console) -> optuna.Study:
    """`python -m optimizer run`: continue (or start) the study until it holds `settings.trials` trials."""
    url = settings.storage_url()
    if settings.storage:  # the default one is ours to create
        check_url(url)
    spec = resolve(with_stored_response_prefix(settings), console)
    if not settings.storage:
        Path(settings.studies_dir).mkdir(parents=True, exist_ok=True)
    db = sqlite_path(url)
    if db is None:
        return _run_in(spec, url)
    # SQLite has no heartbeats and serialises writers: one process per study file, by lock
    with file_lock(db.with_name(db.name + ".lock"), wait=False) as owned:
        if not owned:
            raise UserError(
                f"study file {db} is in use by another optimizer process; SQLite takes one worker per study: "
                "wait for it to finish, or use --storage postgresql://... for several workers"
            )
        return _run_in(spec, url)


def _run_in(spec: RunSpec, url: str) -> optuna.Study:
    settings, console, loaded = spec.settings, spec.console, spec.loaded
    db = sqlite_path(url)
    storage = None
    if db is None or db.exists():
        # refuse an incompatible study before computing anything into its cache
        storage = _connect(settings)
        attrs = _existing_attrs(storage, settings.study)
        if attrs is not None:
            spec.identity.check_study(attrs, settings.study)
    # one-time work before the study is created, so that bad data (NaN residuals...) leaves no study behind
    scorer = prepare_scoring(spec, settings.cache_path())
    storage = storage or _connect(settings)
    starts = seeded_starts(scorer.prepared.stats, settings) if settings.seeded_starts else {}
    study, created = load_or_create_study(storage, spec, starts)
    base = scorer.baseline_refusals
    placed = f" ({loaded.placement()})" if loaded.split else ""
    console.print(
        f"Study {settings.study!r} in {redacted(url)} ({'new' if created else 'resumed'}); model {loaded.source} on "
        f"{loaded.device} {str(loaded.dtype).removeprefix('torch.')}, {loaded.n_layers} layers{placed}; "
        f"baseline refusals {base.count}/{len(base.refused)}"
    )
    study.set_user_attr("baseline_refusals", f"{base.count}/{len(base.refused)}")
    if db is not None:
        fail_stale_running_trials(study, console)
    done = counted_trials(study)
    remaining = settings.trials - done
    if remaining <= 0:
        console.print(f"Study already holds {done} finished trials (asked for {settings.trials}); nothing to run.")
    else:
        _optimize(study, scorer, remaining)
    stops = early_stop_line(study) if settings.early_stop else None
    if stops:
        console.print(stops)
    console.print(pareto_table(study))
    for line in bound_warnings(study):
        console.print(f"[yellow]{line}[/]", highlight=False)
    front = front_trials(study)
    if settings.verify and front:
        options = VerifyOptions(settings.verify_max_new_tokens, settings.max_kl, settings.verify_prompts)
        run_verification(scorer.prepared, scorer.judge, study, storage, front, options, console)
    return study


def _optimize(study: optuna.Study, scorer: Scorer, remaining: int) -> None:
    total, console = scorer.spec.settings.trials, scorer.spec.console
    _hide_interrupt_tracebacks()
    with progress_bar(console) as progress:
        task = progress.add_task("Trials", total=total, completed=total - remaining)

        def show(study: optuna.Study, trial: FrozenTrial) -> None:
            done = counted_trials(study)
            progress.update(task, completed=done)
            best = best_tradeoff(study)
            if best is not None:
                progress.update(
                    task, description=f"Trials (best: {refusals_text(best)} refusals, KL {best.values[1]:.3f}, #{best.number})"
                )
            if not console.is_terminal:  # a log file gets no live bar: one line per trial instead
                console.print(trial_line(trial, done, total))

        fill = FrontFill(scorer.spec.settings)
        callbacks: list[Callable[[optuna.Study, FrozenTrial], None]] = [StopAtBudget(total), fill, show]
        optimize_until_done(study, make_objective(scorer), remaining, callbacks, total, console.print)


def optimize_until_done(
    study: optuna.Study,
    objective: Callable[[optuna.Trial], tuple[float, float]],
    n_trials: int,
    callbacks: list[Callable[[optuna.Study, FrozenTrial], None]],
    total: int,
    say: Callable[[str], None],
) -> None:
    """`study.optimize`, started again when Optuna stops it because another worker failed this
    worker's trial meanwhile (its heartbeat went stale: a database outage longer than the grace
    period, a stalled machine). That trial is run again from its parameters by the other worker;
    this one goes on with the next, until the study holds `total` counted trials."""
    while True:
        try:
            study.optimize(objective, n_trials=n_trials, callbacks=callbacks, catch=(Exception,))
            return
        except Exception as e:
            # a Ctrl-C or SIGTERM while Optuna tells a trial surfaces as Optuna's own error (an
            # UnboundLocalError in its cleanup): stop as for the interrupt itself
            cause: BaseException | None = e
            while cause is not None and not isinstance(cause, KeyboardInterrupt):
                cause = cause.__context__
            if cause is not None:
                raise cause from None
            if not is_told_elsewhere(e):
                raise
        say(
            "[yellow]A trial of this worker was failed by another worker (no heartbeat from here for longer than "
            "--heartbeat-grace); it is run again from its parameters. Going on.[/]"
        )
        if counted_trials(study) >= total:
            return


def _hide_interrupt_tracebacks() -> None:
    """Ctrl-C and SIGTERM are expected ways to stop: keep Optuna from logging them as failures with a traceback."""

    class NoInterrupts(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            error = record.exc_info[1] if record.exc_info else None  # Ctrl-C, or SIGTERM (signals.Terminated)
            return not isinstance(error, KeyboardInterrupt) and "KeyboardInterrupt" not in record.getMessage()

    for handler in logging.getLogger("optuna").handlers:
        if not any(isinstance(f, NoInterrupts) for f in handler.filters):
            handler.addFilter(NoInterrupts())
