"""The one place that touches Optuna's private API: results attached to finished trials (this
docstring), a storage that waits out a database restart, Optuna 4's TPE rules in Optuna 5
(`--tpe-bandwidth scott`, `--tpe-weights hypervolume`), KL on a square-root scale for TPE
(`--tpe-kl-scale sqrt`) and capped at `--kl-limit` for the GP sampler (`--sampler gp`); each section
below says why and what it relies on.

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


# -- a storage that waits out a database restart ----------------------------------------------------
#
# Why it is here: besides BaseStorage's public methods it wraps protected ones that Optuna calls
# directly: `_get_stale_trial_ids` (the heartbeat's, called by `optuna.storages.fail_stale_trials`) and
# the four that Optuna's `_CachedStorage`, which every study puts in front of an RDBStorage, calls
# on it (`_create_new_trial`, `_get_trials`, `_set_trial_param`, `_get_best_trial_id`); and it knows
# which of Optuna's errors mean "this write was already made" (below).

# every storage call Optuna makes while a study runs
RETRIED_METHODS = (
    "create_new_study", "delete_study", "set_study_user_attr", "set_study_system_attr", "get_study_id_from_name",
    "get_study_name_from_id", "get_study_directions", "get_study_user_attrs", "get_study_system_attrs",
    "get_all_studies", "create_new_trial", "set_trial_param", "get_trial_id_from_study_id_trial_number",
    "get_trial_number_from_id", "get_trial_param", "set_trial_state_values", "set_trial_intermediate_value",
    "set_trial_user_attr", "set_trial_system_attr", "get_trial", "get_all_trials", "get_n_trials", "get_best_trial",
    "get_trial_params", "get_trial_user_attrs", "get_trial_system_attrs", "record_heartbeat", "_get_stale_trial_ids",
    "_create_new_trial", "_get_trials", "_set_trial_param", "_get_best_trial_id",
)  # fmt: skip
# writes to one trial: the first argument is its id
TRIAL_WRITES = (
    "set_trial_param", "_set_trial_param", "set_trial_state_values", "set_trial_intermediate_value",
    "set_trial_user_attr", "set_trial_system_attr",
)  # fmt: skip


class RetryingRDBStorage(RDBStorage):
    """An RDBStorage whose every call goes through `retry(call, what)`, which repeats it while the
    database is unreachable (storage.DatabaseRetry).

    Two outcomes of a repeated write need care, and one of a write to a trial that another worker
    has taken over:
    - a write whose commit reached the database while its answer was lost in the outage: repeated,
      Optuna refuses it (`UpdateFinishedTrialError` when a trial's state and values were set,
      `IntegrityError` when a parameter was). When the stored trial already holds what the write
      asked for, the write is done and the refusal is not an error;
    - a trial whose heartbeats stopped during a long outage is failed by another worker and queued
      again (storage's module docstring): its later writes are refused. They are dropped with a
      message: the trial is re-run, and what this worker had of it is not a result any more;
    - two workers failing the same stale trial: the second is told "not set" (False), as Optuna's
      `fail_stale_trials` expects, so that only the first queues its retry.
    """

    def __init__(self, url: str, retry: Any, **kwargs: Any):
        self._retry = retry
        super().__init__(url, **kwargs)

    def _stale_without_heartbeat(self, study_id: int) -> list[int]:
        """RUNNING trials that never recorded a heartbeat, started longer than the grace period ago.
        Optuna's rule only looks at recorded heartbeats, so a worker killed between creating a trial
        and its first heartbeat (or a trial created twice, when the answer to the first creation was
        lost in an outage) would leave it RUNNING for ever."""
        from datetime import datetime, timedelta

        from optuna.storages._rdb import models
        from optuna.trial import TrialState

        grace = timedelta(seconds=self.grace_period or 2 * (self.heartbeat_interval or 0))
        running = RDBStorage.get_all_trials(self, study_id, deepcopy=False, states=(TrialState.RUNNING,))
        old = [t for t in running if t.datetime_start is not None and datetime.now() - t.datetime_start > grace]
        if not old:
            return []
        session = self.scoped_session()
        try:
            beaten = {
                row.trial_id
                for row in session.query(models.TrialHeartbeatModel).filter(
                    models.TrialHeartbeatModel.trial_id.in_([t._trial_id for t in old])
                )
            }
        finally:
            session.close()
        return [t._trial_id for t in old if t._trial_id not in beaten]

    def _call(self, name: str, args: tuple, kwargs: dict) -> Any:
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        method = getattr(RDBStorage, name)
        if name == "_get_stale_trial_ids":
            ids = self._retry(lambda: method(self, *args, **kwargs), name)
            return ids + [i for i in self._retry(lambda: self._stale_without_heartbeat(*args), name) if i not in ids]
        attempts = 0

        def attempt() -> Any:
            nonlocal attempts
            attempts += 1
            return method(self, *args, **kwargs)

        try:
            return self._retry(attempt, name)
        except Exception as e:
            if name not in TRIAL_WRITES or not isinstance(e, (UpdateFinishedTrialError, *_integrity_errors())):
                raise
            trial = RDBStorage.get_trial(self, args[0])
            if attempts > 1 and name == "set_trial_state_values" and _already_holds(trial, args, kwargs):
                return True  # our own write, made before the outage hid its answer
            if attempts > 1 and name in ("set_trial_param", "_set_trial_param") and trial.params.get(args[1]) is not None:
                return None  # the same
            if trial.state != TrialState.FAIL:
                raise
            if name == "set_trial_state_values" and _requested(args, kwargs)[0] == TrialState.FAIL:
                return False  # another worker failed it first (two failing one stale trial): Optuna's "not set"
            self._retry.taken_over(trial.number)
            return False if name == "set_trial_state_values" else None


def is_told_elsewhere(error: BaseException) -> bool:
    """Whether `error` is Optuna refusing to tell a trial that is already finished. `study.optimize`
    raises it (out of the loop, whatever `catch` says) when another worker failed this worker's trial
    meanwhile because its heartbeat went stale, e.g. during a database outage longer than the grace
    period. Optuna's message is the only sign, and Optuna 4 raises an AssertionError ("Should not
    reach.") while handling it, so the refusal is looked for along the chain: tests/test_db_retry.py
    pins both."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, ValueError) and str(seen).startswith("Cannot tell a "):
            return True
        seen = seen.__context__
    return False


def _integrity_errors() -> tuple[type[BaseException], ...]:
    from optuna.exceptions import StorageInternalError
    from sqlalchemy.exc import IntegrityError

    return (IntegrityError, StorageInternalError)


def _requested(args: tuple, kwargs: dict) -> tuple[Any, Any]:
    """The state and values that set_trial_state_values(*args, **kwargs) asks for (Optuna passes
    them by position or by name)."""
    state = args[1] if len(args) > 1 else kwargs.get("state")
    values = args[2] if len(args) > 2 else kwargs.get("values")
    return state, values


def _already_holds(trial: Any, args: tuple, kwargs: dict) -> bool:
    state, values = _requested(args, kwargs)
    return trial.state == state and _same(trial.values, values)


def _same(stored: Any, asked: Any) -> bool:
    if stored is None or asked is None:
        return stored is None and asked is None
    return list(stored) == [float(v) for v in asked]


def _retried(name: str) -> Any:
    def call(self: RetryingRDBStorage, *args: Any, **kwargs: Any) -> Any:
        return self._call(name, args, kwargs)

    call.__name__ = name
    call.__doc__ = getattr(RDBStorage, name).__doc__
    return call


for _name in RETRIED_METHODS:
    setattr(RetryingRDBStorage, _name, _retried(_name))


# -- TPE with Optuna 4's multivariate kernel widths (--tpe-bandwidth scott) ----------------------------
#
# Why it is here: Optuna 5 changed how the multivariate TPE sizes its Parzen kernels. Optuna 4 gave
# every kernel of a density one width per parameter, sigma = 0.2 n^(-1/(d+4)) (high - low) for n
# observations in a d-parameter (group) space (Scott's rule with a fixed scale: about 0.16-0.18 of
# the range for our 10-14 parameters, shrinking slowly with n); Optuna 5 gives each kernel the larger
# gap to its sorted neighbours (the univariate TPE's rule), floored at the range over n + 2. So the
# density of the many "other" trials is made of narrow kernels (about 1/50 of the range at 50 trials)
# and the density of the few good ones of uneven, often wide ones. Heretic 1.4 runs Optuna 4.9, so
# its studies sample with the first rule; so do ours by default (measured: benchmarks/RESULTS.md, "Optuna
# 4's TPE rules"), `--tpe-bandwidth neighbour` gives Optuna 5's.
# Optuna exposes no setting for it: the sampler's `_parzen_estimator_cls` (documented in Optuna's
# source as the way to customise the estimator) takes the subclass below, which keeps everything of
# Optuna 5's estimator (means, the prior kernel, the magic clip's bounds, categoricals) but the widths.
# tests/test_tpe_rules.py pins it against the formula and against Optuna's own estimator.


def scott_sigma(n_observations: int, n_params: int, low: float, high: float) -> float:
    """Optuna 4's multivariate kernel width, clipped as Optuna clips every width (the magic clip:
    at least the range over min(100, n + 2), at most the range)."""
    sigma = 0.2 * max(n_observations, 1) ** (-1.0 / (n_params + 4)) * (high - low)
    return min(max(sigma, (high - low) / min(100.0, n_observations + 2.0)), high - low)


def use_scott_bandwidth(sampler: Any) -> None:
    """Make a TPESampler build its densities with `scott_sigma` widths (see above)."""
    import numpy as np
    from optuna.samplers._tpe.parzen_estimator import _ParzenEstimator

    class ScottParzenEstimator(_ParzenEstimator):
        def _calculate_numerical_distributions(self, observations, search_space, parameters):
            batched = super()._calculate_numerical_distributions(observations, search_space, parameters)
            low, high = search_space.low, search_space.high
            if search_space.step is not None:
                low, high = low - search_space.step / 2, high + search_space.step / 2
            if search_space.log:
                low, high = np.log(low), np.log(high)
            width = scott_sigma(len(observations), len(self._search_space), low, high)
            # the last kernel is the prior's (the whole range wide), as Optuna builds it
            return batched._replace(sigma=np.append(np.full(len(observations), width), batched.sigma[-1]))

    sampler._parzen_estimator_cls = ScottParzenEstimator


# -- TPE's good trials weighted by their hypervolume contribution (--tpe-weights hypervolume) ----------
#
# Why it is here: Optuna 4's multi-objective TPE weighted the kernels of its "good" density l(x) by
# each good trial's contribution to the hypervolume of the good trials (the MOTPE paper's rule; a
# good trial off their front, or infeasible, weighs next to nothing), Optuna 5 weights them all alike.
# Heretic 1.4 samples with the first rule, and so do ours by default (`--tpe-weights uniform`: Optuna
# 5's). Optuna calls `_build_parzen_estimator` for each density;
# the instance's own method below replaces it for the good one and leaves the other to Optuna. It
# relies on that method's arguments, on `_get_params` and `_get_internal_repr` (which trials give
# observations) and on the estimator's `predetermined_weights`; tests/test_tpe_rules.py pins them.


def hypervolume_contributions(points: Any) -> Any:
    """Each minimised 2-D point's exclusive share of the hypervolume of the set's Pareto front, against
    Optuna 4's reference point (the worst value of each objective, times 1.1), as Optuna 4 computed it:
    the front's hypervolume less that of the front without the point; 0 off the front, and for a point
    the front holds twice."""
    import numpy as np

    points = np.asarray(points, dtype=float)
    worst = points.max(axis=0)
    reference = np.maximum(1.1 * worst, 0.9 * worst)
    reference[reference == 0] = 1e-12

    def volume(rows: Any) -> float:
        area, best = 0.0, reference[1]
        for x, y in sorted(map(tuple, rows)):
            if y < best:
                area += (reference[0] - x) * (best - y)
                best = y
        return area

    dominated = [bool(((points <= p).all(axis=1) & (points < p).any(axis=1)).any()) for p in points]
    front = [i for i in range(len(points)) if not dominated[i]]
    whole, share = volume(points[front]), np.zeros(len(points))
    for i in front:
        share[i] = whole - volume(points[[j for j in front if j != i]])
    return share


def use_hypervolume_weights(sampler: Any) -> None:
    """Make a TPESampler weight its good trials by `hypervolume_contributions` (see above)."""
    import types

    import numpy as np

    plain = sampler._build_parzen_estimator

    def build(self: Any, study: Any, search_space: Any, trials: Any, handle_below: bool) -> Any:
        if not handle_below or len(study.directions) < 2:
            return plain(study, search_space, trials, handle_below)
        tiny = 1e-12
        used = [t for t in trials if search_space.keys() <= self._get_params(t, study).keys()]  # as Optuna's observations
        feasible = [t.values is not None and all(c <= 0 for c in t.constraints.values()) for t in used]
        weights = np.full(len(used), tiny)
        if any(feasible):  # a lone feasible trial's share is its whole box: weight 1
            rows = [i for i, ok in enumerate(feasible) if ok]
            share = hypervolume_contributions([used[i].values for i in rows])
            weights[rows] = np.maximum(share / max(share.max(), tiny), tiny)
        observations = self._get_internal_repr(used, search_space, study)
        return self._parzen_estimator_cls(observations, search_space, self._parzen_estimator_parameters, weights)

    sampler._build_parzen_estimator = types.MethodType(build, sampler)


# -- TPE reading KL on a square-root scale (--tpe-kl-scale sqrt) ---------------------------------------
#
# Why it is here: multi-objective TPE learns from ceil(0.1 n) "good" trials; when the front holds more,
# Optuna picks them by hypervolume subset selection, and `--tpe-weights hypervolume` weights them by
# hypervolume contribution, both on the values as they are, where a front point's share is its rate
# gap times its KL gap. KL grows about with the square of a small edit's size, so on the raw scale
# the low-KL end's points (gaps of thousandths) count for less than the knee's and the high-KL end's.
# The square root (about proportional to an edit's size, and 0 at 0, so no floor is needed) is a
# monotone map: the front, the stored values and everything shown stay as they are; only the sampler
# sees it. Measured on the second benchmark model it did not help (benchmarks/RESULTS.md,
# twenty-seventh session), so it is off by default.
# Optuna has no setting for it: the instance's `_sample` (which `sample_relative` and
# `sample_independent` call with the study) gets a view of the study whose `_get_trials` returns
# copies of the trials with that objective rescaled; everything else is the study's own.
# tests/test_tpe_rules.py pins it: a study sampled with the rule draws what a plain sampler draws
# on a copy of the study that stores the square roots.


def use_sqrt_objective(sampler: Any, objective: int) -> None:
    """Make a TPESampler see objective `objective` (>= 0) as its square root (see above)."""
    import math

    _view_objective(sampler, "_sample", objective, lambda value: math.sqrt(max(value, 0.0)))


# -- The GP sampler reading KL up to the hypervolume reference (--sampler gp) ----------------------------
#
# Why it is here: Optuna's GPSampler standardises each objective over the trials it has and takes the
# reference point of its expected hypervolume improvement from them, so one broken trial at KL 8
# stretches the scale its Gaussian process fits and the box it scores in, while every trial past
# --kl-limit (the hypervolume reference, 1 by default) adds nothing to the front. Capping KL at the limit
# makes its hypervolume the study's. A view as for the square root above, which leaves every trial
# inside the limit as it is (the front and the stored values do not change): the instance's
# `sample_relative` gets the study view (GPSampler reads trials only through `study._get_trials`).
# tests/test_gp_sampler.py pins it against a plain GPSampler on a copy of the study storing the capped
# values. Measured level with TPE on both benchmark models (benchmarks/RESULTS.md, twenty-eighth
# session), so TPE stays the default.


def use_capped_objective(sampler: Any, objective: int, cap: float) -> None:
    """Make a GPSampler see objective `objective` as min(value, cap) (see above)."""
    _view_objective(sampler, "sample_relative", objective, lambda value: min(value, cap))


def _view_objective(sampler: Any, method: str, objective: int, rescale: Any) -> None:
    """Let the sampler's `method(study, ...)` see objective `objective` of every trial through `rescale`."""
    import copy
    import types

    def rescaled(trial: Any) -> Any:
        if trial.values is None:
            return trial
        values = list(trial.values)
        values[objective] = rescale(values[objective])
        view = copy.copy(trial)
        view.values = values
        return view

    class StudyView:
        def __init__(self, study: Any) -> None:
            self._study = study

        def __getattr__(self, name: str) -> Any:
            return getattr(self._study, name)

        def _get_trials(self, *args: Any, **kwargs: Any) -> list:
            return [rescaled(t) for t in self._study._get_trials(*args, **kwargs)]

    plain = getattr(sampler, method)

    def viewed(self: Any, study: Any, *args: Any) -> Any:
        return plain(StudyView(study), *args)

    setattr(sampler, method, types.MethodType(viewed, sampler))
