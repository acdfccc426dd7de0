"""The pretrained base: a versioned, checksummed latent diffusion model that `run` adapts.

A base folder has the layout of pretrain's exported model (so every stage that takes `--model`
takes a base), plus what makes it shippable:

    <base>/vae/        AutoencoderKL (save_pretrained, safetensors) + histodiffusion.json (scaling factor)
    <base>/unet_ema/   UNet2DModel, EMA weights
    <base>/scheduler/  the training noise scheduler
    <base>/histodiffusion.json   the LDM record (vae hash, scaling factor, latent shape, mixture) and
                                 "base": name, version, tile size, data, steps, measurements
    <base>/sources.csv every source image it was trained on (name, sha256): the leakage guard's input
    <base>/checksums.json        sha256 of every file above
    <base>/README.md   the model card

The UNet, autoencoder and scheduler load with plain diffusers (`UNet2DModel.from_pretrained(base /
"unet_ema")`, ...). `verify_base` is the one gate: missing file, foreign format_version, checksum
mismatch, or a UNet whose latent shape does not fit the autoencoder -> one HistoError naming it.

Stage `export-base` turns pretrain's model folder into a base (weights cast to fp16 by default).
"""
from __future__ import annotations

import shutil
from pathlib import Path

from . import FORMAT_VERSION, __version__
from .runtime.artifacts import LDM_SCHEDULER, LDM_UNET, LDM_VAE, MODEL_INFO
from .runtime.config import ExportBaseConfig
from .runtime.configtypes import config_to_dict
from .data.leakage import SOURCES_COLUMNS, SOURCES_CSV
from .runtime.errors import HistoError
from .runtime.fileio import (atomic_path, read_csv, read_json, sha256_file, write_csv_atomic, write_json_atomic,
                             write_text_atomic)
from .runtime.rundirs import check_format_version
from .runtime.log import get_logger

CHECKSUMS = "checksums.json"
CARD = "README.md"
BASE_FORMAT = 1  # bumped when the base layout changes
DEFAULT_BASE = "histodiffusion-base-64"
SHIPPED_DIR = Path(__file__).parent / "base"
REQUIRED = (f"{LDM_VAE}/config.json", f"{LDM_VAE}/{MODEL_INFO}", f"{LDM_UNET}/config.json",
            f"{LDM_SCHEDULER}/scheduler_config.json", MODEL_INFO, SOURCES_CSV)


# --------------------------------------------------------------------------------------------
# Finding and verifying a base
# --------------------------------------------------------------------------------------------
def resolve_base(spec: str) -> Path:
    """'default' -> the shipped base; a shipped base's name -> its folder; otherwise a path."""
    if spec in ("", "default"):
        spec = DEFAULT_BASE
    shipped = SHIPPED_DIR / spec
    if "/" not in spec and shipped.is_dir():
        return shipped
    path = Path(spec)
    if not path.is_dir():
        known = sorted(p.name for p in SHIPPED_DIR.iterdir() if p.is_dir()) if SHIPPED_DIR.is_dir() else []
        raise HistoError(f"base not found: {spec} (a base folder, or a shipped base: {known or 'none shipped'})")
    return path


def _checksummed_files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.name not in (CHECKSUMS, CARD) and not p.name.startswith("."))


def verify_base(folder: str | Path) -> dict:
    """Check a base folder and return its histodiffusion.json record plus "id" (sha256 of its checksums)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise HistoError(f"base folder not found: {folder}")
    for rel in REQUIRED + (CHECKSUMS,):
        if not (folder / rel).is_file():
            raise HistoError(f"base {folder} is incomplete: {rel} is missing")
    for sub in (LDM_VAE, LDM_UNET):
        if not any((folder / sub).glob("*.safetensors")):
            raise HistoError(f"base {folder} is incomplete: no *.safetensors in {sub}/")
    info = read_json(folder / MODEL_INFO, "base record")
    check_format_version(info, folder / MODEL_INFO)
    base = info.get("base") or {}
    if base.get("format") != BASE_FORMAT:
        raise HistoError(f"{folder / MODEL_INFO}: base format {base.get('format')!r}; this histodiffusion reads "
                         f"base format {BASE_FORMAT}")
    sums = read_json(folder / CHECKSUMS, "base checksums")
    files = sums.get("files") or {}
    present = set(_checksummed_files(folder))
    if present - set(files):
        raise HistoError(f"base {folder}: file {sorted(present - set(files))[0]} is not in {CHECKSUMS}")
    for rel, sha in sorted(files.items()):
        path = folder / rel
        if not path.is_file():
            raise HistoError(f"base {folder} is incomplete: {rel} (listed in {CHECKSUMS}) is missing")
        if sha256_file(path) != sha:
            raise HistoError(f"base {folder}: checksum mismatch for {rel} (corrupted or modified; "
                             f"expected sha256 {sha[:12]}...)")
    _check_shapes(folder, info)
    return {**info, "id": sha256_file(folder / CHECKSUMS), "path": str(folder)}


def _check_shapes(folder: Path, info: dict) -> None:
    """The UNet must take the autoencoder's latents: channels, and spatial size = tile size / f."""
    vae_cfg = read_json(folder / LDM_VAE / "config.json", "autoencoder config")
    unet_cfg = read_json(folder / LDM_UNET / "config.json", "UNet config")
    f = 2 ** (len(vae_cfg.get("block_out_channels", [])) - 1)
    tile = int(info.get("base", {}).get("tile_size") or vae_cfg.get("sample_size") or 0)
    want = [int(vae_cfg.get("latent_channels", 0)), tile // f, tile // f]
    got = [int(unet_cfg.get("in_channels", 0)), int(unet_cfg.get("sample_size", 0)), int(unet_cfg.get("sample_size", 0))]
    if got != want or list(info.get("latent_shape") or []) != want:
        raise HistoError(f"base {folder}: latent shape mismatch: the autoencoder makes {want} latents "
                         f"({tile} px tiles, f={f}), the UNet takes {got}, {MODEL_INFO} says {info.get('latent_shape')}")


# --------------------------------------------------------------------------------------------
# Stage export-base
# --------------------------------------------------------------------------------------------
def run(cfg: ExportBaseConfig) -> Path:
    import torch
    from diffusers import AutoencoderKL, UNet2DModel

    from .models.autoencoder import vae_id
    from .models.unet import load_scheduler

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
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        vae = AutoencoderKL.from_pretrained(str(src / LDM_VAE), torch_dtype=dtype)
        vae.save_pretrained(str(tmp / LDM_VAE), safe_serialization=True)
        shutil.copy2(src / LDM_VAE / MODEL_INFO, tmp / LDM_VAE / MODEL_INFO)
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
                                            "files": {rel: sha256_file(tmp / rel) for rel in _checksummed_files(tmp)}})
        write_text_atomic(tmp / CARD, model_card(record, tmp, Path(cfg.card_notes) if cfg.card_notes else None))
        verify_base(tmp)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    log.info("base %s v%s exported to %s (%.1f MB, %s)", cfg.name, cfg.version, out, size / 1e6, cfg.dtype)
    return out


