"""Reopen a finished study and rebuild the edited model of one of its trials (for export, eval, chat)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import optuna
from optuna.trial import FixedTrial, FrozenTrial, TrialState
from rich.console import Console

from optimizer.ablation import AblationPlan
from optimizer.config import Settings
from optimizer.errors import UserError
from optimizer.params import PlanInfo, TrialParams, build_plan
from optimizer.study import check_storage_url, open_storage, sqlite_path, suggest_params
from optimizer.workbench import Workbench


def open_study(name: str, storage_url: str | None, studies_dir: str = "studies") -> tuple[optuna.Study, Settings]:
    """The stored study and the settings it was run with."""
    settings = Settings(study=name, storage=storage_url, studies_dir=studies_dir)
    url = settings.resolved_storage()
    check_storage_url(url)
    db = sqlite_path(url)
    if db is not None and not db.exists():  # opening it would create an empty study file
        raise UserError(f"no study file {db}; check --study and --storage (or run the study first)")
    storage = open_storage(url)
    names = [s.study_name for s in storage.get_all_studies()]
    if name not in names:
        raise UserError(f"no study named {name!r} in {url}; studies there: {', '.join(names) or 'none'}")
    study = optuna.load_study(study_name=name, storage=storage)
    stored = study.user_attrs.get("run_settings", {})
    known = {f.name for f in dataclasses.fields(Settings)}
    values = {k: v for k, v in stored.items() if k in known}
    values.setdefault("response_prefix", "")  # studies from before prefixes were detected appended none
    values.update(study=name, storage=storage_url, studies_dir=studies_dir)
    return study, Settings(**values)


def finished_trial(study: optuna.Study, number: int) -> FrozenTrial:
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    if number not in trials:
        raise UserError(f"study {study.study_name!r} has no trial {number} (it has {len(trials)} trials, 0..{len(trials) - 1})")
    trial = trials[number]
    if trial.state != TrialState.COMPLETE:
        raise UserError(f"trial {number} is {trial.state.name.lower()}, not finished; pick a finished trial (see `show`)")
    return trial


def trial_params(trial: FrozenTrial, n_layers: int, settings: Settings) -> TrialParams:
    """The trial's parameters, read back through the same code that sampled them."""
    return suggest_params(FixedTrial(trial.params), n_layers, settings)


@dataclass
class EditedModel:
    bench: Workbench
    trial: FrozenTrial
    params: TrialParams
    plan: AblationPlan
    info: PlanInfo


def load_edited_model(
    study: optuna.Study, settings: Settings, number: int, console: Console, with_baseline: bool = False,
    model: str | None = None, device: str | None = None, dtype: str | None = None, full_precision: bool = False,
) -> EditedModel:
    """Load the study's model, check it is the same model, and build trial `number`'s ablation plan.

    The plan's directions come from the study's cached statistics (recomputed if the cache was
    made on another device or dtype). Hooks are registered but not applied. `full_precision`
    loads a 4-bit study's model unquantised (for export).
    """
    trial = finished_trial(study, number)
    overrides = {k: v for k, v in {"model": model, "device": device, "dtype": dtype}.items() if v is not None}
    if full_precision:
        overrides["quantization"] = None  # the fingerprint stays the portable one the study recorded
    portable = settings.quantization is not None
    settings = dataclasses.replace(settings, **overrides)
    bench = Workbench.open(settings, console, portable=portable)
    expected = study.user_attrs.get("model_fingerprint")
    if expected != bench.model_fingerprint:
        raise UserError(
            f"the model at hand ({bench.loaded.source}, fingerprint {bench.model_fingerprint}) is not the study's model "
            f"({study.user_attrs.get('model')!r}, fingerprint {expected}); pass the study's model with --model"
        )
    bench.prepare(settings.cache_path(), with_baseline=with_baseline)
    params = trial_params(trial, bench.loaded.n_layers, settings)
    plan, info = build_plan(params, bench.stats, settings.projected_directions)
    return EditedModel(bench, trial, params, plan, info)
