"""The ``hmkd`` command line. Every sub-command is a thin layer over a library function.

Errors of the project's own type (:class:`hmkd.errors.HMKDError`) print as one line
``hmkd: error: <message>`` and exit with status 2; nothing partial is left behind as if complete.
Log lines carry their level (``WARNING`` ones in colour on a terminal); Python warnings go
through the same log.

The parts: :mod:`hmkd.cli.parser` (the sub-commands, their options and help texts),
:mod:`hmkd.cli.commands` (one ``cmd_*`` handler per sub-command), :mod:`hmkd.cli.inputs` (the
config, checkpoints and images the arguments name) and :mod:`hmkd.cli.logs` (the log lines).
"""

from __future__ import annotations

import logging
import sys
from typing import Sequence

from hmkd.cli.logs import LevelFormatter, setup_logging
from hmkd.cli.parser import build_parser, parse_args
from hmkd.errors import HMKDError

__all__ = ["LevelFormatter", "build_parser", "main", "parse_args"]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hmkd`` command."""
    args = parse_args(argv)
    setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except HMKDError as e:
        print(f"hmkd: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # TrainingInterrupted (a checkpoint was saved) or a plain Ctrl-C
        print(f"hmkd: {e}" if str(e) else "hmkd: interrupted", file=sys.stderr)
        return 128 + int(getattr(e, "signum", 2))  # 130 for SIGINT, 143 for SIGTERM (shell convention)
    finally:
        logging.captureWarnings(False)
