"""Several workers, killed workers and interrupted runs: PostgreSQL and SQLite."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
import sqlalchemy.exc
from optuna.trial import TrialState

from optimizer.locks import file_lock
from optimizer.storage import counted_trials, is_interrupted, retried_numbers, retry_callback
from tests.conftest import needs_pg
from tests.test_study import run_args


def retried(trial: optuna.trial.FrozenTrial) -> int | None:
    """The number of the trial that `trial` re-runs (Optuna's retry callback records it)."""
    return retry_callback().retried_trial_number(trial)


def worker(model: Path, studies: Path, *extra: str) -> subprocess.Popen:
    args = run_args(model, studies, *extra)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", SIGINT_AS_FROM_A_TERMINAL, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


# `python -m optimizer ARGS`, with SIGINT raising KeyboardInterrupt as it does when started from a
# terminal: a shell running the suite in the background ignores SIGINT, children inherit that, and
# Python then installs no handler. (Resetting it in a `preexec_fn` would run Python code between
# fork and exec in this process, which has torch's threads: unsafe.)
SIGINT_AS_FROM_A_TERMINAL = (
    "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "sys.argv[0] = 'optimizer'; runpy.run_module('optimizer', run_name='__main__', alter_sys=True)"
)


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    return out


def running_trials(storage: str) -> list[int]:
    """The edited (non-baseline) trials RUNNING in the study now; none while its tables or study are
    not there yet, or while a frozen worker holds SQLite's lock (the read gives up)."""
    url = storage
    if storage.startswith("sqlite:///"):
        if not Path(storage.removeprefix("sqlite:///")).exists():
            return []
        # read-only: the poll can never hold a write lock on the worker's file. A read-write poll
        # that catches the worker creating its tables can insert Optuna's version row itself, and
        # an engine left half-built by an error keeps its connection until garbage-collected: the
        # likely cause of a run under heavy load whose worker waited out SQLite's lock timeout twice
        # and could not record its interrupted trial
        url = f"sqlite:///file:{storage.removeprefix('sqlite:///')}?mode=ro&uri=true"
    try:
        # one engine per poll, closed at once: engines left to the garbage collector keep their
        # connections open, and a slow start could fill the server's connection slots
        rdb = optuna.storages.RDBStorage(url, skip_table_creation=True)
    except (RuntimeError, optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError):
        return []  # the worker has not created the tables yet
    try:
        study = optuna.load_study(study_name="t", storage=rdb)
        return [t.number for t in study.get_trials(states=(TrialState.RUNNING,)) if t.number > 0]
    except (KeyError, optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError):
        return []  # the worker has not created the study yet
    finally:
        rdb.remove_session()
        rdb.engine.dispose()


def wait_for_running_trial(storage: str, timeout: float = 120) -> int:
    """Poll until an edited (non-baseline) trial is RUNNING; return its number."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        running = running_trials(storage)
        if running:
            return running[0]
        time.sleep(0.05)
    raise AssertionError("no trial started")


def kill_mid_trial(proc: subprocess.Popen, storage: str, timeout: float = 120) -> int:
    """SIGKILL the worker while an edited trial of its is RUNNING; return that trial's number. The
    worker is frozen (SIGSTOP) before the study is read, so the trial read as running is the one it
    dies in: a kill sent after a poll alone could land after that trial's end and before the next
    one began, leaving nothing RUNNING (seen once in CI)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        wait_for_running_trial(storage, deadline - time.time())
        proc.send_signal(signal.SIGSTOP)
        running = running_trials(storage)
        if running:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return running[0]
        proc.send_signal(signal.SIGCONT)  # frozen between two trials: let it start the next one
    raise AssertionError("the worker was never frozen mid-trial")


# trials of about a second on the tiny model; early stop off, since it can end a dominated trial in milliseconds,
# before a signal meant to land mid-trial
SLOW = ("--scoring-prompts", "12", "--max-new-tokens", "24", "--no-early-stop")


@needs_pg
def test_two_workers_share_one_postgres_study(tiny_dir, tmp_path, pg_url):
    studies = tmp_path / "studies"
    n = 8
    procs = [worker(tiny_dir, studies, "--storage", pg_url, "--trials", str(n), *SLOW) for _ in range(2)]
    outputs = [finish(p) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    study = optuna.load_study(study_name="t", storage=pg_url)
    assert n <= counted_trials(study) <= n + 1  # a worker may finish the trial it had started
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    assert sum(1 for t in study.trials if t.user_attrs.get("baseline")) == 1
    assert sum("no cached directions yet" in out for out in outputs) == 1, "statistics are computed by one worker"
    assert sum("Reusing cached direction statistics" in out for out in outputs) == 1


@needs_pg
def test_killed_postgres_worker_trial_is_failed_and_retried(tiny_dir, tmp_path, pg_url):
    studies = tmp_path / "studies"
    beat = ("--heartbeat-interval", "1", "--heartbeat-grace", "3")
    proc = worker(tiny_dir, studies, "--storage", pg_url, "--trials", "30", *SLOW, *beat)
    polled = kill_mid_trial(proc, pg_url)
    killed = trial_left_running(pg_url, polled)
    before = {
        t.number: t.values for t in optuna.load_study(study_name="t", storage=pg_url).trials if t.state == TrialState.COMPLETE
    }
    time.sleep(4)  # past the grace period: the next worker fails the silent trial
    again = worker(tiny_dir, studies, "--storage", pg_url, "--trials", str(killed + 2), *SLOW, *beat)
    out = finish(again)
    assert again.returncode == 0, out
    study = optuna.load_study(study_name="t", storage=pg_url)
    trial = study.trials[killed]
    assert trial.state == TrialState.FAIL and is_interrupted(trial, retried_numbers(study.trials))
    # the kill may land while the trial is still suggesting: the retry repeats what was suggested
    assert any(retried(t) == killed and t.params.items() >= trial.params.items() for t in study.trials)
    assert counted_trials(study) == killed + 2
    assert all(study.trials[k].values == v for k, v in before.items()), "finished trials are kept as they were"


def signal_mid_trial(model: Path, studies: Path, sig: int, trials: int = 4) -> tuple[subprocess.Popen, int]:
    """Start a SQLite study and send `sig` while an edited trial runs; returns the number of the
    trial seen running (the signal may still land in a later one: some edits end every answer at
    once, so a trial can finish within milliseconds of the poll)."""
    proc = worker(model, studies, "--trials", str(trials), *SLOW)
    number = wait_for_running_trial(f"sqlite:///{studies}/t.db")
    proc.send_signal(sig)
    return proc, number


def trial_left_running(storage: str, polled: int) -> int:
    """The one trial a killed worker left RUNNING: the polled one, or one after it."""
    running = [t.number for t in optuna.load_study(study_name="t", storage=storage).trials if t.state == TrialState.RUNNING]
    assert len(running) == 1 and running[0] >= polled, running
    return running[0]


def test_killed_sqlite_worker_trial_is_failed_and_retried(tiny_dir, tmp_path):
    studies = tmp_path / "studies"
    storage = f"sqlite:///{studies}/t.db"
    polled = kill_mid_trial(worker(tiny_dir, studies, "--trials", "30", *SLOW), storage)
    killed = trial_left_running(storage, polled)
    again = worker(tiny_dir, studies, "--trials", str(killed + 2), *SLOW)
    out = finish(again)
    assert again.returncode == 0, out
    assert "left RUNNING by a process that died" in out
    study = optuna.load_study(study_name="t", storage=storage)
    assert study.trials[killed].state == TrialState.FAIL
    assert any(retried(t) == killed for t in study.trials)
    assert counted_trials(study) == killed + 2 and "computing it now" not in out  # the cache survived the kill


@pytest.mark.parametrize(
    ("sig", "code", "said"), [(signal.SIGINT, 130, "Interrupted."), (signal.SIGTERM, 143, "Terminated (SIGTERM).")]
)
def test_ctrl_c_or_sigterm_records_the_trial_and_says_how_to_resume(tiny_dir, tmp_path, sig, code, said):
    studies = tmp_path / "studies"
    storage = f"sqlite:///{studies}/t.db"
    # many trials: on a loaded machine the poll may see a trial late, and the signal must arrive
    # before the study's last trial ends
    proc, polled = signal_mid_trial(tiny_dir, studies, sig, trials=30)
    out = finish(proc)
    assert proc.returncode == code, out
    assert said in out and "run the same command again to resume" in out and "Traceback" not in out
    study = optuna.load_study(study_name="t", storage=storage)
    (trial,) = [t for t in study.trials if t.state != TrialState.COMPLETE]  # the one the signal landed in
    interrupted = trial.number
    assert interrupted >= polled and trial.state == TrialState.FAIL and trial.user_attrs.get("interrupted")
    assert counted_trials(study) == interrupted  # the interrupted trial does not count
    again = worker(tiny_dir, studies, "--trials", str(interrupted + 2), *SLOW)
    assert again.wait(timeout=300) == 0
    assert counted_trials(optuna.load_study(study_name="t", storage=storage)) == interrupted + 2


def test_second_process_on_one_sqlite_study_is_refused(tiny_dir, tmp_path, capsys):
    from optimizer.cli import main

    studies = tmp_path / "studies"
    studies.mkdir()
    with file_lock(studies / "t.db.lock"):
        assert main(run_args(tiny_dir, studies, "--trials", "1")) == 2
    message = capsys.readouterr().err
    assert "in use by another optimizer process" in message and "postgresql" in message


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_cache_is_detected_and_recomputed(tiny_dir, tmp_path, capsys, damage):
    from optimizer.cli import main

    studies = tmp_path / "studies"
    assert main(run_args(tiny_dir, studies, "--trials", "1")) == 0
    path = studies / "t" / "directions.safetensors"
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-5] ^= 0xFF
    else:
        data = data[: len(data) // 2]
    path.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(run_args(tiny_dir, studies, "--trials", "2")) == 0
    out = capsys.readouterr().err
    assert "cached directions is damaged" in out and "computing it now" in out
    assert "Reusing cached baseline" in out


SECRET = "s3cret-Pw"


def with_password(url: str) -> str:
    """`url` with a password added; the test server trusts loopback connections and ignores it."""
    scheme, rest = url.split("://", 1)
    user, host = rest.split("@", 1)
    return f"{scheme}://{user.split(':')[0]}:{SECRET}@{host}"


def dashboard_json(proc: subprocess.Popen, port: int, path: str) -> str:
    deadline = time.time() + 30
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
                return response.read().decode()
        except OSError:
            assert proc.poll() is None and time.time() < deadline, "dashboard did not answer"
            time.sleep(0.3)


@needs_pg
def test_no_password_in_the_study_its_dashboard_or_the_output(tiny_dir, tmp_path, pg_url):
    from optimizer.dashboard import free_port

    url = with_password(pg_url)
    studies = tmp_path / "studies"
    run = worker(tiny_dir, studies, "--storage", url, "--trials", "2")
    out = finish(run)
    assert run.returncode == 0, out
    shown = subprocess.run(
        [sys.executable, "-m", "optimizer", "show", "--study", "t", "--storage", url],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "Pareto-optimal" in shown.stderr
    study = optuna.load_study(study_name="t", storage=pg_url)
    assert study.user_attrs["run_settings"]["storage"] == with_password(pg_url).replace(SECRET, "***")
    storage = optuna.storages.RDBStorage(pg_url)
    study_system_attrs = storage.get_study_system_attrs(storage.get_study_id_from_name("t"))  # the dashboard's notes, too
    stored = json.dumps([study.user_attrs, study_system_attrs, [(t.user_attrs, t.system_attrs) for t in study.trials]])

    port = free_port()
    command = [sys.executable, "-m", "optimizer", "dashboard", "--study", "t", "--storage", url, "--port", str(port)]
    dashboard = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        first_line = dashboard.stdout.readline()
        assert f"http://127.0.0.1:{port}/dashboard/" in first_line and "***" in first_line
        summaries = json.loads(dashboard_json(dashboard, port, "/api/studies"))["study_summaries"]
        detail = dashboard_json(dashboard, port, f"/api/studies/{summaries[0]['study_id']}")
    finally:
        dashboard.terminate()
        dashboard.wait(timeout=10)
    assert "Refusals" in json.loads(detail)["trials"][1]["note"]["body"], "the notes must be in what was read"
    for where, text in (
        ("run output", out),
        ("show", shown.stderr),
        ("study attributes", stored),
        ("dashboard line", first_line),
        ("dashboard API", detail),
    ):
        assert SECRET not in text, where
