"""The log of the ``hmkd`` command: one line per record with its level (``WARNING`` and ``ERROR``
in colour on a terminal), Python warnings through the same log."""

from __future__ import annotations

import logging
import sys
from typing import IO

__all__ = ["LevelFormatter", "setup_logging"]


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class LevelFormatter(logging.Formatter):
    """``2026-01-02 10:00:00 INFO    hmkd.training.trainer: ...``; on a terminal, WARNING in yellow and
    ERROR in red (the whole line), so that they stand out of the step lines."""

    COLOURS = {logging.WARNING: "\033[33m", logging.ERROR: "\033[31;1m", logging.CRITICAL: "\033[31;1m"}

    def __init__(self, colour: bool = False) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
        self.colour = colour

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.name == "py.warnings":  # "file:line: UserWarning: message\n  source line": keep one line
            text = text.splitlines()[0] if text else text
        code = self.COLOURS.get(record.levelno) if self.colour else None
        return f"{code}{text}\033[0m" if code else text


def setup_logging(verbose: bool = False, stream: IO[str] | None = None) -> None:
    """Log to ``stream`` (default stderr) through :class:`LevelFormatter`, at DEBUG with
    ``verbose`` else INFO, and send ``warnings.warn(...)`` through the log (undo with
    ``logging.captureWarnings(False)``)."""
    stream = sys.stderr if stream is None else stream
    handler = logging.StreamHandler(stream)
    handler.setFormatter(LevelFormatter(colour=_isatty(stream)))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
    logging.captureWarnings(True)  # warnings.warn(...) becomes a WARNING log line like the others
