"""Ctrl-C and SIGTERM that land where Python cannot raise them (a __del__, a weakref callback) still stop the run."""

import os
import signal
import sys

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


@pytest.mark.parametrize(("sig", "raised"), [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, signals.Terminated)])
def test_a_signal_swallowed_in_a_finaliser_is_raised_at_the_next_safe_point(monkeypatch, sig, raised):
    reported = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: reported.append(u.exc_type))
    with signals.handled():
        SignalsWhenCollected(sig)  # collected at once: the signal arrives inside __del__ and is dropped there
        FailsWhenCollected()
        assert reported == [ValueError]  # other errors are reported as before; the signal's is not
        with pytest.raises(raised):  # without the record the run would go on
            signals.raise_pending()
    signals.raise_pending()  # nothing pending once the command is over
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    FailsWhenCollected()
    assert reported == [ValueError, ValueError]  # the previous hook is back
