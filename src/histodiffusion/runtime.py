"""Run-time plumbing shared by every stage.

Errors for users, atomic writes, run directories (config.json first, a completion marker last),
accelerate set-up, seeding, rank-0 logging and resumable checkpoints. Nothing here imports torch
at module level, so `histodiffusion --help` stays fast.
"""
from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from . import FORMAT_VERSION, __version__

COMPLETE_MARKER = "_COMPLETE.json"  # written last into a finished artifact directory
MARKER_FORMAT = 2  # format_version of _COMPLETE.json: 2 records the stage's config and input hashes (contract.py)
CONFIG_FILE = "config.json"


class HistoError(Exception):
    """An error the user can fix: the CLI prints its message (naming the culprit) and exits 2."""


# --------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it over `path`, on error delete it.

    Works for files and for directories (the caller creates what it likes at the yielded path).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    _remove(tmp)
    try:
        yield tmp
        if path.is_dir() and tmp.is_dir():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists() or p.is_symlink():
        p.unlink()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_csv_atomic(path: str | os.PathLike, rows: Iterable[dict], fieldnames: Sequence[str]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(fieldnames), extrasaction="raise")
            w.writeheader()
            for r in rows:
                w.writerow(r)
            f.flush()
            os.fsync(f.fileno())


def read_json(path: str | os.PathLike, what: str = "JSON file") -> dict:
    path = Path(path)
    if not path.is_file():
        raise HistoError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HistoError(f"{what} is not valid JSON: {path} ({e})") from None


def read_csv(path: str | os.PathLike, required: Sequence[str] = (), what: str = "CSV file") -> list[dict]:
    """Read a CSV into dicts; raise a HistoError naming the file when it or a needed column is missing."""
    path = Path(path)
    if not path.is_file():
        raise HistoError(f"{what} not found: {path}")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        missing = [c for c in required if c not in cols]
        if missing:
            raise HistoError(f"{what} {path} lacks column(s) {missing}; it has {cols}")
        return list(reader)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def sha256_dir(path: str | os.PathLike, pattern: str = "*.safetensors") -> str:
    """Content hash of a model folder: its weight files, in name order (names excluded)."""
    path = Path(path)
    files = sorted(path.rglob(pattern))
    if not files:
        raise HistoError(f"no {pattern} files in model folder {path}")
    h = hashlib.sha256()
    for f in files:
        h.update(sha256_file(f).encode())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Run directories and completion markers
# --------------------------------------------------------------------------------------------
def is_complete(directory: str | os.PathLike) -> bool:
    return (Path(directory) / COMPLETE_MARKER).is_file()


_TEMP_RE = re.compile(r"^\..+\.(?:tmp|old)-(\d+)$")  # atomic_path's temporaries: .<name>.tmp-<pid>


def remove_stale_temps(directory: str | os.PathLike) -> None:
    """Delete atomic_path temporaries under `directory` whose writer process is gone (killed runs)."""
    for root, dirs, files in os.walk(directory):
        for name in list(dirs) + files:
            m = _TEMP_RE.match(name)
            if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
                _remove(Path(root) / name)
                if name in dirs:
                    dirs.remove(name)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reopen_for_steps(directory: str | os.PathLike, steps: int, accelerator, log) -> bool:
    """For a training stage whose `steps` may change between runs: True when `directory` is complete
    with at least `steps` steps (skip it); when it is complete with fewer, remove the marker so the run
    continues from its last checkpoint (training longer is a normal wish) and return False."""
    marker = Path(directory) / COMPLETE_MARKER
    if not marker.is_file():
        return False
    done = int(read_json(marker, "completion marker").get("steps") or 0)
    if steps <= done:
        if steps < done:
            log.info("%s was trained for %d steps (> the %d asked): kept as it is", directory, done, steps)
        return True
    accelerator.wait_for_everyone()  # every rank has read the marker before it goes
    if accelerator.is_main_process:
        marker.unlink()
    accelerator.wait_for_everyone()
    log.info("%s: continuing from step %d to %d", directory, done, steps)
    return False


