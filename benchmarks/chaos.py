"""Chaos for several workers on one PostgreSQL study: killed workers, SIGTERMs and database restarts
while trials run, and a check that no finished trial is lost.

    python benchmarks/chaos.py [--workers 8] [--trials 60] [--kills 5] [--sigterms 1] [--db-restarts 2]
                               [--seed 0] [--runs 1] [--gap 1] [--poll 1] [--heartbeat-grace 4] [--db-retry-s 60]
                               [--scoring-prompts 4] [--max-new-tokens 4] [--model DIR] [--workdir DIR] [--timeout 1800]
    python benchmarks/chaos.py --load [--load-workers 1,2,4,8] [--trials 60] [...]

A private PostgreSQL server is started in a temporary folder on a free loopback port, as
.ci/postgres.sh starts the CI one (`PostgresServer`; as the postgres user when run as root), and a
tiny random qwen2 model with the default model's tokenizer is built once (tests/conftest.py's
`build_tiny_model`), unless `--model` gives one. Each run gets a fresh database and cache folder and
starts W workers, each `python -m optimizer run --storage URL --study chaos --trials N` with
heartbeats every second, a 4 s grace and `--db-retry-s` (dropped, with a warning, when this checkout's
`run` does not take it yet), each writing its own log under the workdir.

The chaos, from a random generator seeded by `--seed` (and the run's number): K SIGKILLs of a random
busy worker (past its start-up, its log not yet at the closing table), each followed by a
replacement worker; `--sigterms` SIGTERMs (a graceful stop, expected exit code 143), each also
replaced; R restarts of the server (`pg_ctl restart -m fast`) while trials run (a trial RUNNING that
started after the last kill, so not one a dead worker left). The events are shuffled and spread
over the run: the first once the first trial has finished, the i-th once the study counts about
i/(E+1) of N trials, at least `--gap` seconds apart, and none once the study counts N. The last
remaining worker is never signalled; a worker that dies by itself is not replaced. While the workers
run, the study is read every `--poll` seconds (read errors while the server is down are counted, not
fatal) and every trial seen finished is recorded with its state and values. When the last worker has
exited, the benchmark waits the heartbeat grace + 2 s (only when a trial is still RUNNING), fails the trials left RUNNING with
`optuna.storages.fail_stale_trials` on the product's own storage (`optimizer.storage.connect`:
heartbeats and the retry callback), and checks:

    counted      optimizer.storage.counted_trials; the README's bound is N .. N+W-1
    RUNNING left trials still RUNNING after that (must be 0)
    FAIL other   failed trials that are not interrupted ones: they count toward N without a result,
                 and nothing fails on its own here (must be 0)
    changed      trials seen finished whose state or values changed, or that disappeared (must be 0)
    re-run >1    parameter sets that were retried more than once (a retry that died in turn)
    dup retries  failed trials that more than one trial retries
    exit codes   killed workers -9, SIGTERMed ones 143, all others 0

    lost = changed + (1 if counted < N) + RUNNING left

Prints the events as they happen, then one Markdown row per run, the tail of the log of every worker
that exited with an unexpected code, and as the last line
`chaos_lost=<n> counted=<n> target=<N> workers=<W> kills=<K> db_restarts=<R>` (with `--runs M`: lost
summed over the runs, the smallest count, and the fewest kills and restarts that any run had).
Passes (exit status 0) when every run has lost 0, counted within N .. N+W-1, no FAIL other, every
worker exited with its expected code and all the asked-for events happened (a study that finishes
before its last event fails the run: give more --trials or a smaller --gap). The goal is `--runs 5`
in a row passing.

`--load` measures throughput instead: for each W in `--load-workers` (default 1,2,4,8), a fresh
database and cache, W workers on N trials without faults; a table W | wall s | trials counted |
trials per minute (counted trials over the wall time from the first launch to the last exit, so
start-up and the one-time statistics are included); last line
`load_trials_per_min=<w1>/<w2>/<w4>/<w8>`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Self

if TYPE_CHECKING:
    import optuna

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STUDY = "chaos"
EXIT_TERMINATED = 143
PG_BIN_GLOB = "/usr/lib/postgresql/*/bin"


# -- PostgreSQL ---------------------------------------------------------------------------------


def _version(initdb: Path) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", initdb.parts[-3])]


def pg_bin() -> Path | None:
    """The newest installed PostgreSQL server's bin folder (Debian's layout), or None."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=_version)
    return found[-1].parent if found else None


