"""report: HTML + Markdown twin for a tiny fake run, and for a run with only some stage outputs."""
import json
import re
import shutil
from html.parser import HTMLParser

import pytest

from helpers_eval import make_class_samples, make_dataset, one_thread, with_starts
from histodiffusion.runtime.config import EvaluateConfig, ExportDatasetConfig, JudgeConfig, ReportConfig, SelectConfig
from histodiffusion.runtime.errors import HistoError
from histodiffusion.stages import evaluate, export_dataset, judge, select
from histodiffusion.stages.latent_classifier import strength_summary
from histodiffusion.stages.report import run


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    data = make_dataset(root / "data" / "target")
    samples = make_class_samples(root / "samples", n_per_class=8)
    with one_thread():
        select.run(SelectConfig(samples=str(samples), data=str(data), subset="frac0.5", backbone="small_cnn_w8",
                                feature_steps=10, min_confidence=0.0, quota_ratio=1.0, drop_memorized=False))
        evaluate.run(EvaluateConfig(data=str(data), subset="frac0.5", samples=str(samples), out=str(root / "eval"),
                                    arms=("real", "real_aa", "unselected"), seeds=(0, 1), backbone="small_cnn_w8",
                                    epochs=1, steps_per_epoch=2, val_every=1, batch_size=8))
        # the independent judge's fidelity.json, and a latent classifier's metrics (bucket accuracies + image baseline)
        judge.run(JudgeConfig(data=str(data), out=str(root / "judge"), samples=(str(samples),),
                              backbone="small_cnn_w8", steps=5, batch_size=8))
        by_t = {"[0,250)": 0.75, "[250,500)": 0.5}
        lc = root / "adapt" / "latent_classifier"
        lc.mkdir(parents=True)
        (lc / "metrics.json").write_text(json.dumps({
            "steps": 60, "classes": ["aca", "benign", "scc"], "train_subset": "frac0.5", "n_train": 18,
            "chance": 1 / 3, "val_subset": "val", "n_val": 18, "val_accuracy_by_t": by_t,
            "image_classifier": {"backbone": "small_cnn_w8", "steps": 60, "batch_size": 16, "lr": 3e-4,
                                 "weight_decay": 0.05, "augment": False, "n_train": 18, "n_val": 18,
                                 "val_accuracy": 0.8, "seconds": 1.0},
            **strength_summary(by_t, 0.8)}))
        # the augmented training set the run exports (its evaluation has no selected arm: no effect quoted)
        export_dataset.run(ExportDatasetConfig(data=str(data), subset="frac0.5", samples=str(samples), ratio=0.5,
                                               out=str(root / "augmented")))
        run(ReportConfig(run=str(root), embedding="pca"))
    return root


