"""A stored study and the settings it was run with, without importing torch or transformers: the
dashboard starts seconds sooner (optimizer.trials rebuilds trials' edited models on top of this)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from optimizer.config import Settings, settings_from_record
from optimizer.errors import UserError
from optimizer.optuna_adapter import set_finished_trial_user_attr
from optimizer.storage import check_url, connect, redacted, sqlite_path


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
