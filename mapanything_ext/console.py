"""The job's console: `[tag] message` lines on stdout, from rank 0 unless a line says otherwise.

    from mapanything_ext.console import say, warn
    say("checkpoint", "resuming from ...")                   # [checkpoint] resuming from ...   (rank 0)
    warn("optim", "parameter x is in no ...")                 # [optim] WARNING: parameter x ...  (rank 0)
    say("faults", "rank 1: sending ...", every_rank=True)     # what only that rank knows

Built on the standard logging module (logger "mapanything_ext", level INFO), so a user's logging
configuration can raise the level or add handlers. The handler writes to whatever sys.stdout is when
a line is emitted (the copy into console.log included) and flushes each line, so a killed job loses
none. The rank is cluster.distributed's (the process group's once initialised, else RANK /
SLURM_PROCID; a data-loader worker inherits its rank's), which that module installs here. Commands' own results (check_ckpt's table, status, evaluate's table and
plots, the demo's summary, the pipeline's job ids) are printed, not logged: they are the output.
"""

from __future__ import annotations

import logging
import os
import sys

_LOGGER = logging.getLogger("mapanything_ext")


def say(tag: str, message: str, every_rank: bool = False, stderr: bool = False) -> None:
    """stderr=True: a line about something gone wrong that must not mix with a command's output on
    stdout (check_ckpt --json); rank 0's stderr is copied into console.log as well."""
    _LOGGER.info(message, extra={"tag": tag, "every_rank": every_rank, "stderr": stderr})


def warn(tag: str, message: str, every_rank: bool = False) -> None:
    _LOGGER.warning(message, extra={"tag": tag, "every_rank": every_rank, "stderr": False})


def _rank_from_environment() -> int:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) or 0)


# Where the rank comes from: cluster.distributed installs its get_rank when it is imported (it logs
# through this module, so this module may not import it back); before that, the launcher's variables.
_rank_source = _rank_from_environment


def set_rank_source(source) -> None:
    global _rank_source
    _rank_source = source


def rank() -> int:
    return _rank_source()


class _RankZero(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(record, "every_rank", False) or rank() == 0


class _Stdout(logging.Handler):
    """`[tag] message` (`[tag] WARNING: message` from WARNING up) on the current sys.stdout (or stderr)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level = "WARNING: " if record.levelno >= logging.WARNING else ""
            stream = sys.stderr if getattr(record, "stderr", False) else sys.stdout
            stream.write(f"[{getattr(record, 'tag', 'mapanything_ext')}] {level}{record.getMessage()}\n")
            stream.flush()
        except Exception:
            self.handleError(record)


def _configure() -> None:
    handler = _Stdout()
    handler.addFilter(_RankZero())
    _LOGGER.addHandler(handler)
    _LOGGER.setLevel(logging.INFO)
    _LOGGER.propagate = False  # Hydra's root handlers would print each line a second time


_configure()
