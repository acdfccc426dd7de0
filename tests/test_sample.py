"""sample.py: the guided loop vs diffusers' loop, guidance strength, per-sample reproducibility
(batch size, resume, 2 processes), outputs and bad input."""
import csv
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from histodiffusion.cli import main as cli_main
from histodiffusion.diffusers_pipeline import guided_sample
from histodiffusion.diffusers_pipeline import make_scheduler
from histodiffusion.runtime.config import SampleConfig
from histodiffusion.runtime.errors import HistoError
from histodiffusion.stages import sample as sample_mod
from histodiffusion.stages.sample import plan_samples, run

from helpers_interrupt import interrupt_at
from helpers_sample import ToyClassifier, make_labeled_cache, make_latent_classifier, make_ldm

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    data, vae, cache = make_labeled_cache(d)
    ldm = make_ldm(d / "ldm", vae)
    clf = make_latent_classifier(d / "clf", cache, ldm / "scheduler")
    return {"dir": d, "data": data, "vae": vae, "cache": cache, "ldm": ldm, "clf": clf}


def base_cfg(models, out, **kw):
    kw = {"n_per_class": 3, "steps": 4, "scheduler": "ddim", "eta": 1.0, "scale": 3.0, "batch_size": 2, **kw}
    return SampleConfig(model=str(models["ldm"]), classifier=str(models["clf"]), out=str(out), **kw)


@pytest.fixture(scope="module")
def reference(models, tmp_path_factory):
    """A complete run with batch size 1 (the reference for the invariance tests)."""
    out = tmp_path_factory.mktemp("ref") / "s"
    run(base_cfg(models, out, batch_size=1))
    return out


def read_rows(out):
    with open(out / "samples.csv", newline="") as f:
        return list(csv.DictReader(f))


def same_outputs(a: Path, b: Path):
    ra, rb = read_rows(a), read_rows(b)
    assert ra == rb
    for r in ra:
        assert (a / r["file"]).read_bytes() == (b / r["file"]).read_bytes(), r["file"]


@pytest.mark.parametrize("name,eta", [("ddim", 0.0), ("ddim", 1.0), ("dpmsolver++", 0.0)])
def test_scale_zero_equals_diffusers_loop(models, name, eta):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    from histodiffusion.models.unet import load_scheduler, load_unet

    unet = load_unet(models["ldm"] / "unet_ema")
    config = dict(load_scheduler(models["ldm"] / "scheduler").config)
    noise = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    seeds = [11, 12, 13, 14]
    ours = guided_sample(unet, None, make_scheduler(name, config), noise, torch.zeros(4, dtype=torch.long),
                         [torch.Generator().manual_seed(s) for s in seeds], steps=6, scale=0.0, eta=eta,
                         micro_batch=None)
    # diffusers' own loop (as in DDIMPipeline)
    if name == "ddim":
        sched = DDIMScheduler.from_config(config, clip_sample=False)
        extra = {"eta": eta, "generator": [torch.Generator().manual_seed(s) for s in seeds]}
    else:
        sched = DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", timestep_spacing="linspace")
        extra = {}
    sched.set_timesteps(6)
    z = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        with torch.no_grad():
            eps = unet(z, t).sample
        z = sched.step(eps, t, z, **extra).prev_sample
    assert torch.equal(ours, z)


@pytest.mark.parametrize("name", ["ddim", "dpmsolver++"])
def test_strength_equals_diffusers_img2img_loop(models, name):
    """From clean latents at strength 0.5 and scale 0, the loop is diffusers' img2img recipe: the last half of
    the timesteps, the scheduler's begin index, the clean latents noised to the first of them."""
    from histodiffusion.models.unet import load_scheduler, load_unet

    unet = load_unet(models["ldm"] / "unet_ema")
    config = dict(load_scheduler(models["ldm"] / "scheduler").config)
    g = torch.Generator().manual_seed(3)
    init, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    ours = guided_sample(unet, None, make_scheduler(name, config), noise, torch.zeros(4, dtype=torch.long), None,
                         steps=8, scale=0.0, micro_batch=None, init=init, strength=0.5)
    sched = make_scheduler(name, config)
    sched.set_timesteps(8)
    timesteps = sched.timesteps[4:]
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(4)
    z = sched.add_noise(init, noise, timesteps[:1].repeat(4))
    for t in timesteps:
        with torch.no_grad():
            z = sched.step(unet(z, t).sample, t, z).prev_sample
    assert torch.equal(ours, z)