def test_report_files_and_sections(full_run):
    out = full_run / "report"
    html = (out / "index.html").read_text()
    md = (out / "report.md").read_text()
    assert (out / "config.json").is_file() and (out / "_COMPLETE.json").is_file()
    for section in ("Resolved configurations", "Data", "Real and synthetic images per class",
                    "Embedding of real and synthetic features", "Selection", "Downstream classification",
                    "Confusion matrices", "Generative metrics"):
        assert section in html and section in md
    assert "unselected@1" in html and "Δ accuracy vs real" in html
    # the A/A noise floor in the efficacy table and beside it; validation curves; selection acceptance
    assert "real_aa (A/A noise floor)" in html and "Noise floor (A/A" in html and "Noise floor (A/A" in md
    assert "Validation curves" in html and "best val accuracy" in md and "checkpoint with the best accuracy" in html
    assert "acceptance" in md and "class-balanced" in html
    assert re.search(r"nearest real distance <= aca \d\.\d+, benign \d\.\d+, scc \d\.\d+, the 0.01 quantile", md)
    assert "per class of the nearest real tile" in md
    row = next(line for line in md.splitlines() if line.startswith("| aca | 6 | 8 |"))  # real 6, generated 8
    assert row.split(" | ")[5] == "6" and row.split(" | ")[9] == "0.750"  # kept 6 (quota 1 x 6): acceptance 6/8
    assert re.search(r"\d\.\d{3} \[-?\d\.\d{3}, \d\.\d{3}\]", html)  # mean [CI]
    assert "FD_small_cnn_w8" in html and ">FID<" not in html
    assert "PCA" in html
    # self-contained: images embedded, no external resources
    assert html.count("data:image/png;base64,") >= 3 + 3 + 1 + 3 + 1  # grids, embedding, confusions, curves
    assert not re.search(r"<(link|script)\b|src=\"http", html)
    for name in re.findall(r"\]\((figures/[^)]+)\)", md):
        assert (out / name).is_file()
    assert "| real |" in md
    # class fidelity by the independent judge: per target class, all and kept samples, with intervals
    assert "Class fidelity (independent judge)" in html and "Class fidelity (independent judge)" in md
    f = json.loads((full_run / "samples" / "fidelity.json").read_text())
    a, k = f["all"]["per_class"]["aca"], f["kept"]["per_class"]["aca"]
    row = next(line for line in md.splitlines() if line.startswith("| aca | 8 |"))
    cells = row.strip("|").split(" | ")
    assert cells[2] == str(a["hits"]) and cells[3].startswith(f"{a['fidelity']:.3f} [")
    assert cells[4] == str(k["n"]) == "6" and cells[6].strip().startswith(f"{k['fidelity']:.3f} [")
    assert "| all classes | 24 |" in md and "never a validation or test tile" in html
    assert "filtered.csv changed" not in md
    # the latent classifier per timestep bucket next to the image classifier, the ratio and the goal
    assert "latent classifier strength per timestep bucket" in md
    assert "| [0,250) | 0.750 | 0.800 | 0.94 |" in md and "| [250,500) | 0.500 | 0.800 | 0.62 |" in md
    assert "0.94, met" in md
    # where the augmented training set is: 6 real and 3 synthetic tiles per class
    assert f"Augmented training set: {(full_run / 'augmented' / 'labels.csv').resolve()} (18 real + 9 synthetic tiles (selected@0.5)" in md


def test_exported_set_carries_the_judges_fidelity_of_exactly_its_samples(full_run):
    import csv

    summary = json.loads((full_run / "augmented" / "dataset.json").read_text())
    exported = [r for r in csv.DictReader(open(full_run / "augmented" / "labels.csv")) if r["source"] == "synthetic"]
    pred = {r["id"]: r["judge_pred"] for r in csv.DictReader(open(full_run / "samples" / "fidelity.csv"))}
    assert summary["judge_fidelity"]["n"] == len(exported) == 9
    assert summary["judge_fidelity"]["hits"] == sum(pred[r["id"]] == r["label"] for r in exported)
    assert summary["measured"] is None and "Not measured with this export" in (
        full_run / "augmented" / "README.md").read_text()


def test_report_says_when_a_class_threshold_is_not_calibrated(full_run, tmp_path):
    root = tmp_path / "run"
    shutil.copytree(full_run, root, ignore=shutil.ignore_patterns("report"))
    path = root / "samples" / "select" / "filtered.json"
    f = json.loads(path.read_text())
    assert f["memorization_threshold_from"] == {"aca": "class", "benign": "class", "scc": "class"}
    assert "Not calibrated" not in (full_run / "report" / "report.md").read_text()
    f["memorization_threshold_from"] = {"aca": "none", "benign": "none", "scc": "none"}
    path.write_text(json.dumps(f))
    md = (run(ReportConfig(run=str(root), embedding="pca")) / "report.md").read_text()
    assert "Not calibrated: the real tiles of aca, benign, scc come from one group" in md
    assert "no sample is flagged as memorized" in md
    f["memorization_threshold_from"] = "none"  # one threshold for all classes (--memorization-per-class false)
    path.write_text(json.dumps(f))
    md = (run(ReportConfig(run=str(root), embedding="pca")) / "report.md").read_text()
    assert "Not calibrated: the real tiles of every class come from one group" in md
    f["memorization_threshold_from"] = "pooled"
    path.write_text(json.dumps(f))
    assert "Not calibrated" not in (run(ReportConfig(run=str(root), embedding="pca")) / "report.md").read_text()