def _dataset_summary(d: Path) -> dict:
    """Name, tile counts per split, scale and source files (name, sha256) of a prepared unlabeled dataset."""
    meta = read_json(d / "meta.json", "dataset meta")
    rows = read_csv(d / SOURCES_CSV, SOURCES_COLUMNS, "sources list")
    resolution = {k: v for k, v in (meta.get("resolution") or {}).items() if not isinstance(v, (dict, list))}
    return {"name": meta.get("name") or d.name, "tiles": meta.get("counts"), "resolution": resolution,
            "source_files": len(rows), "sources": rows}


def model_card(record: dict, folder: Path, notes: Path | None) -> str:
    """README.md of a base: what it is, what it saw, how it was trained, how to load it."""
    b = record["base"]
    unet = read_json(folder / LDM_UNET / "config.json", "UNet config")
    vae = read_json(folder / LDM_VAE / "config.json", "autoencoder config")
    vae_info = read_json(folder / LDM_VAE / MODEL_INFO, "autoencoder info")
    size = sum(p.stat().st_size for p in folder.rglob("*.safetensors")) / 1e6
    mix = ", ".join(f"{n} {w:.2f}" for n, w in zip(record.get("sources", []), record.get("weights", [])))
    lines = [
        f"# {b['name']} (version {b['version']})", "",
        "A latent diffusion base for histopathology, pretrained **without labels** for "
        "histodiffusion (HistoDiffusion, Ye et al., MICCAI 2023): a KL "
        f"autoencoder (f={2 ** (len(vae['block_out_channels']) - 1)}, {vae['latent_channels']} latent channels) "
        f"and an unconditional UNet on {record['latent_shape']} latents of {b['tile_size']} px H&E tiles. "
        "`histodiffusion run` adapts it to a small labeled set (latent classifier, decoder fine-tune, "
        "classifier-guided sampling).", "",
        "## Load it", "", "```python",
        "from diffusers import AutoencoderKL, UNet2DModel, DDIMScheduler",
        f"vae = AutoencoderKL.from_pretrained('{b['name']}/vae'); unet = UNet2DModel.from_pretrained('{b['name']}/unet_ema')",
        "```", "",
        "or `histodiffusion run --base PATH` (the shipped one is the default). Latents are `vae.encode(x).latent_dist"
        f".mean * {record['scaling_factor']:.5f}` (the scaling factor, also in `vae/config.json`).", "",
        "## Data (unlabeled)", "",
        "| dataset | tiles (train / held out) | source files | tiling |", "|---|---|---|---|"]
    for d in b["data"]:
        t = {k: sum(v.values()) for k, v in (d.get("tiles") or {}).items()}
        r = d.get("resolution") or {}
        lines.append(f"| {d['name']} | {t.get('unlabeled', 0)} / {t.get('holdout', 0)} | {d['source_files']} "
                     f"| {r.get('source_px') or r.get('patch_size') or '-'} px patches -> {r.get('tile_size')} px "
                     f"(nuclei {r.get('nucleus_px') or '?'} px) |")
    lines += ["", f"Mixture weights: {mix or 'proportional to size'}. Held-out groups were never trained on. "
              f"Every source file's sha256 is in `{SOURCES_CSV}` (the leakage guard refuses a target that shares one).",
              "", "## Training", "",
              f"- Autoencoder: widths {vae['block_out_channels']}, {vae_info.get('steps')} steps; held-out "
              f"{_fmt_metrics(vae_info.get('holdout_metrics'))}.",
              f"- UNet: widths {unet['block_out_channels']}, {record.get('steps')} steps, "
              f"{record.get('loss')} loss on {record.get('prediction_type')}, EMA weights.",
              f"- Weights: {b['dtype']} safetensors, {size:.1f} MB; checksums in `{CHECKSUMS}` (verified at load).", ""]
    if notes is not None:
        if not notes.is_file():
            raise HistoError(f"card_notes file not found: {notes}")
        lines += [notes.read_text().rstrip(), ""]
    return "\n".join(lines)


def _fmt_metrics(m: dict | None) -> str:
    if not m:
        return "metrics not recorded"
    return ", ".join(f"{k.upper()} {v:.3f}" for k, v in m.items())


def base_summary(info: dict) -> str:
    b = info.get("base", {})
    return f"{b.get('name')} v{b.get('version')} (id {info.get('id', '')[:12]}, {info.get('path')})"
