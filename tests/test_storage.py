"""What Optuna persists for us, against real databases: SQLite files in tmp_path, and a PostgreSQL
server when OPTIMIZER_TEST_PG_URL is set (.ci/run starts one). Processes that die mid-trial are real
processes, killed."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import threading
import time

import optuna
import pytest
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console

from optimizer import storage as storage_module
from optimizer.errors import UserError
from optimizer.optuna_adapter import set_finished_trial_user_attr
from optimizer.storage import (
    check_url,
    connect,
    counted_trials,
    fail_stale_running_trials,
    is_interrupted,
    redacted,
    retried_numbers,
    wait_for_initialisation,
)
from tests.conftest import needs_pg


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=needs_pg)])
def storage_url(request: pytest.FixtureRequest, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/s.db"
    return request.getfixturevalue("pg_url")


def fresh(url: str, **kwargs: int) -> optuna.Study:
    """The study as a new process would see it: a new storage, nothing cached."""
    return optuna.load_study(study_name="s", storage=connect(url, **kwargs))


def objective(trial: optuna.Trial) -> float:
    return trial.suggest_float("x", 0.0, 1.0)


def retries_of(study: optuna.Study, number: int) -> list[FrozenTrial]:
    return [t for t in study.trials if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == number]


def start_python(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def trial_number_from(proc: subprocess.Popen) -> int:
    """Read the child's output until it prints `TRIAL n` (it is then inside trial n)."""
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        if m := re.fullmatch(r"TRIAL (\d+)", line.strip()):
            return int(m.group(1))
        seen.append(line)
    raise AssertionError(f"the child never started its trial (exit {proc.wait()}):\n{''.join(seen)}")