def test_report_names_how_the_synthetic_arms_train_differently(full_run, tmp_path):
    root = tmp_path / "run"
    shutil.copytree(full_run, root, ignore=shutil.ignore_patterns("report"))
    assert "In the synthetic arms" not in (full_run / "report" / "report.md").read_text()
    path = root / "eval" / "metrics.json"
    m = json.loads(path.read_text())
    m["budget"].update(synthetic_weight=0.5, real_finish=0.3)
    path.write_text(json.dumps(m))
    md = (run(ReportConfig(run=str(root), embedding="pca")) / "report.md").read_text()
    assert ("In the synthetic arms each synthetic image weighs 0.5 of a real one in the loss and the last 30% of "
            "the steps train on the real tiles only.") in md


def test_report_shows_kept_samples_beside_the_tiles_they_started_from(full_run, tmp_path):
    """Samples made from real tiles (init_id): per class, the first kept samples in rank order beside their starting
    tiles turned by init_dihedral; a tile whose own label is another class is framed red."""
    import csv

    import numpy as np
    from PIL import Image

    from histodiffusion.core.transforms import dihedral
    from histodiffusion.data.datasets import PixelDataset
    from histodiffusion.stages.report.images import start_pairs

    assert "tiles they started from" not in (full_run / "report" / "report.md").read_text()  # made from noise
    root = tmp_path / "run"
    shutil.copytree(full_run, root, ignore=shutil.ignore_patterns("report", "samples"))
    with_starts(full_run / "samples", str(root / "data" / "target"), root / "samples")
    md = (run(ReportConfig(run=str(root), embedding="pca", grid_per_class=4)) / "report.md").read_text()
    assert "## Kept samples and the tiles they started from" in md
    assert re.search(r"aca: starting tiles \(left\), kept samples \(right\); mean absolute difference \d+\.\d / 255 "
                     r"over these 4", md)
    rows = list(csv.DictReader(open(root / "samples" / "samples.csv")))
    filt = {f["id"]: f for f in csv.DictReader(open(root / "samples" / "select" / "filtered.csv"))}
    ds = PixelDataset(root / "data" / "target", subset="train")
    idx, tiles, own = start_pairs(rows, filt, ds, "aca", 4)
    kept = sorted((f for f in filt.values() if f["target"] == "aca" and f["keep"] == "1"), key=lambda f: int(f["rank"]))
    assert [rows[i]["id"] for i in idx] == [f["id"] for f in kept[:4]]
    at = {r["id"]: j for j, r in enumerate(ds.rows)}
    for i, t, lab in zip(idx, tiles, own):
        j = at[rows[i]["init_id"]]
        assert (t == dihedral(ds.uint8(j), int(rows[i]["init_dihedral"]), dims=(0, 1)).numpy()).all()
        assert lab == ds.rows[j]["label"]
    # the red frame (2 px around each 128 px cell, 4 a row, 4 px gaps) marks exactly the tiles of another class
    grid = np.asarray(Image.open(root / "report" / "figures" / "grid_start_0.png").convert("RGB"))
    framed = [tuple(grid[2, 4 + k * 132 + 60]) == (220, 30, 30) for k in range(len(idx))]
    assert framed == [lab != "aca" for lab in own] and any(framed) and not all(framed)


def test_report_with_only_data(tmp_path):
    make_dataset(tmp_path / "data" / "target")
    out = run(ReportConfig(run=str(tmp_path)))
    html = (out / "index.html").read_text()
    assert "Data" in html and "Real images per class" in html
    assert "synthetic" not in html.split("<h2>Embedding")[0].lower()
    assert "Downstream classification" not in html and "Selection" not in html
    assert "Class fidelity" not in html and "Latent classifier" not in html
    with pytest.raises(HistoError, match="not found"):
        run(ReportConfig(run=str(tmp_path / "nope")))


