"""DatasetWriter streams manifest rows to a temporary CSV (memory flat in the number of tiles), assigns
splits by group at finish(), and removes the temporary directories of killed writers."""
from __future__ import annotations

import csv
import os
import subprocess
import sys

import numpy as np

from histodiffusion.data.writer import ROWS_TMP, DatasetWriter
from histodiffusion.runtime.artifacts import read_dataset


def _tile(i: int) -> np.ndarray:
    return np.full((8, 8, 3), i % 256, np.uint8)


def test_rows_streamed_and_split_assigned_at_finish(tmp_path):
    w = DatasetWriter(tmp_path / "ds", 8, shard_size=16)
    for i in range(100):
        w.add(_tile(i), id=f"t{i}", source="s", label="ab"[i % 2], group=f"g{i // 10}")
    assert w._rows is None and w.count == 100  # nothing accumulated in memory
    with open(w.tmp / ROWS_TMP, newline="") as f:
        assert len(list(csv.DictReader(f))) == 96  # on disk with every finished shard (6 x 16)
    assert sum(1 for _ in w.iter_rows()) == 100
    split_of = {f"g{k}": ("train" if k < 6 else "val" if k < 8 else "test") for k in range(10)}
    assert {r["split"] for r in w.iter_rows(split_of) if r["group"] == "g9"} == {"test"}
    w.finish({"name": "ds", "classes": ["a", "b"], "tile_size": 8}, {"few": ["t0", "t1"]}, split_of=split_of)
    meta, rows = read_dataset(tmp_path / "ds")
    assert [r["id"] for r in rows] == [f"t{i}" for i in range(100)]
    assert all(r["split"] == split_of[r["group"]] for r in rows)
    assert not (tmp_path / "ds" / ROWS_TMP).exists() and meta["format_version"] == 1


def test_rows_list_edits_are_kept(tmp_path):
    w = DatasetWriter(tmp_path / "ds", 8)
    for i in range(4):
        w.add(_tile(i), id=f"t{i}", source="s", split="train")
    w.rows[1]["split"] = "test"  # the in-memory list (small test datasets) stays editable
    w.add(_tile(9), id="t9", source="s", split="val")
    w.finish({"name": "ds"})
    _, rows = read_dataset(tmp_path / "ds")
    assert [r["split"] for r in rows] == ["train", "test", "train", "train", "val"]


def test_stale_temp_dir_of_a_killed_writer_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".ds.tmp-{dead.stdout.strip()}"
    (stale / "shards").mkdir(parents=True)
    alive = tmp_path / f".ds.tmp-{os.getppid()}"  # a running process's directory is left alone
    alive.mkdir()
    w = DatasetWriter(tmp_path / "ds", 8)
    w.add(_tile(0), id="t0", source="s")
    w.finish({"name": "ds"})
    assert not stale.exists() and alive.exists()


def test_completion_removes_temporaries_of_killed_writers(tmp_path):
    from histodiffusion.runtime.rundirs import mark_complete

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = dead.stdout.strip()
    (tmp_path / "images").mkdir()
    stale_file = tmp_path / "images" / f".s_00001.png.tmp-{pid}"
    stale_file.write_bytes(b"half a png")
    stale_dir = tmp_path / "classifiers" / f".real_0.tmp-{pid}"
    stale_dir.mkdir(parents=True)
    live = tmp_path / "images" / f".s_00002.png.tmp-{os.getppid()}"  # another process still writing
    live.write_bytes(b"x")
    keep = tmp_path / "images" / "s_00001.png"
    keep.write_bytes(b"png")
    mark_complete(tmp_path)
    assert not stale_file.exists() and not stale_dir.exists()
    assert live.exists() and keep.exists() and (tmp_path / "_COMPLETE.json").is_file()
