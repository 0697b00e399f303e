"""Console output of the haodiff_model commands (haodiff-train, haodiff-restore, haodiff-eval): one
`logging` setup, with haodiff-data's message style and exit codes.

INFO lines go to stdout as the bare message (what these commands printed before); warnings and
errors go to stderr as `<prog>: warning: ...` / `<prog>: error: ...`, the form haodiff-data uses.
Under torchrun / accelerate every process runs the command: rank 0 alone shows INFO, the other
ranks show warnings and errors only, tagged `<prog> rank R:` so a line says where it came from.
The handler looks sys.stdout / sys.stderr up per record, so a redirection made after the setup
(pytest's capture, contextlib.redirect_stdout) still applies.
"""

from __future__ import annotations

import logging
import os
import sys

# one owner of the exit codes, and of how Ctrl-C and SIGTERM stop a run, for both CLIs
from haodiff_data.cli import (EXIT_INTERRUPTED, EXIT_OK, EXIT_REJECTS, EXIT_TERMINATED, EXIT_USAGE, sigterm_as_ctrl_c,
                              stop_reason)

LOGGER_NAME = "haodiff_model"


class _Console(logging.Handler):
    """INFO and below to the current stdout, WARNING and above to the current stderr."""

    def __init__(self, prog: str, rank: int):
        super().__init__()
        self.prog, self.rank = prog, rank

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno < logging.WARNING:
            return message
        where = self.prog + (f" rank {self.rank}" if self.rank else "")
        return f"{where}: {record.levelname.lower()}: {message}"

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stdout if record.levelno < logging.WARNING else sys.stderr
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - logging's contract: a failing handler reports, never raises
            self.handleError(record)


def launcher_rank() -> int:
    """This process's global rank from the launcher's RANK (0 without a launcher)."""
    value = os.environ.get("RANK") or "0"
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable RANK={value!r} is not an integer") from None


def setup_logging(prog: str, rank: int | None = None) -> logging.Logger:
    """Route the `haodiff_model` loggers to the console for command `prog` (e.g. "haodiff-train dpg").

    `rank`: this process's global rank (default: the launcher's RANK). Calling it again replaces the
    previous setup, so a process that runs several commands (tests, notebooks) gets one line per record.
    """
    rank = launcher_rank() if rank is None else rank
    logger = logging.getLogger(LOGGER_NAME)
    for handler in [h for h in logger.handlers if isinstance(h, _Console)]:
        logger.removeHandler(handler)
    logger.addHandler(_Console(prog, rank))
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logger.propagate = False  # the root logger (other libraries' setup) would print every line twice
    return logger


__all__ = ["EXIT_INTERRUPTED", "EXIT_OK", "EXIT_REJECTS", "EXIT_TERMINATED", "EXIT_USAGE", "LOGGER_NAME", "launcher_rank",
           "setup_logging", "sigterm_as_ctrl_c", "stop_reason"]