class _Outline(HTMLParser):
    """Top-level blocks of the body in order (tag, id/class), and the text of each p.verdict."""

    def __init__(self):
        super().__init__()
        self.depth, self.blocks, self.verdicts, self._in_verdict = 0, [], [], False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if self.depth == 0 and tag in ("h1", "p", "section", "details"):
            self.blocks.append((tag, a.get("id") or a.get("class") or ""))
        if tag == "p" and a.get("class") == "verdict":
            self._in_verdict = True
            self.verdicts.append("")
        if tag in ("section", "details"):
            self.depth += 1

    def handle_endtag(self, tag):
        if tag in ("section", "details"):
            self.depth -= 1
        if tag == "p":
            self._in_verdict = False

    def handle_data(self, data):
        if self._in_verdict:
            self.verdicts[-1] += data


def test_report_leads_with_the_verdict(full_run):
    from PIL import Image

    page = (full_run / "report" / "index.html").read_text()
    outline = _Outline()
    outline.feed(page.split("<body>", 1)[1])
    # title, run directory, then the verdict first; details next; the resolved configurations last, folded
    assert [b for b in outline.blocks if b[0] != "p"] == [("h1", ""), ("section", "verdict"), ("section", "details"),
                                                          ("details", "fold")]
    verdict = page.split('<section id="verdict">', 1)[1].split("</section>", 1)[0]
    m = json.loads((full_run / "eval" / "metrics.json").read_text())
    d, aa = m["deltas"]["unselected@1"]["accuracy"], m["noise_floor"]["accuracy"]
    # no selected arm in this run: the sentence is about the unselected tiles; numbers are metrics.json's
    assert len(outline.verdicts) == 1
    got = re.fullmatch(r"Synthetic tiles without selection at ratio 1 changed test accuracy by ([+-]\d\.\d{3}) "
                       r"\[95% CI (-?\d\.\d{3}), (-?\d\.\d{3})\] over (\d) seeds, against ([+-]\d\.\d{3}) "
                       r"\[95% CI (-?\d\.\d{3}), (-?\d\.\d{3})\] between two real-only runs \(A/A noise floor\): "
                       r"(not distinguishable from seed noise|a gain beyond seed noise|a loss beyond seed noise)\.",
                       outline.verdicts[0])
    assert got, outline.verdicts[0]
    want = [d["mean"], *d["ci95"], d["n"], aa["mean"], *aa["ci95"]]
    assert [float(x) for x in got.groups()[:7]] == pytest.approx(want, abs=5e-4)
    assert int(got.group(4)) == 2 == len(m["seeds"])
    # the efficacy table, class fidelity and the grids are on the first screen too
    assert "efficacy on the test split" in verdict and "real_aa (A/A noise floor)" in verdict
    assert "class fidelity: share of samples" in verdict
    assert verdict.count('class="tiles"') == 2 * 3  # real and synthetic per class
    grid = Image.open(full_run / "report" / "figures" / "grid_syn_0.png")
    assert grid.size == (4 * (128 + 4) + 4, 2 * (128 + 4) + 4)  # 8 samples of 16 px, shown 128 px wide, 4 a row, 4 px gaps
    assert 'name="viewport"' in page and "@media (max-width:640px)" in page


