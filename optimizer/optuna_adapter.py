"""The one place that touches Optuna's private API.

Why it exists
    After a study, `export` and `eval` attach their results (the exported folder, held-out scores)
    to the trial they worked on, as user attributes, so that optuna-dashboard shows them next to the
    trial's parameters. Optuna's public API refuses that: once a trial is finished,
    `storage.set_trial_user_attr` (and `Trial.set_user_attr`) raise
    `optuna.exceptions.UpdateFinishedTrialError`. The dashboard, like `optuna.load_study`, reads the
    user attributes from the storage's table whenever they appear, so we write that row ourselves.

What it relies on (Optuna's RDB schema, private)
    - `optuna.storages._rdb.models.TrialUserAttributeModel`: table ``trial_user_attributes``, columns
      ``trial_id``, ``key`` (unique together) and ``value_json``, the value as `json.dumps` writes it
      (Optuna reads it back with `json.loads`);
    - `RDBStorage.scoped_session`, a SQLAlchemy session factory on the storage's engine.
    The trial's id is found through public storage methods (`get_study_id_from_name`,
    `get_trial_id_from_study_id_trial_number`). tests/test_storage.py pins all of this against the
    installed Optuna (write, overwrite, read back through a fresh `optuna.load_study`, nothing else
    changed; and that the public API still refuses), on SQLite and on PostgreSQL.

A `Study` that has already read a finished trial keeps it in Optuna's cache: load the study again
to see attributes written here.
"""

from __future__ import annotations

import json
from typing import Any

from optuna.storages import RDBStorage


def set_finished_trial_user_attr(storage: RDBStorage, study_name: str, trial_number: int, key: str, value: Any) -> None:
    """Set (insert or overwrite) user attribute `key` of trial `trial_number` of study `study_name`,
    whatever the trial's state. `value` must be JSON serialisable, as for Optuna's own user attributes.

    Only RDB storages (every study of ours is one): any other storage raises TypeError, rather than
    storing the value somewhere else. Raises KeyError for an unknown study or trial.
    """
    from optuna.storages._rdb import models
    from sqlalchemy.exc import IntegrityError

    if not isinstance(storage, RDBStorage):
        raise TypeError(f"results can be attached to finished trials only in an RDBStorage, not {type(storage).__name__}")
    value_json = json.dumps(value)  # before any write: a value that cannot be stored changes nothing
    study_id = storage.get_study_id_from_name(study_name)
    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial_number)
    for attempt in range(2):
        session = storage.scoped_session()
        try:
            row = session.query(models.TrialUserAttributeModel).filter_by(trial_id=trial_id, key=key).one_or_none()
            if row is None:
                session.add(models.TrialUserAttributeModel(trial_id=trial_id, key=key, value_json=value_json))
            else:
                row.value_json = value_json
            session.commit()
            return
        except IntegrityError:  # another process inserted the same key in between: update its row
            session.rollback()
            if attempt:
                raise
        except Exception:
            session.rollback()
            raise
        finally:
            session.close()
