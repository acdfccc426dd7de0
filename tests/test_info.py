"""`histodiffusion info RUN_DIR`: stages of a complete, a partial and a based run (laid out from the run's
own plan, wherever the directory now is), their key figures, and a clear error for what is not a run."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from histodiffusion import api
from histodiffusion.cli import main
from histodiffusion.info import COMPLETE, NOT_STARTED, STARTED, run_plan
from histodiffusion.runtime.config import RunConfig
from histodiffusion.runtime.errors import HistoError
from histodiffusion.runtime.fileio import write_json_atomic
from histodiffusion.runtime.rundirs import mark_complete, start_run_dir

DELTA = {"mean": 0.02, "ci95": [0.005, 0.035], "half_width": 0.015, "std": 0.01, "n": 5}


def make_run(tmp_path: Path, n_complete: int | None = None, **kw) -> Path:
    """A run directory whose config was recorded elsewhere (it was moved), and the first n_complete
    stages marked complete with their figure files (all when None); the next one only started."""
    root = tmp_path / "run"
    cfg = RunConfig(out=str(tmp_path / "was_here"), base="none", ratios=(1.0,), seeds=(0, 1, 2, 3, 4), **kw)
    start_run_dir(root, cfg, "run")
    _, steps = run_plan(root)
    n_complete = len(steps) if n_complete is None else n_complete
    for i, s in enumerate(steps):
        if i > n_complete:
            break
        write_json_atomic(s.out / "config.json", {"format_version": 1, "stage": s.stage, "config": {}})
        if i == n_complete:
            continue  # started, not finished
        if s.stage == "prepare":
            write_json_atomic(s.out / "meta.json", {"count": 30, "counts": {"train": {"a": 10, "b": 10},
                                                                          "test": {"a": 5, "b": 5}},
                                                    "classes": ["a", "b"]})
        if s.stage == "select":
            (s.out / "filtered.csv").write_text("id\n")
            write_json_atomic(s.out / "filtered.json", {"samples": 40, "kept": 30, "mode": "filters"})
        if s.stage == "evaluate":
            write_json_atomic(s.out / "metrics.json", {
                "seeds": [0, 1, 2, 3, 4], "arms": {"real": {"accuracy": {"mean": 0.8}}},
                "deltas": {"selected@1": {"accuracy": DELTA}, "real_aa": {"accuracy": DELTA}},
                "noise_floor": {"accuracy": DELTA}})
        if s.stage == "export-dataset":
            write_json_atomic(s.out / "dataset.json", {"description": "20 real + 20 synthetic tiles (selected@1)"})
        if s.stage == "train-latent-classifier":
            write_json_atomic(s.out / "metrics.json", {"steps": 400, "val_accuracy": 0.9, "chance": 0.5})
        mark_complete(s.out, **({"count": 40} if s.stage == "sample" else {}))
    return root


def test_complete_run(tmp_path, capsys):
    root = make_run(tmp_path)
    assert main(["info", str(root)]) == 0
    out = capsys.readouterr().out
    assert "13/13 stages complete (finished)" in out
    assert "[x] 11. evaluate" in out and "delta selected@1 +0.020 [+0.005, +0.035]" in out
    assert "noise floor +0.020" in out and "(5 seeds)" in out and "real accuracy 0.800" in out
    assert "30 tiles (train 20, test 10), 2 classes" in out and "kept 30 of 40 (75%, filters)" in out
    assert "val accuracy 0.900" in out and "40 synthetic tiles" in out
    assert "[x] 12. export dataset" in out and "20 real + 20 synthetic tiles (selected@1) in labels.csv" in out
    assert "was_here" not in out  # laid out under the directory given, not where the config was written
    info = api.info(root)
    assert info["complete"] and [s["status"] for s in info["stages"]] == [COMPLETE] * 13


def test_partial_run(tmp_path, capsys):
    root = make_run(tmp_path, n_complete=3)
    assert main(["info", str(root)]) == 0
    out = capsys.readouterr().out
    assert "3/13 stages complete" in out and "(finished)" not in out
    assert "[~]  4. encode unlabeled" in out and "started, not finished" in out
    assert "[ ] 13. report" in out
    statuses = [s["status"] for s in api.info(root)["stages"]]
    assert statuses == [COMPLETE] * 3 + [STARTED] + [NOT_STARTED] * 9


def test_run_adapting_a_base_has_no_pretraining_stages(tmp_path):
    root = tmp_path / "run"
    start_run_dir(root, RunConfig(out=str(root), base=str(tmp_path / "somebase")), "run")
    write_json_atomic(root / "base.json", {"path": str(tmp_path / "somebase"), "name": "b", "version": "1"})
    stages = [s["stage"] for s in api.info(root)["stages"]]
    assert "pretrain" not in stages and "train-autoencoder" not in stages and stages[0] == "prepare"


def test_not_a_run_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["info", str(tmp_path / "empty")]) == 2
    assert "is not a run directory (no config.json" in capsys.readouterr().err
    stage_dir = tmp_path / "samples"
    start_run_dir(stage_dir, RunConfig(), "sample")
    assert main(["info", str(stage_dir)]) == 2
    assert "output directory of stage 'sample', not a run directory" in capsys.readouterr().err
    assert main(["info", str(tmp_path / "missing")]) == 2
    assert "run directory not found" in capsys.readouterr().err
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text(json.dumps({"format_version": 999, "stage": "run"}))
    with pytest.raises(HistoError, match="format_version 999"):
        api.info(tmp_path / "odd")


def test_dataset_line_names_the_licence_where_known(tmp_path):
    from histodiffusion.models.cards import dataset_line

    src = tmp_path / "src"
    src.mkdir()
    (src / "CITATION.md").write_text("# Tiles\n\nSome words.\n\nSource: Lab X tiles,\nCC BY 4.0; cite the paper.\n")
    d = tmp_path / "ds"
    d.mkdir()
    meta = {"name": "lung", "count": 12, "tile_size": 64, "classes": ["a", "b"], "sources": {"root": str(src)}}
    (d / "meta.json").write_text(json.dumps(meta))
    line = dataset_line(d)
    assert line.startswith(f"`lung` ({d}): 12 tiles of 64 px, classes a, b; sources {src}.")
    assert line.endswith(f"Licence: Source: Lab X tiles, CC BY 4.0; cite the paper. (see {src / 'CITATION.md'}).")
    (d / "meta.json").write_text(json.dumps({**meta, "licence": "CC0"}))
    assert dataset_line(d).endswith("Licence: CC0.")
    assert "not described" in dataset_line(tmp_path / "nothing")
    # an unlabeled dataset lists its source images: the licence file next to them counts
    (d / "meta.json").write_text(json.dumps({"name": "unl", "tile_size": 64, "counts": {"unlabeled": 7},
                                             "sources": [{"path": str(src / "a.svs")}, {"path": str(src / "b.png")}]}))
    line = dataset_line(d)
    assert line.startswith(f"`unl` ({d}): 7 tiles of 64 px, unlabeled; sources {src}.") and "CC BY 4.0" in line


def test_a_run_of_an_older_version_resumes_when_a_new_field_keeps_its_default(tmp_path):
    """A config.json written before a field existed is the same config when the field is at its default,
    and a different one when it is not."""
    import json

    from histodiffusion.runtime.config import EvaluateConfig
    from histodiffusion.runtime.errors import HistoError

    out = tmp_path / "eval"
    start_run_dir(out, EvaluateConfig(out=str(out)), "evaluate")
    rec = json.loads((out / "config.json").read_text())
    del rec["config"]["synthetic_weight"]  # as written by a version without the field
    (out / "config.json").write_text(json.dumps(rec))
    (out / "classifiers").mkdir()  # the run had produced something
    start_run_dir(out, EvaluateConfig(out=str(out)), "evaluate")
    with pytest.raises(HistoError, match="synthetic_weight"):
        start_run_dir(out, EvaluateConfig(out=str(out), synthetic_weight=0.5), "evaluate")
