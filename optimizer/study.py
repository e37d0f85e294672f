"""The Optuna study: storage, search space, objective, budget, resume and the Pareto table."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console
from rich.table import Table

from optimizer.components import COMPONENTS
from optimizer.config import Settings
from optimizer.dashboard import trial_note
from optimizer.errors import UserError
from optimizer.locks import file_lock
from optimizer.params import Kernel, TrialParams, build_plan
from optimizer.workbench import Workbench, progress_bar

OBJECTIVES = ("refusal_rate", "kl_divergence")
SUPPORTED_SCHEMES = ("sqlite", "postgresql", "mysql")
MAX_CONSECUTIVE_FAILURES = 3
# the trade-off shown while running: fewest refusals among trials within this KL
PROGRESS_KL_LIMIT = 1.0


# -- storage ---------------------------------------------------------------------------------


def check_storage_url(url: str) -> None:
    """Reject malformed or unsupported URLs before anything is loaded or written."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        raise UserError(f"malformed storage URL {url!r}; give --storage as sqlite:///path/to/study.db or postgresql://user:pass@host/db") from None
    backend = parsed.get_backend_name()
    if backend not in SUPPORTED_SCHEMES:
        raise UserError(f"unsupported storage scheme {backend!r} in {url!r}; give --storage as sqlite:///FILE.db or postgresql://...")
    if backend == "sqlite" and parsed.database and parsed.database != ":memory:":
        parent = Path(parsed.database).parent
        if not parent.is_dir():
            raise UserError(f"the folder {parent} of the SQLite storage does not exist; create it or fix --storage")


def open_storage(url: str, heartbeat_interval: int = 30, heartbeat_grace: int = 120) -> optuna.storages.BaseStorage:
    """RDB storage; on server databases with heartbeats, so that a killed worker's trial is failed
    (and retried) by the others instead of staying RUNNING forever."""
    check_storage_url(url)
    kwargs: dict = {"engine_kwargs": {"pool_pre_ping": True}}
    if url.startswith("sqlite"):
        kwargs["engine_kwargs"]["connect_args"] = {"timeout": 60}  # wait for a lock instead of failing
    else:
        if url.startswith("postgresql"):
            kwargs["engine_kwargs"]["connect_args"] = {"connect_timeout": 10}
        kwargs.update(heartbeat_interval=heartbeat_interval, grace_period=heartbeat_grace, heartbeat_stale_trial_callback=retry_interrupted_trial)
    from sqlalchemy.exc import IntegrityError

    for attempt in range(3):
        try:
            return optuna.storages.RDBStorage(url, **kwargs)
        except IntegrityError:  # another worker was creating the tables at the same moment
            time.sleep(1 + attempt)
        except Exception as e:  # sqlalchemy raises many types for unreachable servers
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"cannot open storage {url}: {first}; check the URL and that the server is running") from None
    raise UserError(f"cannot open storage {url}: its tables could not be created; try again")


def retry_interrupted_trial(study: optuna.Study, trial: FrozenTrial) -> None:
    """A trial whose worker died: mark it interrupted (not counted) and run its parameters again."""
    annotate_trial(study, trial, "interrupted", True)
    study.enqueue_trial(trial.params, user_attrs={**{k: v for k, v in trial.user_attrs.items() if k == "baseline"}, "retry_of": trial.number})


# -- counting ---------------------------------------------------------------------------------


def is_interrupted(trial: FrozenTrial) -> bool:
    return trial.state == TrialState.FAIL and bool(trial.user_attrs.get("interrupted"))


def counted_trials(study: optuna.Study) -> int:
    """Trials that count toward the budget: finished in any state, except ones cut off by an
    interruption (Ctrl-C, a killed process), which are retried instead of counted."""
    finished = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    return sum(1 for t in study.get_trials(deepcopy=False, states=finished) if not is_interrupted(t))


def fail_stale_running_trials(study: optuna.Study, console: Console) -> int:
    """On SQLite (one process per study, no heartbeat) a RUNNING trial at start was left by a dead process."""
    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for trial in stale:
        study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        retry_interrupted_trial(study, trial)
    if stale:
        console.print(f"[yellow]Trial(s) {[t.number for t in stale]} were left RUNNING by a process that died: marked failed, not counted, and queued again[/]")
    return len(stale)


# -- search space -----------------------------------------------------------------------------


