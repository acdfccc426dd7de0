"""Scale of a dataset's stored tiles, measured from the pixels: how wide cell nuclei are, in pixels.

A model pretrained on tiles at one magnification and adapted to tiles at another sees different
tissue (LC25000 lung tiles are whole 224 px images shrunk 3.5x to 64 px, nuclei about 5 px across;
the same 64 px cut natively from a 10x or 20x image shows nuclei of 15-20 px). Geometry (patch size
in source pixels, microns per pixel) says this only when the sources state their resolution; nuclei
are a ruler every H&E tile carries. `prepare` records the estimate and warns when two datasets that
meet in one model (unlabeled sources and target) differ by more than a tolerance.

Estimate (pure functions of uint8 RGB tiles; numpy and scipy.ndimage only):
1. haematoxylin optical density of every pixel (colour deconvolution, Ruifrok & Johnston's H&E vectors);
2. per tile, Otsu's threshold of the tissue pixels' haematoxylin splits nuclei from the rest, but the
   tile is measured only when it is clearly two-toned (Otsu's effectiveness, between-class over total
   variance, at least 0.65), the dark class is haematoxylin-dark (mean OD at least 0.6) and is the
   minority (at most half of the tissue): tiles of bone, matrix or stroma without nuclei are not measured;
3. nuclei are the connected components of that class (3x3 opening, holes filled, area >= 4 px);
4. the estimate is the area-weighted median of their equivalent diameters 2 sqrt(area / pi): the width
   of the nucleus the median nuclear pixel belongs to. (A plain median counts every speck of texture
   as often as a whole nucleus and hardly moves with magnification.)

Measured on samples of 256 tiles (64 px), in pixels: LC25000 lung whole tiles 5.4; colon whole tiles
6.2; osteosarcoma (10x) tiled natively 14.7, in 224 px patches shrunk to 64 px 4.4; the unlabeled H&E
images (20x-40x) tiled natively 22.5. On discs of known diameter the estimate is within about 1 px.
"""
from __future__ import annotations

import heapq
from typing import Iterable

import numpy as np

METHOD = "nucleus-px-v1"  # recorded with every estimate; bump when the estimator changes
TISSUE_GRAY = 220.0  # tissue pixels: grey mean below this (as the tissue filter of data/slides.py)
MIN_TISSUE = 0.5  # a tile is measured when at least this fraction of it is tissue
MIN_EFFECTIVENESS = 0.65  # Otsu's between-class / total variance of the tile's haematoxylin
MIN_NUCLEAR_OD = 0.6  # mean haematoxylin optical density of the dark class
MAX_NUCLEAR_FRACTION = 0.5  # the dark class is at most this fraction of the tissue
MIN_AREA = 4  # px; smaller components are noise
MIN_NUCLEI = 20  # fewer nuclei measured: no estimate

# Ruifrok & Johnston (2001) stain vectors in optical-density space: haematoxylin, eosin, residual (DAB)
_STAINS = np.array([[0.650, 0.704, 0.286], [0.072, 0.990, 0.105], [0.268, 0.570, 0.776]])
_UNMIX = np.linalg.inv(_STAINS / np.linalg.norm(_STAINS, axis=1, keepdims=True))


def haematoxylin_od(rgb: np.ndarray) -> np.ndarray:
    """Haematoxylin optical density per pixel of a uint8 (H, W, 3) tile (about 0 on glass, 1+ in nuclei)."""
    od = -np.log((rgb.astype(np.float64) + 1.0) / 256.0)
    return (od @ _UNMIX)[..., 0]  # od = concentrations @ stains


def _otsu(values: np.ndarray, bins: int = 128) -> float:
    hist, edges = np.histogram(values, bins=bins)
    p = hist / max(1, hist.sum())
    w = np.cumsum(p)
    mu = np.cumsum(p * np.arange(bins))
    between = (mu[-1] * w - mu) ** 2 / (w * (1.0 - w) + 1e-12)
    return float(edges[int(np.argmax(between)) + 1])


