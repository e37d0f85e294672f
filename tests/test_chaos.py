"""Chaos, reduced: three workers on one PostgreSQL study, one of them SIGKILLed mid-run (and replaced)
and the server restarted while trials run; no finished trial may be lost (benchmarks/chaos.py has
the full version and the details of the check)."""

import signal

import pytest

from benchmarks.chaos import ChaosConfig, PostgresServer, chaos_table, pg_bin, report_problems, run_chaos

pytestmark = pytest.mark.skipif(
    pg_bin() is None, reason="no PostgreSQL server binaries (/usr/lib/postgresql/*/bin/initdb): install postgresql to run it"
)


def test_killed_worker_and_database_restart_lose_no_finished_trial(tiny_dir, tmp_path):
    try:
        server = PostgresServer()
    except RuntimeError as e:  # running as root without a postgres user to start the server as
        pytest.skip(str(e))
    cfg = ChaosConfig(
        workers=3, trials=10, kills=1, sigterms=0, db_restarts=1, seed=0, gap_s=1.0, poll_s=0.5, db_retry_s=60,
        scoring_prompts=12, max_new_tokens=24,  # trials of about a second: the events land while trials run
        timeout_s=240,
    )  # fmt: skip
    with server:
        result = run_chaos(cfg, server, tiny_dir, tmp_path)
    print(chaos_table([result]))  # shown by pytest when an assertion fails
    report_problems(result)

    assert result.kills == 1 and result.db_restarts == 1, f"the chaos did not all happen: {result}"
    assert not result.timed_out
    assert not result.changed, "finished trials changed or disappeared"
    assert result.running_left == 0, "trials left RUNNING after every worker ended and the stale ones were failed"
    assert cfg.trials <= result.counted <= cfg.trials + cfg.workers - 1, result
    assert result.lost == 0
    assert result.fail_other == 0, "a trial cut off by the kill or the restart was counted as an ordinary failure"
    # the killed worker -9, every other one (the replacement too) 0: none may die on the restart
    assert result.exit_codes == {-signal.SIGKILL: 1, 0: cfg.workers}, result.unexpected_exits
    assert not result.unexpected_exits
