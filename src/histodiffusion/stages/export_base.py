"""Stage `export-base`: pretrain's model folder -> a shippable base (models/base.py describes its layout):
weights cast to fp16 by default, the sources it saw, checksums of every file and a model card; the result is
checked by `verify_base` before it is renamed into place.
"""
from __future__ import annotations

import math
import shutil
from pathlib import Path

from .. import FORMAT_VERSION, __version__
from ..data.leakage import SOURCES_COLUMNS, SOURCES_CSV
from ..models.base import BASE_FORMAT, CHECKSUMS, checksummed_files, verify_base
from ..models.cards import CARD, base_card
from ..runtime.artifacts import LDM_SCHEDULER, LDM_UNET, LDM_VAE, MODEL_INFO
from ..runtime.config import ExportBaseConfig
from ..runtime.configtypes import config_to_dict
from ..runtime.errors import HistoError
from ..runtime.fileio import (atomic_path, read_csv, read_json, sha256_file, write_csv_atomic, write_json_atomic,
                              write_text_atomic)
from ..runtime.log import get_logger
from ..runtime.rundirs import check_format_version


def run(cfg: ExportBaseConfig) -> Path:
    import torch
    from diffusers import AutoencoderKL, UNet2DModel

    from ..models.autoencoder import vae_id
    from ..models.unet import load_scheduler

    log = get_logger("histodiffusion.export_base")
    src, out = Path(cfg.model), Path(cfg.out)
    if cfg.dtype not in ("fp16", "fp32"):
        raise HistoError(f"dtype must be fp16 or fp32, not {cfg.dtype!r}")
    for rel in (LDM_UNET, LDM_SCHEDULER, LDM_VAE, MODEL_INFO):
        if not (src / rel).exists():
            raise HistoError(f"{src} is not an exported LDM folder of pretrain: {rel} is missing")
    ldm = read_json(src / MODEL_INFO, "LDM info")
    check_format_version(ldm, src / MODEL_INFO)
    datasets = [_dataset_summary(Path(d)) for d in cfg.data]
    dtype = torch.float16 if cfg.dtype == "fp16" else torch.float32
    vae_dir = check_same_encoder(src / LDM_VAE, Path(cfg.vae), dtype) if cfg.vae else src / LDM_VAE
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        vae = AutoencoderKL.from_pretrained(str(vae_dir), torch_dtype=dtype)
        vae.save_pretrained(str(tmp / LDM_VAE), safe_serialization=True)
        shutil.copy2(vae_dir / MODEL_INFO, tmp / LDM_VAE / MODEL_INFO)
        unet = UNet2DModel.from_pretrained(str(src / LDM_UNET), torch_dtype=dtype)
        unet.save_pretrained(str(tmp / LDM_UNET), safe_serialization=True)
        load_scheduler(src / LDM_SCHEDULER).save_pretrained(str(tmp / LDM_SCHEDULER))
        sources = [{"path": f"{d['name']}/{Path(r['path']).name}", "sha256": r["sha256"]}
                   for d in datasets for r in d.pop("sources")]
        write_csv_atomic(tmp / SOURCES_CSV, sources, SOURCES_COLUMNS)
        vae_cfg = read_json(tmp / LDM_VAE / "config.json", "autoencoder config")
        record = {**ldm, "vae": LDM_VAE, "vae_hash": vae_id(tmp / LDM_VAE), "format_version": FORMAT_VERSION,
                  "base": {"format": BASE_FORMAT, "name": cfg.name, "version": cfg.version, "dtype": cfg.dtype,
                           "tile_size": int(vae_cfg["sample_size"]), "data": datasets,
                           "exported_from": str(src.resolve()), "histodiffusion": __version__,
                           "config": config_to_dict(cfg)}}
        record.pop("caches", None)  # machine-local paths of the build: the card and "data" say what it saw
        write_json_atomic(tmp / MODEL_INFO, record)
        write_json_atomic(tmp / CHECKSUMS, {"algorithm": "sha256",
                                            "files": {rel: sha256_file(tmp / rel) for rel in checksummed_files(tmp)}})
        write_text_atomic(tmp / CARD, base_card(record, tmp, Path(cfg.card_notes) if cfg.card_notes else None))
        verify_base(tmp)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    log.info("base %s v%s exported to %s (%.1f MB, %s)", cfg.name, cfg.version, out, size / 1e6, cfg.dtype)
    return out


def check_same_encoder(model_vae: Path, new_vae: Path, dtype) -> Path:
    """`new_vae` (replacing the model's autoencoder) after checking that its encoder, quant_conv and scaling factor
    are the model's at the stored dtype: the UNet was trained on those latents, so only the decoder may differ."""
    import torch

    from ..models.autoencoder import load_vae

    old, new = load_vae(model_vae), load_vae(new_vae)
    a = {k: v.to(dtype) for k, v in old.state_dict().items()}
    b = {k: v.to(dtype) for k, v in new.state_dict().items()}
    enc = [k for k in a if k.startswith(("encoder.", "quant_conv."))]
    differ = [k for k in enc if k not in b or a[k].shape != b[k].shape or not torch.equal(a[k], b[k])]
    if differ or set(a) != set(b):
        raise HistoError(f"--vae {new_vae}: its encoder differs from the one the UNet of {model_vae.parent} was trained "
                         f"on ({len(differ) or 'other'} tensors, e.g. {(differ or sorted(set(a) ^ set(b)))[0]}); only a "
                         f"decoder trained with train-autoencoder --train-part decoder --init-from can replace it")
    if not math.isclose(old.config.scaling_factor, new.config.scaling_factor, rel_tol=1e-6):
        raise HistoError(f"--vae {new_vae}: scaling factor {new.config.scaling_factor} is not the model's "
                         f"{old.config.scaling_factor}")
    return new_vae


def _dataset_summary(d: Path) -> dict:
    """Name, tile counts per split, scale and source files (name, sha256) of a prepared unlabeled dataset."""
    meta = read_json(d / "meta.json", "dataset meta")
    rows = read_csv(d / SOURCES_CSV, SOURCES_COLUMNS, "sources list")
    resolution = {k: v for k, v in (meta.get("resolution") or {}).items() if not isinstance(v, (dict, list))}
    return {"name": meta.get("name") or d.name, "tiles": meta.get("counts"), "resolution": resolution,
            "source_files": len(rows), "sources": rows}
