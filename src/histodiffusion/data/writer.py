"""Streaming writer of a dataset directory (the `prepare` artifact; see artifacts.py).

Tiles are appended one at a time and flushed to a pixel shard every `shard_size` tiles; their
manifest rows are appended to a temporary CSV in the temporary directory as they are added, so
memory does not grow with the number of tiles (neither pixels nor rows). `iter_rows()` streams the
rows back (e.g. to assign splits by group); `finish(meta, subsets, split_of)` writes the manifest
with the split of each row's group. Everything is written into a temporary directory that is
renamed over the destination only by `finish()`, after the completion marker: a killed run leaves
no half-written dataset that a later stage could read as complete, and the next writer of the same
destination removes the temporary directories that killed runs left behind.

`rows` (all rows as a list, loaded on first use) remains for small datasets built in tests: once
loaded, edits to its dicts before finish() are written to the manifest.
"""
from __future__ import annotations

import csv
import hashlib
import os
import shutil
from pathlib import Path
from typing import Iterator

import numpy as np

from ..runtime.artifacts import MANIFEST, MANIFEST_COLUMNS, META, SHARDS_DIR, SUBSETS_DIR, format_meta, pixel_shard_name
from ..runtime.errors import HistoError
from ..runtime.fileio import write_csv_atomic, write_json_atomic
from ..runtime.rundirs import pid_alive, mark_complete

ROWS_TMP = "_rows.csv"  # manifest rows as added (removed before the rename)


def tile_hash(tile: np.ndarray) -> str:
    """Content hash of a tile's pixels (used by the leakage guard)."""
    return hashlib.sha1(np.ascontiguousarray(tile).tobytes()).hexdigest()


def remove_stale_temps(out: Path) -> None:
    """Remove .<name>.tmp-<pid> directories beside `out` left by writers that were killed."""
    for p in out.parent.glob(f".{out.name}.tmp-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


class DatasetWriter:
    def __init__(self, out: str | os.PathLike, tile_size: int, shard_size: int = 1024):
        from safetensors.numpy import save_file  # noqa: F401  (fail early if missing)

        self.out = Path(out)
        if self.out.parent.exists():
            remove_stale_temps(self.out)
        self.tmp = self.out.parent / f".{self.out.name}.tmp-{os.getpid()}"
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        (self.tmp / SHARDS_DIR).mkdir(parents=True)
        self.tile_size = tile_size
        self.shard_size = shard_size
        self.count = 0
        self._rows: list[dict] | None = None  # loaded only when `rows` is used
        self._rows_file = open(self.tmp / ROWS_TMP, "w", newline="", encoding="utf-8")
        self._rows_csv = csv.DictWriter(self._rows_file, fieldnames=MANIFEST_COLUMNS, extrasaction="raise")
        self._rows_csv.writeheader()
        self._buf: list[np.ndarray] = []
        self._shard = 0

    def add(self, tile: np.ndarray, *, id: str, source: str, path: str = "", x: int = 0, y: int = 0,
            width: int = 0, height: int = 0, label: str = "", group: str = "", split: str = "") -> dict:
        """Append one uint8 [H, W, 3] tile at the working resolution; returns its manifest row."""
        if tile.dtype != np.uint8 or tile.shape != (self.tile_size, self.tile_size, 3):
            raise HistoError(f"tile {id}: expected uint8 {(self.tile_size, self.tile_size, 3)}, "
                             f"got {tile.dtype} {tile.shape}")
        row = {"id": id, "source": source, "path": path, "x": x, "y": y, "width": width, "height": height,
               "label": label, "group": group or id, "split": split, "shard": self._shard,
               "index": len(self._buf), "hash": tile_hash(tile)}
        self._buf.append(tile)
        self._rows_csv.writerow(row)
        self.count += 1
        if self._rows is not None:
            self._rows.append(row)
        if len(self._buf) >= self.shard_size:
            self._flush()
        return row

    def _flush(self) -> None:
        from safetensors.numpy import save_file

        self._rows_file.flush()
        if not self._buf:
            return
        path = self.tmp / SHARDS_DIR / pixel_shard_name(self._shard)
        save_file({"images": np.stack(self._buf)}, str(path),
                  metadata={"format_version": str(format_meta()["format_version"])})
        self._buf = []
        self._shard += 1

    def iter_rows(self, split_of: dict[str, str] | None = None) -> Iterator[dict]:
        """The rows added so far (streamed back from disk), with split = split_of[group] when given."""
        rows = iter(self._rows) if self._rows is not None else self._read_rows()
        for r in rows:
            if split_of is not None:
                if r["group"] not in split_of:
                    raise HistoError(f"tile {r['id']}: group {r['group']!r} has no split")
                r = {**r, "split": split_of[r["group"]]}
            yield r

    def _read_rows(self) -> Iterator[dict]:
        if not self._rows_file.closed:
            self._rows_file.flush()
        with open(self.tmp / ROWS_TMP, newline="", encoding="utf-8") as f:
            yield from csv.DictReader(f)

    @property
    def rows(self) -> list[dict]:
        """All rows in memory (for small datasets; edits before finish() are kept)."""
        if self._rows is None:
            self._rows = list(self.iter_rows())
        return self._rows

    def finish(self, meta: dict, subsets: dict[str, list[str]] | None = None,
               split_of: dict[str, str] | None = None, marker: dict | None = None) -> Path:
        """Write the manifest (split from `split_of[group]` when given), subsets and meta.json, mark
        complete, and rename into place."""
        self._flush()
        self._rows_file.close()
        if not self.count:
            self.abort()
            raise HistoError(f"no tiles to write to {self.out}")
        write_csv_atomic(self.tmp / MANIFEST, self.iter_rows(split_of), MANIFEST_COLUMNS)
        (self.tmp / ROWS_TMP).unlink()
        for name, ids in (subsets or {}).items():
            write_csv_atomic(self.tmp / SUBSETS_DIR / f"{name}.csv", ({"id": i} for i in ids), ["id"])
        write_json_atomic(self.tmp / META, format_meta(**meta))
        mark_complete(self.tmp, count=self.count, **(marker or {}))
        if self.out.exists():
            shutil.rmtree(self.out)
        os.replace(self.tmp, self.out)
        return self.out

    def abort(self) -> None:
        if not self._rows_file.closed:
            self._rows_file.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
