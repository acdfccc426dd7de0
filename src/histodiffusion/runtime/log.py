"""Logging of every stage: loggers under `histodiffusion.<stage>`, the run's log.txt (`log_to`), stage log
files closed when a stage returns (`closes_stage_logs`), metrics.jsonl, progress of loops and durations.
No torch: `histodiffusion --help` stays fast.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import HistoError
from .fileio import json_default as _json_default


# --------------------------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------------------------
PACKAGE_LOGGER = "histodiffusion"  # parent of every stage's logger, histodiffusion.<stage>
_LINE = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")


class _RunLine(logging.Formatter):
    """A line of a run's log.txt: the stage it comes from, then the message."""

    def format(self, record: logging.LogRecord) -> str:
        stage = record.name[len(PACKAGE_LOGGER) + 1:] or "run"
        return f"{self.formatTime(record, '%H:%M:%S')} {record.levelname} [{stage}] {record.getMessage()}" + (
            f"\n{self.formatException(record.exc_info)}" if record.exc_info else "")


_SETTINGS = {"console_level": logging.INFO, "progress_every": 10.0}  # set_logging() changes them


def logging_settings() -> dict:
    """{"console_level": the console's logging level, "progress_every": percent between progress lines}."""
    return dict(_SETTINGS)


def set_logging(console_level: int | None = None, progress_every: float | None = None) -> None:
    """What the console shows (the CLI's --quiet: WARNING, no progress bars; --verbose: DEBUG, also in the
    log files) and how often a progress line is written where there is no terminal (percent of the loop)."""
    if progress_every is not None:
        if not 0 < progress_every <= 100:
            raise HistoError(f"progress_every must be in (0, 100] percent, got {progress_every}")
        _SETTINGS["progress_every"] = float(progress_every)
    if console_level is not None:
        _SETTINGS["console_level"] = console_level
    _package_logger()


def _console_line(record: logging.LogRecord) -> bool:
    return getattr(record, "console", True)  # False: a progress line while a bar shows the same on the terminal


def _package_logger() -> logging.Logger:
    """The `histodiffusion` logger: its handlers are stderr and, during `run`, the run's log.txt. Files get
    INFO and above (DEBUG with --verbose); the console gets the level of set_logging."""
    logger = logging.getLogger(PACKAGE_LOGGER)
    logger.propagate = False
    logger.setLevel(min(logging.INFO, _SETTINGS["console_level"]))
    console = [h for h in logger.handlers if type(h) is logging.StreamHandler]
    if not console:
        console = [logging.StreamHandler(sys.stderr)]
        console[0].setFormatter(_LINE)
        console[0].addFilter(_console_line)
        logger.addHandler(console[0])
    console[0].setLevel(_SETTINGS["console_level"])
    return logger


def get_logger(stage: str = "", log_file: str | os.PathLike | None = None, is_main: bool = True) -> logging.Logger:
    """The logger of one stage, `histodiffusion.<stage>` (e.g. get_logger("sample", out / "log.txt")).

    Its lines go up to the package logger, which writes them to stderr and, while `run` is running, to the
    run's log.txt (see `log_to`); with `log_file` (in the stage's own output directory) they also go to
    that file, on the main process only, until the stage's entry point returns (see `closes_stage_logs`).
    No handler is ever swapped. Processes other than the main one log warnings only.
    """
    _package_logger()
    name = stage if stage == PACKAGE_LOGGER or stage.startswith(PACKAGE_LOGGER + ".") else \
        f"{PACKAGE_LOGGER}.{stage or 'run'}"
    logger = logging.getLogger(name)
    if name != PACKAGE_LOGGER:  # the main process inherits the package logger's level (INFO, or DEBUG)
        logger.setLevel(logging.NOTSET if is_main else logging.WARNING)
    if log_file is not None and is_main and name != PACKAGE_LOGGER:
        path = str(Path(log_file).resolve())
        if not any(isinstance(h, logging.FileHandler) and h.baseFilename == path for h in logger.handlers):
            fh = logging.FileHandler(path)
            fh.setFormatter(_LINE)
            logger.addHandler(fh)
    return logger


def _stage_log_files() -> set[tuple[logging.Logger, logging.Handler]]:
    loggers = [logging.getLogger(n) for n in list(logging.root.manager.loggerDict)
               if n.startswith(PACKAGE_LOGGER + ".")]
    return {(lg, h) for lg in loggers for h in lg.handlers if isinstance(h, logging.FileHandler)}


def closes_stage_logs(entry: Callable) -> Callable:
    """Decorator of a stage's entry point: the stage log files opened during the call are closed when it
    returns or fails, so the next stage run in this process (e.g. the pipeline's second `encode`)
    starts without them."""
    @functools.wraps(entry)
    def wrapper(*args, **kwargs):
        before = _stage_log_files()
        try:
            return entry(*args, **kwargs)
        finally:
            for logger, h in _stage_log_files() - before:
                logger.removeHandler(h)
                h.close()
    return wrapper


@contextlib.contextmanager
def log_to(log_file: str | os.PathLike) -> Iterator[None]:
    """While the block runs, every histodiffusion logger's lines (the pipeline's and every stage's) also
    go to `log_file`, each with the name of its stage: the run's log.txt."""
    logger = _package_logger()
    fh = logging.FileHandler(str(Path(log_file).resolve()))
    fh.setFormatter(_RunLine())
    logger.addHandler(fh)
    try:
        yield
    finally:
        logger.removeHandler(fh)
        fh.close()


class MetricsLog:
    """Append-only metrics.jsonl (one JSON object per line), written by the main process only."""

    def __init__(self, path: str | os.PathLike, is_main: bool = True):
        self.path = Path(path)
        self.is_main = is_main

    def log(self, **row: Any) -> None:
        if not self.is_main:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, default=_json_default) + "\n")
            f.flush()


def progress(iterable=None, total=None, desc: str = "", disable: bool = False, **kw):
    """Progress of a loop (disable it on processes other than the main one): a tqdm bar on a terminal, plain
    lines every few percent in log files and redirected output (progresslog.Progress; `log=` the stage's
    logger, `level=` the lines' level)."""
    from .progresslog import Progress

    return Progress(iterable, total=total, desc=desc, disable=disable, **kw)


def human_time(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")