def test_lower_strength_stays_closer_to_the_init_latents(models):
    from histodiffusion.models.unet import load_scheduler, load_unet

    unet = load_unet(models["ldm"] / "unet_ema")
    config = dict(load_scheduler(models["ldm"] / "scheduler").config)
    g = torch.Generator().manual_seed(4)
    init, noise = torch.randn(8, 4, 8, 8, generator=g), torch.randn(8, 4, 8, 8, generator=g)
    dist = [float((guided_sample(unet, None, make_scheduler("ddim", config), noise, torch.zeros(8, dtype=torch.long),
                                 None, steps=10, scale=0.0, init=init, strength=s) - init).pow(2).mean())
            for s in (0.1, 0.5, 1.0)]
    assert dist[0] < dist[1] < dist[2], dist
    with pytest.raises(HistoError, match="strength must be in"):
        guided_sample(unet, None, make_scheduler("ddim", config), noise, torch.zeros(8, dtype=torch.long), None,
                      steps=10, scale=0.0, init=init, strength=0.0)


def test_larger_scale_raises_target_probability(models):
    from histodiffusion.models.unet import load_scheduler, load_unet

    unet = load_unet(models["ldm"] / "unet_ema")
    config = dict(load_scheduler(models["ldm"] / "scheduler").config)
    clf = ToyClassifier(1.0)
    noise = torch.randn(16, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1] * 8)
    probs = []
    for s in (0.0, 2.0, 8.0):
        z = guided_sample(unet, clf, make_scheduler("ddim", config), noise, y, None, steps=8, scale=s)
        with torch.no_grad():
            p = torch.softmax(clf(z, 0), -1)[torch.arange(16), y]
        probs.append(float(p.mean()))
    assert probs[0] < probs[1] < probs[2], probs
    assert probs[2] - probs[0] > 0.15, probs


def test_outputs_and_batch_size_invariance(models, reference, tmp_path):
    rows = read_rows(reference)
    assert list(rows[0]) == sample_mod.SAMPLES_COLUMNS
    assert [r["id"] for r in rows] == ["dark_00000", "dark_00001", "dark_00002", "pale_00000", "pale_00001",
                                       "pale_00002"]
    assert {r["target"] for r in rows} == {"dark", "pale"}
    assert len({r["seed"] for r in rows}) == 6
    assert all(0.0 <= float(r["confidence"]) <= 1.0 for r in rows)
    assert all(len(r["unet_id"]) == 64 and len(r["classifier_id"]) == 64 and len(r["vae_id"]) == 64 for r in rows)
    assert (reference / "grids" / "dark.png").is_file() and (reference / "grids" / "pale.png").is_file()
    assert (reference / "_COMPLETE.json").is_file() and not (reference / "_progress").exists()
    assert json.loads((reference / "config.json").read_text())["stage"] == "sample"
    # the same command with batch size 3 gives byte-identical images and rows
    run(base_cfg(models, tmp_path / "b3", batch_size=3))
    same_outputs(reference, tmp_path / "b3")


def test_resume_after_kill(models, reference, tmp_path):
    out = tmp_path / "s"
    # the progress line "sample: 1/6 (17%)" is logged once the first batch's PNG and progress row are written
    with interrupt_at("histodiffusion.sample", "sample: 1/6 (17%)"), pytest.raises(KeyboardInterrupt):
        run(base_cfg(models, out, batch_size=1))
    first = out / "images" / "dark_00000.png"
    stamp = first.stat().st_mtime_ns
    assert not (out / "samples.csv").exists() and not (out / "_COMPLETE.json").exists()
    assert sorted(p.name for p in (out / "images").glob("*.png")) == ["dark_00000.png"]

    run(base_cfg(models, out, batch_size=1))
    assert "sampling 6 images (1 done before, 5 pending)" in (out / "log.txt").read_text()
    assert first.stat().st_mtime_ns == stamp  # the finished one was not made again
    same_outputs(reference, out)


