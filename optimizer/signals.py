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
case, the record makes it certain. Python's "Exception ignored" report of such a swallowed signal
(a traceback through the library's internals) is left out: the signal is not ignored, it is acted on
shortly. `handled()` installs both handlers and that quieter report for one CLI command and puts the
previous ones back afterwards (the CLI is also called in-process by tests).
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


def _on_signal(signum: int, frame: FrameType | None) -> None:
    global _pending
    _pending = Terminated if signum == signal.SIGTERM else KeyboardInterrupt
    raise _pending()


def raise_pending() -> None:
    """Raise the Ctrl-C or SIGTERM that arrived in code that could not pass it on; call at safe points."""
    if _pending is not None:
        raise _pending()


@contextmanager
def handled() -> Iterator[None]:
    global _pending
    _pending = None
    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
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