# A process that starts a trial on a SQLite study and dies without telling Optuna anything.
DIE_MID_TRIAL = """
import os, signal, sys
import optuna
from optimizer.storage import connect
study = optuna.load_study(study_name="s", storage=connect(sys.argv[1]))
trial = study.ask()
trial.suggest_float("x", 0.0, 1.0)
trial.set_user_attr("note", "kept")
print("TRIAL", trial.number, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def die_mid_trial(url: str) -> int:
    proc = start_python(DIE_MID_TRIAL, url)
    number = trial_number_from(proc)
    assert proc.wait(timeout=120) == -signal.SIGKILL
    return number


# -- the adapter: pinned against the installed Optuna -------------------------------------------


def test_adapter_sets_user_attrs_of_finished_trials(storage_url):
    storage = connect(storage_url)
    study = optuna.create_study(study_name="s", storage=storage, directions=["minimize", "minimize"])
    study.set_user_attr("model", "m")

    def scored(trial: optuna.Trial) -> tuple[float, float]:  # optimize, not ask: a server storage beats
        trial.suggest_float("x", 0.0, 1.0)
        trial.set_user_attr("refusals", "3/8" if trial.number == 0 else "1/8")
        if trial.number == 1:
            raise ValueError("the second trial fails")
        return 0.375, 0.1

    study.optimize(scored, n_trials=2, catch=(ValueError,))
    before = fresh(storage_url).trials
    assert [t.state for t in before] == [TrialState.COMPLETE, TrialState.FAIL]

    # Why the adapter exists: Optuna's public API refuses to change a finished trial.
    trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name("s"), 0)
    with pytest.raises(UpdateFinishedTrialError):
        storage.set_trial_user_attr(trial_id, "eval/mmlu", 0.5)

    set_finished_trial_user_attr(storage, "s", 0, "eval/mmlu", {"acc": 0.5})  # insert
    assert fresh(storage_url).trials[0].user_attrs["eval/mmlu"] == {"acc": 0.5}
    set_finished_trial_user_attr(storage, "s", 0, "eval/mmlu", {"acc": 0.625, "tasks": ["a", "b"]})  # update ours
    set_finished_trial_user_attr(storage, "s", 0, "refusals", "2/8")  # update a row Optuna wrote

    reloaded = fresh(storage_url)
    after = reloaded.trials
    assert after[0].user_attrs == {"refusals": "2/8", "eval/mmlu": {"acc": 0.625, "tasks": ["a", "b"]}}
    unchanged = (
        "number",
        "state",
        "values",
        "params",
        "distributions",
        "system_attrs",
        "intermediate_values",
        "datetime_start",
        "datetime_complete",
    )
    assert {k: getattr(after[0], k) for k in unchanged} == {k: getattr(before[0], k) for k in unchanged}
    assert after[0]._trial_id == before[0]._trial_id
    assert after[1] == before[1], "the other trial is untouched"
    assert reloaded.user_attrs == {"model": "m"}, "the study's attributes are untouched"
    assert after[0].state == TrialState.COMPLETE and after[0].values == [0.375, 0.1]


def test_adapter_refuses_unknown_trials_and_other_storages(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    storage = connect(url)
    study = optuna.create_study(study_name="s", storage=storage)
    study.optimize(objective, n_trials=1)
    with pytest.raises(KeyError):
        set_finished_trial_user_attr(storage, "s", 5, "k", 1)
    with pytest.raises(KeyError):
        set_finished_trial_user_attr(storage, "no-such-study", 0, "k", 1)
    with pytest.raises(TypeError):
        set_finished_trial_user_attr(storage, "s", 0, "k", object())  # not JSON: nothing written
    with pytest.raises(TypeError, match="RDBStorage"):
        set_finished_trial_user_attr(optuna.storages.InMemoryStorage(), "s", 0, "k", 1)  # type: ignore[arg-type]
    assert fresh(url).trials[0].user_attrs == {}


# -- URLs and credentials --------------------------------------------------------------------


def test_redacted_masks_passwords_and_keeps_other_urls():
    assert redacted("postgresql://u:secret@h/db") == "postgresql://u:***@h/db"
    assert "p@ss" not in redacted("postgresql://u:p%40ss@h:5/db") and "p%40ss" not in redacted("postgresql://u:p%40ss@h:5/db")
    assert redacted("pg sql://u:secret@h/db") == "pg sql://u:***@h/db"  # does not parse: masked all the same
    assert redacted("://u:se@cret@h/db") == "://u:***@h/db"
    for url in ("not a url", "sqlite:///:memory:", "sqlite:////tmp/a b.db", "postgresql://nobody@127.0.0.1:1/none"):
        assert redacted(url) == url


def test_error_messages_hide_the_password():
    with pytest.raises(UserError) as unreachable:
        connect("postgresql://u:secret@127.0.0.1:1/db", db_retry_s=1)  # a refused port: no need to wait 15 s
    message = str(unreachable.value)
    assert "secret" not in message
    assert "cannot open storage postgresql://u:***@127.0.0.1:1/db" in message and "server is running" in message
    with pytest.raises(UserError, match="unsupported storage scheme") as scheme:
        check_url("redis://u:secret@h/0")
    assert "secret" not in str(scheme.value) and "u:***@h" in str(scheme.value)
    with pytest.raises(UserError, match="malformed storage URL") as malformed:
        check_url("pg sql://u:secret@h/db")
    assert "secret" not in str(malformed.value)


# -- counting --------------------------------------------------------------------------------


def test_trial_of_a_dead_sqlite_process_is_failed_retried_and_not_counted(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    storage = connect(url)
    assert storage.get_heartbeat_interval() is None, "SQLite runs one process per study, without heartbeats"
    optuna.create_study(study_name="s", storage=storage).optimize(objective, n_trials=2)
    dead = die_mid_trial(url)

    study = fresh(url)
    assert study.trials[dead].state == TrialState.RUNNING and counted_trials(study) == 2
    console = Console(file=io.StringIO(), width=300)
    assert fail_stale_running_trials(study, console) == 1
    assert f"Trial(s) [{dead}] were left RUNNING by a process that died" in console.file.getvalue()  # type: ignore[attr-defined]

    study = fresh(url)
    failed = study.trials[dead]
    assert failed.state == TrialState.FAIL and failed.user_attrs == {"note": "kept"}
    [retry] = retries_of(study, dead)
    assert retry.state == TrialState.WAITING and retry.params == failed.params and retry.user_attrs == {"note": "kept"}
    assert retried_numbers(study.trials) == {dead} and is_interrupted(failed, {dead})
    assert counted_trials(study) == 2
    assert fail_stale_running_trials(study, Console(file=io.StringIO())) == 0

    # the retry runs next, with the failed trial's parameters
    study.optimize(objective, n_trials=1)
    study = fresh(url)
    done = study.trials[retry.number]
    assert done.state == TrialState.COMPLETE and done.params == failed.params and counted_trials(study) == 3


def test_a_retry_that_dies_too_is_not_counted(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    optuna.create_study(study_name="s", storage=connect(url)).optimize(objective, n_trials=1)
    first = die_mid_trial(url)
    fail_stale_running_trials(fresh(url), Console(file=io.StringIO()))
    second = die_mid_trial(url)  # runs the queued retry of `first`, and dies as well
    [retry] = retries_of(fresh(url), first)
    assert second == retry.number
    fail_stale_running_trials(fresh(url), Console(file=io.StringIO()))

    study = fresh(url)
    assert study.trials[first].state == study.trials[second].state == TrialState.FAIL
    third = [t for t in study.trials if t.state == TrialState.WAITING]
    assert len(third) == 1 and third[0].params == study.trials[first].params
    assert RetryHeartbeatStaleTrialCallback.retried_trial_number(third[0]) == first  # the first of the series
    assert retried_numbers(study.trials) == {first, second}
    assert counted_trials(study) == 1


def test_trials_that_fail_on_their_own_count_and_interrupted_ones_do_not(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    study = optuna.create_study(study_name="s", storage=connect(url))
    study.optimize(objective, n_trials=1)  # COMPLETE

    def broken(trial: optuna.Trial) -> float:
        trial.suggest_float("x", 0.0, 1.0)
        raise ValueError("an ordinary error")

    study.optimize(broken, n_trials=1, catch=(ValueError,))  # FAIL, counted
    told = study.ask()
    told.suggest_float("x", 0.0, 1.0)
    study.tell(told, state=TrialState.FAIL)  # FAIL, counted
    pruned = study.ask()
    study.tell(pruned, state=TrialState.PRUNED)  # counted

    def interrupted(trial: optuna.Trial) -> float:
        trial.suggest_float("x", 0.0, 1.0)
        trial.set_user_attr("interrupted", True)  # what the objective does on Ctrl-C
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        study.optimize(interrupted, n_trials=1)
    study.ask()  # RUNNING: not finished
    study.enqueue_trial({"x": 0.5})  # WAITING: not finished

    study = fresh(url)
    states = [t.state for t in study.trials]
    assert states == [
        TrialState.COMPLETE,
        TrialState.FAIL,
        TrialState.FAIL,
        TrialState.PRUNED,
        TrialState.FAIL,
        TrialState.RUNNING,
        TrialState.WAITING,
    ]
    assert [is_interrupted(t, set()) for t in study.trials] == [False, False, False, False, True, False, False]
    assert counted_trials(study) == 4


def test_studies_with_legacy_retry_of_count_as_before(tmp_path):
    """Before Optuna's callback, a killed trial was marked `interrupted` on the finished trial and
    its retry carried the user attribute `retry_of`."""
    url = f"sqlite:///{tmp_path}/s.db"
    storage = connect(url)
    study = optuna.create_study(study_name="s", storage=storage)
    study.optimize(objective, n_trials=1)
    trials = [study.ask() for _ in range(2)]
    for trial in trials:
        trial.suggest_float("x", 0.0, 1.0)
        study.tell(trial, state=TrialState.FAIL)
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
    killed = [t.number for t in trials]
    set_finished_trial_user_attr(storage, "s", killed[0], "interrupted", True)  # what the old code wrote; the second lost it

    study = fresh(url)
    assert retried_numbers(study.trials) == set(killed)
    assert counted_trials(study) == 1
    study.optimize(objective, n_trials=2)  # runs both retries
    study = fresh(url)
    assert [t.params for t in study.trials[-2:]] == [study.trials[k].params for k in killed]
    assert counted_trials(study) == 3


# -- study initialisation --------------------------------------------------------------------


def test_wait_for_initialisation(tmp_path, monkeypatch):
    storage = connect(f"sqlite:///{tmp_path}/s.db")
    study = optuna.create_study(study_name="s", storage=storage)
    study_id = storage.get_study_id_from_name("s")
    later = threading.Timer(1.0, lambda: study.set_user_attr("initialised", True))  # the creator, a moment later
    later.start()
    try:
        assert wait_for_initialisation(storage, study_id) == {"initialised": True}
    finally:
        later.join()

    optuna.create_study(study_name="never", storage=storage)
    monkeypatch.setattr(storage_module, "STUDY_INIT_WAIT_S", 0.2)
    with pytest.raises(UserError, match="study 'never' exists but was never initialised"):
        wait_for_initialisation(storage, storage.get_study_id_from_name("never"))


# -- PostgreSQL: heartbeats ------------------------------------------------------------------


# The heartbeat grace of the heartbeat test: long enough that the check "within the grace period"
# holds on a loaded machine (the suite runs one worker per core, beside the workers the tests start).
GRACE_S = 4

# A worker whose trial beats every second; it prints the trial's number once a beat is recorded.
BEATING_WORKER = f"""
import sys, time
import optuna
from optimizer.storage import connect
study = optuna.load_study(study_name="s", storage=connect(sys.argv[1], heartbeat_interval=1, heartbeat_grace={GRACE_S}))
def objective(trial):
    trial.suggest_float("x", 0.0, 1.0)
    trial.set_user_attr("note", "kept")
    time.sleep(1.5)
    print("TRIAL", trial.number, flush=True)
    time.sleep(600)
