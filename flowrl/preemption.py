"""Pre-emption and Ctrl-C: while the loop trains, SIGTERM and SIGINT ask it to stop at the next
safe point — after the iteration in progress, with a checkpoint — instead of killing the process
(the loop then raises :class:`~flowrl.errors.TrainingInterrupted`). A second SIGINT interrupts at
once, without a checkpoint."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Iterator


class StopRequest:
    """The signal that asked to stop (``signum``; None while none did)."""

    signum: int | None = None

    @property
    def name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum is not None else None


@contextlib.contextmanager
def stop_requests() -> Iterator[StopRequest]:
    """Install the SIGTERM / SIGINT handlers for the block (restored after). Outside the main
    thread (where Python allows no signal handlers) nothing is installed."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame):
        if signum == signal.SIGINT and stop.signum is not None:
            raise KeyboardInterrupt
        stop.signum = signum
        print(f"\n[flowrl] {signal.Signals(signum).name}: stopping after this iteration with a checkpoint "
              "(Ctrl-C again to stop at once, without one)", file=sys.stderr, flush=True)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
