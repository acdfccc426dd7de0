"""Torch / accelerate set-up for one process or many: seeding, the Accelerator, collective error checks and
resumable checkpoints (checkpoints/step_N). Imports of torch and accelerate are local: torch is heavy."""
from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import HistoError
from .fileio import read_json, remove_path, write_json_atomic
from .rundirs import is_complete, mark_complete


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


def end_process_group() -> None:
    """Destroy the default process group if this process made one (at the end of a stage run by torchrun /
    accelerate launch). Left to interpreter exit, gloo's worker threads can abort the process (SIGABRT,
    "terminate called without an active exception") after its work is done, and the launcher then
    reports the stage as failed."""
    import sys

    dist = sys.modules.get("torch.distributed")  # never imports torch just to find nothing to do
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_process(code: int) -> None:
    """Exit with `code`; a worker of torchrun / accelerate launch (WORLD_SIZE > 1) skips the interpreter's
    finalization after flushing its logs and output. Its work is done and written by then, but with torch
    2.14 a worker that has run an optimizer step in a process group aborts at finalization in about one
    exit of six (SIGABRT, "terminate called without an active exception", also after
    destroy_process_group), and the launcher then stops the other ranks and fails the stage."""
    import logging
    import sys

    if dist_info()[1] > 1:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


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


def launch_stage(stage: str, config, procs: int) -> None:
    """Run stage `stage` with `config` in `procs` local processes (torchrun --standalone; its CLI reads the
    config from a temporary file); the processes' output goes to this one's. A failure is one HistoError.

    The launched processes never outlive this one: a SIGTERM or an exception here terminates them (torchrun
    passes the signal on to its workers), and on Linux torchrun gets SIGTERM when this process dies in any
    other way (kill -9), so a killed `run` re-run with the same command never races its own orphans."""
    import signal
    import subprocess
    import sys
    import tempfile
    import threading

    from .configtypes import config_to_dict

    def terminated(signum, frame):
        raise SystemExit(128 + signum)

    with tempfile.TemporaryDirectory(prefix="histodiffusion-launch-") as tmp:
        path = Path(tmp) / f"{stage}.json"
        write_json_atomic(path, config_to_dict(config))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
               "-m", "histodiffusion", stage, "--config", str(path)]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, terminated) if main_thread else None
        try:
            proc = subprocess.Popen(cmd, env=env, preexec_fn=_die_with_parent if sys.platform == "linux" else None)
            try:
                code = proc.wait()
            except BaseException:  # SIGTERM, Ctrl-C, any error here: the launched processes stop too
                proc.terminate()
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                raise
        finally:
            if main_thread:
                signal.signal(signal.SIGTERM, previous)
    if code != 0:
        raise HistoError(f"stage {stage} failed in {procs} processes (exit code {code}; its error is above)")


def _die_with_parent() -> None:
    """In the launched child before exec (Linux): SIGTERM when the launching process dies (PR_SET_PDEATHSIG)."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))
    except (OSError, AttributeError):  # no prctl: the launcher's own handler still covers SIGTERM
        pass


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
        remove_path(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json_atomic(tmp / "trainer_state.json", {"step": step, **(extra or {})})
        mark_complete(tmp, step=step)
        remove_path(final)
        os.replace(tmp, final)
        for _, old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
            remove_path(old)
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


def check_finite(accelerator, loss, step: int, run_dir, what: str = "loss") -> None:
    """Collective: stop every rank with a clear error when the mean loss is NaN/inf (checkpoints kept)."""
    import torch

    value = accelerator.reduce(loss.detach().float().reshape(1), reduction="mean")
    if not torch.isfinite(value).all():
        cks = list_checkpoints(run_dir)
        last = f"the last good checkpoint is {cks[-1][1]}" if cks else "no checkpoint was saved yet"
        raise HistoError(f"{what} became {value.item()} at step {step + 1} in {run_dir}; stopped. {last}: lower "
                         f"the learning rate or check the data, then re-run to resume from it")