def check_checkpoint_within(step: int, steps: int, run_dir) -> None:
    if step > steps:
        raise HistoError(f"{run_dir} holds a checkpoint at step {step}, beyond steps={steps}: ask for at least "
                         f"{step} steps, or use another output directory")


def mark_complete(directory: str | os.PathLike, **info: Any) -> None:
    """Write the completion marker (last), after removing temporaries left by killed runs. A stage's output
    marker carries contract.completion_record(cfg) (stage, config, input hashes) in `info`."""
    remove_stale_temps(directory)
    write_json_atomic(Path(directory) / COMPLETE_MARKER,
                      {"format_version": MARKER_FORMAT, "version": __version__, "finished": time.time(), **info})


def check_format_version(meta: dict, path: str | os.PathLike) -> None:
    """Refuse artifacts written by an incompatible version of histodiffusion."""
    v = meta.get("format_version")
    if v != FORMAT_VERSION:
        raise HistoError(f"{path} has format_version {v!r}; this histodiffusion {__version__} reads "
                         f"format_version {FORMAT_VERSION}. Re-create it with this version.")


def start_run_dir(out: str | os.PathLike, config: Any, stage: str, is_main: bool = True,
                  neutral: tuple[str, ...] = ()) -> Path:
    """Create `out` and write the resolved config as config.json first.

    Re-running with the same config resumes; a different config in an existing run directory is an
    error (the user picks another --out or deletes the old run), so two runs never mix. Fields named in
    `neutral` (and _RESUME_NEUTRAL) may differ: they do not change the artifacts (e.g. a sampling batch size).
    """
    from .config import config_to_dict

    out = Path(out)
    cfg = {"format_version": FORMAT_VERSION, "version": __version__, "stage": stage,
           "config": config_to_dict(config)}
    path = out / CONFIG_FILE
    if path.is_file():
        old = read_json(path, "run config")
        check_format_version(old, path)
        if old.get("stage") != stage:
            raise HistoError(f"{out} is a run directory of stage {old.get('stage')!r}, not {stage!r}")
        same = comparable_config(old.get("config"), neutral) == comparable_config(cfg["config"], neutral)
        if same and old.get("config") != cfg["config"] and is_main:  # only neutral fields changed: record them
            write_json_atomic(path, cfg)
        if not same:
            diff = sorted(k for k in set(old["config"]) | set(cfg["config"])
                          if old["config"].get(k) != cfg["config"].get(k))
            if {p.name for p in out.iterdir()} <= _STARTED_ONLY:  # a run refused before it produced anything
                if is_main:
                    write_json_atomic(path, cfg)
                return out
            raise HistoError(f"{out} holds a run with a different config (fields {diff}); "
                             f"use another output directory or delete it")
    elif is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, cfg)
    return out


_STARTED_ONLY = {CONFIG_FILE, "log.txt"}  # what a run refused at its input checks leaves behind
_RESUME_NEUTRAL = {"out", "num_workers", "resume", "progress", "batch_size_eval", "device"}


def comparable_config(cfg: dict | None, neutral: tuple[str, ...] = ()) -> dict:
    """A config dict without the fields that do not change a stage's artifacts (for "same config?")."""
    return {k: v for k, v in (cfg or {}).items() if k not in _RESUME_NEUTRAL and k not in neutral}


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


# --------------------------------------------------------------------------------------------
# Torch / accelerate set-up (imports are local: torch is heavy)
# --------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def make_accelerator(mixed_precision: str = "no", grad_accum: int = 1, cpu: bool = False):
    """An Accelerator for one process or many (torchrun / accelerate launch; gloo on CPU)."""
    import torch
    from accelerate import Accelerator

    if mixed_precision not in ("no", "fp16", "bf16"):
        raise HistoError(f"mixed_precision must be no, fp16 or bf16, not {mixed_precision!r}")
    use_cpu = cpu or not torch.cuda.is_available()
    if mixed_precision == "fp16" and use_cpu:
        raise HistoError("mixed_precision=fp16 needs a GPU; use bf16 or no on CPU")
    return Accelerator(mixed_precision=mixed_precision, gradient_accumulation_steps=grad_accum, cpu=use_cpu)


