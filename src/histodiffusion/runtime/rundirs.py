"""Run directories: config.json first, the completion marker _COMPLETE.json last, the temporaries of killed
runs removed, a finished training stage re-opened when more steps are asked for."""
from __future__ import annotations

import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from .. import FORMAT_VERSION, __version__
from .errors import HistoError
from .fileio import read_json, remove_path, write_json_atomic

COMPLETE_MARKER = "_COMPLETE.json"  # written last into a finished artifact directory
MARKER_FORMAT = 2  # format_version of _COMPLETE.json: 2 records the stage's config and input hashes (contract.py)
CONFIG_FILE = "config.json"


def is_complete(directory: str | os.PathLike) -> bool:
    return (Path(directory) / COMPLETE_MARKER).is_file()


_TEMP_RE = re.compile(r"^\..+\.(?:tmp|old)-(\d+)$")  # atomic_path's temporaries: .<name>.tmp-<pid>


def remove_stale_temps(directory: str | os.PathLike) -> None:
    """Delete atomic_path temporaries under `directory` whose writer process is gone (killed runs)."""
    for root, dirs, files in os.walk(directory):
        for name in list(dirs) + files:
            m = _TEMP_RE.match(name)
            if m and int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1))):
                remove_path(Path(root) / name)
                if name in dirs:
                    dirs.remove(name)


def pid_alive(pid: int) -> bool:
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
    from .configrules import validate_config
    from .configtypes import config_to_dict

    validate_config(config)  # a config built in Python meets the rules of one read from flags or a file
    out = Path(out)
    cfg = {"format_version": FORMAT_VERSION, "version": __version__, "stage": stage,
           "config": config_to_dict(config)}
    path = out / CONFIG_FILE
    if path.is_file():
        old = read_json(path, "run config")
        check_format_version(old, path)
        if old.get("stage") != stage:
            raise HistoError(f"{out} is a run directory of stage {old.get('stage')!r}, not {stage!r}")
        same = comparable_config(old.get("config"), neutral, type(config)) == comparable_config(cfg["config"], neutral)
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



def start_stage(acc, config: Any, stage: str, neutral: tuple[str, ...] = ()):
    """(out, log) of a stage run under accelerate `acc`: its run directory started by the main process
    (start_run_dir(config.out, ...)) while the others wait, and its logger writing <out>/log.txt."""
    from .log import get_logger

    out = start_run_dir(config.out, config, stage, acc.is_main_process, neutral=neutral)
    acc.wait_for_everyone()
    return out, get_logger(stage, out / "log.txt", is_main=acc.is_main_process)


_STARTED_ONLY = {CONFIG_FILE, "log.txt"}  # what a run refused at its input checks leaves behind
_RESUME_NEUTRAL = {"out", "num_workers", "resume", "progress", "batch_size_eval", "device"}


def comparable_config(cfg: dict | None, neutral: tuple[str, ...] = (), cls: type | None = None) -> dict:
    """A config dict without the fields that do not change a stage's artifacts (for "same config?");
    with `cls` (its config class), a field added since the dict was written counts at its default, so a
    run made by an older version resumes when the new field keeps its default."""
    from .configtypes import config_to_dict

    full = {**config_to_dict(cls()), **(cfg or {})} if cls is not None else (cfg or {})
    return {k: v for k, v in full.items() if k not in _RESUME_NEUTRAL and k not in neutral}



def ensure_writable(directory: str | os.PathLike) -> None:
    """Fail early, naming the directory, when outputs cannot be written there (read-only, disk full)."""
    d = Path(directory)
    try:
        d.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=d, prefix=".write-test-"):
            pass
    except OSError as e:
        raise HistoError(f"cannot write to output directory {d}: {e.strerror or e}") from None
