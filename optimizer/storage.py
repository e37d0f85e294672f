"""Everything Optuna persists, through Optuna's public API only.

Storages
    A study lives in an RDB storage (`optuna.storages.RDBStorage`): a SQLite file (the default,
    ``sqlite:///studies/NAME.db``) or a database server (``postgresql://...``, ``mysql://...``).
    SQLite serialises writers and has no heartbeat here: the caller lets one process work on a study
    file at a time (a file lock), so a trial found RUNNING when a process starts was left by one that
    died, and `fail_stale_running_trials` fails and re-queues it. On a server several workers share a
    study, so a worker cannot tell a dead worker's trial from a live one: there every running trial
    records a heartbeat every `heartbeat_interval` seconds, and any worker that starts a trial first
    fails the trials whose last heartbeat is older than `heartbeat_grace` seconds (Optuna does that in
    `study.optimize` through `optuna.storages.fail_stale_trials`).

Retries
    Either way the trial that a dead process left is marked FAIL and handed to Optuna's own
    `RetryHeartbeatStaleTrialCallback` (called `RetryFailedTrialCallback` before Optuna 4.9), which adds
    a WAITING trial with the same parameters and user attributes and records the failed trial's number
    in that new trial's system attributes (``failed_trial``, ``retry_history``). The next `ask` runs the
    WAITING trial first. Nothing is written to the failed trial itself: Optuna refuses to change a
    finished trial.

What counts toward the budget
    `--trials N` asks for N finished trials (COMPLETE, PRUNED or FAIL) that were not interrupted. A
    trial is interrupted when it FAILed and either
    - carries the user attribute ``interrupted``: Ctrl-C sets it while the trial is still RUNNING,
      then Optuna marks the trial FAIL; the next run starts a new trial instead, or
    - a later trial retries it: its number is in `retried_numbers`, read from the retries' system
      attributes, or from their ``retry_of`` user attribute in studies made before retries used
      Optuna's callback (those also carry ``interrupted`` on the failed trial).
    A trial that failed on an ordinary error counts: repeating it would most likely fail again.

A database that goes away
    A server database restarts (maintenance, a failover) while workers run. Every storage call of a
    worker on a server then waits for it: `DatabaseRetry` repeats a call that failed on the
    connection, with growing pauses, for up to `--db-retry-s` seconds from the first failure (one
    clock for all calls of the process, the heartbeat thread's included), says so once when it
    starts waiting and once when the database is back. Optuna's own calls go through it
    (optuna_adapter.RetryingRDBStorage), so a trial being suggested, heartbeating or told simply
    goes on. Past the bound the worker stops with an error (exit 2); the trial it was running stays
    RUNNING without heartbeats, so another worker, or the next run, fails it and runs it again.
    Errors that waiting cannot fix (a wrong password, a missing database) are raised at once.
Credentials
    A storage URL may hold a password. Every URL in a message or in printed output goes through
    `redacted`, which masks the password (also when the URL does not parse), and the first line of a
    driver's error is cleaned of the password too before it is shown.
"""

from __future__ import annotations

import re
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console

from optimizer.errors import UserError, first_line
from optimizer.optuna_adapter import RetryingRDBStorage

SUPPORTED_SCHEMES = ("sqlite", "postgresql", "mysql")
# how long a worker waits for the study's creator (another worker) to write the study's attributes
STUDY_INIT_WAIT_S = 120
# how long a starting worker waits for a database server that refuses connections (a restart takes seconds)
OPEN_WAIT_S = 15
FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)

# the password of a URL that SQLAlchemy cannot parse: anything between "://user:" and the last "@"
_PASSWORD_IN_URL = re.compile(r"(://[^:/@\s]*:).*@")


# -- URLs -------------------------------------------------------------------------------------


def redacted(url: str) -> str:
    """The URL with its password shown as ``***``; a URL without a password is returned unchanged.
    Never raises: a URL that does not parse has anything between ``://user:`` and ``@`` masked."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 - any string must come back masked, never raise
        return _PASSWORD_IN_URL.sub(lambda m: m.group(1) + "***@", url)
    if parsed.password is None:
        return url  # as given: rendering would re-escape it (sqlite:///:memory: -> %3Amemory%3A)
    return parsed.render_as_string(hide_password=True)


def _without_password(text: str, url: str) -> str:
    """`text` (a driver's error message) with the URL's password, raw or quoted, masked."""
    from urllib.parse import quote

    from sqlalchemy.engine import make_url

    try:
        password = make_url(url).password
    except Exception:  # noqa: BLE001
        password = None
    text = text.replace(url, redacted(url))
    if password:
        for form in {str(password), quote(str(password), safe="")}:
            text = text.replace(form, "***")
    return text


def check_url(url: str) -> None:
    """Reject malformed or unsupported URLs before anything is loaded or written."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        raise UserError(
            f"malformed storage URL {redacted(url)!r}; "
            "give --storage as sqlite:///path/to/study.db or postgresql://user:pass@host/db"
        ) from None
    backend = parsed.drivername.partition("+")[0]
    if backend not in SUPPORTED_SCHEMES:
        raise UserError(
            f"unsupported storage scheme {backend!r} in {redacted(url)!r}; "
            "give --storage as sqlite:///FILE.db or postgresql://..."
        )
    if backend == "sqlite" and parsed.database and parsed.database != ":memory:":
        parent = Path(parsed.database).parent
        if not parent.is_dir():
            raise UserError(f"the folder {parent} of the SQLite storage does not exist; create it or fix --storage")


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite storage; None for a server database or an in-memory SQLite one."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.drivername.partition("+")[0] != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database)


