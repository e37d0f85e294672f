"""Ctrl-C and SIGTERM that land where Python cannot raise them (a __del__, a weakref callback) still stop the run."""

import os
import signal
import sys
import types

import pytest

from optimizer import signals


class SignalsWhenCollected:
    """Sends a signal to this process from its finaliser, as a signal that arrives during SQLAlchemy's
    weakref cleanup does: the handler's exception cannot leave the finaliser and is dropped."""

    def __init__(self, sig: signal.Signals) -> None:
        self.sig = sig

    def __del__(self) -> None:
        os.kill(os.getpid(), self.sig)


class FailsWhenCollected:
    def __del__(self) -> None:
        raise ValueError("a real error in a finaliser")


@pytest.fixture(autouse=True)
def handlers_as_in_a_terminal():
    """Python's own handlers, whatever this process started with (a shell without job control starts
    `cmd &` with SIGINT ignored, and Python then leaves it so); put back afterwards."""
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    for s, handler in previous.items():
        signal.signal(s, handler)


@pytest.mark.parametrize(("sig", "raised"), [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, signals.Terminated)])
def test_a_signal_swallowed_in_a_finaliser_is_raised_at_the_next_safe_point(monkeypatch, sig, raised):
    reported = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: reported.append(u.exc_type))
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with signals.handled():
        SignalsWhenCollected(sig)  # collected at once: the signal arrives inside __del__ and is dropped there
        FailsWhenCollected()
        assert reported == [ValueError]  # other errors are reported as before; the signal's is not
        with pytest.raises(raised):  # without the record the run would go on
            signals.raise_pending()
    signals.raise_pending()  # nothing pending once the command is over
    assert {s: signal.getsignal(s) for s in before} == before  # the handlers it found are back
    FailsWhenCollected()
    assert reported == [ValueError, ValueError]  # the previous hook is back


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_ignored_at_start_stays_ignored(sig):
    signal.signal(sig, signal.SIG_IGN)  # as a script's `optimizer run ... &` starts it
    with signals.handled():
        assert signal.getsignal(sig) is signal.SIG_IGN
        os.kill(os.getpid(), sig)
        signals.raise_pending()  # nothing recorded: the run goes on
    assert signal.getsignal(sig) is signal.SIG_IGN


def test_a_signal_inside_the_database_layer_waits_for_the_next_safe_point():
    def send(sig):  # runs as if it were SQLAlchemy's code (the module a frame belongs to is its globals' name)
        os.kill(os.getpid(), sig)
        return sum(range(1000))  # bytecodes after the kill, where a handler that raised would raise

    in_database = types.FunctionType(send.__code__, {"__name__": "sqlalchemy.engine.base", "os": os, "sum": sum, "range": range})
    with signals.handled():
        assert in_database(signal.SIGINT) == 499500  # not raised inside the database layer
        with pytest.raises(KeyboardInterrupt):
            signals.raise_pending()  # but at the next safe point
    with signals.handled(), pytest.raises(signals.Terminated):
        send(signal.SIGTERM)  # anywhere else: at once