def test_two_processes_equal_single_process(models, reference, tmp_path):
    out = tmp_path / "dist"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "MASTER_PORT": "29531"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
           "-m", "histodiffusion", "sample", "--model", str(models["ldm"]), "--classifier", str(models["clf"]),
           "--out", str(out), "--n-per-class", "3", "--steps", "4", "--scheduler", "ddim", "--eta", "1.0",
           "--scale", "3.0", "--batch-size", "2"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    same_outputs(reference, out)


def test_strength_starts_from_train_tiles_of_the_class(models, tmp_path):
    """strength < 1: every sample names a train tile of its own class from the classifier's subset, cycling
    through the tiles and then their flips/rotations; images do not depend on the batch size."""
    with open(models["cache"] / "index.csv", newline="") as f:
        index = {r["id"]: r for r in csv.DictReader(f)}
    cfg = base_cfg(models, tmp_path / "a", strength=0.5, n_per_class=14, batch_size=5, classes=("dark",))
    run(cfg)
    rows = read_rows(tmp_path / "a")
    assert len(rows) == 14 and all(r["strength"] == "0.5" for r in rows)
    train_dark = sorted(i for i, r in index.items() if r["split"] == "train" and r["label"] == "dark")
    assert len(train_dark) == 12
    assert [r["init_id"] for r in rows] == train_dark + train_dark[:2]
    assert [r["init_dihedral"] for r in rows] == ["0"] * 12 + ["1"] * 2
    run(dataclasses.replace(cfg, out=str(tmp_path / "b"), batch_size=14))
    same_outputs(tmp_path / "a", tmp_path / "b")
    # the samples differ from noise-started ones of the same seeds
    run(dataclasses.replace(cfg, out=str(tmp_path / "c"), strength=1.0))
    assert all(r["init_id"] == "" for r in read_rows(tmp_path / "c"))
    assert (tmp_path / "a" / rows[0]["file"]).read_bytes() != (tmp_path / "c" / rows[0]["file"]).read_bytes()


def test_color_match_gives_each_sample_its_starting_tiles_colors(models, tmp_path):
    """color_match=tile: each sample is the unmatched sample of the same seed with its per-channel RGB mean and
    standard deviation set to those of its starting tile, turned as the sample started."""
    import numpy as np
    from PIL import Image

    from histodiffusion.core.transforms import dihedral, match_color
    from histodiffusion.data.datasets import PixelDataset

    cfg = base_cfg(models, tmp_path / "plain", strength=0.5, n_per_class=14, batch_size=7, classes=("dark",))
    run(cfg)
    run(dataclasses.replace(cfg, out=str(tmp_path / "matched"), color_match="tile"))
    rows = read_rows(tmp_path / "matched")
    assert [r["init_dihedral"] for r in rows][-2:] == ["1", "1"]  # some starting tiles turned
    ds = PixelDataset(models["data"], ids=[r["init_id"] for r in rows])
    at = {r["id"]: j for j, r in enumerate(ds.rows)}
    for r in rows:
        tile = dihedral(ds.uint8(at[r["init_id"]]), int(r["init_dihedral"]), dims=(0, 1)).numpy()
        plain = np.asarray(Image.open(tmp_path / "plain" / r["file"]).convert("RGB"))
        got = np.asarray(Image.open(tmp_path / "matched" / r["file"]).convert("RGB"))
        assert (got == match_color(plain, tile)).all()
        gap = [np.abs(x.reshape(-1, 3).mean(0) - tile.reshape(-1, 3).mean(0)).max() for x in (got, plain)]
        assert gap[0] < gap[1]  # nearer the tile's colours (not equal: clipping at 0 and 255 moves them)
    info = json.loads((tmp_path / "matched" / "pipeline" / "histodiffusion.json").read_text())
    assert info["sampling"]["color_match"] == "tile"
    with pytest.raises(HistoError, match="color_match=tile .* needs strength < 1"):
        run(base_cfg(models, tmp_path / "noise", color_match="tile"))
    assert not (tmp_path / "noise" / "samples.csv").exists()


