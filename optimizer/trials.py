"""Reopen a finished study and rebuild the edited model of one of its trials (for export, eval, chat)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console

from optimizer.ablation import AblationPlan
from optimizer.components import COMPONENTS
from optimizer.config import Settings, replace_checked, settings_from_record
from optimizer.errors import UserError
from optimizer.optuna_adapter import set_finished_trial_user_attr
from optimizer.params import PlanInfo, TrialParams, plan_for, replay_params
from optimizer.storage import check_url, connect, redacted, sqlite_path
from optimizer.workbench import Prepared, prepare, resolve


@dataclass(frozen=True)
class StoredStudy:
    """A study as stored: the Optuna study, its storage, and the settings it was run with."""

    study: optuna.Study
    storage: optuna.storages.RDBStorage
    settings: Settings

    def annotate(self, trial: FrozenTrial, key: str, value: Any) -> None:
        """Attach a result (export path, eval score) to a finished trial, where the dashboard shows it."""
        set_finished_trial_user_attr(self.storage, self.study.study_name, trial.number, key, value)


def open_study(name: str, storage_url: str | None, studies_dir: str = "studies") -> StoredStudy:
    """The stored study and the settings it was run with (rebuilt through the same checks as a run's)."""
    url = Settings(study=name, storage=storage_url, studies_dir=studies_dir).storage_url()
    check_url(url)
    db = sqlite_path(url)
    if db is not None and not db.exists():  # opening it would create an empty study file
        raise UserError(f"no study file {db}; check --study and --storage (or run the study first)")
    storage = connect(url)
    names = [s.study_name for s in storage.get_all_studies()]
    if name not in names:
        raise UserError(f"no study named {name!r} in {redacted(url)}; studies there: {', '.join(names) or 'none'}")
    study = optuna.load_study(study_name=name, storage=storage)
    stored = study.user_attrs.get("run_settings", {})
    settings = settings_from_record(stored, study=name, storage=storage_url, studies_dir=studies_dir)
    return StoredStudy(study, storage, settings)


def finished_trial(study: optuna.Study, number: int) -> FrozenTrial:
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    if number not in trials:
        raise UserError(f"study {study.study_name!r} has no trial {number} (it has {len(trials)} trials, 0..{len(trials) - 1})")
    trial = trials[number]
    if trial.state != TrialState.COMPLETE:
        raise UserError(f"trial {number} is {trial.state.name.lower()}, not finished; pick a finished trial (see `show`)")
    return trial


@dataclass(frozen=True)
class EditedModel:
    prepared: Prepared
    trial: FrozenTrial
    params: TrialParams
    plan: AblationPlan
    info: PlanInfo

    def record(self) -> dict[str, Any]:
        """What `optimizer.json` holds beside every export (folder, GGUF, adapter): where the trial
        came from and the whole edit."""
        settings, trial, loaded = self.prepared.settings, self.trial, self.prepared.loaded
        return {
            "study": settings.study,
            "trial": trial.number,
            "model": loaded.source,
            "model_fingerprint": self.prepared.spec.identity.model,
            "params": trial.params,
            "trial_params": self.params.to_json(),
            "weights": {c: self.plan.weights[c] for c in COMPONENTS},
            "subspace": {"k": self.plan.rank, "gamma": self.plan.decay, "direction_weights": "w * gamma^(i-1), i = 1..k"},
            "fallback_layers": self.info.fallback_layers,
            "scores": {"refusals": trial.user_attrs.get("refusals"), "kl_divergence": trial.values[1]},
            "edit": "W <- (I - R W_r R^T) W and b <- (I - R W_r R^T) b on every tensor each block writes to the "
            "residual stream with (attention output, MLP down projection, every expert's down projection); R: the "
            "layer's k orthonormal directions, W_r: their weights; in ablation.safetensors, per component, "
            "`<c>.directions` (L, d) the first direction of every layer and `<c>.extra_directions` (L, k-1, d) the others",
            "norm_preserving": settings.norm_preserving,
            "response_prefix": settings.response_prefix,
            "chat_template_kwargs": settings.template_kwargs(),
            "projected_directions": settings.projected_directions,
            "refused_directions": settings.refused_directions,
            "trust_remote_code": settings.trust_remote_code,
            "sites": [list(row) for row in loaded.discovery.table_rows()],
        }

    def plan_of(self, trial: FrozenTrial) -> AblationPlan:
        """The ablation plan of another trial of the same study, on this model and statistics."""
        return plan_of(self.prepared, trial)


def plan_of(prepared: Prepared, trial: FrozenTrial) -> AblationPlan:
    """The ablation plan of a trial of the study, on this model and statistics."""
    params = replay_params(trial.params, prepared.loaded.n_layers, prepared.settings)
    return plan_for(params, prepared.stats, prepared.settings)[0]


def load_edited_model(
    stored: StoredStudy, number: int, console: Console,
    model: str | None = None, device: str | None = None, dtype: str | None = None, full_precision: bool = False,
) -> EditedModel:  # fmt: skip
    """Load the study's model, check it is the same model, and build trial `number`'s ablation plan.

    The plan's directions come from the study's cached statistics (recomputed if the cache was
    made on another device or dtype). Hooks are registered but not applied. `full_precision`
    loads a 4-bit study's model unquantised (for export).
    """
    trial = finished_trial(stored.study, number)
    settings = stored.settings
    portable = settings.quantization is not None
    settings = replace_checked(settings, model=model, device=device, dtype=dtype)
    if full_precision:  # the fingerprint stays the portable one the study recorded
        settings = dataclasses.replace(settings, quantization=None)
    spec = resolve(settings, console, portable=portable)
    spec.identity.check_model(stored.study.user_attrs)
    prepared = prepare(spec, settings.cache_path())
    params = replay_params(trial.params, spec.loaded.n_layers, spec.settings)
    plan, info = plan_for(params, prepared.stats, spec.settings)
    return EditedModel(prepared, trial, params, plan, info)
