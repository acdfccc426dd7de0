"""Kill mid-way, lose nothing: every stage's CLI command is SIGKILLed at a step it reached and re-run.

For each stage the harness
1. builds tiny inputs with the tests' own builders (helpers_*.py) and runs the command once
   uninterrupted in this process (the reference; torch on one thread, as the subprocesses),
2. starts `python -m histodiffusion <stage> ...` in a subprocess, waits until the file the stage
   writes when it reaches a given step is there (a shard, a checkpoint, a PNG, a trained feature
   classifier, a finished classifier) and SIGKILLs it at once (no wall-clock delay),
3. checks that nothing a later stage would read as complete was left (no _COMPLETE.json, the
   readers refuse the directory),
4. re-runs the same command (in this process, through the same CLI entry point) and checks that it exits 0, leaves no temporary files or directories,
   and that the artifacts equal the reference's: byte for byte for prepare, encode, sample, select
   and evaluate; for the training stages, the run continued from the newest checkpoint (logged
   `resumed_from`), reached the final step, and exported the same weights as the uninterrupted run.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from histodiffusion.cli import main as cli_main
from histodiffusion.runtime.distributed import list_checkpoints
from histodiffusion.runtime.errors import HistoError

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
KILL_TIMEOUT = 180  # seconds to wait for the kill trigger (generous: a busy 2-core machine)


def _env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("HISTODIFFUSION_RECORD_IDS", None)
    return env


def _cmd(stage: str, args: dict) -> list[str]:
    argv = [stage]
    for k, v in args.items():
        argv += [f"--{k.replace('_', '-')}", ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)]
    return argv


def kill_when(argv: list[str], trigger) -> dict:
    """Run the CLI in a subprocess and SIGKILL it as soon as trigger() is true (a file written when the
    stage reaches a given step). Returns {"killed": bool}: False when the process ended before the kill."""
    proc = subprocess.Popen([sys.executable, "-m", "histodiffusion", *argv], env=_env(), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + KILL_TIMEOUT
        while proc.poll() is None and not trigger() and time.time() < deadline:
            time.sleep(0.01)
        killed = proc.poll() is None
        if killed:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        err = proc.stderr.read().decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if not killed:
        assert proc.returncode == 0, err[-3000:]
    return {"killed": killed}


def rerun(argv: list[str]) -> None:
    """The same command again, in this process (same entry point as the CLI; saves an interpreter start)."""
    assert cli_main(argv) == 0


def temp_leftovers(out: Path) -> list[str]:
    """Temporary files/dirs of `out` left behind: .<name>.tmp-* beside it, *.tmp* / _progress inside it."""
    out = Path(out)
    found = [p.name for p in out.parent.glob(f".{out.name}.*")]
    if out.is_dir():
        found += [str(p.relative_to(out)) for p in out.rglob("*")
                  if ".tmp" in p.name or ".old-" in p.name or p.name in ("_progress",) or p.name.startswith(".write-test")]
    return sorted(found)


def files(d: Path, skip=("config.json", "_COMPLETE.json", "log.txt")) -> dict[str, bytes]:
    d = Path(d)
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file() and p.name not in skip}


def assert_same_files(a: Path, b: Path, skip=("config.json", "_COMPLETE.json", "log.txt"), json_drop=()):
    fa, fb = files(a, skip), files(b, skip)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        if k.endswith(".json") and json_drop:
            ja, jb = json.loads(fa[k]), json.loads(fb[k])
            for key in json_drop:
                ja.pop(key, None), jb.pop(key, None)
            assert ja == jb, k
        else:
            assert fa[k] == fb[k], k


def metrics_rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


def safetensors_equal(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), f"{a.name}: tensor {k} differs"


# --------------------------------------------------------------------------------------------
# Per-stage set-ups: (argv without --out, out-of-reference run, trigger factory, checks)
# --------------------------------------------------------------------------------------------
def first_file(pattern_dir: Path, glob: str):
    return lambda: any(Path(pattern_dir).glob(glob))


def _kill_and_resume(tmp: Path, stage: str, args: dict, trigger_of):
    """Reference run in-process, then kill (at the step trigger_of(out) signals) + re-run. Returns
    (ref_out, out, argv, kill info)."""
    ref_out, out = tmp / "ref" / "out", tmp / "kill" / "out"
    ref_out.parent.mkdir(parents=True)
    out.parent.mkdir(parents=True)
    assert cli_main(_cmd(stage, {**args, "out": ref_out})) == 0
    argv = _cmd(stage, {**args, "out": out})
    info = kill_when(argv, trigger_of(out))
    info["killed"] = info["killed"] and not (out / "_COMPLETE.json").exists()  # not killed after finishing
    assert info["killed"], f"{stage} finished before the kill: trigger on an earlier step"
    assert not (out / "_COMPLETE.json").exists()
    return ref_out, out, argv, info


def _assert_clean(out: Path) -> None:
    assert (out / "_COMPLETE.json").is_file()
    assert temp_leftovers(out) == []


def test_prepare(tmp_path):
    from helpers_prepare import labels_csv, lung_rows

    from histodiffusion.runtime.artifacts import read_dataset

    by_class: dict[str, list] = {}
    for r in lung_rows():
        by_class.setdefault(r["label"], []).append(r)
    rows = [r for rs in by_class.values() for r in rs[:40]]  # enough work to be killed mid-way
    csv_path = labels_csv(tmp_path / "src", rows)
    args = {"labels_csv": csv_path, "tile_size": 16, "shard_size": 4, "fewshot_fracs": "0.5", "name": "lung"}

    def trigger(out):
        return first_file(out.parent, f".{out.name}.tmp-*/shards/pixels_00001.safetensors")

    ref, out, argv, _ = _kill_and_resume(tmp_path, "prepare", args, trigger)
    # a killed prepare leaves no dataset directory a later stage could read
    assert not out.exists()
    with pytest.raises(HistoError):
        read_dataset(out)
    rerun(argv)
    _assert_clean(out)
    meta_a, meta_b = (json.loads((d / "meta.json").read_text()) for d in (ref, out))
    for m in (meta_a, meta_b):
        m.pop("seconds"), m["config"].pop("out")
    assert meta_a == meta_b
    assert_same_files(ref, out, skip=("config.json", "_COMPLETE.json", "meta.json", "log.txt"))


def test_encode(tmp_path):
    from helpers_pretrain import make_dataset, make_vae

    from histodiffusion.data.datasets import LatentDataset

    data = make_dataset(tmp_path / "data", n=96, seed=3, classes=("a", "b"))
    vae = make_vae(tmp_path / "vae", block_out_channels=(8, 16, 16))
    args = {"data": data, "vae": vae, "batch_size": 1, "shard_size": 2}

    def trigger(out):
        return first_file(out.parent, f".{out.name}.tmp-encode/latents_00001.safetensors")

    ref, out, argv, _ = _kill_and_resume(tmp_path, "encode", args, trigger)
    with pytest.raises(HistoError):
        LatentDataset(out)
    rerun(argv)
    _assert_clean(out)
    assert_same_files(ref, out)


def _training_checks(ref: Path, out: Path, killed_at: int, steps: int, weights: str) -> None:
    _assert_clean(out)
    rows = metrics_rows(out)
    resumed = [r["resumed_from"] for r in rows if "resumed_from" in r]
    if not resumed:  # stages that only log it
        resumed = [int(m) for m in re.findall(r"resumed from (?:checkpoint )?step (\d+)", (out / "log.txt").read_text())]
    assert resumed == [killed_at], (resumed, killed_at)
    assert max(r["step"] for r in rows if "step" in r) == steps
    assert (out / "checkpoints").is_dir() and not list((out / "checkpoints").glob(".*"))
    # the interrupted-and-resumed run exports the same weights as the uninterrupted one
    safetensors_equal(ref / weights, out / weights)


@pytest.mark.parametrize("stage", ["train-autoencoder", "pretrain", "train-latent-classifier"])
def test_training_stage(tmp_path, stage):
    if stage == "train-autoencoder":
        from helpers_pretrain import make_dataset

        data = make_dataset(tmp_path / "data", n=24, seed=1)
        steps = 16
        args = {"data": data, "block_out_channels": "8,16", "steps": steps, "batch_size": 4, "crop": 0,
                "holdout": 4, "eval_every": 0, "checkpoint_every": 3, "keep_checkpoints": 2}
        weights = "model/vae/diffusion_pytorch_model.safetensors"
    elif stage == "pretrain":
        from helpers_pretrain import make_cache

        cache = make_cache(tmp_path / "in", "a", n=16)
        steps = 16
        args = {"cache": cache, "block_out_channels": "16,32", "batch_size": 4, "warmup": 2, "sample_every": 0,
                "steps": steps, "checkpoint_every": 3, "keep_checkpoints": 2}
        weights = "model/unet_ema/diffusion_pytorch_model.safetensors"
    else:
        from helpers_sample import make_labeled_cache
        from histodiffusion.models.unet import build_scheduler

        _, _, cache = make_labeled_cache(tmp_path / "in", n=30)
        build_scheduler().save_pretrained(tmp_path / "sched")
        steps = 24
        args = {"cache": cache, "scheduler": tmp_path / "sched", "width": 8, "depth": 1, "steps": steps,
                "batch_size": 8, "checkpoint_every": 4, "keep_checkpoints": 2, "subset": "train", "val_subset": "val"}
        weights = "model/diffusion_pytorch_model.safetensors"
    ref, out, argv, _ = _kill_and_resume(tmp_path, stage, args, lambda o: (lambda: bool(list_checkpoints(o))))
    cks = list_checkpoints(out)
    assert cks, "killed before the first checkpoint"
    assert not (out / "model").exists() or not (out / "_COMPLETE.json").exists()
    rerun(argv)
    _training_checks(ref, out, cks[-1][0], steps, weights)


@pytest.fixture(scope="module")
def ldm_and_classifier(tmp_path_factory):
    from helpers_sample import make_labeled_cache, make_latent_classifier, make_ldm

    d = tmp_path_factory.mktemp("models")
    with torch.no_grad():
        _, vae, cache = make_labeled_cache(d, n=20)
        ldm = make_ldm(d / "ldm", vae)
        clf = make_latent_classifier(d / "clf", cache, ldm / "scheduler")
    return ldm, clf


def test_sample(tmp_path, ldm_and_classifier):
    ldm, clf = ldm_and_classifier
    args = {"model": ldm, "classifier": clf, "n_per_class": 6, "steps": 3, "scheduler": "ddim", "eta": 1.0,
            "scale": 3.0, "batch_size": 2}
    ref, out, argv, _ = _kill_and_resume(tmp_path, "sample", args,
                                         lambda o: first_file(o / "images", "*.png"))
    assert not (out / "samples.csv").exists()
    rerun(argv)
    _assert_clean(out)
    assert_same_files(ref, out)


def _eval_inputs(tmp: Path):
    from helpers_eval import make_class_samples, make_dataset, write_filtered

    data = make_dataset(tmp / "data")
    samples = make_class_samples(tmp / "samples", n_per_class=6)
    return data, samples, write_filtered


def test_select(tmp_path):
    data, samples, _ = _eval_inputs(tmp_path)
    # select writes into <samples>/select by default; the reference and the killed run get their own copies
    import shutil

    for d in ("ref", "kill"):
        shutil.copytree(samples, tmp_path / f"samples_{d}")
    base = {"data": data, "subset": "train", "backbone": "small_cnn_w8", "feature_steps": 40,
            "min_confidence": 0.0, "generative_metrics": "true"}
    ref_out, out = tmp_path / "samples_ref", tmp_path / "samples_kill"
    assert cli_main(_cmd("select", {**base, "samples": ref_out})) == 0
    argv = _cmd("select", {**base, "samples": out})
    info = kill_when(argv, first_file(out, "select/selector/model/classifier.json"))  # feature classifier trained
    assert info["killed"], "select finished before the kill"
    assert not (out / "select" / "_COMPLETE.json").exists()
    rerun(argv)
    assert temp_leftovers(out) == []
    for name in ("filtered.csv", "filtered.json", "generative_metrics.json"):
        a, b = (ref_out / "select" / name).read_bytes(), (out / "select" / name).read_bytes()
        if name == "filtered.json":
            a, b = (json.loads(x) for x in (a, b))
            a["config"].pop("samples"), b["config"].pop("samples")
        elif name == "generative_metrics.json":
            a, b = (json.loads(x) for x in (a, b))
        assert a == b, name


def test_evaluate(tmp_path):
    data, samples, write_filtered = _eval_inputs(tmp_path)
    write_filtered(samples, keep_every=2)
    args = {"data": data, "subset": "frac0.5", "samples": samples, "arms": "real,classic,selected",
            "seeds": "0,1", "backbone": "small_cnn_w8", "epochs": 2, "steps_per_epoch": 3, "batch_size": 8}

    def trigger(out):
        return first_file(out / "classifiers", "*/_COMPLETE.json")

    ref, out, argv, _ = _kill_and_resume(tmp_path, "evaluate", args, trigger)
    assert not (out / "metrics.json").exists()
    rerun(argv)
    _assert_clean(out)
    assert (ref / "per_seed.csv").read_bytes() == (out / "per_seed.csv").read_bytes()
    assert json.loads((ref / "metrics.json").read_text()) == json.loads((out / "metrics.json").read_text())
    for d in (ref / "classifiers").iterdir():
        safetensors_equal(d / "model.safetensors", out / "classifiers" / d.name / "model.safetensors")


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc; the parent-death signal is Linux's")
@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_launched_processes_die_with_the_launcher(tmp_path, how):
    """`run --procs 2` launches evaluate's processes with torchrun; killing the launcher (as a scheduler or a
    user's `kill` does) must stop them too, so the re-run command never races orphans writing the same run."""
    from helpers_eval import make_dataset

    data = make_dataset(tmp_path / "data")
    out = tmp_path / "eval"
    script = (f"from histodiffusion.runtime.config import EvaluateConfig\n"
              f"from histodiffusion.runtime.distributed import launch_stage\n"
              f"launch_stage('evaluate', EvaluateConfig(data={str(data)!r}, subset='frac0.5', arms=('real',),"
              f" seeds=(0, 1), backbone='small_cnn_w8', steps=1000000, val_every=0, batch_size=8,"
              f" out={str(out)!r}), 2)\n")
    launcher = subprocess.Popen([sys.executable, "-c", script])

    def descendants() -> list[int]:  # the launcher's children, grandchildren, ... (from /proc/<pid>/stat)
        parent = {}
        for p in Path("/proc").iterdir():
            try:
                fields = (p / "stat").read_text().rsplit(")", 1)[1].split() if p.name.isdigit() else []
            except (OSError, IndexError):
                continue
            if not fields:
                continue
            parent[int(p.name)] = int(fields[1])
        found, frontier = [], [launcher.pid]
        while frontier:
            kids = [pid for pid, pp in parent.items() if pp in frontier]
            found, frontier = found + kids, kids
        return found

    def alive(pids: list[int]) -> list[int]:
        return [pid for pid in pids if Path(f"/proc/{pid}").exists()
                and (Path(f"/proc/{pid}") / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]

    launched: list[int] = []
    try:
        deadline = time.time() + 120  # torchrun and its two workers up, the stage started
        while not ((out / "config.json").is_file() and len(descendants()) >= 3) and time.time() < deadline:
            time.sleep(0.5)
        launched = descendants()
        assert len(launched) >= 3, "the launched processes did not start"
        launcher.send_signal(getattr(signal, how))
        launcher.wait(timeout=60)
        deadline = time.time() + 60
        while alive(launched) and time.time() < deadline:
            time.sleep(0.5)
        assert alive(launched) == []
    finally:  # whatever happened, nothing of this test keeps running
        for pid in [launcher.pid, *launched]:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
