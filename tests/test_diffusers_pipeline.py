"""diffusers_pipeline.py: the sample stage's pipeline/ folder loads with DiffusionPipeline.from_pretrained
and reproduces the stage's PNGs byte for byte for the same seeds; its vae/, unet/, scheduler/ load with
plain diffusers; the pipeline's arguments; the latent classifier's class names in its config; api.py."""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from histodiffusion import api
from histodiffusion.diffusers_pipeline import HistoDiffusionPipeline
from histodiffusion.runtime.config import SampleConfig
from histodiffusion.runtime.errors import HistoError
from histodiffusion.stages.sample import run

from helpers_sample import make_guided_chain, make_latent_classifier

SETTINGS = {"n_per_class": 3, "steps": 4, "scheduler": "ddim", "eta": 1.0, "scale": 3.0, "batch_size": 2,
            "guidance_window": (100, 900), "seed": 5}


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    d = tmp_path_factory.mktemp("pipe")
    c = make_guided_chain(d, n=20)
    c["samples"] = run(SampleConfig(model=str(c["ldm"]), classifier=str(c["clf"]), out=str(d / "samples"), **SETTINGS))
    return c


def rows_of(out: Path) -> list[dict]:
    with open(out / "samples.csv", newline="") as f:
        return list(csv.DictReader(f))


def call(pipe, rows, **kw):
    return pipe(class_labels=[r["target"] for r in rows], guidance_scale=SETTINGS["scale"],
                num_inference_steps=SETTINGS["steps"], eta=SETTINGS["eta"], guidance_window=SETTINGS["guidance_window"],
                generator=[torch.Generator().manual_seed(int(r["seed"])) for r in rows], **kw)


def png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_from_pretrained_reproduces_the_sample_stage_byte_for_byte(chain):
    from diffusers import DiffusionPipeline, DDIMScheduler

    out = chain["samples"]
    folder = out / "pipeline"
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "HistoDiffusionPipeline" and index["unet"] == ["diffusers", "UNet2DModel"]
    assert index["latent_classifier"] == ["histodiffusion.models.latent_classifier", "LatentClassifier"]
    assert (folder / "README.md").is_file()
    assert json.loads((folder / "histodiffusion.json").read_text())["kind"] == "pipeline"
    pipe = DiffusionPipeline.from_pretrained(str(folder))
    assert isinstance(pipe, HistoDiffusionPipeline) and isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.class_names == ["dark", "pale"] and pipe.scaling_factor == 1.5
    rows = rows_of(out)
    res = call(pipe, rows)
    assert res.class_labels == [r["target"] for r in rows]
    for img, r, c in zip(res.images, rows, res.confidence):
        assert png(img) == (out / r["file"]).read_bytes(), r["file"]
        assert f"{float(c):.6f}" == r["confidence"]
    # per-sample generators: an image does not depend on the batch it is in; np = the PNGs' values / 255
    last = call(pipe, rows[-1:], output_type="np").images
    assert last.dtype == np.float32 and np.array_equal(np.round(last[0] * 255).astype(np.uint8),
                                                       np.asarray(res.images[-1]))
    lat = call(pipe, rows[:1], output_type="latent").images
    assert tuple(lat.shape) == (1, 4, 8, 8)


def test_from_models_and_the_api_give_the_same_pipeline(chain, capsys):
    out = chain["samples"]
    rows = rows_of(out)[:2]
    pipe = HistoDiffusionPipeline.from_models(chain["ldm"], chain["clf"], scheduler="ddim")
    assert [png(i) for i in call(pipe, rows).images] == [(out / r["file"]).read_bytes() for r in rows]
    for p in (api.load_pipeline(out / "pipeline"), api.load_pipeline(model=chain["ldm"], classifier=chain["clf"],
                                                                      scheduler="ddim")):
        assert [png(i) for i in call(p, rows).images] == [(out / r["file"]).read_bytes() for r in rows]
    assert "\r" not in capsys.readouterr().err  # diffusers' loading bar is off where stderr is not a terminal
    with pytest.raises(HistoError, match="model= and classifier="):
        api.load_pipeline(model=chain["ldm"])


def test_api_sample_equals_the_stage(chain, tmp_path):
    out = api.sample(model=str(chain["ldm"]), classifier=str(chain["clf"]), out=str(tmp_path / "s"), **SETTINGS)
    assert (out / "samples.csv").read_bytes() == (chain["samples"] / "samples.csv").read_bytes()
    with pytest.raises(HistoError, match="scheduler"):
        api.config("sample", scheduler="euler")
    with pytest.raises(HistoError, match="unknown stage"):
        api.config("paint")