def suggest_params(trial: optuna.Trial, n_layers: int, settings: Settings) -> TrialParams:
    last = n_layers - 1
    methods = settings.direction_methods
    method = methods[0] if len(methods) == 1 else trial.suggest_categorical("direction_method", methods)
    alpha = trial.suggest_float("alpha", 0.0, settings.alpha_max) if method == "contrastive" else None
    scope = trial.suggest_categorical("direction_scope", ["global", "per_layer"])
    index = trial.suggest_float("direction_index", 0.2 * last, 0.9 * last) if scope == "global" else None
    kernels = {
        c: Kernel(
            peak_weight=trial.suggest_float(f"{c}_peak_weight", 0.0, 1.5),
            peak_layer=trial.suggest_float(f"{c}_peak_layer", 0.3 * last, last),
            min_ratio=trial.suggest_float(f"{c}_min_ratio", 0.0, 1.0),
            falloff=trial.suggest_float(f"{c}_falloff", 1.0, max(1.0, 0.6 * last)),
        )
        for c in COMPONENTS
    }
    return TrialParams(method, alpha, index, kernels)


def baseline_params(n_layers: int, settings: Settings) -> dict:
    """Parameters of the unedited model inside the search space: every peak weight 0."""
    last = n_layers - 1
    params: dict = {"direction_scope": "global", "direction_index": 0.5 * last}
    if len(settings.direction_methods) > 1:
        params["direction_method"] = "mean_diff" if "mean_diff" in settings.direction_methods else settings.direction_methods[0]
    if params.get("direction_method", settings.direction_methods[0]) == "contrastive":
        params["alpha"] = 0.0
    for c in COMPONENTS:
        params.update({f"{c}_peak_weight": 0.0, f"{c}_peak_layer": last, f"{c}_min_ratio": 0.0, f"{c}_falloff": 1.0})
    return params


# -- study ------------------------------------------------------------------------------------


# Settings that change what a trial's parameters do to the model (not what is cached).
EDIT_VARIANTS = ("projected_directions", "norm_preserving")


def study_settings_record(bench: Workbench) -> dict:
    """The settings that make trials comparable; stored on the study and checked on resume."""
    s = bench.settings
    return {
        "scoring_prompts": s.scoring_prompts,
        "direction_prompts": s.direction_prompts,
        "max_new_tokens": s.max_new_tokens,
        "system_prompt": s.system_prompt,
        "harmful": s.harmful or "bundled",
        "harmless": s.harmless or "bundled",
        "refusal_markers": sorted(s.refusal_markers),
        "template_kwargs": s.template_kwargs(),
        "response_prefix": s.response_prefix,
        "winsorize": s.winsorize,
        **{k: getattr(s, k) for k in EDIT_VARIANTS},
    }


def check_compatible(attrs: dict, bench: Workbench) -> None:
    """Refuse to add trials to a study made with another model or other scoring settings."""
    name = bench.settings.study
    if attrs.get("model_fingerprint") != bench.model_fingerprint:
        raise UserError(
            f"study {name!r} was created with model {attrs.get('model')!r} (fingerprint {attrs.get('model_fingerprint')}), "
            f"not {bench.loaded.source!r} (fingerprint {bench.model_fingerprint}); use that model or another --study name"
        )
    if attrs.get("scoring_fingerprint") != bench.scoring_fingerprint() or attrs.get("directions_fingerprint") != bench.directions_fingerprint():
        stored = attrs.get("settings", {})
        current = study_settings_record(bench)
        differ = sorted(k for k in current if stored.get(k) != current[k]) or ["prompt contents"]
        raise UserError(
            f"study {name!r} was created with other settings ({', '.join(differ)} differ), so its trials are not comparable; "
            "run with the original settings or use another --study name"
        )
    stored = attrs.get("settings", {})
    changed = [k for k in EDIT_VARIANTS if stored.get(k, False) != getattr(bench.settings, k)]
    if changed:
        raise UserError(
            f"study {name!r} was run with {', '.join(f'{k}={stored.get(k, False)}' for k in changed)}; the same parameters "
            "would edit the model differently now: run with the original settings or use another --study name"
        )


STUDY_INIT_WAIT_S = 120