def tile_nuclei(rgb: np.ndarray) -> np.ndarray | None:
    """Areas (px) of the nuclei of one tile, or None when the tile is not measured (see the module doc)."""
    from scipy import ndimage as ndi

    h = haematoxylin_od(rgb)
    tissue = rgb.astype(np.float32).mean(axis=-1) < TISSUE_GRAY
    if tissue.mean() < MIN_TISSUE:
        return None
    v = h[tissue]
    thr = _otsu(v)
    dark = v > thr
    frac = float(dark.mean())
    if not 0.0 < frac <= MAX_NUCLEAR_FRACTION or v.var() <= 0:
        return None
    hi, lo = v[dark], v[~dark]
    effectiveness = frac * (1.0 - frac) * (hi.mean() - lo.mean()) ** 2 / v.var()
    if effectiveness < MIN_EFFECTIVENESS or hi.mean() < MIN_NUCLEAR_OD:
        return None
    mask = ndi.binary_fill_holes(ndi.binary_opening((h > thr) & tissue))
    labels, n = ndi.label(mask)
    areas = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    return areas[areas >= MIN_AREA]


def nucleus_size(tiles: Iterable[np.ndarray], min_nuclei: int = MIN_NUCLEI) -> dict:
    """The scale estimate of a sample of tiles: {"nucleus_px": area-weighted median nucleus diameter
    (None with fewer than `min_nuclei` nuclei), "nuclei", "tiles_measured", "tiles", "method"}."""
    areas, n_tiles, measured = [], 0, 0
    for t in tiles:
        n_tiles += 1
        a = tile_nuclei(t)
        if a is not None:
            measured += 1
            areas.append(a)
    a = np.concatenate(areas) if areas else np.zeros(0)
    px = None
    if len(a) >= max(1, min_nuclei):
        d = 2.0 * np.sqrt(a / np.pi)
        order = np.argsort(d)
        cum = np.cumsum(a[order])
        px = round(float(d[order][np.searchsorted(cum, cum[-1] / 2.0)]), 2)
    return {"nucleus_px": px, "nuclei": int(len(a)), "tiles_measured": measured, "tiles": n_tiles,
            "method": METHOD}


class TileSample:
    """A deterministic sample of at most `k` tiles, whatever the order they come in: the tiles with the
    smallest content hashes (a bottom-k sample; a content hash is as good as a random draw)."""

    def __init__(self, k: int):
        self.k = k
        self._top: list[_Neg] = []  # the kept hashes, largest on top
        self._kept: dict[str, np.ndarray] = {}

    def offer(self, content_hash: str, tile: np.ndarray) -> None:
        if self.k <= 0 or content_hash in self._kept:
            return
        if len(self._top) < self.k:
            heapq.heappush(self._top, _Neg(content_hash))
        elif content_hash < self._top[0].h:
            del self._kept[heapq.heapreplace(self._top, _Neg(content_hash)).h]
        else:
            return
        self._kept[content_hash] = tile

    def tiles(self) -> list[np.ndarray]:
        return [self._kept[h] for h in sorted(self._kept)]


class _Neg:
    """Reverses string order, so heapq's min-heap keeps the largest kept hash on top."""
    __slots__ = ("h",)

    def __init__(self, h: str):
        self.h = h

    def __lt__(self, other: "_Neg") -> bool:
        return self.h > other.h


def mismatch(name_a: str, px_a: float | None, name_b: str, px_b: float | None, tolerance: float) -> str | None:
    """A warning naming both datasets and both estimates when their nucleus sizes differ by more than
    `tolerance` (a ratio, e.g. 1.5); None when they agree, an estimate is missing or tolerance is 0."""
    if not tolerance or not px_a or not px_b:
        return None
    ratio = max(px_a, px_b) / min(px_a, px_b)
    if ratio <= tolerance:
        return None
    bigger = name_a if px_a > px_b else name_b
    return (f"scale mismatch: nuclei are {px_a:g} px wide in {name_a} and {px_b:g} px in {name_b} "
            f"({ratio:.1f}x, tolerance {tolerance:g}): {bigger} shows tissue at about {ratio:.1f}x the "
            f"magnification of the other; prepare it from patches about {ratio:.1f}x larger shrunk to the same "
            f"tile size (--patch-size or --downscale), or both at one --target-mpp")
