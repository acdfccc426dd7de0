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

Stage `export-base` (stages/export_base.py) turns pretrain's model folder into a base (weights cast to fp16 by
default); its model card is models/cards.py's `base_card`.
"""
from __future__ import annotations

from pathlib import Path

from ..data.leakage import SOURCES_CSV
from ..runtime.artifacts import LDM_SCHEDULER, LDM_UNET, LDM_VAE, MODEL_INFO
from ..runtime.errors import HistoError
from ..runtime.fileio import read_json, sha256_file
from ..runtime.rundirs import check_format_version
from .autoencoder import downsample_factor
from .cards import CARD

CHECKSUMS = "checksums.json"
BASE_FORMAT = 1  # bumped when the base layout changes
DEFAULT_BASE = "histodiffusion-base-64"
SHIPPED_DIR = Path(__file__).parent.parent / "base"
REQUIRED = (f"{LDM_VAE}/config.json", f"{LDM_VAE}/{MODEL_INFO}", f"{LDM_UNET}/config.json",
            f"{LDM_SCHEDULER}/scheduler_config.json", MODEL_INFO, SOURCES_CSV)


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


def checksummed_files(folder: Path) -> list[str]:
    """The files of a base that checksums.json lists (all but itself, the card and hidden files)."""
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
    present = set(checksummed_files(folder))
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
    f = downsample_factor(vae_cfg.get("block_out_channels", []))
    tile = int(info.get("base", {}).get("tile_size") or vae_cfg.get("sample_size") or 0)
    want = [int(vae_cfg.get("latent_channels", 0)), tile // f, tile // f]
    got = [int(unet_cfg.get("in_channels", 0)), int(unet_cfg.get("sample_size", 0)), int(unet_cfg.get("sample_size", 0))]
    if got != want or list(info.get("latent_shape") or []) != want:
        raise HistoError(f"base {folder}: latent shape mismatch: the autoencoder makes {want} latents "
                         f"({tile} px tiles, f={f}), the UNet takes {got}, {MODEL_INFO} says {info.get('latent_shape')}")


def base_summary(info: dict) -> str:
    """One line naming a verified base: name, version, id, folder."""
    b = info.get("base", {})
    return f"{b.get('name')} v{b.get('version')} (id {info.get('id', '')[:12]}, {info.get('path')})"
