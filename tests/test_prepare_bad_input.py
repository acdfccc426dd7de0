"""Every bad input of `prepare`: exit code 2, the culprit named on stderr, no output directory left."""
import logging
import shutil

import numpy as np
import pytest
from PIL import Image

from helpers_prepare import balanced_rows, class_folders, labels_csv, lung_rows, tissue_crop
from histodiffusion.cli import main


@pytest.fixture(autouse=True)
def _fresh_logger():
    """The stage logger keeps the stderr of the test that created it; give each test its own."""
    logger = logging.getLogger("histodiffusion")
    saved = logger.handlers[:]
    logger.handlers = []
    yield
    logger.handlers = saved


def _fails(capsys, tmp_path, args, *culprits):
    out = tmp_path / "out_ds"
    rc = main(["prepare", "--out", str(out), *args])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "error:" in err and all(c in err for c in culprits), err
    assert len([ln for ln in err.splitlines() if "error:" in ln]) == 1 and "Traceback" not in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out_ds")]  # no temp dir left
    return err


def _good_image(tmp_path, name="good.png"):
    p = tmp_path / name
    tissue_crop(p).save(p)
    return p


def test_no_inputs(capsys, tmp_path):
    _fails(capsys, tmp_path, [], "no inputs given")


def test_corrupt_and_truncated_image(capsys, tmp_path):
    p = tmp_path / "bad.png"
    p.write_bytes(_good_image(tmp_path).read_bytes()[:3000])
    _fails(capsys, tmp_path, ["--sources", str(p)], "corrupt or truncated", "bad.png")
    j = tmp_path / "trunc.jpg"
    tissue_crop(j).save(j, quality=90)
    j.write_bytes(j.read_bytes()[:1500])
    _fails(capsys, tmp_path, ["--sources", str(j)], "trunc.jpg")


def test_non_image_file(capsys, tmp_path):
    p = tmp_path / "notes.png"
    p.write_text("this is not an image")
    _fails(capsys, tmp_path, ["--sources", str(p)], "not an image file", "notes.png")


@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16"])
def test_grayscale_rgba_16bit_refused(capsys, tmp_path, mode):
    rgb = np.asarray(tissue_crop(None))
    img = {"L": Image.fromarray(rgb).convert("L"), "RGBA": Image.fromarray(rgb).convert("RGBA"),
           "I;16": Image.fromarray((rgb[..., 0].astype(np.uint16) * 257))}[mode]
    p = tmp_path / "m.png"
    img.save(p)
    _fails(capsys, tmp_path, ["--sources", str(p), "--image-mode", "refuse"], "m.png", "image mode")
    assert main(["prepare", "--out", str(tmp_path / "conv"), "--sources", str(p), "--min-tissue", "0"]) == 0


def test_empty_class_folder(capsys, tmp_path):
    root = class_folders(tmp_path / "nct", per_class=2)
    (root / "EMPTY").mkdir()
    (root / "EMPTY" / "readme.txt").write_text("x")
    _fails(capsys, tmp_path, ["--class-folders", str(root)], "empty class folder", "EMPTY")


def test_label_not_a_class(capsys, tmp_path):
    rows = balanced_rows(30)
    rows[7] = {**rows[7], "label": "lung_typo"}
    csv = labels_csv(tmp_path / "t", rows=rows)
    _fails(capsys, tmp_path, ["--labels-csv", str(csv), "--classes", "lung_aca,lung_n,lung_scc"],
           "lung_typo", "not a class", "line 9")


def test_missing_file(capsys, tmp_path):
    rows = balanced_rows(20) + [{"path": "lung_n/gone.jpg", "label": "lung_n", "group_id": "g"}]
    _fails(capsys, tmp_path, ["--labels-csv", str(labels_csv(tmp_path / "t", rows=rows))], "missing file", "gone.jpg")
    _fails(capsys, tmp_path, ["--sources", str(tmp_path / "nowhere.svs")], "missing source", "nowhere.svs")


def test_image_smaller_than_patch(capsys, tmp_path):
    p = _good_image(tmp_path)
    _fails(capsys, tmp_path, ["--sources", str(p), "--patch-size", "256"], "good.png", "smaller than the patch size")
    _fails(capsys, tmp_path, ["--labels-csv", str(labels_csv(tmp_path / "t", n=30)), "--tile-size", "128"],
           "smaller than the tile size", "lungaca")


def test_csv_without_required_columns(capsys, tmp_path):
    csv = labels_csv(tmp_path / "t", n=10, columns=("path", "group_id"))
    _fails(capsys, tmp_path, ["--labels-csv", str(csv)], "labels.csv", "lacks column", "label")


def test_unreadable_tile_in_folder_is_an_error_with_strict(capsys, tmp_path):
    root = class_folders(tmp_path / "nct", per_class=4)
    (root / "LUNG_N" / "broken.tif").write_bytes(b"II*\x00garbage")
    _fails(capsys, tmp_path, ["--class-folders", str(root), "--strict", "true"], "broken.tif", "--strict")


def test_leakage_refused_via_cli(capsys, tmp_path):
    csv = labels_csv(tmp_path / "t", n=40)
    assert main(["prepare", "--out", str(tmp_path / "target"), "--labels-csv", str(csv), "--fewshot-fracs", ""]) == 0
    capsys.readouterr()
    leak = tmp_path / "leak"
    leak.mkdir()
    (leak / "x.jpg").write_bytes((csv.parent / lung_rows()[3]["path"]).read_bytes())
    _fails(capsys, tmp_path, ["--sources", str(leak), "--min-tissue", "0", "--exclude", str(tmp_path / "target")],
           "leakage", str(tmp_path / "target"), "x.jpg")


def test_same_source_twice(capsys, tmp_path):
    a = _good_image(tmp_path, "a.png")
    (tmp_path / "b.png").write_bytes(a.read_bytes())
    _fails(capsys, tmp_path, ["--sources", f"{a},{tmp_path / 'b.png'}"], "b.png", "a.png", "same content")


def test_single_class_refused(capsys, tmp_path):
    csv = labels_csv(tmp_path / "t", rows=lung_rows()[:20])  # all lung_aca
    _fails(capsys, tmp_path, ["--labels-csv", str(csv)], "single class", "'lung_aca'", "labels.csv")
    root = class_folders(tmp_path / "nct", per_class=3)
    for d in ("LUNG_N", "LUNG_SCC"):
        shutil.rmtree(root / d)
    _fails(capsys, tmp_path, ["--class-folders", str(root)], "single class", "LUNG_ACA", str(root))


def test_image_over_pillows_pixel_limit_is_too_large_not_corrupt(capsys, tmp_path, monkeypatch):
    from PIL import Image as PILImage

    p = _good_image(tmp_path, "big.png")  # 200 x 200 = 40,000 pixels
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 10_000)  # Pillow refuses images over twice its limit
    err = _fails(capsys, tmp_path, ["--sources", str(p)], "too large to load at once", "big.png")
    assert "corrupt" not in err