def test_verdict_sentences_judge_against_the_noise_floor():
    from histodiffusion.stages.report.verdict import verdict_sentences

    def delta(mean, lo, hi, n=3):
        return {"accuracy": {"mean": mean, "ci95": [lo, hi], "n": n}}

    m = {"testsets": {"test": {"deltas_vs_real": {
        "real_aa": delta(0.01, -0.05, 0.07), "classic": delta(0.02, 0.0, 0.04),
        "selected@2": delta(0.1, 0.08, 0.12), "selected@0.5": delta(0.04, 0.01, 0.07),
        "unselected@2": delta(-0.2, -0.3, -0.1)}}}}
    s = verdict_sentences(m)
    assert len(s) == 2 and s[0].startswith("Selected synthetic tiles at ratio 0.5 changed test accuracy by +0.040 "
                                           "[95% CI 0.010, 0.070] over 3 seeds, against +0.010 [95% CI -0.050, 0.070]")
    assert s[0].endswith("and +0.020 [95% CI 0.000, 0.040] for classic augmentation: not distinguishable from seed "
                         "noise.")  # its interval excludes 0 but its mean lies inside the A/A interval
    assert s[1].startswith("Selected synthetic tiles at ratio 2 ") and s[1].endswith(": a gain beyond seed noise.")
    del m["testsets"]["test"]["deltas_vs_real"]["real_aa"]
    assert verdict_sentences(m)[0].endswith("for classic augmentation: a gain beyond seed noise.")
    # with deltas vs classic: a second clause judges the gain over classic against the classic_aa floor
    m["testsets"]["test"]["deltas_vs_classic"] = {"selected@0.5": delta(0.02, -0.01, 0.05),
                                                  "selected@2": delta(0.08, 0.06, 0.10)}
    m["testsets"]["test"]["noise_floors"] = {"classic_aa": delta(0.0, -0.03, 0.03)}
    s = verdict_sentences(m)
    assert s[0].endswith("Over classic augmentation alone (which the synthetic arms also use): +0.020 [95% CI "
                         "-0.010, 0.050], against +0.000 [95% CI -0.030, 0.030] between two classic runs: not "
                         "distinguishable from seed noise.")
    assert "Over classic augmentation alone (which the synthetic arms also use): +0.080 [95% CI 0.060, 0.100]" in s[1]
    assert s[1].endswith("a gain beyond seed noise.")
    # with a pseudo arm of the same ratio: a third clause, the gain over plain pseudo-labelling
    m["testsets"]["test"]["deltas_vs_pseudo"] = {"selected@2": delta(-0.05, -0.07, -0.03)}
    s = verdict_sentences(m)
    assert "pseudo" not in s[0] and s[1].endswith(
        "Over pseudo-labelled real tiles at the same ratio (pseudo@2, no generator): -0.050 [95% CI -0.070, "
        "-0.030]: a loss beyond seed noise.")
    # a pseudo+selected arm: a sentence of its own, the samples' gain on top of the pseudo-labelled tiles
    m["testsets"]["test"]["deltas_vs_pseudo"]["pseudo+selected@2"] = delta(0.01, -0.02, 0.04)
    s = verdict_sentences(m)
    assert len(s) == 3 and s[2] == (
        "Selected synthetic tiles added to the pseudo-labelled real tiles at ratio 2 (pseudo+selected@2 against "
        "pseudo@2) changed test accuracy by +0.010 [95% CI -0.020, 0.040] over 3 seeds: not distinguishable from "
        "seed noise.")
    # with a start arm of the same ratio: a fourth clause, what the diffusion step adds over its starting tiles
    m["testsets"]["test"]["deltas_vs_start"] = {"selected@2": delta(0.004, -0.01, 0.018)}
    s = verdict_sentences(m)
    assert "start@" not in s[0] and s[1].endswith(
        "Over the samples' own starting tiles, raw (start@2: the same tiles and labels without the diffusion step): "
        "+0.004 [95% CI -0.010, 0.018]: not distinguishable from seed noise.")
    # with a roundtrip arm too: that difference split into the autoencoder's round trip and the denoising step
    m["testsets"]["test"]["deltas_vs_start"]["roundtrip@2"] = delta(-0.03, -0.05, -0.01)
    m["testsets"]["test"]["deltas_vs_roundtrip"] = {"selected@2": delta(0.034, 0.02, 0.048)}
    s = verdict_sentences(m)
    assert s[1].endswith(
        "Of that, one pass of the tiles through the samples' autoencoder (roundtrip@2 against start@2) gives "
        "-0.030 [95% CI -0.050, -0.010] and the denoising step over that round trip +0.034 [95% CI 0.020, 0.048].")
    assert len(s) == 3  # a roundtrip arm gets no sentence of its own
    del m["testsets"]["test"]["deltas_vs_pseudo"], m["testsets"]["test"]["deltas_vs_start"]
    del m["testsets"]["test"]["deltas_vs_roundtrip"]
    # without a real arm the synthetic arms are judged against classic alone
    m["testsets"]["test"]["deltas_vs_real"] = {}
    s = verdict_sentences(m)
    assert s[0] == ("Selected synthetic tiles at ratio 0.5 changed test accuracy over classic augmentation alone (which "
                    "the synthetic arms also use) by +0.020 [95% CI -0.010, 0.050] over 3 seeds, against +0.000 [95% "
                    "CI -0.030, 0.030] between two classic runs: not distinguishable from seed noise.")