study.optimize(objective, n_trials=1)
"""


@needs_pg
def test_killed_postgres_trial_is_failed_by_the_heartbeat_and_retried(pg_url):
    storage = connect(pg_url, heartbeat_interval=1, heartbeat_grace=GRACE_S)
    assert storage.get_heartbeat_interval() == 1
    optuna.create_study(study_name="s", storage=storage).optimize(objective, n_trials=1)
    proc = start_python(BEATING_WORKER, pg_url)
    try:
        killed = trial_number_from(proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)

    other = fresh(pg_url, heartbeat_interval=1, heartbeat_grace=GRACE_S)  # another worker
    optuna.storages.fail_stale_trials(other)
    assert other.trials[killed].state == TrialState.RUNNING, "within the grace period the trial is left alone"
    time.sleep(GRACE_S + 1.5)
    other.optimize(objective, n_trials=1)  # fails the silent trial, queues it again, and runs the retry

    study = fresh(pg_url)
    failed = study.trials[killed]
    assert failed.state == TrialState.FAIL and "interrupted" not in failed.user_attrs
    [retry] = retries_of(study, killed)
    assert retry.state == TrialState.COMPLETE and retry.params == failed.params and retry.user_attrs == {"note": "kept"}
    assert is_interrupted(failed, retried_numbers(study.trials))
    assert counted_trials(study) == 2
