"""A database server that goes away while a study runs (storage.DatabaseRetry and
optuna_adapter.RetryingRDBStorage), on a private PostgreSQL server that the tests stop and start."""

from __future__ import annotations

import threading
import time

import optuna
import pytest
from optuna.trial import TrialState

from benchmarks.chaos import PostgresServer, pg_bin
from optimizer.errors import UserError
from optimizer.storage import DatabaseUnreachable, connect, retried_numbers
from optimizer.study import StopAtBudget, optimize_until_done

pytestmark = pytest.mark.skipif(pg_bin() is None, reason="no PostgreSQL server binaries (install postgresql)")


def pause(server: PostgresServer) -> None:
    server._ctl("-m", "fast", "stop")


def resume(server: PostgresServer) -> None:
    server._ctl("-o", f"-c listen_addresses=127.0.0.1 -p {server.port} -k {server.dir}", "start")


@pytest.fixture(scope="module")
def server():
    with PostgresServer() as running:
        yield running


def new_study(url: str, name: str, retry_s: float = 30, grace: int = 4) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = connect(url, heartbeat_interval=1, heartbeat_grace=grace, db_retry_s=retry_s)
    return optuna.create_study(storage=storage, study_name=name, directions=["minimize", "minimize"], load_if_exists=True)


def test_a_study_goes_on_through_a_database_outage(server, capfd):
    url = server.create_database("outage")
    study = new_study(url, "s")

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        x = trial.suggest_float("x", 0, 1)
        if trial.number == 3:  # the server goes away in the middle of a trial, for a few seconds
            pause(server)
            threading.Timer(3, resume, (server,)).start()
        trial.set_user_attr("after", trial.number)
        return x, trial.suggest_float("y", 0, 1)

    study.optimize(objective, n_trials=8)
    err = capfd.readouterr().err
    assert "unreachable" in err and "waiting up to 30 s" in err and "reachable again after" in err
    trials = optuna.load_study(study_name="s", storage=url).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 8
    assert [t.user_attrs["after"] for t in trials] == list(range(8)) and all(len(t.params) == 2 for t in trials)


def test_past_the_bound_the_worker_stops_and_its_trial_is_run_again(server, capfd):
    url = server.create_database("bound")
    study = new_study(url, "s", retry_s=2, grace=2)
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    storage = connect(url, heartbeat_interval=1, heartbeat_grace=2)
    storage.record_heartbeat(storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name("s"), 0))
    pause(server)
    start = time.monotonic()
    try:
        with pytest.raises(DatabaseUnreachable) as gone:
            study.tell(trial, [0.5, 0.5])
        waited = time.monotonic() - start
        assert 2 <= waited < 15 and isinstance(gone.value, UserError)
        assert "unreachable for 2 s" in str(gone.value) and "run the same command again" in str(gone.value)
        again = time.monotonic()
        with pytest.raises(DatabaseUnreachable):  # once given up, at once: no second wait on the way out
            _ = study.trials
        assert time.monotonic() - again < 1
    finally:
        resume(server)
    # the trial was never told: another worker fails it once its heartbeat is stale, and runs it again
    other = new_study(url, "s", grace=2)
    time.sleep(3)
    optuna.storages.fail_stale_trials(other)
    trials = other.get_trials(deepcopy=False)
    assert trials[0].state == TrialState.FAIL and trials[0].number in retried_numbers(trials)
    assert trials[1].state == TrialState.WAITING and trials[1].params == trials[0].params
    assert "unreachable" in capfd.readouterr().err


def test_a_worker_whose_trial_another_worker_failed_goes_on(server, capfd):
    """Another worker fails this worker's running trial (as it does when no heartbeat came for longer
    than the grace period): Optuna then refuses this worker's writes and its tell, and stops
    `optimize`; the worker says so and goes on with the next trial."""
    url = server.create_database("taken")
    mine = new_study(url, "s")
    other = connect(url, heartbeat_interval=1, heartbeat_grace=4)
    said = []

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        x = trial.suggest_float("x", 0, 1)
        if trial.number == 1:
            trial_id = other.get_trial_id_from_study_id_trial_number(other.get_study_id_from_name("s"), 1)
            other.set_trial_state_values(trial_id, TrialState.FAIL)
            trial.set_user_attr("late", True)  # refused by Optuna: dropped, with a message
        return x, 1.0

    optimize_until_done(mine, objective, 5, [StopAtBudget(5)], 5, said.append)
    assert len(said) == 1 and "failed by another worker" in said[0]
    assert "Trial 1 was failed by another worker" in capfd.readouterr().err
    trials = optuna.load_study(study_name="s", storage=url).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL] + [TrialState.COMPLETE] * 3
    assert "late" not in trials[1].user_attrs


def test_errors_that_waiting_cannot_fix_are_raised_at_once(server):
    start = time.monotonic()
    with pytest.raises(UserError) as missing:
        connect(server.database_url("no_such_database"), db_retry_s=30)
    assert time.monotonic() - start < 10 and "does not exist" in str(missing.value)


def test_a_trial_whose_worker_died_before_its_first_heartbeat_is_run_again(server):
    """Optuna fails only trials whose recorded heartbeat is stale; a worker killed between creating
    a trial and its first heartbeat left it RUNNING for ever."""
    url = server.create_database("nobeat")
    # a grace of 4 s: the check "not before the grace period" must hold on a loaded machine too
    new_study(url, "s", grace=4).ask({"x": optuna.distributions.FloatDistribution(0, 1)})  # no heartbeat, ever
    other = new_study(url, "s", grace=4)
    optuna.storages.fail_stale_trials(other)
    assert other.get_trials(deepcopy=False)[0].state == TrialState.RUNNING  # not before the grace period
    time.sleep(5)
    optuna.storages.fail_stale_trials(other)
    trials = other.get_trials(deepcopy=False)
    assert trials[0].state == TrialState.FAIL and trials[0].number in retried_numbers(trials)
    assert trials[1].state == TrialState.WAITING and trials[1].params == trials[0].params