def test_detail_adds_back_what_the_round_trip_loses_on_the_starting_tile(models, tmp_path):
    """detail=tile: each sample is the plain sample of the same seed plus (its starting tile - that tile's latent
    decoded), tile and latent turned as the sample started; so it lies nearer its tile than the plain sample.
    With color_match as well, the colours are matched after the detail is added."""
    import numpy as np
    from PIL import Image

    from histodiffusion.core.transforms import add_detail, dihedral, match_color
    from histodiffusion.data.datasets import PixelDataset
    from histodiffusion.models.autoencoder import load_vae, roundtrip_uint8

    cfg = base_cfg(models, tmp_path / "plain", strength=0.3, n_per_class=14, batch_size=7, classes=("dark",))
    run(cfg)
    run(dataclasses.replace(cfg, out=str(tmp_path / "detail"), detail="tile"))
    run(dataclasses.replace(cfg, out=str(tmp_path / "both"), detail="tile", color_match="tile"))
    rows = read_rows(tmp_path / "detail")
    assert rows == read_rows(tmp_path / "plain") and [r["init_dihedral"] for r in rows][-2:] == ["1", "1"]
    ds = PixelDataset(models["data"], ids=[r["init_id"] for r in rows])
    at = {r["id"]: j for j, r in enumerate(ds.rows)}
    raw = np.stack([ds.uint8(at[r["init_id"]]).numpy() for r in rows])
    turns = [int(r["init_dihedral"]) for r in rows]
    recs = roundtrip_uint8(load_vae(models["vae"]), raw, turns=turns)[0].numpy()  # posterior means, as cached
    near = []
    for r, t0, rec, k in zip(rows, raw, recs, turns):
        tile = dihedral(torch.from_numpy(t0), k, dims=(0, 1)).numpy()
        plain, got, both = (np.asarray(Image.open(tmp_path / d / r["file"]).convert("RGB"), dtype=np.int16)
                            for d in ("plain", "detail", "both"))
        assert np.abs(got - add_detail(plain, tile, rec)).max() <= 1  # the cache's latents: scaled, float32
        assert (both == match_color(got, tile)).all()
        near.append((np.abs(got - tile).mean(), np.abs(plain - tile).mean()))
    assert all(a < b for a, b in near)
    info = json.loads((tmp_path / "detail" / "pipeline" / "histodiffusion.json").read_text())
    assert info["sampling"]["detail"] == "tile" and info["sampling"]["color_match"] == "none"
    card = (tmp_path / "both" / "pipeline" / "README.md").read_text()
    assert "strength 0.3" in card and "`detail=True` and `color_match=True`" in card
    # the exported pipeline makes the very same images, given the seeds, the cached starting latents and the tiles
    from diffusers import DiffusionPipeline

    from histodiffusion.data.datasets import LatentDataset

    cache = LatentDataset(models["cache"], sample=False)
    where = {r["id"]: j for j, r in enumerate(cache.rows)}
    z = torch.stack([dihedral(cache[where[r["init_id"]]][0], k) for r, k in zip(rows, turns)])
    tiles = np.stack([dihedral(torch.from_numpy(t0), k, dims=(0, 1)).numpy() for t0, k in zip(raw, turns)])
    pipe = DiffusionPipeline.from_pretrained(str(tmp_path / "both" / "pipeline"))
    kw = {"class_labels": [r["target"] for r in rows], "guidance_scale": cfg.scale, "num_inference_steps": cfg.steps,
          "eta": cfg.eta, "strength": 0.3, "output_type": "np"}
    pngs = {}
    for d, extra in (("both", {"detail": True, "color_match": True}), ("detail", {"detail": True}), ("plain", {})):
        pngs[d] = np.stack([np.asarray(Image.open(tmp_path / d / r["file"]).convert("RGB")) for r in rows])
        res = pipe(generator=[torch.Generator().manual_seed(int(r["seed"])) for r in rows], init_latents=z,
                   image=tiles, **kw, **extra).images
        assert np.array_equal(np.rint(res * 255).astype(np.uint8), pngs[d]), d
    # the tiles alone: the pipeline encodes them (posterior means) itself, as the cache holds the unturned ones
    # (the stage turns a tile's latent, the encoder sees the turned tile: the same only for unturned tiles)
    own = pipe(generator=[torch.Generator().manual_seed(int(r["seed"])) for r in rows], image=list(tiles),
               detail=True, **kw).images
    diff = np.abs(np.rint(own * 255).astype(np.int16) - pngs["detail"])[np.array(turns) == 0]
    assert len(diff) >= 6 and diff.max() <= 1
    with pytest.raises(HistoError, match="detail=tile .* needs strength < 1"):
        run(base_cfg(models, tmp_path / "noise", detail="tile"))
    assert not (tmp_path / "noise" / "samples.csv").exists()


