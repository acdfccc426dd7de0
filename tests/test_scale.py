"""Scale of stored tiles (data/scale.py): nucleus width on synthetic tiles of known blob size, the
deterministic tile sample, the mismatch check, and how `prepare` records and checks it."""
import json

import numpy as np
import pytest
from PIL import Image

from helpers_prepare import labels_csv
from histodiffusion.data import default
from histodiffusion.data.resolution import check_scale
from histodiffusion.data.scale import TileSample, mismatch, nucleus_size, tile_nuclei
from histodiffusion.data.slides import resize_tile
from histodiffusion.runtime.config import PrepareConfig
from histodiffusion.stages.prepare import run

EOSIN, NUCLEUS = (230, 150, 190), (70, 40, 120)  # pink stroma, haematoxylin-dark nucleus


def disc_tile(diameter: float, size: int = 64, seed: int = 0) -> np.ndarray:
    """A pink tile with dark discs of one diameter on a grid (jittered by up to half a pixel)."""
    rng = np.random.default_rng(seed)
    tile = np.empty((size, size, 3), np.uint8)
    tile[:] = EOSIN
    yy, xx = np.mgrid[:size, :size]
    step = int(round(2 * diameter))
    for cy in range(step // 2, int(size - diameter / 2), step):
        for cx in range(step // 2, int(size - diameter / 2), step):
            oy, ox = rng.uniform(-0.5, 0.5, 2)
            tile[(yy - cy - oy) ** 2 + (xx - cx - ox) ** 2 <= (diameter / 2) ** 2] = NUCLEUS
    return tile


@pytest.mark.parametrize("diameter", [4, 6, 8, 12, 20])
def test_nucleus_width_of_discs_of_known_size(diameter):
    n_tiles = 10 if diameter < 20 else 40  # enough nuclei for an estimate (MIN_NUCLEI)
    est = nucleus_size([disc_tile(diameter, seed=s) for s in range(n_tiles)])
    assert est["nucleus_px"] == pytest.approx(diameter, abs=0.5), est
    assert est["tiles_measured"] == est["tiles"] == n_tiles and est["method"]


def test_mixed_sizes_give_the_width_of_the_median_nuclear_pixel():
    # many small specks and fewer large nuclei: most nuclear area is in the large ones
    tiles = [disc_tile(3, seed=s) for s in range(3)] + [disc_tile(12, seed=s) for s in range(12)]
    assert nucleus_size(tiles)["nucleus_px"] == pytest.approx(12, abs=1)


def test_shrinking_tiles_shrinks_the_estimate_by_the_same_factor():
    big = [disc_tile(21, size=224, seed=s) for s in range(6)]
    small = [resize_tile(t, 64) for t in big]  # 224 px shrunk 3.5x, as LC25000 tiles to 64 px
    a, b = nucleus_size(big)["nucleus_px"], nucleus_size(small)["nucleus_px"]
    assert a == pytest.approx(21, abs=1) and a / b == pytest.approx(3.5, rel=0.15)


def test_tiles_without_nuclei_are_not_measured():
    rng = np.random.default_rng(0)
    flat = np.full((64, 64, 3), EOSIN, np.uint8)
    stroma = np.clip(flat + rng.normal(0, 6, flat.shape), 0, 255).astype(np.uint8)  # texture, no nuclei
    glass = np.full((64, 64, 3), 245, np.uint8)
    assert tile_nuclei(flat) is None and tile_nuclei(stroma) is None and tile_nuclei(glass) is None
    est = nucleus_size([flat, stroma, glass] * 5)
    assert est["nucleus_px"] is None and est["tiles_measured"] == 0 and est["tiles"] == 15
    # too few nuclei for an estimate
    assert nucleus_size([disc_tile(30)])["nucleus_px"] is None


def test_tile_sample_is_deterministic_and_order_free():
    tiles = {f"{i:040x}"[::-1]: np.full((2, 2, 3), i, np.uint8) for i in range(50)}
    a, b = TileSample(7), TileSample(7)
    for h in sorted(tiles):
        a.offer(h, tiles[h])
    for h in sorted(tiles, reverse=True):
        b.offer(h, tiles[h])
        b.offer(h, tiles[h])  # a tile seen twice counts once
    kept = [tiles[h] for h in sorted(tiles)[:7]]
    assert [t[0, 0, 0] for t in a.tiles()] == [t[0, 0, 0] for t in b.tiles()] == [t[0, 0, 0] for t in kept]
    assert TileSample(0).tiles() == []


def test_mismatch_names_both_datasets_and_both_estimates():
    msg = mismatch("data/unlabeled", 14.7, "data/target", 5.4, 1.5)
    assert "data/unlabeled" in msg and "data/target" in msg and "14.7" in msg and "5.4" in msg
    assert "2.7x" in msg and "--patch-size" in msg
    assert mismatch("a", 5.4, "b", 4.4, 1.5) is None  # within tolerance (1.23x)
    assert mismatch("a", 5.4, "b", 14.7, 0) is None  # check off
    assert mismatch("a", None, "b", 14.7, 1.5) is None  # no estimate: nothing to compare


# --------------------------------------------------------------------------------------------
# prepare: recorded in meta.json, checked against --exclude datasets
# --------------------------------------------------------------------------------------------
def test_prepare_records_scale_and_warns_on_mismatch(tmp_path, warnings_logged):
    target = run(PrepareConfig(out=str(tmp_path / "target"), labels_csv=str(labels_csv(tmp_path / "t", n=90)),
                               fewshot_fracs=(), val_frac=0.2, test_frac=0.2))
    res = json.loads((target / "meta.json").read_text())["resolution"]
    assert res["tile_size"] == 64 and res["source_px"] == 64 and res["downscale"] == 1.0  # built-in tiles: 64 px
    assert 4 <= res["nucleus_px"] <= 7 and res["nucleus"]["nuclei"] >= 100, res
    tia = str(default.unlabeled_dir() / "tiatoolbox_target_image.jpg")  # about 40x, tiled natively
    native = run(PrepareConfig(out=str(tmp_path / "native"), sources=(tia,), exclude=(str(target),)))
    meta = json.loads((native / "meta.json").read_text())
    px = meta["resolution"]["nucleus_px"]
    assert px > 2 * res["nucleus_px"], meta["resolution"]
    warnings = [m for m in warnings_logged if "scale mismatch" in m]
    assert len(warnings) == 1 and str(native) in warnings[0] and str(target) in warnings[0]
    assert f"{px:g}" in warnings[0] and f"{res['nucleus_px']:g}" in warnings[0]
    assert meta["scale_checks"][0]["dataset"] == str(target) and meta["scale_checks"][0]["warning"]
    # the same check on the finished datasets (what `run` repeats when it skips prepare)
    assert check_scale(native, [target], 1.5) == [meta["scale_checks"][0]["warning"]]
    assert check_scale(native, [target], 10.0) == []
    # shrunk 5x towards the target's scale: no warning at tolerance 2
    warnings_logged.clear()
    shrunk = run(PrepareConfig(out=str(tmp_path / "shrunk"), sources=(tia,), patch_size=320, stride=160,
                               exclude=(str(target),), scale_tolerance=2.0))
    assert not [m for m in warnings_logged if "scale mismatch" in m]
    check = json.loads((shrunk / "meta.json").read_text())["scale_checks"][0]
    assert check["ratio"] < meta["scale_checks"][0]["ratio"] / 2 and check["warning"] is None


def test_downscale_of_labeled_tiles_is_the_real_one(tmp_path):
    """224 px tiles stored at 64 px: downscale 3.5 (JPEG draft decoding must not hide the file's size)."""
    src = default.labels_csv().parent
    root = tmp_path / "nct"
    from helpers_prepare import lung_rows

    for i, r in enumerate(lung_rows()[::40]):
        d = root / r["label"]
        d.mkdir(parents=True, exist_ok=True)
        Image.open(src / r["path"]).resize((224, 224), Image.BICUBIC).save(d / f"{i}.jpg", quality=95)
    meta = json.loads((run(PrepareConfig(out=str(tmp_path / "ds"), class_folders=str(root), val_frac=0.2,
                                         test_frac=0.2, fewshot_fracs=())) / "meta.json").read_text())
    res = meta["resolution"]
    assert res["source_px"] == 224 and res["downscale"] == 3.5 and res["source_px_range"] == [224, 224]


def test_scale_fields_do_not_make_an_old_dataset_a_different_config(tmp_path):
    """A dataset prepared before scale_sample/scale_tolerance existed is reused, not refused; the
    tolerance only changes a warning."""
    csv = labels_csv(tmp_path / "t", n=40)
    out = run(PrepareConfig(out=str(tmp_path / "ds"), labels_csv=str(csv), fewshot_fracs=()))
    meta_path = out / "meta.json"
    meta = json.loads(meta_path.read_text())
    for k in ("scale_sample", "scale_tolerance"):
        meta["config"].pop(k)
    meta_path.write_text(json.dumps(meta))
    before = (out / "_COMPLETE.json").read_text()
    run(PrepareConfig(out=str(out), labels_csv=str(csv), fewshot_fracs=(), scale_tolerance=2.0))
    assert (out / "_COMPLETE.json").read_text() == before


@pytest.mark.slow
def test_real_data_lung_vs_osteosarcoma_native_and_shrunk(shared_data, tmp_path, warnings_logged):
    """LC25000 lung at 64 px against osteosarcoma (10x) tiled natively (warned) and in 224 px patches
    shrunk to 64 px (not warned); a part of each set, for time."""
    osteo = shared_data / "unlabeled_osteosarcoma_ut"
    if not osteo.is_dir():
        pytest.skip(f"needs {osteo}")
    lung = shared_data / "lc25000_lung"
    rows = (lung / "labels.csv").read_text().splitlines()
    csv = tmp_path / "labels.csv"
    csv.write_text("\n".join([rows[0]] + [str(lung) + "/" + r for r in rows[1::12]]) + "\n")
    target = run(PrepareConfig(out=str(tmp_path / "lung"), labels_csv=str(csv), fewshot_fracs=()))
    files = tuple(str(p) for p in sorted(osteo.glob("*.jpg"))[::3])
    native = run(PrepareConfig(out=str(tmp_path / "o64"), sources=files, patch_size=64, exclude=(str(target),)))
    shrunk = run(PrepareConfig(out=str(tmp_path / "o224"), sources=files, patch_size=224, exclude=(str(target),)))
    px = {p.name: json.loads((p / "meta.json").read_text())["resolution"]["nucleus_px"]
          for p in (target, native, shrunk)}
    assert 4 <= px["lung"] <= 7 and px["o64"] / px["lung"] > 2 and px["o224"] / px["lung"] < 1.5, px
    warned = [m for m in warnings_logged if "scale mismatch" in m]
    assert len(warned) == 1 and str(native) in warned[0] and str(target) in warned[0]


def test_run_checks_scale_of_unlabeled_and_target_also_when_prepare_is_skipped(tmp_path, warnings_logged):
    """The built-in unlabeled images tiled natively (nuclei about 20 px) against the built-in lung
    tiles (about 5 px): `run` warns when it prepares them, and again when a re-run skips them."""
    from histodiffusion.runtime.config import RunConfig
    from histodiffusion.pipeline import run as run_pipeline

    cfg = RunConfig(out=str(tmp_path / "run"), base="none", until="prepare")
    run_pipeline(cfg)
    first = [m for m in warnings_logged if "scale mismatch" in m]
    d_unl, d_tgt = str(tmp_path / "run" / "data" / "unlabeled"), str(tmp_path / "run" / "data" / "target")
    assert len(first) == 1 and d_unl in first[0] and d_tgt in first[0]
    warnings_logged.clear()
    run_pipeline(cfg)
    assert [m for m in warnings_logged if "scale mismatch" in m] == first
