"""Pretraining throughput: latent cache vs encoding every batch through the autoencoder, and the
peak memory of reading the cache at 1x and 10x corpus size.

    .venv/bin/python bench/pretrain_throughput.py [--work /tmp/bench_pretrain] [--steps 30] [--batch 32]

1. Data: the unlabeled H&E images of ../shared/data/unlabeled_he tiled to 64 px without overlap
   (tiles at least half tissue), or, when absent, synthetic H&E-like tiles (said so in the output).
2. Autoencoder: the default AutoencoderConfig architecture (f=4, --latent-channels, default 8 as the shipped
   base; untrained: speed
   does not depend on the weights), exported with a measured scaling factor; the corpus is encoded.
3. Throughput, same UNet (default PretrainConfig), same loop, same machine:
   a) cache: z sampled from the cached (mean, std) -- this package's design;
   b) on the fly: every batch read as pixels and encoded by the autoencoder (no grad) at each step
      -- the reference implementation's design.
4. Memory: a child process reads one full epoch of a cache through the training loader, at 1x and at
   10x the corpus (the shards replicated under new ids); its peak RSS is printed.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("HISTODIFFUSION_SHARED", REPO.parent / "shared" / "data")) / "unlabeled_he"


def tile_images(out: Path, size: int = 64) -> tuple[Path, str]:
    from PIL import Image

    from histodiffusion.data.writer import DatasetWriter

    if (out / "_COMPLETE.json").is_file():
        return out, "cached"
    w = DatasetWriter(out, size)
    files = sorted(SHARED.glob("*")) if SHARED.is_dir() else []
    n = 0
    for f in files:
        Image.MAX_IMAGE_PIXELS = None
        img = np.asarray(Image.open(f).convert("RGB"))
        hsv = np.asarray(Image.fromarray(img).convert("HSV"))
        tissue = (img.mean(-1) < 220) & (hsv[..., 1] / 255.0 > 0.07)
        for y in range(0, img.shape[0] - size + 1, size):
            for x in range(0, img.shape[1] - size + 1, size):
                if tissue[y:y + size, x:x + size].mean() >= 0.5:
                    w.add(np.ascontiguousarray(img[y:y + size, x:x + size]), id=f"{f.stem}_{x}_{y}",
                          source=f.name, x=x, y=y, width=size, height=size, split="unlabeled")
                    n += 1
    what = f"{n} real 64 px tiles from {SHARED}"
    if n == 0:
        sys.path.insert(0, str(REPO / "tests"))
        from helpers_pretrain import he_like_tiles

        for i, t in enumerate(he_like_tiles(860, size)):
            w.add(t, id=f"synth_{i}", source="synthetic", split="unlabeled")
        what = "860 synthetic H&E-like tiles (shared data absent)"
    w.finish({"name": "unlabeled", "kind": "unlabeled", "classes": [], "tile_size": size})
    return out, what


def make_vae_and_cache(work: Path, data: Path, latent_channels: int = 8) -> Path:
    from histodiffusion.runtime.config import AutoencoderConfig, EncodeConfig
    from histodiffusion.data.datasets import PixelDataset
    from histodiffusion.stages.encode import run as encode
    from histodiffusion.models.autoencoder import build_vae_from_config, save_vae
    from histodiffusion.stages.train_autoencoder import measure_scaling_factor

    cache = work / "cache"
    if (cache / "_COMPLETE.json").is_file():
        return cache
    torch.manual_seed(0)
    vae = build_vae_from_config(AutoencoderConfig(latent_channels=latent_channels), 64)
    sf = measure_scaling_factor(vae, PixelDataset(data), "cpu", max_items=256)
    save_vae(vae, work / "vae", sf, trained_on=["bench (untrained)"])
    t = time.time()
    encode(EncodeConfig(data=str(data), vae=str(work / "vae"), out=str(cache)))
    print(f"encode: {json.loads((cache / 'meta.json').read_text())['count']} tiles in {time.time() - t:.1f} s")
    return cache


def throughput(mode: str, data: Path, cache: Path, work: Path, steps: int, batch: int) -> tuple[float, float]:
    """(images per wall-clock second, images per CPU second of this process) of `steps` training steps."""
    from histodiffusion.runtime.config import PretrainConfig
    from histodiffusion.data.datasets import LatentDataset, PixelDataset
    from histodiffusion.data.mixture import EpochIndex, MixtureDataset, make_loader
    from histodiffusion.models.autoencoder import load_vae
    from histodiffusion.models.unet import build_scheduler_from_config, build_unet_from_config
    from histodiffusion.stages.pretrain import diffusion_loss

    cfg = PretrainConfig()
    lat = LatentDataset(cache)
    torch.manual_seed(0)
    unet = build_unet_from_config(cfg, lat.space.latent_shape).train()
    noise_s = build_scheduler_from_config(cfg)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr)
    src = lat if mode == "cache" else PixelDataset(data)
    vae = load_vae(work / "vae") if mode == "pixels" else None
    sf = lat.scaling_factor
    batches = make_loader(MixtureDataset([src], ["u"]), EpochIndex([len(src)], [], batch), 0)
    t0, n = None, 0
    for i in range(steps + 3):  # 3 warm-up steps
        if i == 3:
            t0, c0, n = time.perf_counter(), time.process_time(), 0
        x, _, _ = next(batches)
        if vae is not None:
            with torch.no_grad():
                post = vae.encode(x).latent_dist
                x = post.sample() * sf
        nz = torch.randn_like(x)
        t = torch.randint(0, 1000, (len(x),))
        loss = diffusion_loss(unet(noise_s.add_noise(x, nz, t), t).sample, nz, cfg.loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        n += len(x)
    return n / (time.perf_counter() - t0), n / (time.process_time() - c0)


def replicate_cache(cache: Path, out: Path, times: int) -> Path:
    """A cache holding the shards of `cache` `times` times (hard links), ids made unique."""
    from histodiffusion.runtime.fileio import read_csv, write_csv_atomic

    if (out / "_COMPLETE.json").is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    meta = json.loads((cache / "meta.json").read_text())
    rows = read_csv(cache / "index.csv")
    shards = sorted(cache.glob("latents_*.safetensors"))
    new_rows = []
    for k in range(times):
        for j, s in enumerate(shards):
            os.link(s, out / f"latents_{k * len(shards) + j:05d}.safetensors")
        new_rows += [{**r, "id": f"{r['id']}#{k}", "shard": int(r["shard"]) + k * len(shards)} for r in rows]
    write_csv_atomic(out / "index.csv", new_rows, list(rows[0].keys()))
    meta.update(count=len(new_rows), shards=len(shards) * times)
    (out / "meta.json").write_text(json.dumps(meta))
    shutil.copy(cache / "_COMPLETE.json", out / "_COMPLETE.json")
    return out


def _status_mib(key: str = "VmHWM") -> float:
    """A /proc/self/status memory figure in MiB. VmHWM = peak RSS (unlike ru_maxrss it is not
    inherited from the parent); RssAnon = private memory; RssFile = mapped file pages (the mmap'ed
    shards: page cache the kernel can drop, not memory the process holds)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def read_epoch_child(cache: str) -> None:
    """(child) read one epoch through the training loader; print peak RSS in MiB and items read."""
    from histodiffusion.data.datasets import LatentDataset
    from histodiffusion.data.mixture import EpochIndex, MixtureDataset, make_loader

    base, base_anon = _status_mib("VmHWM"), _status_mib("RssAnon")
    ds = LatentDataset(cache)
    idx = EpochIndex([len(ds)], [], 64)
    it = make_loader(MixtureDataset([ds], ["u"]), idx, 0)
    n, anon = 0, 0.0
    for _ in range(idx.batches_per_epoch):
        n += len(next(it)[0])
        anon = max(anon, _status_mib("RssAnon"))
    print(json.dumps({"items": n, "peak_rss_mib": round(_status_mib("VmHWM"), 1), "rss_before_mib": round(base, 1),
                      "peak_anon_mib": round(anon, 1), "anon_before_mib": round(base_anon, 1),
                      "file_mib": round(_status_mib("RssFile"), 1)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/bench_pretrain")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--latent-channels", type=int, default=8, help="autoencoder latent channels (the base: 8)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default); 1 gives the "
                   "cleanest CPU-second figures on a loaded machine")
    p.add_argument("--child", default="")
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if a.child:
        return read_epoch_child(a.child)
    if a.threads:
        torch.set_num_threads(a.threads)
    work = Path(a.work)
    data, what = tile_images(work / "data")
    print(f"data: {what}; torch threads: {torch.get_num_threads()}")
    cache = make_vae_and_cache(work, data, a.latent_channels)
    shape = json.loads((cache / "latent_space.json").read_text())["latent_shape"]
    print(f"latents {shape}, UNet = PretrainConfig defaults, batch {a.batch}, {a.steps} timed steps each")
    res: dict[str, list[float]] = {"cache": [], "pixels": []}
    cpu: dict[str, list[float]] = {"cache": [], "pixels": []}
    for _ in range(a.rounds):  # interleaved rounds: load drift on a shared machine hits both alike
        for m in res:
            wall, per_cpu = throughput(m, data, cache, work, a.steps, a.batch)
            res[m].append(round(wall, 1))
            cpu[m].append(round(per_cpu, 1))
            print(f"  round {len(res[m])} {m}: {wall:.1f} img/s wall, {per_cpu:.1f} img per CPU-second", flush=True)
    med = {m: float(np.median(v)) for m, v in res.items()}
    medc = {m: float(np.median(v)) for m, v in cpu.items()}
    print(f"throughput with the latent cache:          {med['cache']:.1f} img/s (rounds {res['cache']})")
    print(f"throughput encoding every batch (pixels): {med['pixels']:.1f} img/s (rounds {res['pixels']})")
    print(f"ratio cache / on-the-fly (median wall-clock img/s): {med['cache'] / med['pixels']:.2f}x")
    print(f"ratio cache / on-the-fly (median img per CPU-second, robust to other load): "
          f"{medc['cache'] / medc['pixels']:.2f}x")
    for times in (1, 10):
        c = cache if times == 1 else replicate_cache(cache, work / "cache_x10", times)
        r = subprocess.run([sys.executable, __file__, "--child", str(c)], capture_output=True, text=True, check=True)
        m = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"read one epoch at {times:>2}x corpus ({m['items']} latents): peak RSS {m['peak_rss_mib']} MiB "
              f"(+{m['peak_rss_mib'] - m['rss_before_mib']:.1f} over the set-up); private memory (RssAnon) "
              f"peak {m['peak_anon_mib']} MiB (+{m['peak_anon_mib'] - m['anon_before_mib']:.1f}); "
              f"mapped shard pages (RssFile, reclaimable) {m['file_mib']} MiB")


if __name__ == "__main__":
    main()
