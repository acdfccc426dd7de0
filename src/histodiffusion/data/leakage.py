"""Leakage guard: two prepared datasets must share no image.

An image is shared when a source file has the same sha256 (sources.csv of both datasets) or a tile
has the same pixels at the working resolution (the `hash` column of both manifests).
"""
from __future__ import annotations

from pathlib import Path

from ..runtime.artifacts import MANIFEST, MANIFEST_COLUMNS, read_meta
from ..runtime.errors import HistoError
from ..runtime.fileio import read_csv

SOURCES_CSV = "sources.csv"  # path,sha256 of every source file of a dataset (written by prepare)
SOURCES_COLUMNS = ["path", "sha256"]


EVALUATION_SPLITS = ("val", "test")  # a labeled set's tiles that no generator or decoder may train on


def evaluation_tiles(rows: list[dict]) -> list[str]:
    """Ids of the validation/test tiles among manifest `rows` (the generators' leakage guard: pretraining
    and decoder adaptation refuse any)."""
    return [r["id"] for r in rows if r.get("split") in EVALUATION_SPLITS]


def dataset_hashes(directory: str | Path) -> tuple[dict[str, str], dict[str, str]]:
    """({source sha256: path}, {tile hash: tile id}) of a complete prepared dataset, or ({source sha256:
    path}, {}) of a pretrained base (its sources.csv lists every image it was trained on)."""
    directory = Path(directory)
    if not (directory / MANIFEST).is_file() and (directory / SOURCES_CSV).is_file():  # a base folder
        return {r["sha256"]: r["path"] for r in read_csv(directory / SOURCES_CSV, SOURCES_COLUMNS, "sources list")}, {}
    read_meta(directory, "dataset")
    sources = {r["sha256"]: r["path"] for r in read_csv(directory / SOURCES_CSV, SOURCES_COLUMNS, "sources list")}
    tiles = {r["hash"]: r["id"] for r in read_csv(directory / MANIFEST, MANIFEST_COLUMNS, "manifest")}
    return sources, tiles


def find_overlap(a_sources: dict[str, str], a_tiles: dict[str, str], b_dir: str | Path) -> str | None:
    """A description of the first image shared with dataset `b_dir`, or None."""
    b_sources, b_tiles = dataset_hashes(b_dir)
    for sha, path in a_sources.items():
        if sha in b_sources:
            return f"source file {path} is identical (sha256 {sha[:12]}) to {b_sources[sha]}"
    for h, tid in a_tiles.items():
        if h in b_tiles:
            return f"tile {tid} has the same pixels as tile {b_tiles[h]}"
    return None


def check_no_overlap(dataset_a: str | Path, dataset_b: str | Path) -> None:
    """Raise a HistoError naming both datasets and an example when they share any image."""
    a_sources, a_tiles = dataset_hashes(dataset_a)
    example = find_overlap(a_sources, a_tiles, dataset_b)
    if example:
        raise HistoError(f"datasets {dataset_a} and {dataset_b} share images (leakage): {example}")