def _wait_for_initialisation(storage: optuna.storages.BaseStorage, study_id: int) -> dict:
    """Another worker created the study a moment ago: wait until it has written the attributes."""
    deadline = time.monotonic() + STUDY_INIT_WAIT_S
    while True:
        attrs = storage.get_study_user_attrs(study_id)
        if attrs.get("initialised"):
            return attrs
        if time.monotonic() > deadline:
            raise UserError(
                f"study {storage.get_study_name_from_id(study_id)!r} exists but was never initialised (its creator died early?); "
                "delete it or use another --study name"
            )
        time.sleep(0.5)


def load_or_create_study(storage: optuna.storages.BaseStorage, bench: Workbench) -> tuple[optuna.Study, bool]:
    """The study for these settings. Creation is atomic (unique study name), so of several workers
    starting at once exactly one creates the study and enqueues the baseline trial."""
    settings = bench.settings
    name = settings.study
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    existing = name in {s.study_name for s in storage.get_all_studies()}
    if existing:  # check before writing anything
        study_id = storage.get_study_id_from_name(name)
        check_compatible(_wait_for_initialisation(storage, study_id), bench)
        created = False
    else:
        try:
            study_id = storage.create_new_study([optuna.study.StudyDirection.MINIMIZE] * 2, name)
            created = True
        except optuna.exceptions.DuplicatedStudyError:
            study_id = storage.get_study_id_from_name(name)
            check_compatible(_wait_for_initialisation(storage, study_id), bench)
            created = False
    seed = settings.seed
    if seed is not None and not created:
        # a resumed run must not replay earlier random trials, nor two workers sample the same ones
        seed += len(storage.get_all_trials(study_id, deepcopy=False))
        if not isinstance(storage, optuna.storages.RDBStorage) or not storage.url.startswith("sqlite"):
            seed += os.getpid()
    sampler = optuna.samplers.TPESampler(
        multivariate=True, group=True, constant_liar=True, n_startup_trials=settings.startup_trials, seed=seed
    )
    study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
    if created:
        study.set_metric_names(list(OBJECTIVES))
        study.set_user_attr("model", bench.loaded.source)
        study.set_user_attr("model_fingerprint", bench.model_fingerprint)
        study.set_user_attr("scoring_fingerprint", bench.scoring_fingerprint())
        study.set_user_attr("directions_fingerprint", bench.directions_fingerprint())
        study.set_user_attr("settings", study_settings_record(bench))
        study.set_user_attr("run_settings", dataclasses.asdict(settings))
        study.set_user_attr("n_layers", bench.loaded.n_layers)
        study.enqueue_trial(baseline_params(bench.loaded.n_layers, settings), user_attrs={"baseline": True})
        study.set_user_attr("initialised", True)
    return study, created


def refusals_text(trial: FrozenTrial) -> str:
    return str(trial.user_attrs.get("refusals", "?"))


def make_objective(bench: Workbench):
    settings = bench.settings

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        try:
            start = time.perf_counter()
            params = suggest_params(trial, bench.loaded.n_layers, settings)
            plan, info = build_plan(params, bench.stats, bench.settings.projected_directions)
            directions_s = time.perf_counter() - start
            scores = bench.score(plan)
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)
            raise
        timings = {"directions_s": round(directions_s, 4), **{k: round(v, 3) for k, v in scores.timings.items()}}
        timings["total_s"] = round(time.perf_counter() - start, 3)
        trial.set_user_attr("refusals", f"{scores.refusals}/{scores.n_harmful}")
        trial.set_user_attr("kl_divergence", round(scores.kl, 6))
        trial.set_user_attr("alpha", params.alpha)
        trial.set_user_attr("direction", params.describe_direction())
        trial.set_user_attr("fallback_layers", info.fallback_layers)
        trial.set_user_attr("timings", timings)
        trial.set_user_attr("scored_from_cache", scores.from_cache)
        trial.set_user_attr("sample_responses", [{"prompt": p, "response": r} for p, r in scores.responses])
        trial_note(trial, scores.responses, f"{scores.refusals}/{scores.n_harmful}", scores.kl)
        return scores.refusal_rate, scores.kl

    return objective


class StopAtBudget:
    """Stop once the study holds `total` counted trials, or after repeated failures in a row."""

    def __init__(self, total: int):
        self.total = total
        self.failures_in_a_row = 0

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.failures_in_a_row = self.failures_in_a_row + 1 if trial.state == TrialState.FAIL else 0
        if counted_trials(study) >= self.total:
            study.stop()
        elif self.failures_in_a_row >= MAX_CONSECUTIVE_FAILURES:
            study.stop()
            raise UserError(f"{self.failures_in_a_row} trials failed in a row (last: trial {trial.number}); see the log above for the error")


