"""Progress of a long loop, readable wherever it goes.

On a terminal (stderr is a TTY) a tqdm bar; in log files, pipes and redirected output one plain line every
few percent (`set_logging(progress_every=...)`, default 10%) with the step, the rate and the time left, e.g.

    12:01:07 INFO pretrain: 120/400 (30%), loss=0.1234, 3.41 it/s, elapsed 35s, ETA 1m22s

Lines go through the stage's logger, so they land in the stage's log.txt and the run's log.txt; while a bar
is on the terminal they are kept off the console (the bar shows the same). No carriage return is ever
written to a log file. `--quiet` hides bars and lines on the console; the log files keep the lines.
"""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass

from .configtypes import F
from .errors import HistoError
from .log import human_time, logging_settings, set_logging

_NO_CONSOLE = {"console": False}  # extra of a line the console handler drops (a bar shows it already)


@dataclass(frozen=True)
class LogConfig:
    """The `histodiffusion` command's global flags (before or after the subcommand)."""
    quiet: bool = F(False, "warnings and errors only on the console, no progress (log files keep every line)")
    verbose: bool = F(False, "debug lines too, on the console and in log files")
    progress_every: float = F(10.0, "without a terminal (log files, pipes): a progress line every this many percent")


def apply_log_config(cfg: LogConfig) -> None:
    """Set the console's level and the progress lines' spacing for this process."""
    if cfg.quiet and cfg.verbose:
        raise HistoError("--quiet and --verbose exclude each other: give one")
    set_logging(logging.WARNING if cfg.quiet else logging.DEBUG if cfg.verbose else logging.INFO,
                cfg.progress_every)


def sync_diffusers_bars() -> None:
    """diffusers' own progress bars (e.g. "Loading pipeline components") follow ours: on a terminal only,
    never with --quiet, so no carriage return reaches a log file or a pipe."""
    from diffusers.utils import logging as diffusers_logging

    on = sys.stderr.isatty() and logging_settings()["console_level"] <= logging.INFO
    (diffusers_logging.enable_progress_bar if on else diffusers_logging.disable_progress_bar)()


def progress_line(desc: str, done: int, total: int | None, rate: float | None, elapsed: float,
                  postfix: str = "") -> str:
    """One plain progress line (no carriage return): 'desc: i/n (p%), postfix, r it/s, elapsed e, ETA t'."""
    parts = [f"{desc}: {done}/{total} ({100 * done / total:.0f}%)" if total else f"{desc}: {done}"]
    if postfix:
        parts.append(postfix)
    if rate:
        parts.append(f"{rate:.0f} it/s" if rate >= 100 else f"{rate:.3g} it/s" if rate >= 1 else f"{1 / rate:.3g} s/it")
    parts.append(f"elapsed {human_time(elapsed)}")
    if rate and total and done < total:
        parts.append(f"ETA {human_time((total - done) / rate)}")
    return ", ".join(parts)


class Progress:
    """`progress(...)` of runtime: iterate over it or call update(n); set_postfix(**values); close().

    `level`: the level of the plain lines (DEBUG for inner loops, e.g. one downstream classifier among many).
    """

    def __init__(self, iterable=None, total: int | None = None, desc: str = "", disable: bool = False,
                 initial: int = 0, log: logging.Logger | None = None, level: int = logging.INFO,
                 every: float | None = None, **tqdm_kw):
        from .log import get_logger

        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.desc, self.disable, self.level = total, desc or "progress", disable, level
        self.log = log or get_logger("progress")
        settings = logging_settings()
        pct = settings["progress_every"] if every is None else every
        self.step = max(1, round((total or 0) * pct / 100)) if total else 0
        self.n = self.start = initial
        self.next_line = (initial // self.step + 1) * self.step if self.step else 0
        self.t0 = time.monotonic()
        self.postfix = ""
        self.bar = None
        if not disable and settings["console_level"] <= logging.INFO and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, initial=initial, dynamic_ncols=True, **tqdm_kw)

    def __iter__(self):
        for x in self.iterable:
            yield x
            self.update(1)
        self.close()

    def __len__(self) -> int:
        return self.total or 0

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())
        if self.bar is not None:
            self.bar.set_postfix(**values)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        if not self.disable and self.step and (self.n >= self.next_line or self.n == self.total):
            self.next_line = (self.n // self.step + 1) * self.step
            self._line()

    def _line(self) -> None:
        elapsed = time.monotonic() - self.t0
        rate = (self.n - self.start) / elapsed if elapsed > 0 and self.n > self.start else None
        self.log.log(self.level, progress_line(self.desc, self.n, self.total, rate, elapsed, self.postfix),
                     extra=_NO_CONSOLE if self.bar is not None else None)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
