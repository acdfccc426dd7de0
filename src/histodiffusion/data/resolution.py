"""The scale of a prepared dataset as prepare records it (meta.json's "resolution": source pixels per tile
edge, downscale, microns per pixel where the source states them, the measured nucleus width) and the
comparison of nucleus widths with other prepared datasets or a pretrained base (scale-mismatch warnings:
prepare --exclude, and `run` when it skips a finished prepare)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..runtime.artifacts import read_meta
from ..runtime.config import PrepareConfig
from ..runtime.fileio import read_json
from . import scale


def _weighted_median(values: list[float], weights: list[float]) -> float:
    order = np.argsort(values)
    cum = np.cumsum(np.asarray(weights, dtype=np.float64)[order])
    return float(np.asarray(values, dtype=np.float64)[order][np.searchsorted(cum, cum[-1] / 2.0)])


def resolution_record(cfg: PrepareConfig, source_info, geometry: list[tuple], measured: dict) -> dict:
    """Scale of the stored tiles: geometry (source pixels per tile edge, downscale, microns per pixel
    where the source states it) and the measured width of nuclei in px (data/scale.py).

    `geometry`: (source pixels of a tile edge, source microns per pixel or None, tiles) per source image
    (unlabeled) or per tile (labeled: the centred square of the file, resized to tile_size)."""
    px = [g[0] for g in geometry]
    weights = [g[2] for g in geometry]
    source_px = _weighted_median(px, weights) if geometry and sum(weights) else None
    with_mpp = [g for g in geometry if g[1] and g[2]]
    mpp = (_weighted_median([g[1] * g[0] / cfg.tile_size for g in with_mpp], [g[2] for g in with_mpp])
           if with_mpp else None)
    res = {"tile_size": cfg.tile_size,
           "source_px": source_px, "source_px_range": [min(px), max(px)] if px else None,
           "downscale": round(source_px / cfg.tile_size, 4) if source_px else None,
           "target_mpp": cfg.target_mpp or None, "mpp": round(mpp, 4) if mpp else None,
           "nucleus_px": measured.get("nucleus_px"),
           "nucleus": {k: v for k, v in measured.items() if k != "nucleus_px"}}
    if isinstance(source_info, list):  # unlabeled: per-source level-0 mpp and tile mpp
        res["tile_mpp"] = {Path(s["path"]).name: (round(s["mpp"] * s["patch"] / cfg.tile_size, 4) if s["mpp"]
                                                  else None) for s in source_info}
    return res


def scale_warnings(name: str, nucleus_px: float | None, others, tolerance: float) -> list[dict]:
    """Compare the nucleus width of dataset `name` with that of each prepared dataset in `others`:
    [{"dataset", "nucleus_px", "ratio", "warning"}], where "warning" is the message (or None)."""
    out = []
    for other, px in (pair for o in others for pair in _nucleus_px_of(Path(o))):
        ratio = round(max(nucleus_px, px) / min(nucleus_px, px), 2) if nucleus_px and px else None
        out.append({"dataset": other, "nucleus_px": px, "ratio": ratio,
                    "warning": scale.mismatch(str(name), nucleus_px, other, px, tolerance)})
    return out


def _nucleus_px_of(other: Path) -> list[tuple[str, float | None]]:
    """[(name, nucleus width)] of a prepared dataset, or of a pretrained base: the mean of its datasets'
    widths weighted by their share of the pretraining mixture (what the UNet saw)."""
    from ..runtime.artifacts import MODEL_INFO

    if not (other / "meta.json").is_file() and (other / MODEL_INFO).is_file():  # a base folder
        record = read_json(other / MODEL_INFO, "base record")
        px = {d.get("name"): (d.get("resolution") or {}).get("nucleus_px")
              for d in (record.get("base") or {}).get("data") or []}
        mix = [(px.get(n), w) for n, w in zip(record.get("sources") or [], record.get("weights") or [])]
        if not mix or any(p is None for p, _ in mix):
            return [(str(other), None)]
        return [(f"{other} (pretraining mixture)", round(sum(p * w for p, w in mix) / sum(w for _, w in mix), 2))]
    return [(str(other), read_meta(other, "dataset").get("resolution", {}).get("nucleus_px"))]


def check_scale(dataset, others, tolerance: float) -> list[str]:
    """The scale-mismatch warnings of prepared `dataset` against prepared `others` (those prepare
    --exclude gives when it writes `dataset`; `run` repeats them when it skips the finished prepare)."""
    px = read_meta(dataset, "dataset").get("resolution", {}).get("nucleus_px")
    return [c["warning"] for c in scale_warnings(dataset, px, others, tolerance) if c["warning"]]