def trial_line(trial: FrozenTrial, done: int, total: int) -> str:
    if trial.state != TrialState.COMPLETE:
        return f"[{done}/{total}] trial {trial.number} {trial.state.name.lower()}"
    seconds = trial.user_attrs.get("timings", {}).get("total_s", 0.0)
    return f"[{done}/{total}] trial {trial.number}: refusals {refusals_text(trial)}, KL {trial.values[1]:.4f}, {seconds:.1f} s"


def best_tradeoff(study: optuna.Study) -> FrozenTrial | None:
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.values[1] <= PROGRESS_KL_LIMIT]
    return min(done, key=lambda t: (t.values[0], t.values[1]), default=None)


def pareto_table(study: optuna.Study) -> Table:
    table = Table(title=f"Pareto-optimal trials of study {study.study_name!r}")
    for column in ("trial", "refusals", "KL divergence", "direction", "attn kernel", "mlp kernel"):
        table.add_column(column)
    table.caption = "kernel: peak weight @ peak layer, weight ratio at the edge, falloff in layers"
    for t in sorted(study.best_trials, key=lambda t: (t.values[0], t.values[1])):
        if t.user_attrs.get("baseline"):
            table.add_row(f"{t.number} (baseline)", refusals_text(t), f"{t.values[1]:.4f}", "none (unedited)", "-", "-")
            continue
        kernels = [
            f"{t.params[f'{c}_peak_weight']:.2f} @{t.params[f'{c}_peak_layer']:.1f}, "
            f"{t.params[f'{c}_min_ratio']:.2f}, {t.params[f'{c}_falloff']:.1f}"
            for c in COMPONENTS
        ]
        table.add_row(str(t.number), refusals_text(t), f"{t.values[1]:.4f}", str(t.user_attrs.get("direction", "")), *kernels)
    return table


def sqlite_path(url: str) -> Path | None:
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database)


def with_stored_response_prefix(settings: Settings, url: str) -> Settings:
    """The settings with the response prefix the study recorded, unless one is given: detecting it
    again could give another answer on another device or dtype, and every process must format the
    prompts alike. A study recorded before prefixes were detected appended none."""
    db = sqlite_path(url)
    if settings.response_prefix is not None or (db is not None and not db.exists()):
        return settings
    storage = open_storage(url, settings.heartbeat_interval, settings.heartbeat_grace)
    if settings.study not in {s.study_name for s in storage.get_all_studies()}:
        return settings
    attrs = _wait_for_initialisation(storage, storage.get_study_id_from_name(settings.study))
    return dataclasses.replace(settings, response_prefix=attrs.get("run_settings", {}).get("response_prefix", ""))


def run_study(settings: Settings, console: Console) -> optuna.Study:
    """`python -m optimizer run`: continue (or start) the study until it holds `settings.trials` trials."""
    url = settings.resolved_storage()
    if settings.storage:  # the default one is ours to create
        check_storage_url(url)
    settings = with_stored_response_prefix(settings, url)
    bench = Workbench.open(settings, console)
    if not settings.storage:
        Path(settings.studies_dir).mkdir(parents=True, exist_ok=True)
    db = sqlite_path(url)
    if db is None:
        return _run_with_storage(settings, bench, url, console)
    # SQLite has no heartbeats and serialises writers: one process per study file, by lock
    with file_lock(db.with_name(db.name + ".lock"), wait=False) as owned:
        if not owned:
            raise UserError(
                f"study file {db} is in use by another optimizer process; SQLite takes one worker per study: "
                "wait for it to finish, or use --storage postgresql://... for several workers"
            )
        return _run_with_storage(settings, bench, url, console)


