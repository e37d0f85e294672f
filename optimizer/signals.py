"""Ctrl-C and SIGTERM: stop now, and never be talked out of it.

Python turns SIGINT into a KeyboardInterrupt raised wherever the main thread happens to be, and
the CLI does the same with SIGTERM (`Terminated`, a KeyboardInterrupt, so that one `except` handles
both: the running trial is marked interrupted and not counted, locks and temporary files are
released on the way out). Raised "wherever" includes places whose exceptions Python cannot pass
on: a `__del__`, a weakref callback (SQLAlchemy's session state cleanup is one, and a signal landed
there in a test run), a finaliser run by the garbage collector. Python prints "Exception ignored
in ..." and carries on, and the run would finish as if nothing had been asked.

So the handler also writes the signal down before raising, and `raise_pending` raises it again at
the next trial boundary if it was swallowed: the first raise keeps the stop immediate in the usual
case, the record makes it certain. Inside the database layer (SQLAlchemy, Optuna's storages, the
drivers) the handler only records: an exception raised half-way through a commit or a connection's
return to its pool can leave a SQLite write lock held, so that the interrupted trial could not be
recorded (seen once in CI: the FAIL commit waited out the lock timeout and Optuna stopped with
"Should not reach"); the signal is then raised at the next trial's start. Python's "Exception
ignored" report of a swallowed signal (a traceback through the library's internals) is left out: the
signal is not ignored, it is acted on shortly. `handled()` installs both handlers and that quieter
report for one CLI command and puts the previous ones back afterwards (the CLI is also called
in-process by tests).

A signal that the process was started with ignored stays ignored, as Python itself leaves SIGINT
then: a shell without job control starts `cmd &` with SIGINT ignored so that a Ctrl-C meant for the
foreground does not stop the jobs in the background (a study started so from a script keeps
running), and a caller that ignores SIGTERM means it too.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType


class Terminated(KeyboardInterrupt):
    """SIGTERM (a container stopping, a scheduler's preemption, `kill`), handled as Ctrl-C is."""


_pending: type[KeyboardInterrupt] | None = None


# Modules in which a raise could leave a database connection half-way (a SQLite write lock held by a
# connection nobody will close, so the next commit waits out the lock timeout and fails).
_DATABASE_LAYER = ("sqlalchemy", "optuna.storages", "sqlite3", "psycopg")


def _in_database_layer(frame: FrameType | None) -> bool:
    """Whether the code the signal interrupted is the database layer's, called from ours: the frames
    from the innermost up to the first of this package."""
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module.startswith("optimizer"):
            return False
        if module.startswith(_DATABASE_LAYER):
            return True
        frame = frame.f_back
    return False


def _on_signal(signum: int, frame: FrameType | None) -> None:
    global _pending
    _pending = Terminated if signum == signal.SIGTERM else KeyboardInterrupt
    if not _in_database_layer(frame):  # there it is only recorded, for `raise_pending` at the next safe point
        raise _pending()


def raise_pending() -> None:
    """Raise the Ctrl-C or SIGTERM that arrived in code that could not pass it on; call at safe points."""
    if _pending is not None:
        raise _pending()


@contextmanager
def handled() -> Iterator[None]:
    global _pending
    _pending = None
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig, handler in previous.items():
        if handler is not signal.SIG_IGN:  # ignored by whoever started the process: stays ignored (see below)
            signal.signal(sig, _on_signal)
    report = sys.unraisablehook

    def quiet_about_signals(unraisable: sys.UnraisableHookArgs) -> None:
        if not (_pending is not None and isinstance(unraisable.exc_value, KeyboardInterrupt)):
            report(unraisable)

    sys.unraisablehook = quiet_about_signals
    try:
        yield
    finally:
        sys.unraisablehook = report
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _pending = None
