"""export-dataset: the real subset and evaluate's selected@ratio samples as a labeled image folder that
`prepare --labels-csv` and ImageFolder read; groups of samples made from tiles; bad input refused."""
import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers_eval import make_class_samples, make_dataset, with_starts, write_filtered
from histodiffusion.cli import main
from histodiffusion.data.evaldata import load_real
from histodiffusion.runtime.config import ExportDatasetConfig
from histodiffusion.runtime.errors import HistoError
from histodiffusion.stages.export_dataset import file_name, run


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    data = make_dataset(root / "data")  # frac0.5: 6 real tiles per class
    samples = make_class_samples(root / "samples", n_per_class=8)
    write_filtered(samples, keep_every=2)  # kept: the 1st, 3rd, 5th, 7th sample of each class, ranks 1, 3, 5, 7
    return root, data, samples


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_selected_at_ratio_with_real_tiles_as_files(world, tmp_path):
    _, data, samples = world
    out = tmp_path / "aug"
    main(["export-dataset", "--data", str(data), "--subset", "frac0.5", "--samples", str(samples),
          "--ratio", "0.5", "--out", str(out)])
    rows = read_rows(out / "labels.csv")
    real = load_real(data, "frac0.5")
    assert [r["source"] for r in rows].count("real") == len(real) == 18
    # per class the first 3 (0.5 x 6 real) kept samples in rank order: the 1st, 3rd and 5th of the class
    syn = [r for r in rows if r["source"] == "synthetic"]
    sample_rows = read_rows(samples / "samples.csv")
    want = {c: [r["id"] for r in sample_rows if r["target"] == c][0:6:2] for c in real.classes}
    assert {c: [r["id"] for r in syn if r["label"] == c] for c in real.classes} == want
    assert all(r["group_id"] == f"synthetic-{r['id']}" and r["origin"] == r["origin_group"] == "" for r in syn)
    # the files: real tiles' pixels as prepared, samples byte for byte, one folder per class
    for r in rows:
        assert Path(r["path"]).parts[:2] == ("images", r["label"])
    for i, tile_id in enumerate(real.ids):
        r = next(r for r in rows if r["id"] == tile_id)
        assert r["group_id"] == real.groups[i] and r["label"] == real.classes[int(real.labels[i])]
        assert np.array_equal(np.asarray(Image.open(out / r["path"])), real.images[i].numpy())
    for r in syn:
        assert (out / r["path"]).read_bytes() == (samples / "images" / f"{r['id']}.png").read_bytes()
    summary = json.loads((out / "dataset.json").read_text())
    assert summary["counts"] == {c: {"real": 6, "synthetic": 3, "pseudo": 0} for c in real.classes}
    assert summary["measured"] is None
    card = (out / "README.md").read_text()
    assert "selected@0.5" in card and "Not measured" in card
    # ImageFolder reads it; `prepare --labels-csv` reads it (paths relative to the CSV, groups kept)
    from torchvision.datasets import ImageFolder

    folder = ImageFolder(str(out / "images"))
    assert folder.classes == sorted(real.classes) and len(folder) == 27
    assert main(["prepare", "--labels-csv", str(out / "labels.csv"), "--tile-size", "16",
                 "--out", str(tmp_path / "again")]) == 0
    again = read_rows(tmp_path / "again" / "manifest.csv")
    assert len(again) == 27 and {r["group"] for r in again} == {r["group_id"] for r in rows}
    # complete: the same command is a no-op; another config in the folder is refused
    stamp = (out / "_COMPLETE.json").stat().st_mtime_ns
    assert main(["export-dataset", "--data", str(data), "--subset", "frac0.5", "--samples", str(samples),
                 "--ratio", "0.5", "--out", str(out)]) == 0
    assert (out / "_COMPLETE.json").stat().st_mtime_ns == stamp
    assert main(["export-dataset", "--data", str(data), "--subset", "frac0.5", "--samples", str(samples),
                 "--ratio", "1", "--out", str(out)]) == 2


def test_samples_from_tiles_keep_their_tiles_group(world, tmp_path, warnings_logged):
    _, data, samples = world
    started = with_starts(samples, str(data), tmp_path / "started")
    out = run(ExportDatasetConfig(data=str(data), subset="frac0.5", samples=str(started), ratio=2.0, real=False,
                                  out=str(tmp_path / "aug")))
    rows = read_rows(out / "labels.csv")
    assert {r["source"] for r in rows} == {"synthetic"} and len(rows) == 12  # 4 kept per class, 12 asked
    assert any("keep-list has 4 'aca' samples, ratio 2 asks for 12" in w for w in warnings_logged)
    group = {r["id"]: r["group"] for r in read_rows(data / "manifest.csv")}
    init = {r["id"]: r["init_id"] for r in read_rows(started / "samples.csv")}
    for r in rows:
        assert r["origin"] == init[r["id"]] and r["origin_group"] == group[init[r["id"]]]


def test_file_names_are_safe_and_distinct():
    assert file_name("real", "lung_aca/lungaca1") == "real__lung_aca_lungaca1.png"
    assert file_name("synthetic", "s00001") != file_name("real", "s00001")


def test_bad_input_refused_before_anything_is_written(world, tmp_path):
    _, data, samples = world
    base = dict(data=str(data), subset="frac0.5", samples=str(samples))
    with pytest.raises(HistoError, match="ratio"):
        run(ExportDatasetConfig(**base, ratio=0.0, out=str(tmp_path / "a")))
    bare = tmp_path / "bare"
    shutil.copytree(samples, bare)
    shutil.rmtree(bare / "select")
    with pytest.raises(HistoError, match="run `histodiffusion select` first"):
        run(ExportDatasetConfig(**{**base, "samples": str(bare)}, out=str(tmp_path / "b")))
    with pytest.raises(HistoError, match="not a complete evaluate output"):
        run(ExportDatasetConfig(**base, evaluation=str(tmp_path), out=str(tmp_path / "c")))
    none_kept = tmp_path / "none_kept"
    shutil.copytree(samples, none_kept)
    rows = read_rows(none_kept / "select" / "filtered.csv")
    with open(none_kept / "select" / "filtered.csv", "w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows({**r, "keep": 0} for r in rows)
    with pytest.raises(HistoError, match="nothing to export"):
        run(ExportDatasetConfig(**{**base, "samples": str(none_kept)}, real=False, out=str(tmp_path / "d")))
    for name in "abcd":
        assert not (tmp_path / name).exists()