# -- opening ----------------------------------------------------------------------------------


def retry_callback() -> RetryHeartbeatStaleTrialCallback:
    """Optuna's retry of a failed trial: a WAITING copy (params, user attrs), retrying without limit."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        return RetryHeartbeatStaleTrialCallback()


# driver messages of connection errors that waiting does not fix
_PERMANENT = re.compile(
    r"authentication failed|does not exist|no pg_hba\.conf entry|permission denied|access denied", re.IGNORECASE
)


def connection_error(error: BaseException) -> BaseException | None:
    """The lost or refused connection to a database server that `error` is, or was raised from
    (Optuna wraps it in StorageInternalError): something a server restart causes, and waiting
    cures. None for any other error."""
    from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError

    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OperationalError | InterfaceError | DisconnectionError):
            return None if _PERMANENT.search(str(seen)) else seen
        seen = seen.__cause__ or seen.__context__
    return None


class DatabaseUnreachable(UserError):
    """The database server stayed unreachable for longer than --db-retry-s."""

    def __init__(self, message: str, last_error: str = ""):
        super().__init__(message)
        self.last_error = last_error


class DatabaseRetry:
    """Repeats storage calls that fail on the connection until the database answers again, for at
    most `limit_s` seconds from the first failure of an outage (module docstring)."""

    FIRST_PAUSE_S, LONGEST_PAUSE_S = 0.5, 8.0

    def __init__(self, url: str, limit_s: float, say: Callable[[str], None] | None = None):
        self.url, self.shown = url, redacted(url)
        self.limit_s = limit_s
        self.say = say or (lambda line: print(line, file=sys.stderr, flush=True))
        self._lock = threading.Lock()
        self._outage_since: float | None = None
        self.last_error = ""
        self._gave_up = False
        self._taken_over: set[int] = set()

    def __call__(self, call: Callable[[], Any], what: str = "") -> Any:
        pause = self.FIRST_PAUSE_S
        while True:
            if self._gave_up:
                raise self._unreachable()
            try:
                result = call()
            except Exception as e:
                lost = connection_error(e)
                if lost is None:
                    raise
                left = self._failed(lost)
                if left <= 0:
                    raise self._unreachable() from None
                time.sleep(min(pause, left))
                pause = min(2 * pause, self.LONGEST_PAUSE_S)
                continue
            if self._outage_since is not None:
                self._recovered()
            return result

    def taken_over(self, number: int) -> None:
        """Say (once per trial) that a write to trial `number` was dropped: another worker failed it."""
        with self._lock:
            if number in self._taken_over:
                return
            self._taken_over.add(number)
        self.say(
            f"Trial {number} was failed by another worker while this one could not reach the database (no heartbeat); "
            "it is run again from its parameters, and this worker's result for it is dropped."
        )

    def _failed(self, error: BaseException) -> float:
        """Note a failed call; the seconds left to wait."""
        now = time.monotonic()
        with self._lock:
            first = self._outage_since is None
            if first:
                self._outage_since = now
            self.last_error = _without_password(first_line(getattr(error, "orig", None) or error), self.url)
            since = self._outage_since
        assert since is not None
        if first:
            self.say(
                f"Database {self.shown} unreachable ({self.last_error}); waiting up to {self.limit_s:g} s for it "
                "(--db-retry-s), trials in progress go on"
            )
        return since + self.limit_s - now

    def _recovered(self) -> None:
        with self._lock:
            if self._outage_since is None:
                return
            lasted = time.monotonic() - self._outage_since
            self._outage_since = None
        self.say(f"Database {self.shown} reachable again after {lasted:.1f} s; going on.")

    def _unreachable(self) -> DatabaseUnreachable:
        self._gave_up = True
        return DatabaseUnreachable(
            f"database {self.shown} unreachable for {self.limit_s:g} s ({self.last_error}); the trial in progress is "
            "run again by another worker or the next run: check the server, then run the same command again "
            "(--db-retry-s sets how long to wait)",
            self.last_error,
        )


def connect(url: str, heartbeat_interval: int = 30, heartbeat_grace: int = 120, db_retry_s: float = 120) -> RDBStorage:
    """RDB storage; on server databases with heartbeats, so that a killed worker's trial is failed
    (and retried) by the others instead of staying RUNNING forever, and with every call waiting up
    to `db_retry_s` for a server that went away (module docstring)."""
    check_url(url)
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    kwargs: dict[str, Any] = {"engine_kwargs": engine_kwargs}
    if url.startswith("sqlite"):
        engine_kwargs["connect_args"] = {"timeout": 60}  # wait for a lock instead of failing
    else:
        if url.startswith("postgresql"):
            engine_kwargs["connect_args"] = {"connect_timeout": 10}
        kwargs.update(
            heartbeat_interval=heartbeat_interval, grace_period=heartbeat_grace, heartbeat_stale_trial_callback=retry_callback()
        )
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    shown = redacted(url)
    retry = None if url.startswith("sqlite") else DatabaseRetry(url, db_retry_s)
    for attempt in range(3):
        try:
            if retry is None:
                return RDBStorage(url, **kwargs)
            # at start, a refused connection is more often a wrong URL than a restart (seconds): wait less
            opening = DatabaseRetry(url, min(db_retry_s, OPEN_WAIT_S))
            return opening(lambda: RetryingRDBStorage(url, retry, **kwargs), "connect")
        except DatabaseUnreachable as e:
            raise UserError(
                f"cannot open storage {shown}: {e.last_error} (waited {min(db_retry_s, OPEN_WAIT_S):g} s); "
                "check the URL and that the server is running"
            ) from None
        except (IntegrityError, ProgrammingError) as e:  # another worker was creating the tables at the same moment
            if isinstance(e, ProgrammingError) and "already exists" not in str(e):
                raise _cannot_open(e, url) from None
            time.sleep(1 + attempt)
        except Exception as e:  # noqa: BLE001 (sqlalchemy and the drivers raise many types for unreachable servers)
            raise _cannot_open(e, url) from None
    raise UserError(f"cannot open storage {shown}: its tables could not be created; try again")


def _cannot_open(error: BaseException, url: str) -> UserError:
    return UserError(
        f"cannot open storage {redacted(url)}: {_without_password(first_line(error), url)}; "
        "check the URL and that the server is running"
    )


def wait_for_initialisation(storage: optuna.storages.BaseStorage, study_id: int) -> dict[str, Any]:
    """The study's user attributes, once its creator has written them: another worker may have
    created the study a moment ago. Raises UserError, naming the study, after STUDY_INIT_WAIT_S."""
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


# -- counting ---------------------------------------------------------------------------------


def retried_numbers(trials: Iterable[FrozenTrial]) -> set[int]:
    """Numbers of the trials that a later trial retries.

    Optuna's callback records in each retry the first failed trial of the series
    (`retried_trial_number`) and every trial of it (`retry_history`): when a retry dies in turn, its
    retry names both. Studies made before we used the callback name the retried trial in the
    ``retry_of`` user attribute.
    """
    numbers: set[int] = set()
    with warnings.catch_warnings():  # both static methods are marked experimental
        warnings.simplefilter("ignore", ExperimentalWarning)
        for t in trials:
            first = RetryHeartbeatStaleTrialCallback.retried_trial_number(t)
            if first is not None:
                numbers.add(first)
            numbers.update(RetryHeartbeatStaleTrialCallback.retry_history(t))
            legacy = t.user_attrs.get("retry_of")
            if legacy is not None:
                numbers.add(int(legacy))
    return numbers


def is_interrupted(trial: FrozenTrial, retried: set[int]) -> bool:
    """A FAILed trial that was cut off (Ctrl-C, a dead process) rather than failing on its own."""
    return trial.state == TrialState.FAIL and (bool(trial.user_attrs.get("interrupted")) or trial.number in retried)


def counted_trials(study: optuna.Study) -> int:
    """Trials that count toward the budget: finished in any state, except ones cut off by an
    interruption (Ctrl-C, a killed process), which are retried instead of counted."""
    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    return sum(1 for t in trials if t.state in FINISHED_STATES and not is_interrupted(t, retried))


def fail_stale_running_trials(study: optuna.Study, console: Console) -> int:
    """On SQLite (one process per study, no heartbeat) a RUNNING trial at start was left by a dead
    process: mark it FAIL and queue it again, as the heartbeat does on a server. Returns how many."""
    stale = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
    retry = retry_callback()
    for number in stale:
        study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
        # a copy, as Optuna's heartbeat path hands over: the callback appends to the retry history it reads
        failed = next(t for t in study.get_trials(deepcopy=True) if t.number == number)
        if failed.state == TrialState.FAIL:
            retry(study, failed)
    if stale:
        console.print(
            f"[yellow]Trial(s) {stale} were left RUNNING by a process that died: marked failed, not counted, and queued again[/]"
        )
    return len(stale)
