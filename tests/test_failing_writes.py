"""Writes that the system refuses (a full disk, simulated by a file-size limit): the previous cache
stays as it was, no half-written export is left, and the run ends with a one-line error (exit 2)."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import optuna

from optimizer.cli import main
from tests.test_study import run_args

LIMIT = 1024  # bytes a process may write to one file: less than any statistics or weights file


def limited(*args: str) -> subprocess.CompletedProcess:
    """`python -m optimizer ARGS` with files limited to LIMIT bytes (a write past it fails with EFBIG)."""

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "optimizer", *args], capture_output=True, text=True, env=env, preexec_fn=limit, check=False
    )


def contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name != ".lock"}  # (holds a pid)


def test_a_cache_that_cannot_be_written_keeps_the_previous_one(tiny_dir, tmp_path, capsys):
    studies, cache = tmp_path / "studies", tmp_path / "shared-cache"
    assert main(run_args(tiny_dir, studies, "--trials", "1", "--batch-size", "4", "--cache-dir", str(cache))) == 0
    before = contents(cache)
    assert {"directions.safetensors", "directions.json", "baseline.json"} <= set(before)

    # another study on the same cache folder needs new statistics (other direction prompts): its write fails
    other = [
        *run_args(tiny_dir, studies, "--trials", "1", "--batch-size", "4", "--cache-dir", str(cache)),
        "--direction-prompts",
        "6",
    ]
    other[other.index("--study") + 1] = "u"
    result = limited(*other)
    assert result.returncode == 2, result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert error and f"cannot write the cache in {cache}" in error[0] and "File too large" in error[0], result.stderr
    assert "Traceback" not in result.stderr
    assert contents(cache) == before, "the previous cache is byte for byte as it was, with no temporary file beside it"
    assert not (studies / "u.db").exists(), "no study was created"

    capsys.readouterr()
    assert main(run_args(tiny_dir, studies, "--trials", "2", "--batch-size", "4", "--cache-dir", str(cache))) == 0
    assert "Reusing cached direction statistics" in capsys.readouterr().err


def test_an_export_that_cannot_be_written_leaves_nothing(tiny_dir, tmp_path):
    studies = tmp_path / "studies"
    assert main(run_args(tiny_dir, studies, "--trials", "2")) == 0
    out = tmp_path / "exported"
    result = limited("export", "--study", "t", "--studies-dir", str(studies), "--trial", "1", "--out", str(out))
    assert result.returncode == 2, result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert error and f"cannot write the export to {out}" in error[0] and "nothing was left there" in error[0], result.stderr
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()
    trial = optuna.load_study(study_name="t", storage=f"sqlite:///{studies}/t.db").trials[1]
    assert "exported_to" not in trial.user_attrs