def test_components_load_with_plain_diffusers(chain):
    folder = chain["samples"] / "pipeline"
    code = ("import sys\nfrom diffusers import AutoencoderKL, DDIMScheduler, UNet2DModel\n"
            f"p = {str(folder)!r}\n"
            "AutoencoderKL.from_pretrained(p + '/vae'); UNet2DModel.from_pretrained(p + '/unet')\n"
            "DDIMScheduler.from_pretrained(p + '/scheduler')\n"
            "assert not [m for m in sys.modules if m.startswith('histodiffusion')]\nprint('ok')\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


def test_pipeline_arguments_are_checked(chain):
    from diffusers import DPMSolverMultistepScheduler

    pipe = HistoDiffusionPipeline.from_models(chain["ldm"], chain["clf"], scheduler="ddim")
    g = [torch.Generator().manual_seed(0)]
    for kw, match in [({"class_labels": ["tumour"]}, "not one of the latent classifier's classes"),
                      ({"class_labels": [2]}, "not one of"),
                      ({"class_labels": []}, "empty"),
                      ({"class_labels": ["dark", "pale"]}, "2 class labels"),
                      ({"class_labels": ["dark"], "output_type": "png"}, "output_type"),
                      ({"class_labels": ["dark"], "guidance_window": (500, 5000)}, "guidance_window")]:
        with pytest.raises(HistoError, match=match):
            pipe(generator=g, num_inference_steps=2, **kw)
    # starting tiles (image=): checked before anything runs
    from PIL import Image

    size = pipe.tile_size
    tile = np.full((size, size, 3), 120, np.uint8)
    for kw, match in [({"image": tile[None]}, "strength must be below 1"),
                      ({"strength": 0.5}, "needs image or init_latents"),
                      ({"strength": 0.5, "image": np.stack([tile, tile])}, "2 tiles for 1 class labels"),
                      ({"strength": 0.5, "image": tile[None, :-2, :-2]}, f"{size - 2}x{size - 2} px tiles"),
                      ({"strength": 0.5, "image": tile[None].astype(np.float32)}, "uint8 RGB tiles"),
                      ({"strength": 0.5, "image": [Image.fromarray(tile).convert("RGBA")]}, "mode RGBA"),
                      ({"strength": 0.5, "init_latents": torch.zeros(1, 4, 8, 8), "detail": True}, "give image="),
                      ({"strength": 0.5, "image": tile[None], "color_match": True, "output_type": "latent"},
                       "output_type 'latent'")]:
        with pytest.raises(HistoError, match=match):
            pipe(class_labels=["dark"], generator=g, num_inference_steps=2, **kw)
    one = pipe(class_labels=["dark"], generator=torch.Generator().manual_seed(1), num_inference_steps=2, strength=0.5,
               image=[Image.fromarray(tile)], detail=True, color_match=True, output_type="np").images
    assert one.shape == (1, size, size, 3) and np.allclose(one.mean((1, 2)), 120 / 255, atol=1e-3)  # the tile's colour
    # indices, digit strings and a single generator work; eta is passed only to a scheduler that takes it
    assert pipe(class_labels=[1, "0"], num_inference_steps=2, generator=torch.Generator().manual_seed(1),
                output_type="latent").class_labels == ["pale", "dark"]
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(HistoError, match="takes no eta"):
        pipe(class_labels=["dark"], generator=g, num_inference_steps=2, eta=1.0)


def test_latent_classifier_class_names_in_config(chain, tmp_path):
    from histodiffusion.models.latent_classifier import LatentClassifier, load_latent_classifier

    # a folder exported before the names were in the config reads them from histodiffusion.json
    old = Path(shutil.copytree(chain["clf"], tmp_path / "old"))
    cfg = json.loads((old / "config.json").read_text())
    cfg.pop("class_names")
    (old / "config.json").write_text(json.dumps(cfg))
    model, info, _ = load_latent_classifier(old)
    assert model.config.class_names == ["dark", "pale"] == info["classes"]
    saved = chain["samples"] / "pipeline" / "latent_classifier"
    assert json.loads((saved / "config.json").read_text())["class_names"] == ["dark", "pale"]
    assert LatentClassifier.from_pretrained(str(saved)).config.class_names == ["dark", "pale"]
    assert load_latent_classifier(saved)[1]["classes"] == ["dark", "pale"]  # also a histodiffusion model folder
    # names that contradict histodiffusion.json, or do not match the outputs, are refused
    bad = make_latent_classifier(tmp_path / "bad", chain["cache"], chain["ldm"] / "scheduler",
                                 model=LatentClassifier(in_channels=4, num_classes=2, width=16, depth=2,
                                                        class_names=["pale", "dark"]))
    with pytest.raises(HistoError, match="class_names"):
        load_latent_classifier(bad)
    with pytest.raises(HistoError, match="3 class names"):
        LatentClassifier(num_classes=2, class_names=["a", "b", "c"])
