"""Tiling, tissue detection, resolution and image modes on the real built-in images."""
import numpy as np
import pytest
from PIL import Image

from histodiffusion.data import default
from histodiffusion.data.slides import (ImageTooSmall, Slide, TileParams, TilingStats, ink_mask, iter_tiles,
                                        read_rgb, tile_grid, tissue_mask)
from histodiffusion.runtime.errors import HistoError

SVS = default.unlabeled_dir() / "cmu_small_region.svs"


@pytest.fixture(scope="module")
def cmu():
    return Slide(SVS)


def test_mpp_read_from_svs_and_absent_elsewhere(cmu):
    assert cmu.mpp == pytest.approx(0.499)
    assert (cmu.width, cmu.height) == (2220, 2967)
    assert Slide(default.unlabeled_dir() / "stardist_histo.jpg").mpp is None


def test_background_tiles_dropped_and_coordinates_in_bounds(cmu):
    stats = TilingStats()
    tiles = list(iter_tiles(cmu, TileParams(tile_size=64), stats))
    assert stats.candidates == (2220 // 64) * (2967 // 64)
    assert stats.background > stats.candidates // 3  # the CMU crop is mostly glass
    assert stats.kept == len(tiles) > 300
    coords = {(x, y) for x, y, _, _ in tiles}
    assert (0, 0) not in coords  # top-left corner is glass
    for x, y, patch, t in tiles:
        assert 0 <= x <= cmu.width - patch and 0 <= y <= cmu.height - patch
        assert t.shape == (64, 64, 3) and t.dtype == np.uint8
        assert tissue_mask(t).mean() >= 0.5
    # a dropped candidate really is background
    dropped = [c for c in tile_grid(cmu.width, cmu.height, 64, 64) if c not in coords]
    x, y = dropped[0]
    assert tissue_mask(cmu.read(x, y, 64, 64)).mean() < 0.5 or ink_mask(cmu.read(x, y, 64, 64)).mean() > 0.05


def test_ink_filter_drops_green_pen_tiles(cmu):
    with_ink, without = TilingStats(), TilingStats()
    kept = {(x, y) for x, y, _, _ in iter_tiles(cmu, TileParams(), with_ink)}
    all_tissue = {(x, y) for x, y, _, _ in iter_tiles(cmu, TileParams(max_ink=1.0), without)}
    assert with_ink.ink > 0 and without.ink == 0
    assert kept < all_tissue and len(all_tissue - kept) == with_ink.ink
    x, y = sorted(all_tissue - kept)[0]
    assert ink_mask(cmu.read(x, y, 64, 64)).mean() > 0.05
    # painting green ink over a clean tissue tile makes it an ink tile
    tile = cmu.read(*sorted(kept)[0], 64, 64).copy()
    assert ink_mask(tile).mean() < 0.05
    tile[:, :16] = (40, 150, 120)
    assert ink_mask(tile).mean() >= 0.25


def test_stride_scale_and_target_mpp(cmu):
    over = list(iter_tiles(cmu, TileParams(tile_size=64, stride=32)))
    plain = list(iter_tiles(cmu, TileParams(tile_size=64)))
    assert len(over) > 3 * len(plain)
    assert all(x % 32 == 0 and y % 32 == 0 for x, y, _, _ in over)
    half = list(iter_tiles(cmu, TileParams(tile_size=32, target_mpp=0.998)))  # 2x coarser: 64 px patches
    assert {p for _, _, p, _ in half} == {64} and all(t.shape == (32, 32, 3) for *_, t in half)
    assert len(half) == len(plain)
    down = list(iter_tiles(cmu, TileParams(tile_size=32, downscale=2.0)))
    assert {(x, y) for x, y, _, _ in down} == {(x, y) for x, y, _, _ in half}
    with pytest.raises(HistoError, match="stardist_histo.jpg does not state its resolution"):
        list(iter_tiles(Slide(default.unlabeled_dir() / "stardist_histo.jpg"), TileParams(target_mpp=0.5)))
    with pytest.raises(ImageTooSmall, match="smaller than the patch size"):
        list(iter_tiles(Slide(default.unlabeled_dir() / "stardist_histo.jpg"), TileParams(patch_size=400)))


def test_all_tissue_images_keep_every_tile_even_with_otsu():
    s = Slide(default.unlabeled_dir() / "stardist_histo.jpg")
    for method in ("fixed", "otsu"):
        stats = TilingStats()
        list(iter_tiles(s, TileParams(tissue_method=method), stats))
        assert stats.kept == stats.candidates == 28


def test_rgba_converted_over_white_or_refused():
    png = default.unlabeled_dir() / "panoptes_colorstandard.png"
    rgb, info = read_rgb(png)
    assert info["mode"] == "RGBA" and rgb.shape == (299, 299, 3) and rgb.dtype == np.uint8
    with pytest.raises(HistoError, match="panoptes_colorstandard.png: image mode RGBA"):
        read_rgb(png, image_mode="refuse")


def test_16bit_and_grayscale_scaled_not_clipped(tmp_path):
    a = np.zeros((80, 80), dtype=np.uint16)
    a[:, 40:] = 65535
    a[:40, :40] = 32896  # 128 * 257
    Image.fromarray(a).save(tmp_path / "g16.png")
    rgb, info = read_rgb(tmp_path / "g16.png")
    assert info["mode"].startswith("I")
    assert rgb[0, 79].tolist() == [255, 255, 255] and rgb[0, 0].tolist() == [128, 128, 128]
    assert rgb[79, 0].tolist() == [0, 0, 0]
    Image.fromarray((a // 257).astype(np.uint8)).save(tmp_path / "g8.png")
    assert read_rgb(tmp_path / "g8.png")[0][0, 0].tolist() == [128, 128, 128]


def test_16bit_rgb_tiff_scaled_or_refused_and_tiff_resolution_read(tmp_path):
    import tifffile

    a = np.zeros((70, 70, 3), np.uint16)
    a[..., 0], a[..., 1] = 65535, 32896
    tifffile.imwrite(tmp_path / "rgb16.tif", a, compression="zlib")
    rgb, info = read_rgb(tmp_path / "rgb16.tif")
    assert info["mode"] == "RGB;16" and rgb[5, 5].tolist() == [255, 128, 0]
    with pytest.raises(HistoError, match="rgb16.tif: image mode RGB;16"):
        read_rgb(tmp_path / "rgb16.tif", image_mode="refuse")
    tifffile.imwrite(tmp_path / "res.tif", (a // 257).astype(np.uint8), resolution=(20000, 20000),
                     resolutionunit="CENTIMETER")
    assert Slide(tmp_path / "res.tif").mpp == pytest.approx(0.5)