def _free_port() -> int:
    from optimizer.dashboard import free_port

    return free_port()


class PostgresServer:
    """A throwaway PostgreSQL server on 127.0.0.1 in a temporary folder, trusting local connections,
    started as .ci/postgres.sh does (initdb -A trust -U postgres; pg_ctl start; as the postgres user
    when running as root). A context manager: stopped and removed on exit."""

    def __init__(self, port: int | None = None):
        bin_dir = pg_bin()
        if bin_dir is None:
            raise RuntimeError(f"no PostgreSQL server binaries ({PG_BIN_GLOB}/initdb): install postgresql")
        if os.geteuid() == 0:
            import pwd

            try:
                pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError("running as root needs a 'postgres' user to run the server as") from None
        self.bin = bin_dir
        self.port = port or _free_port()
        self.dir: Path | None = None

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def database_url(self, name: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def _pg(self, tool: str, *args: str, timeout: float = 120) -> str:
        command = [str(self.bin / tool), *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(command, check=False, cwd=self.dir, capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            log = self.dir / "server.log" if self.dir else None
            tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
            raise RuntimeError(f"{tool} {' '.join(args)} failed ({result.returncode}): {result.stdout}{result.stderr}\n{tail}")
        return result.stdout

    def _ctl(self, *args: str) -> str:
        assert self.dir is not None
        return self._pg("pg_ctl", "-D", str(self.dir / "data"), "-l", str(self.dir / "server.log"), "-w", "-t", "60", *args)

    def start(self) -> Self:
        self.dir = Path(tempfile.mkdtemp(prefix="optimizer-chaos-pg."))
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres")
        self._pg("initdb", "-D", str(self.dir / "data"), "-A", "trust", "-U", "postgres", "--no-sync")
        self._ctl("-o", f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.dir}", "start")
        return self

    def restart(self) -> float:
        """`pg_ctl restart -m fast`: every connection is cut; returns the seconds until it accepts again."""
        start = time.perf_counter()
        self._ctl("-m", "fast", "restart")
        return time.perf_counter() - start

    def stop(self) -> None:
        if self.dir is None:
            return
        try:
            if (self.dir / "data" / "postmaster.pid").exists():
                self._ctl("-m", "fast", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def create_database(self, name: str) -> str:
        """A new, empty database on the server (dropped first if a previous run left one); its URL."""
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            admin.execute(f'CREATE DATABASE "{name}"')
        return self.database_url(name)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- workers ------------------------------------------------------------------------------------


@dataclasses.dataclass
class ChaosConfig:
    workers: int = 8
    trials: int = 60
    kills: int = 5
    sigterms: int = 1
    db_restarts: int = 2
    seed: int = 0
    gap_s: float = 1.0
    poll_s: float = 1.0
    heartbeat_interval: int = 1
    heartbeat_grace: int = 4
    db_retry_s: int | None = 60
    direction_prompts: int = 8
    scoring_prompts: int = 4
    max_new_tokens: int = 4
    startup_trials: int = 2
    timeout_s: float = 1800


@functools.cache
def db_retry_supported() -> bool:
    """Whether this checkout's `optimizer run` takes --db-retry-s (it is being added)."""
    command = [sys.executable, "-m", "optimizer", "run", "--help"]
    result = subprocess.run(command, check=False, capture_output=True, text=True, cwd=ROOT, env=worker_env())
    return "--db-retry-s" in result.stdout


def worker_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def worker_command(cfg: ChaosConfig, model: Path, url: str, cache: Path, seed: int) -> list[str]:
    command = [
        sys.executable, "-m", "optimizer", "run", "--model", str(model), "--storage", url, "--study", STUDY,
        "--trials", str(cfg.trials), "--cache-dir", str(cache),
        "--heartbeat-interval", str(cfg.heartbeat_interval), "--heartbeat-grace", str(cfg.heartbeat_grace),
        "--direction-prompts", str(cfg.direction_prompts), "--scoring-prompts", str(cfg.scoring_prompts),
        "--max-new-tokens", str(cfg.max_new_tokens), "--startup-trials", str(cfg.startup_trials), "--seed", str(seed),
        "--no-verify",  # the front's verification is not what is under test, and would outlast the chaos
    ]  # fmt: skip
    if cfg.db_retry_s is not None:
        command += ["--db-retry-s", str(cfg.db_retry_s)]
    return command


@dataclasses.dataclass
class Worker:
    index: int
    proc: subprocess.Popen
    log: Path
    expected: int = 0  # exit code: 0, or -9 once SIGKILLed, 143 once SIGTERMed
    signalled: str | None = None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def busy(self) -> bool:
        """Running trials: past its start-up (it has printed the study line) and not yet at its end
        (the closing Pareto table, or the note that the study needs no more trials)."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return False
        return "Study '" in text and "Pareto-optimal trials of study" not in text and "nothing to run" not in text


def start_worker(index: int, cfg: ChaosConfig, model: Path, url: str, cache: Path, logs: Path) -> Worker:
    log = logs / f"worker-{index:02d}.log"
    with open(log, "w", encoding="utf-8") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            worker_command(cfg, model, url, cache, cfg.seed + index), stdout=out, stderr=subprocess.STDOUT,
            env=worker_env(), cwd=ROOT, start_new_session=True,  # Ctrl-C on the benchmark reaches it only through us
        )  # fmt: skip
    return Worker(index, proc, log)


def stop_all(workers: list[Worker]) -> None:
    for w in workers:
        if w.alive():
            w.proc.kill()
    for w in workers:
        w.proc.wait()


# -- watching the study -------------------------------------------------------------------------


class StudyWatch:
    """Reads the study now and then; remembers every trial seen finished, with its state and values.
    Read errors (the server restarting, the study not created yet) are counted and the connection
    is made again at the next read."""

    def __init__(self, url: str):
        self.url = url
        self.storage = None
        self.study = None
        self.seen: dict[int, tuple[str, list[float] | None]] = {}
        self.counted = 0
        self.running: set[int] = set()
        self.suspects: set[int] = set()  # RUNNING when a worker was killed: maybe the dead worker's
        self.errors = 0
        self.reads = 0

    def _close(self) -> None:
        if self.storage is not None:
            with contextlib.suppress(Exception):  # closing a connection to a server that is down
                self.storage.remove_session()
                self.storage.engine.dispose()
        self.storage = self.study = None

    def poll(self) -> bool:
        import optuna
        from optuna.trial import TrialState

        from optimizer.storage import FINISHED_STATES, is_interrupted, retried_numbers

        try:
            if self.study is None:
                engine_kwargs = {"pool_pre_ping": True, "connect_args": {"connect_timeout": 5}}
                self.storage = optuna.storages.RDBStorage(self.url, skip_table_creation=True, engine_kwargs=engine_kwargs)
                self.study = optuna.load_study(study_name=STUDY, storage=self.storage)
            trials = self.study.get_trials(deepcopy=False)
        except Exception:  # noqa: BLE001 - the server restarting, tables or study not made yet: read again later
            self.errors += self.reads > 0  # errors before the first read are the workers' start-up
            self._close()
            return False
        self.reads += 1
        retried = retried_numbers(trials)
        self.counted = sum(1 for t in trials if t.state in FINISHED_STATES and not is_interrupted(t, retried))
        self.running = {t.number for t in trials if t.state == TrialState.RUNNING}
        for t in trials:
            if t.state in FINISHED_STATES and t.number not in self.seen:
                self.seen[t.number] = (t.state.name, list(t.values) if t.values is not None else None)
        return True

    def live(self) -> int:
        """RUNNING trials that no killed worker can have left behind: started after the last kill."""
        return len(self.running - self.suspects)

    def close(self) -> None:
        self._close()


# -- the check ----------------------------------------------------------------------------------


def retry_chains(trials: list) -> tuple[int, int]:
    """(parameter sets retried more than once, failed trials retried by more than one trial).

    A retry names the trials it repeats: Optuna's callback in its system attributes
    (``retry_history``: the first failed trial ... the last), studies from before that in the
    ``retry_of`` user attribute (one link per retry, followed back here)."""
    from optimizer.storage import retry_callback

    callback = retry_callback()
    with warnings.catch_warnings():  # retry_history is marked experimental
        warnings.simplefilter("ignore")
        histories = {t.number: list(callback.retry_history(t)) for t in trials}
    by_number = {t.number: t for t in trials}
    longest: dict[int, int] = {}  # first failed trial of a series -> trials of the series that failed
    retried_by: Counter[int] = Counter()  # failed trial -> trials that retry it
    for t in trials:
        history = histories[t.number]
        if not history and t.user_attrs.get("retry_of") is not None:
            number = int(t.user_attrs["retry_of"])
            while number is not None and number not in history:
                history.insert(0, number)
                parent = by_number.get(number)
                number = int(parent.user_attrs["retry_of"]) if parent and parent.user_attrs.get("retry_of") is not None else None
        if history:
            longest[history[0]] = max(longest.get(history[0], 0), len(history))
            retried_by[history[-1]] += 1
    return sum(1 for n in longest.values() if n > 1), sum(1 for n in retried_by.values() if n > 1)


@dataclasses.dataclass
class ChaosResult:
    run: int
    workers: int
    target: int
    kills: int = 0
    sigterms: int = 0
    db_restarts: int = 0
    events_asked: int = 0
    counted: int = 0
    complete: int = 0
    pruned: int = 0
    fail_interrupted: int = 0
    fail_other: int = 0
    fail_other_trials: list[int] = dataclasses.field(default_factory=list)
    running_left: int = 0
    waiting_left: int = 0
    rerun_more_than_once: int = 0
    duplicate_retries: int = 0
    changed: list[str] = dataclasses.field(default_factory=list)
    exit_codes: dict[int, int] = dataclasses.field(default_factory=dict)
    unexpected_exits: list[str] = dataclasses.field(default_factory=list)
    unexpected_logs: list[str] = dataclasses.field(default_factory=list)
    read_errors: int = 0
    restart_s: list[float] = dataclasses.field(default_factory=list)
    wall_s: float = 0.0
    timed_out: bool = False
    workdir: str = ""

    @property
    def started(self) -> int:
        return sum(self.exit_codes.values())

    @property
    def lost(self) -> int:
        return len(self.changed) + (1 if self.counted < self.target else 0) + self.running_left

    @property
    def in_bound(self) -> bool:
        return self.target <= self.counted <= self.target + self.workers - 1

    @property
    def all_events(self) -> bool:
        return self.kills + self.sigterms + self.db_restarts == self.events_asked

    @property
    def passed(self) -> bool:
        return (
            self.lost == 0 and self.in_bound and self.fail_other == 0 and not self.unexpected_exits and self.all_events
            and not self.timed_out
        )  # fmt: skip


def final_check(url: str, cfg: ChaosConfig, watch: StudyWatch, result: ChaosResult) -> None:
    """Fail what the dead workers left RUNNING (as the next worker would), then count and compare."""
    import optuna

    from optimizer.storage import connect

    with warnings.catch_warnings():  # heartbeats and fail_stale_trials are marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = connect(url, cfg.heartbeat_interval, cfg.heartbeat_grace)
        try:
            try:
                study = optuna.load_study(study_name=STUDY, storage=storage)
            except KeyError:
                result.changed = [f"#{n} (study missing)" for n in sorted(watch.seen)]
                return
            optuna.storages.fail_stale_trials(study)
            count(study, watch, result)
        finally:
            storage.remove_session()
            storage.engine.dispose()


def count(study: optuna.Study, watch: StudyWatch, result: ChaosResult) -> None:
    """The counts of the check, and the finished trials seen during the run that changed since."""
    from optuna.trial import TrialState

    from optimizer.storage import counted_trials, is_interrupted, retried_numbers

    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    result.counted = counted_trials(study)
    result.complete = sum(t.state == TrialState.COMPLETE for t in trials)
    result.pruned = sum(t.state == TrialState.PRUNED for t in trials)
    result.fail_interrupted = sum(t.state == TrialState.FAIL and is_interrupted(t, retried) for t in trials)
    result.fail_other_trials = [t.number for t in trials if t.state == TrialState.FAIL and not is_interrupted(t, retried)]
    result.fail_other = len(result.fail_other_trials)
    result.running_left = sum(t.state == TrialState.RUNNING for t in trials)
    result.waiting_left = sum(t.state == TrialState.WAITING for t in trials)
    result.rerun_more_than_once, result.duplicate_retries = retry_chains(trials)
    by_number = {t.number: t for t in trials}
    for number, (state, values) in sorted(watch.seen.items()):
        now = by_number.get(number)
        if now is None:
            result.changed.append(f"#{number} disappeared")
        elif now.state.name != state or (list(now.values) if now.values is not None else None) != values:
            result.changed.append(f"#{number} {state} {values} -> {now.state.name} {now.values}")


# -- one chaos run ------------------------------------------------------------------------------


def run_chaos(
    cfg: ChaosConfig, server: PostgresServer, model: Path, workdir: Path, run: int = 0, log: Callable[[str], None] = print
) -> ChaosResult:
    """One study under chaos on `server` (a fresh database), its workers' logs under workdir/run-<run>."""
    here = workdir / f"run-{run}"
    shutil.rmtree(here, ignore_errors=True)
    (here / "logs").mkdir(parents=True)
    url = server.create_database(f"chaos_run{run}")
    cache = here / "cache"
    rng = random.Random(cfg.seed * 1000 + run)
    events = ["kill"] * cfg.kills + ["term"] * cfg.sigterms + ["restart"] * cfg.db_restarts
    rng.shuffle(events)
    # the first once a trial has finished, then spread over the run
    thresholds = [max(1, round(cfg.trials * i / (len(events) + 1))) for i in range(len(events))]
    result = ChaosResult(run=run, workers=cfg.workers, target=cfg.trials, events_asked=len(events), workdir=str(here))
    watch = StudyWatch(url)
    workers: list[Worker] = []
    t0 = time.monotonic()

    def say(text: str) -> None:
        log(f"[run {run} {time.monotonic() - t0:7.1f} s] {text}")

    def spawn(why: str) -> Worker:
        w = start_worker(len(workers), cfg, model, url, cache, here / "logs")
        workers.append(w)
        say(f"started worker {w.index} (pid {w.proc.pid}){why}")
        return w

    def fire(kind: str) -> bool:
        if watch.counted >= cfg.trials:
            return False  # the study is done: the workers are only finishing
        live = [w for w in workers if w.alive() and w.signalled is None]
        if kind == "restart":
            if watch.live() == 0:
                return False  # only while trials run
            seconds = server.restart()
            result.restart_s.append(round(seconds, 2))
            result.db_restarts += 1
            say(f"restarted PostgreSQL ({seconds:.1f} s; trials {sorted(watch.running - watch.suspects)} were RUNNING)")
            return True
        candidates = [w for w in live if w.busy()]
        if len(live) < 2 or not candidates:
            return False  # never the last worker; only one that has started its trials
        victim = rng.choice(candidates)
        if kind == "kill":
            watch.suspects |= watch.running
            victim.proc.send_signal(signal.SIGKILL)
            victim.expected, victim.signalled = -signal.SIGKILL, "SIGKILL"
            result.kills += 1
        else:
            victim.proc.send_signal(signal.SIGTERM)
            victim.expected, victim.signalled = EXIT_TERMINATED, "SIGTERM"
            result.sigterms += 1
        say(f"{victim.signalled} worker {victim.index} (pid {victim.proc.pid}; trials RUNNING: {sorted(watch.running)})")
        spawn(f" to replace worker {victim.index}")
        return True

    try:
        for _ in range(cfg.workers):
            spawn("")
        next_event, last_event = 0, 0.0
        while any(w.alive() for w in workers):
            now = time.monotonic()
            if now - t0 > cfg.timeout_s:
                say(f"timed out after {cfg.timeout_s:.0f} s: killing the workers left")
                result.timed_out = True
                for w in workers:
                    if w.alive():
                        w.signalled = w.signalled or "timeout"
                stop_all(workers)
                break
            due = next_event < len(events) and now - last_event >= cfg.gap_s
            if watch.poll() and due and watch.counted >= thresholds[next_event] and fire(events[next_event]):
                next_event += 1
                last_event = time.monotonic()
            time.sleep(cfg.poll_s)
        for w in workers:
            w.proc.wait()
        if next_event < len(events):
            say(f"the study finished before {', '.join(events[next_event:])}: not applied")
        # the last trials finished since the previous read; with every worker gone the study can no longer
        # change, so when the read shows no trial RUNNING there is nothing for the stale check to fail
        # and waiting for heartbeats to go stale would change nothing
        if not watch.poll() or watch.running:
            say(f"all workers exited; waiting {cfg.heartbeat_grace + 2} s (heartbeat grace + 2) before the check")
            time.sleep(cfg.heartbeat_grace + 2)
            watch.poll()
        else:
            say("all workers exited, no trial left RUNNING: checking now")
        final_check(url, cfg, watch, result)
    finally:
        stop_all(workers)
        watch.close()
    result.wall_s = round(time.monotonic() - t0, 1)
    result.read_errors = watch.errors
    result.exit_codes = dict(sorted(Counter(w.proc.returncode for w in workers).items()))
    for w in workers:
        if w.proc.returncode != w.expected:
            result.unexpected_exits.append(f"worker {w.index} exited {w.proc.returncode} (expected {w.expected}); log {w.log}")
            result.unexpected_logs.append(str(w.log))
    return result


# -- output -------------------------------------------------------------------------------------


def _codes(codes: dict[int, int]) -> str:
    return ", ".join(f"{code}×{n}" for code, n in codes.items())


def chaos_table(results: list[ChaosResult]) -> str:
    head = (
        "| run | workers (started) | kills | SIGTERMs | db restarts | counted | target | bound | COMPLETE | FAIL interrupted "
        "| FAIL other | RUNNING left | WAITING left | re-run >1 | dup retries | changed | exit codes | unexpected exits "
        "| read errors | wall s | lost |"
    )
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        bound = f"{r.target}..{r.target + r.workers - 1}" + ("" if r.in_bound else " OUT")
        rows.append(
            f"| {r.run} | {r.workers} ({r.started}) | {r.kills} | {r.sigterms} | {r.db_restarts} | {r.counted} | {r.target} "
            f"| {bound} | {r.complete} | {r.fail_interrupted} | {r.fail_other} | {r.running_left} | {r.waiting_left} "
            f"| {r.rerun_more_than_once} | {r.duplicate_retries} | {len(r.changed)} | {_codes(r.exit_codes)} "
            f"| {len(r.unexpected_exits)} | {r.read_errors} | {r.wall_s} | {r.lost} |"
        )
    return "\n".join(rows)


def last_line(results: list[ChaosResult], cfg: ChaosConfig) -> str:
    return (
        f"chaos_lost={sum(r.lost for r in results)} counted={min(r.counted for r in results)} target={cfg.trials} "
        f"workers={cfg.workers} kills={min(r.kills for r in results)} db_restarts={min(r.db_restarts for r in results)}"
    )


def report_problems(result: ChaosResult, log: Callable[[str], None] = print) -> None:
    for line in result.changed:
        log(f"# run {result.run}: finished trial changed: {line}")
    for line, log_path in zip(result.unexpected_exits, result.unexpected_logs, strict=True):
        log(f"# run {result.run}: {line}")
        path = Path(log_path)
        tail = "\n".join(path.read_text(errors="replace").splitlines()[-25:]) if path.exists() else "(no log)"
        log("\n".join(f"#   {x}" for x in tail.splitlines()))
    if result.fail_other_trials:
        log(f"# run {result.run}: trials {result.fail_other_trials} FAILed without being interrupted: counted, no result")
    if not result.all_events:
        applied = result.kills + result.sigterms + result.db_restarts
        log(f"# run {result.run}: only {applied} of {result.events_asked} events applied")
    if result.timed_out:
        log(f"# run {result.run}: timed out")


# -- load ---------------------------------------------------------------------------------------


def run_load(cfg: ChaosConfig, server: PostgresServer, model: Path, workdir: Path, n_workers: int) -> dict:
    """W workers on a fresh study, no faults: wall time from the first launch to the last exit."""
    import optuna

    from optimizer.storage import counted_trials

    here = workdir / f"load-{n_workers}"
    shutil.rmtree(here, ignore_errors=True)
    (here / "logs").mkdir(parents=True)
    url = server.create_database(f"chaos_load{n_workers}")
    start = time.monotonic()
    workers = [start_worker(i, cfg, model, url, here / "cache", here / "logs") for i in range(n_workers)]
    try:
        for w in workers:
            w.proc.wait(timeout=max(1.0, cfg.timeout_s - (time.monotonic() - start)))
    finally:
        stop_all(workers)
    wall = time.monotonic() - start
    storage = optuna.storages.RDBStorage(url, skip_table_creation=True)
    try:
        counted = counted_trials(optuna.load_study(study_name=STUDY, storage=storage))
    finally:
        storage.engine.dispose()
    codes = [w.proc.returncode for w in workers]
    per_min = round(counted / wall * 60, 1)
    return {"workers": n_workers, "wall_s": round(wall, 1), "counted": counted, "per_min": per_min, "codes": codes}


# -- main ---------------------------------------------------------------------------------------


def tiny_model(folder: Path) -> Path:
    """The tests' tiny random qwen2 model with the default model's tokenizer, built once."""
    if (folder / "config.json").exists():
        return folder
    from optimizer.fetch import QWEN_CODER_05B, ensure_model_folder
    from tests.conftest import build_tiny_model

    return build_tiny_model(folder, ensure_model_folder(QWEN_CODER_05B))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--kills", type=int, default=5, help="SIGKILLs of running workers, each replaced")
    parser.add_argument("--sigterms", type=int, default=1, help="SIGTERMs of running workers, each replaced")
    parser.add_argument("--db-restarts", type=int, default=2, help="PostgreSQL restarts while trials run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", type=int, default=1, help="repeat the whole run, a fresh study each time")
    parser.add_argument("--gap", type=float, default=1.0, help="seconds at least between two events")
    parser.add_argument("--poll", type=float, default=1.0, help="seconds between two reads of the study")
    parser.add_argument("--heartbeat-grace", type=int, default=4)
    parser.add_argument("--db-retry-s", type=int, default=60, help="workers' --db-retry-s (0: not passed)")
    parser.add_argument("--scoring-prompts", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run before the workers left are killed")
    parser.add_argument("--model", type=Path, help="model folder (default: a tiny random qwen2, built under the workdir)")
    parser.add_argument("--workdir", type=Path, help="logs, caches and the tiny model (default: a new temporary folder)")
    parser.add_argument("--load", action="store_true", help="throughput by number of workers instead of chaos")
    parser.add_argument("--load-workers", default="1,2,4,8")
    args = parser.parse_args()

    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="chaos-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = ChaosConfig(
        workers=args.workers, trials=args.trials, kills=args.kills, sigterms=args.sigterms, db_restarts=args.db_restarts,
        seed=args.seed, gap_s=args.gap, poll_s=args.poll, heartbeat_grace=args.heartbeat_grace,
        db_retry_s=args.db_retry_s or None, scoring_prompts=args.scoring_prompts, max_new_tokens=args.max_new_tokens,
        timeout_s=args.timeout,
    )  # fmt: skip
    if cfg.db_retry_s is not None and not db_retry_supported():
        print("# WARNING: this checkout's `optimizer run` has no --db-retry-s: the workers run without it", flush=True)
        cfg = dataclasses.replace(cfg, db_retry_s=None)
    model = args.model or tiny_model(workdir / "tiny-model")
    shown = " ".join(worker_command(cfg, model, "URL", workdir / "CACHE", cfg.seed))
    print(f"# workdir {workdir}; model {model}; worker command: {shown}", flush=True)

    with PostgresServer() as server:
        print(f"# PostgreSQL {server.bin.parent.name} on 127.0.0.1:{server.port} ({server.dir})", flush=True)
        if args.load:
            rows = []
            for n in [int(x) for x in args.load_workers.split(",")]:
                row = run_load(cfg, server, model, workdir, n)
                print(f"# {n} worker(s): {row}", flush=True)
                rows.append(row)
            print(f"\n# {cfg.trials} trials, no faults, {os.cpu_count()} CPU cores")
            print("| workers | wall s | trials counted | trials per minute | exit codes |")
            print("|---|---|---|---|---|")
            for r in rows:
                codes = _codes(dict(Counter(r["codes"])))
                print(f"| {r['workers']} | {r['wall_s']} | {r['counted']} | {r['per_min']} | {codes} |")
            print("load_trials_per_min=" + "/".join(str(r["per_min"]) for r in rows))
            ok = all(r["counted"] >= cfg.trials and set(r["codes"]) == {0} for r in rows)
            return 0 if ok else 1

        results = []
        for run in range(args.runs):
            result = run_chaos(cfg, server, model, workdir, run, log=lambda s: print(s, flush=True))
            results.append(result)
            if args.runs > 1:
                print("# " + chaos_table([result]).splitlines()[-1], flush=True)
    print(
        f"\n# {cfg.workers} workers, {cfg.trials} trials, {cfg.kills} kills, {cfg.sigterms} SIGTERMs, {cfg.db_restarts} "
        f"db restarts per run; seed {cfg.seed}; {os.cpu_count()} CPU cores; logs under {workdir}"
    )
    print(chaos_table(results))
    for result in results:
        report_problems(result)
    passed = sum(r.passed for r in results)
    print(f"# {passed} of {len(results)} run(s) passed")
    print(last_line(results, cfg))
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
