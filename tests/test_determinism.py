"""Determinism on CPU: the same seed gives byte-identical sample PNGs whatever the batch size (here with
DPM-Solver++ and batch sizes that cross the fixed micro-batch of the model calls), and identical
select / evaluate outputs when the same command is run again from scratch. A different seed gives
different images (the seed is used, not ignored).

Already covered elsewhere (not repeated): DDIM with eta=1 at batch sizes 1 and 3, and 2 processes
(torch.distributed.run) vs 1 process, byte-identical (tests/test_sample.py); evaluate with 2
processes vs 1, identical scores (tests/test_evaluate.py). See docs/determinism.md.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from histodiffusion.cli import main


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from helpers_sample import make_guided_chain

    chain = make_guided_chain(tmp_path_factory.mktemp("det"), n=20)
    return chain["ldm"], chain["clf"]


def _sample(models, out: Path, batch_size: int, seed: int = 7) -> Path:
    ldm, clf = models
    code = main(["sample", "--model", str(ldm), "--classifier", str(clf), "--out", str(out), "--n-per-class", "9",
                 "--steps", "3", "--scheduler", "dpmsolver++", "--scale", "5", "--seed", str(seed),
                 "--batch-size", str(batch_size), "--grid", "false"])
    assert code == 0
    return out


def _images(out: Path) -> dict[str, bytes]:
    with open(out / "samples.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return {r["id"]: (out / r["file"]).read_bytes() for r in rows}


def test_sample_pngs_identical_for_any_batch_size(models, tmp_path):
    ref = _images(_sample(models, tmp_path / "b18", 18))  # one batch of 18 = micro-batches of 16 + 2 (padded)
    assert len(ref) == 18
    for bs in (1, 5):
        out = _sample(models, tmp_path / f"b{bs}", bs)
        assert _images(out) == ref, f"batch size {bs} changed the images"
        assert (out / "samples.csv").read_bytes() == (tmp_path / "b18" / "samples.csv").read_bytes()
    other = _images(_sample(models, tmp_path / "seed8", 18, seed=8))
    assert all(other[k] != ref[k] for k in ref)  # the seed is used


@pytest.fixture(scope="module")
def eval_inputs(tmp_path_factory):
    from helpers_eval import make_class_samples, make_dataset

    d = tmp_path_factory.mktemp("det_eval")
    return make_dataset(d / "data"), make_class_samples(d / "samples", n_per_class=5)


def test_select_repeatable(eval_inputs, tmp_path):
    import shutil

    data, samples = eval_inputs
    outs = []
    for k in range(2):
        s = shutil.copytree(samples, tmp_path / f"s{k}")
        assert main(["select", "--samples", str(s), "--data", str(data), "--backbone", "small_cnn_w8",
                     "--feature-steps", "20", "--min-confidence", "0.3", "--seed", "3"]) == 0
        outs.append(s)
    a, b = (s / "select" for s in outs)
    assert (a / "filtered.csv").read_bytes() == (b / "filtered.csv").read_bytes()
    assert (a / "generative_metrics.json").read_bytes() == (b / "generative_metrics.json").read_bytes()
    fa, fb = (json.loads((d / "filtered.json").read_text()) for d in (a, b))
    fa["config"].pop("samples"), fb["config"].pop("samples")
    assert fa == fb


def test_evaluate_repeatable(eval_inputs, tmp_path):
    data, _ = eval_inputs
    outs = []
    for k in range(2):
        out = tmp_path / f"e{k}"
        assert main(["evaluate", "--data", str(data), "--subset", "frac0.5", "--arms", "real,classic", "--seeds", "0,1",
                     "--backbone", "small_cnn_w8", "--epochs", "2", "--steps-per-epoch", "2", "--batch-size", "8",
                     "--out", str(out)]) == 0
        outs.append(out)
    a, b = outs
    assert (a / "per_seed.csv").read_bytes() == (b / "per_seed.csv").read_bytes()
    assert json.loads((a / "metrics.json").read_text()) == json.loads((b / "metrics.json").read_text())
    # the two seeds are really different runs
    with open(a / "per_seed.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["testset"] == "test"]
    assert len(rows) == 4
