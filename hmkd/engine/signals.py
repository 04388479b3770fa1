"""SIGINT/SIGTERM during training: stop at the end of the iteration (after a checkpoint), never
in the middle of a step or of a checkpoint write.

:class:`StopSignal` records the signal for the training loop to act on; :func:`worker_init`
makes DataLoader workers ignore both signals (the main process decides when to stop and shuts
them down).
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["StopSignal", "worker_init"]


def worker_init(_: int) -> None:
    """DataLoader ``worker_init_fn``: workers ignore SIGINT/SIGTERM. The main process decides when
    to stop (it saves a checkpoint first) and shuts them down; a worker dying of Ctrl-C would
    abort that save."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class StopSignal:
    """While entered, SIGINT/SIGTERM set ``requested`` (the signal number), checked by the loop at
    the end of each iteration; a second SIGINT raises ``KeyboardInterrupt`` at once. The previous
    handlers are restored on exit. Off the main thread (where Python cannot install handlers) it
    does nothing."""

    def __init__(self) -> None:
        self.requested: int | None = None
        self._old: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signum
        logger.warning(
            "%s received: finishing this iteration and saving a checkpoint (SIGINT again to stop at once)",
            signal.Signals(signum).name,
        )

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    self._old[sig] = signal.signal(sig, self._handler)
                except (ValueError, OSError):  # pragma: no cover - unusual embedding
                    pass
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()