def test_init_labels_classifier_starts_from_tiles_the_classifier_reads_as_the_class(models, tmp_path):
    """init_labels=classifier: the pool is the train split (default), a tile's class is the latent classifier's
    reading of its clean latent, the tiles' own labels are never read (a copy of the cache without labels gives
    the same samples); images do not depend on the batch size."""
    import shutil

    from histodiffusion.data.datasets import LatentDataset
    from histodiffusion.models.latent_classifier import load_latent_classifier

    blank = tmp_path / "cache_unlabeled"
    shutil.copytree(models["cache"], blank)
    with open(blank / "index.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    with open(blank / "index.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows({**r, "label": ""} for r in rows)
    clf, _, _ = load_latent_classifier(models["clf"])
    ds = LatentDataset(models["cache"], "train", sample=False)
    with torch.no_grad():
        pred = clf(torch.stack([ds[i][0] for i in range(len(ds))]), 0).argmax(1).tolist()
    reads = {r["id"]: ("dark", "pale")[p] for r, p in zip(ds.rows, pred)}
    assert 0 < pred.count(0) < len(pred)  # both classes have a pool

    n = len(pred)  # more samples per class than either pool holds: the pools cycle
    cfg = base_cfg(models, tmp_path / "a", strength=0.5, n_per_class=n, batch_size=5, init_labels="classifier",
                   init_cache=str(blank))
    run(cfg)
    out = read_rows(tmp_path / "a")
    assert len(out) == 2 * n and all(reads[r["init_id"]] == r["target"] for r in out)
    for cls in ("dark", "pale"):
        pool = sorted(i for i, c in reads.items() if c == cls)
        ids = [r["init_id"] for r in out if r["target"] == cls]
        assert sorted(ids[:len(pool)]) == pool  # every tile of the pool once before any repeats
        assert all(ids[k] == ids[k % len(pool)] for k in range(n))
        assert [r["init_dihedral"] for r in out if r["target"] == cls] == [str(k // len(pool)) for k in range(n)]
    run(dataclasses.replace(cfg, out=str(tmp_path / "b"), init_cache=str(models["cache"]), batch_size=2 * n))
    same_outputs(tmp_path / "a", tmp_path / "b")
    # the pipeline reads the tiles as the stage does: from their cached latents, or from their pixels
    import numpy as np

    from histodiffusion.data.datasets import PixelDataset
    from histodiffusion.diffusers_pipeline import HistoDiffusionPipeline

    pipe = HistoDiffusionPipeline.from_models(models["ldm"], models["clf"])
    names, probs = pipe.read_classes(init_latents=torch.stack([ds[i][0] for i in range(len(ds))]))
    assert names == [reads[r["id"]] for r in ds.rows] and probs.shape == (len(ds), 2)
    px = PixelDataset(models["data"], ids=[r["id"] for r in ds.rows])
    at = {r["id"]: j for j, r in enumerate(px.rows)}
    own, own_probs = pipe.read_classes(image=torch.stack([px.uint8(at[r["id"]]) for r in ds.rows]))
    assert own == names and np.allclose(own_probs, probs, atol=1e-4)
    with pytest.raises(HistoError, match="give one of them"):
        pipe.read_classes()
    # init_top_share: only the most confident share of each pool (by the predicted class's probability)
    with torch.no_grad():
        conf = clf(torch.stack([ds[i][0] for i in range(len(ds))]), 0).softmax(1).max(1).values.tolist()
    run(dataclasses.replace(cfg, out=str(tmp_path / "top"), init_top_share=0.5))
    top = read_rows(tmp_path / "top")
    for cls in ("dark", "pale"):
        pool = sorted((c, r["id"]) for r, c in zip(ds.rows, conf) if reads[r["id"]] == cls)
        want = {i for _, i in pool[len(pool) - max(1, round(0.5 * len(pool))):]}
        ids = [r["init_id"] for r in top if r["target"] == cls]
        assert set(ids) == want and len(set(ids[:len(want)])) == len(want)
    # the labels decide with init_labels=tiles: a cache without labels has no tile of the class
    with pytest.raises(HistoError, match="has no tile of class 'dark' to start from"):
        run(dataclasses.replace(cfg, out=str(tmp_path / "c"), init_labels="tiles", init_subset="train"))
    assert not (tmp_path / "c" / "samples.csv").exists()
    # a classifier that reads every tile as "dark" leaves "pale" without a pool: one clear error
    from histodiffusion.models.latent_classifier import LatentClassifier

    one_sided = LatentClassifier(in_channels=4, num_classes=2, width=16, depth=2)
    with torch.no_grad():
        one_sided.head.weight.zero_()
        one_sided.head.bias.copy_(torch.tensor([5.0, -5.0]))
    clf_dark = make_latent_classifier(tmp_path / "clf_dark", models["cache"], models["ldm"] / "scheduler", model=one_sided)
    with pytest.raises(HistoError, match="has no tile the latent classifier reads as class 'pale' to start from"):
        run(dataclasses.replace(cfg, out=str(tmp_path / "d"), classifier=str(clf_dark)))
    assert not (tmp_path / "d" / "samples.csv").exists()


def constant_image_classifier(folder, classes, size, p_first: float) -> Path:
    """An image classifier that gives every tile the probabilities (p_first, 1 - p_first)."""
    import math

    from histodiffusion.models.classifier import build_classifier, save_classifier

    model = build_classifier("small_cnn_w16", len(classes), size)
    b = 0.5 * math.log(p_first / (1 - p_first))  # softmax([b, -b])[0] = p_first
    with torch.no_grad():
        model.head[-1].weight.zero_()
        model.head[-1].bias.copy_(torch.tensor([b, -b]))
    save_classifier(model, folder, {"name": "small_cnn_w16", "classes": list(classes), "image_size": size})
    return Path(folder)


def test_init_labels_ensemble_averages_the_latent_and_the_image_classifier(models, tmp_path):
    """init_labels=ensemble: a tile's class is the argmax of the mean of the latent classifier's probabilities
    (clean latent, t = 0) and the image classifier's (its pixels, read from the cache's dataset). With an image
    classifier that says (q, 1 - q) for every tile, a tile is read as the first class iff the latent classifier
    gives it more than 1 - q: chosen here so that exactly the latent's least unsure second-class tile flips."""
    from histodiffusion.data.datasets import LatentDataset
    from histodiffusion.models.latent_classifier import load_latent_classifier

    clf, _, _ = load_latent_classifier(models["clf"])
    ds = LatentDataset(models["cache"], "train", sample=False)
    with torch.no_grad():
        p0 = clf(torch.stack([ds[i][0] for i in range(len(ds))]), 0).softmax(1)[:, 0].tolist()
    below = sorted(p for p in p0 if p < 0.5)
    assert below and any(p > 0.5 for p in p0)
    lo = below[-2] if len(below) > 1 else 0.0
    q = 1 - (lo + below[-1]) / 2  # the threshold 1 - q lies between the two highest first-class probabilities below 0.5
    size = int(ds.meta.get("tile_size") or 16)
    img = constant_image_classifier(tmp_path / "img", ("dark", "pale"), size, q)
    want = {r["id"]: ("dark" if p > 1 - q else "pale") for r, p in zip(ds.rows, p0)}
    latent_reads = {r["id"]: ("dark" if p > 0.5 else "pale") for r, p in zip(ds.rows, p0)}
    assert sum(want[i] != latent_reads[i] for i in want) == 1  # the ensemble differs from the latent alone

    n = len(p0)
    cfg = base_cfg(models, tmp_path / "a", strength=0.5, n_per_class=n, batch_size=8, init_labels="ensemble",
                   init_image_classifier=(str(img),))
    run(cfg)
    out = read_rows(tmp_path / "a")
    assert all(want[r["init_id"]] == r["target"] for r in out)
    for cls in ("dark", "pale"):
        assert {r["init_id"] for r in out if r["target"] == cls} == {i for i, c in want.items() if c == cls}
    n_dark = sum(c == "dark" for c in want.values())
    assert (f"starting tiles: dark {n_dark}, pale {n - n_dark} of the {n} tiles of subset 'train', as read by the "
            "latent and the image classifier together") in (tmp_path / "a" / "log.txt").read_text()
    # the pixels come from init_data when given; a classifier of other classes or unreadable pixels: one error
    with pytest.raises(HistoError, match="has classes .*'tumour'.* the latent classifier"):
        run(dataclasses.replace(cfg, out=str(tmp_path / "b"), init_image_classifier=(str(
            constant_image_classifier(tmp_path / "img2", ("tumour", "stroma"), size, 0.5)),)))
    with pytest.raises(HistoError, match="dataset .*nowhere is not readable .*give --init-data"):
        run(dataclasses.replace(cfg, out=str(tmp_path / "c"), init_data=str(tmp_path / "nowhere")))
    for d in "bc":
        assert not (tmp_path / d / "samples.csv").exists()


def test_init_labels_image_averages_the_image_classifiers_and_ignores_the_latent_one(models, tmp_path):
    """init_labels=image (self-training: the downstream classifiers of an earlier round read the pool): a tile's
    class is the argmax of the mean of the image classifiers' probabilities; the latent classifier is not asked.
    Constant classifiers make every tile one class: (0.8, 0.2) alone reads all as the first class, averaged with
    (0.1, 0.9) as the second, whatever the latent classifier says of each tile (it reads both classes)."""
    from histodiffusion.data.datasets import LatentDataset

    ds = LatentDataset(models["cache"], "train", sample=False)
    size = int(ds.meta.get("tile_size") or 16)
    dark = str(constant_image_classifier(tmp_path / "dark", ("dark", "pale"), size, 0.8))
    pale = str(constant_image_classifier(tmp_path / "pale", ("dark", "pale"), size, 0.1))
    for folders, cls in (((dark,), "dark"), ((dark, pale), "pale")):
        out = tmp_path / cls
        run(base_cfg(models, out, strength=0.5, n_per_class=len(ds), batch_size=8, classes=(cls,),
                     init_labels="image", init_image_classifier=folders))
        rows = read_rows(out)
        assert {r["init_id"] for r in rows} == {r["id"] for r in ds.rows} and {r["target"] for r in rows} == {cls}
        assert (f"starting tiles: dark {len(ds) if cls == 'dark' else 0}, pale {len(ds) if cls == 'pale' else 0} "
                f"of the {len(ds)} tiles of subset 'train', as read by {len(folders)} image classifier(s)"
                in (out / "log.txt").read_text())
    # the class no tile is read as cannot be started from: one error, nothing written
    with pytest.raises(HistoError, match="has no tile the image classifiers read as class 'pale'"):
        run(base_cfg(models, tmp_path / "none", strength=0.5, n_per_class=2, classes=("pale",),
                     init_labels="image", init_image_classifier=(dark,)))
    assert not (tmp_path / "none" / "samples.csv").exists()


def test_strength_refuses_validation_or_test_tiles(models, tmp_path):
    with pytest.raises(HistoError, match="init tiles must be train-split tiles: subset 'all' of .* holds 16 "):
        run(base_cfg(models, tmp_path / "s", strength=0.5, init_cache=str(models["cache"]), init_subset="all"))
    assert not (tmp_path / "s" / "samples.csv").exists() and not list((tmp_path / "s").glob("images/*.png"))


def test_ratio_counts(models):
    cfg = base_cfg(models, "unused", n_per_class=0, ratio=0.5, real_counts=str(models["cache"]), real_subset="train")
    plan = plan_samples(cfg, ["dark", "pale"])
    # 40 tiles, train = 3 of every 5 -> 24, alternating classes -> 12 per class -> 6 each at ratio 0.5
    assert sum(p["target"] == "dark" for p in plan) == 6 and sum(p["target"] == "pale" for p in plan) == 6
    assert [p["i"] for p in plan] == list(range(12))
    plan = plan_samples(dataclasses.replace(cfg, real_counts=str(models["data"]), ratio=2.0, classes=("1",)), ["dark", "pale"])
    assert len(plan) == 24 and {p["target"] for p in plan} == {"pale"}
    # without real_counts: the latent classifier's own cache
    plan = plan_samples(dataclasses.replace(cfg, real_counts=""), ["dark", "pale"], default_real=str(models["cache"]))
    assert len(plan) == 12
    with pytest.raises(HistoError, match="give n_per_class"):
        plan_samples(dataclasses.replace(cfg, real_counts=""), ["dark", "pale"])


@pytest.mark.parametrize("change,match", [
    ({"classes": ("tumour",)}, "not one of the latent classifier's classes"),
    ({"classes": ("5",)}, "not one of"),
    ({"guidance_window": (500, 100)}, "guidance_window"),
    ({"guidance_window": (0, 5000)}, "guidance_window"),
    ({"n_per_class": -1}, "n_per_class"),
    ({"n_per_class": 0, "ratio": 0.0, "real_counts": "x"}, "ratio must be positive"),
    ({"n_per_class": 0, "ratio": 0.01, "real_counts": "CACHE"}, "gives no samples"),
    ({"model": "/nonexistent/ldm"}, "LDM folder not found"),
    ({"classifier": "/nonexistent/clf"}, "latent classifier folder not found"),
    ({"scheduler": "euler"}, r"scheduler \(SampleConfig.scheduler\) must be one of ddim"),
    ({"scheduler": "dpmsolver++", "eta": 1.0}, "eta"),
    ({"strength": 0.0}, r"strength must be in \(0, 1\]"),
    ({"strength": 1.5}, r"strength must be in \(0, 1\]"),
    ({"strength": 0.05}, "runs no step"),
    ({"init_subset": "few"}, "only with strength < 1"),
    ({"init_labels": "classifier"}, "only with strength < 1"),
    ({"strength": 0.5, "init_labels": "kmeans"}, r"init_labels \(SampleConfig.init_labels\) must be one of tiles, classifier"),
    ({"strength": 0.5, "init_labels": "classifier", "init_top_share": 0.0}, r"init_top_share \(SampleConfig.init_top_share\) must be in \(0, 1\]"),
    ({"strength": 0.5, "init_top_share": 0.5}, "only used with init_labels=classifier"),
    ({"strength": 0.5, "init_labels": "ensemble"}, "init_labels=ensemble or image needs init_image_classifier"),
    ({"strength": 0.5, "init_labels": "image"}, "init_labels=ensemble or image needs init_image_classifier"),
    ({"strength": 0.5, "init_labels": "classifier", "init_image_classifier": ("x",)}, "used only with them"),
    ({"strength": 0.5, "init_labels": "image", "init_image_classifier": "x"}, "is a list: give"),
    ({"init_image_classifier": ("x",)}, "only with strength < 1"),
])
def test_bad_input(models, tmp_path, change, match):
    if change.get("real_counts") == "CACHE":
        change = {**change, "real_counts": str(models["cache"])}
    with pytest.raises(HistoError, match=match):
        run(dataclasses.replace(base_cfg(models, tmp_path / "s"), **change))
    assert not (tmp_path / "s" / "samples.csv").exists()


def test_classifier_of_another_autoencoder_refused(models, tmp_path, capsys):
    other = make_latent_classifier(tmp_path / "clf_other", models["cache"], models["ldm"] / "scheduler",
                                   vae_hash="0" * 64)
    with pytest.raises(HistoError, match="latent classifier .* holds latents of autoencoder 000000000000"):
        run(dataclasses.replace(base_cfg(models, tmp_path / "s"), classifier=str(other)))
    # through the CLI: one clear message, exit code 2
    code = cli_main(["sample", "--model", str(models["ldm"]), "--classifier", str(other), "--out",
                     str(tmp_path / "s2"), "--n-per-class", "1"])
    assert code == 2 and "latents of autoencoder 000000000000" in capsys.readouterr().err