def _run_with_storage(settings: Settings, bench: Workbench, url: str, console: Console) -> optuna.Study:
    db = sqlite_path(url)
    storage = None
    if db is None or db.exists():
        # refuse an incompatible study before computing anything into its cache
        storage = open_storage(url, settings.heartbeat_interval, settings.heartbeat_grace)
        if settings.study in {s.study_name for s in storage.get_all_studies()}:
            check_compatible(_wait_for_initialisation(storage, storage.get_study_id_from_name(settings.study)), bench)
    # one-time work before the study is created, so that bad data (NaN residuals...) leaves no study behind
    bench.prepare(settings.cache_path())
    storage = storage or open_storage(url, settings.heartbeat_interval, settings.heartbeat_grace)
    study, created = load_or_create_study(storage, bench)
    base = bench.baseline_refusals
    console.print(
        f"Study {settings.study!r} in {url} ({'new' if created else 'resumed'}); model {bench.loaded.source} on "
        f"{bench.loaded.device} {str(bench.loaded.dtype).removeprefix('torch.')}, {bench.loaded.n_layers} layers; "
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
        _optimize(study, bench, remaining, console)
    console.print(pareto_table(study))
    return study


def _optimize(study: optuna.Study, bench: Workbench, remaining: int, console: Console) -> None:
    total = bench.settings.trials
    _hide_interrupt_tracebacks()
    with progress_bar(console) as progress:
        task = progress.add_task("Trials", total=total, completed=total - remaining)

        def show(study: optuna.Study, trial: FrozenTrial) -> None:
            done = counted_trials(study)
            progress.update(task, completed=done)
            best = best_tradeoff(study)
            if best is not None:
                progress.update(task, description=f"Trials (best: {refusals_text(best)} refusals, KL {best.values[1]:.3f}, #{best.number})")
            if not console.is_terminal:  # a log file gets no live bar: one line per trial instead
                console.print(trial_line(trial, done, total))

        study.optimize(make_objective(bench), n_trials=remaining, callbacks=[StopAtBudget(total), show], catch=(Exception,))


def _hide_interrupt_tracebacks() -> None:
    """Ctrl-C is an expected way to stop: keep Optuna from logging it as a failure with a traceback."""

    class NoInterrupts(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "KeyboardInterrupt" not in record.getMessage()

    for handler in logging.getLogger("optuna").handlers:
        if not any(isinstance(f, NoInterrupts) for f in handler.filters):
            handler.addFilter(NoInterrupts())


def annotate_trial(study: optuna.Study, trial: FrozenTrial, key: str, value: object) -> None:
    """Set a user attribute on a finished trial (export paths, eval scores).

    Optuna's API refuses to change finished trials, but the dashboard reads user attributes from
    the same table whenever they appear, so for RDB storages we write the row ourselves.
    """
    from optuna.storages._rdb import models

    storage = getattr(study._storage, "_backend", study._storage)
    if not isinstance(storage, optuna.storages.RDBStorage):
        study.set_user_attr(f"trial_{trial.number}_{key}", value)
        return
    session = storage.scoped_session()
    try:
        row = session.query(models.TrialUserAttributeModel).filter_by(trial_id=trial._trial_id, key=key).one_or_none()
        if row is None:
            session.add(models.TrialUserAttributeModel(trial_id=trial._trial_id, key=key, value_json=json.dumps(value)))
        else:
            row.value_json = json.dumps(value)
        session.commit()
    except Exception:
        session.rollback()
        raise
    finally:
        session.close()


def show_study(study: optuna.Study, console: Console) -> None:
    """`python -m optimizer show`: settings, baseline, trial counts and the Pareto table."""
    attrs = study.user_attrs
    console.print(f"Study {study.study_name!r}: model {attrs.get('model')} (fingerprint {attrs.get('model_fingerprint')})")
    settings = attrs.get("run_settings", {})
    keys = (
        "trials", "direction_prompts", "scoring_prompts", "max_new_tokens", "system_prompt", "response_prefix", "seed",
        "direction_methods", "alpha_max",
    )
    console.print("Settings: " + ", ".join(f"{k}={settings.get(k)!r}" for k in keys if k in settings), highlight=False)
    console.print(f"Baseline refusals: {attrs.get('baseline_refusals', '?')}")
    states = [t.state for t in study.get_trials(deepcopy=False)]
    counts = {s.name.lower(): states.count(s) for s in (TrialState.COMPLETE, TrialState.FAIL, TrialState.RUNNING, TrialState.PRUNED, TrialState.WAITING)}
    console.print("Trials: " + ", ".join(f"{n} {state}" for state, n in counts.items() if n or state in ("complete", "fail", "running")))
    if counts["complete"]:
        console.print(pareto_table(study))