def dist_info() -> tuple[int, int]:
    """(rank, world_size) from the launcher's environment, without initialising anything."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def raise_if_any_rank_failed(error: BaseException | None, what: str) -> None:
    """Collective error check after each rank's share of the work: every rank calls it with the
    exception it caught (or None). If any rank failed, every rank raises (its own error, or a
    HistoError naming the failed ranks) instead of waiting for the failed one at the next barrier.
    One process (no process group): re-raises `error` if given."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        if error is not None:
            raise error
        return
    flags = torch.zeros(dist.get_world_size())
    flags[dist.get_rank()] = float(error is not None)
    dist.all_reduce(flags)
    if error is not None:
        raise error
    failed = [r for r, f in enumerate(flags.tolist()) if f]
    if failed:
        raise HistoError(f"{what}: process rank(s) {failed} failed (their error is in their log); "
                         f"fix it and re-run the same command: finished work is kept")


# --------------------------------------------------------------------------------------------
# Resumable checkpoints: checkpoints/step_N, written atomically through accelerate.save_state
# --------------------------------------------------------------------------------------------
_STEP_RE = re.compile(r"^step_(\d+)$")


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints under run_dir/checkpoints, oldest first."""
    ck = Path(run_dir) / "checkpoints"
    if not ck.is_dir():
        return []
    out = []
    for p in ck.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and is_complete(p):
            out.append((int(m.group(1)), p))
    return sorted(out)


def save_checkpoint(accelerator, run_dir: str | os.PathLike, step: int, keep_last: int = 2,
                    extra: dict | None = None) -> Path:
    """accelerator.save_state into checkpoints/step_N (temp dir + rename), then prune to keep_last.

    Collective: every rank must call it. Only the main process renames and prunes.
    """
    ck = Path(run_dir) / "checkpoints"
    final = ck / f"step_{step}"
    tmp = ck / f".step_{step}.tmp"
    if accelerator.is_main_process:
        _remove(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json_atomic(tmp / "trainer_state.json", {"step": step, **(extra or {})})
        mark_complete(tmp, step=step)
        _remove(final)
        os.replace(tmp, final)
        for _, old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
            _remove(old)
    accelerator.wait_for_everyone()
    return final


def save_final_checkpoint(accelerator, run_dir: str | os.PathLike, step: int, keep_last: int = 2) -> None:
    """Checkpoint the state at the last step unless that step is saved already (collective), so a later
    run asking for more steps continues from here."""
    cks = list_checkpoints(run_dir)
    if not cks or cks[-1][0] != step:
        save_checkpoint(accelerator, run_dir, step, keep_last)


def load_latest_checkpoint(accelerator, run_dir: str | os.PathLike) -> tuple[int, dict]:
    """Load the newest complete checkpoint, if any. Returns (step, trainer_state) or (0, {})."""
    cks = list_checkpoints(run_dir)
    if not cks:
        return 0, {}
    step, path = cks[-1]
    try:
        accelerator.load_state(str(path))
    except Exception as e:  # a truncated or foreign checkpoint: one clear error, nothing deleted
        raise HistoError(f"cannot load checkpoint {path}: {type(e).__name__}: {e}. "
                         f"Delete that folder to resume from an older checkpoint.") from None
    state = read_json(path / "trainer_state.json", "checkpoint state")
    return step, state


def human_time(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def ensure_writable(directory: str | os.PathLike) -> None:
    """Fail early, naming the directory, when outputs cannot be written there (read-only, disk full)."""
    d = Path(directory)
    try:
        d.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=d, prefix=".write-test-"):
            pass
    except OSError as e:
        raise HistoError(f"cannot write to output directory {d}: {e.strerror or e}") from None
