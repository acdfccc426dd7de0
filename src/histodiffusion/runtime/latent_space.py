"""The latent-space record: whose latents (the autoencoder's content hash), scaled by which factor, of
which shape, and, for a diffusion model or a latent classifier, under which noise schedule.

One fact, one place: the factor of an autoencoder is decided here (`of_autoencoder`: the one measured by
train-autoencoder, or an explicit --scaling-factor; a foreign autoencoder's diffusers default is never
trusted). `encode` writes the record once into its cache (latent_space.json); every later stage reads it
from there (`of_cache`) and a model trained on the cache carries it in its histodiffusion.json
(`LatentSpace.fields`, read back by `of_model`; a base has the same record). `check_compatible` is the
one comparison between two records; `decoder_factor` the one decision of the factor a decoder uses.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from .artifacts import MODEL_INFO
from .errors import HistoError
from .fileio import read_json, sha256_dir, write_json_atomic

LATENT_SPACE = "latent_space.json"  # in a latent cache
RECORD_FORMAT = 2  # format_version of latent_space.json (format 1 caches kept these fields in meta.json)
SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")  # the noise schedule
MEASURED, OVERRIDE = "vae", "override"  # where a factor came from


@dataclass(frozen=True)
class LatentSpace:
    vae_hash: str  # content hash of the autoencoder whose posterior made the latents (its encoder)
    scaling_factor: float  # z = posterior sample x scaling_factor; decode(z / scaling_factor)
    latent_shape: tuple[int, ...] = ()  # [C, h, w] (empty when unknown)
    vae: str = ""  # the autoencoder folder it was read from
    source: str = ""  # where the factor came from: "vae" (measured by train-autoencoder) or "override"
    schedule: tuple[tuple[str, object], ...] = ()  # SCHEDULE_KEYS of a model's noise scheduler

    def fields(self) -> dict:
        """What a model trained in this space stores in its histodiffusion.json."""
        return {"vae_hash": self.vae_hash, "scaling_factor": self.scaling_factor,
                "latent_shape": list(self.latent_shape)}

    def with_schedule(self, scheduler_config: dict) -> "LatentSpace":
        return LatentSpace(self.vae_hash, self.scaling_factor, self.latent_shape, self.vae, self.source,
                           tuple((k, scheduler_config[k]) for k in SCHEDULE_KEYS if k in scheduler_config))

    def with_shape(self, shape) -> "LatentSpace":
        return LatentSpace(self.vae_hash, self.scaling_factor, tuple(int(v) for v in shape), self.vae, self.source,
                           self.schedule)


# --------------------------------------------------------------------------------------------------
# Autoencoders
# --------------------------------------------------------------------------------------------------
def measured_factor(vae_dir: str | Path) -> float | None:
    """The factor train-autoencoder measured for this autoencoder folder, or None (a foreign VAE)."""
    path = Path(vae_dir) / MODEL_INFO
    if not path.is_file():
        return None
    sf = read_json(path, "autoencoder info").get("scaling_factor")
    return float(sf) if sf else None


def latent_hash(vae_dir: str | Path) -> str:
    """The hash naming the latent space of an autoencoder folder: its weights' content hash, or, for a
    folder written by finetune-decoder (new decoder, the untouched encoder of its base), its base's."""
    path = Path(vae_dir) / MODEL_INFO
    if path.is_file():
        base = read_json(path, "autoencoder info").get("base_vae_hash")
        if base:
            return str(base)
    return sha256_dir(vae_dir)


def of_autoencoder(vae_dir: str | Path, vae=None, override: float = 0.0) -> LatentSpace:
    """The latent space of an autoencoder: an explicit positive `override`, else the factor measured by
    train-autoencoder (its config.json must agree). A foreign autoencoder (no measured factor) needs the
    override: its diffusers default is never trusted."""
    if override < 0:
        raise HistoError(f"scaling_factor must be >= 0 (0: the autoencoder's measured one), got {override}")
    vae_dir = Path(vae_dir)
    if override > 0:
        return LatentSpace(latent_hash(vae_dir), float(override), vae=str(vae_dir), source=OVERRIDE)
    measured = measured_factor(vae_dir)
    if measured is None:
        raise HistoError(f"autoencoder {vae_dir} has no measured scaling factor ({MODEL_INFO} missing: not "
                         f"exported by train-autoencoder), and its config's default is not trusted; pass "
                         f"--scaling-factor explicitly")
    if vae is not None:
        cfg_sf = float(getattr(vae.config, "scaling_factor", 0.0) or 0.0)
        if not math.isclose(cfg_sf, measured, rel_tol=1e-6):
            raise HistoError(f"autoencoder {vae_dir}: config.json scaling_factor {cfg_sf} disagrees with "
                             f"{MODEL_INFO} ({measured}); re-export it")
    return LatentSpace(latent_hash(vae_dir), measured, vae=str(vae_dir), source=MEASURED)


def decoder_factor(vae_dir: str | Path, vae, space: LatentSpace) -> float:
    """The factor a decoder decodes `space`'s latents with, written into its config (the pipeline decodes
    with the config's): its measured one, which must be the space's, or, for a foreign decoder, the
    space's (the factor its latents were encoded with), never its diffusers default."""
    measured = measured_factor(vae_dir)
    if measured is not None and not math.isclose(measured, space.scaling_factor, rel_tol=1e-6):
        raise HistoError(f"autoencoder {vae_dir} has scaling factor {measured}, the latents it should decode "
                         f"were scaled by {space.scaling_factor}")
    vae.register_to_config(scaling_factor=float(space.scaling_factor))
    return float(space.scaling_factor)


# --------------------------------------------------------------------------------------------------
# Caches and models
# --------------------------------------------------------------------------------------------------
def write_cache_record(cache_dir: str | Path, space: LatentSpace) -> None:
    write_json_atomic(Path(cache_dir) / LATENT_SPACE, {
        "format_version": RECORD_FORMAT, "vae": space.vae, "vae_hash": space.vae_hash,
        "scaling_factor": space.scaling_factor, "scaling_source": space.source,
        "latent_shape": list(space.latent_shape)})


def of_cache(cache_dir: str | Path) -> LatentSpace:
    """The record encode wrote into a latent cache; a clear error for a cache made before it existed."""
    path = Path(cache_dir) / LATENT_SPACE
    if not path.is_file():
        raise HistoError(f"latent cache {cache_dir} has no {LATENT_SPACE}: it was made by an older histodiffusion "
                         f"(format 1); re-run encode into a new directory (or delete it)")
    d = read_json(path, "latent-space record")
    if d.get("format_version") != RECORD_FORMAT:
        raise HistoError(f"{path} has format_version {d.get('format_version')!r}, this histodiffusion reads "
                         f"{RECORD_FORMAT}: re-run encode")
    return LatentSpace(str(d["vae_hash"]), float(d["scaling_factor"]), tuple(d.get("latent_shape") or ()),
                       str(d.get("vae") or ""), str(d.get("scaling_source") or ""))


def of_model(model_dir: str | Path, what: str = "model") -> LatentSpace:
    """The record an LDM, a base or a latent classifier carries (histodiffusion.json), with the noise
    schedule of its scheduler/ folder or of its own record."""
    model_dir = Path(model_dir)
    info = read_json(model_dir / MODEL_INFO, f"{what} info")
    if not info.get("vae_hash") or not info.get("scaling_factor"):
        raise HistoError(f"{what} {model_dir}: {MODEL_INFO} names no autoencoder hash and scaling factor")
    space = LatentSpace(str(info["vae_hash"]), float(info["scaling_factor"]), tuple(info.get("latent_shape") or ()),
                        str(model_dir))
    sched_file = model_dir / "scheduler" / "scheduler_config.json"
    sched = json.loads(sched_file.read_text()) if sched_file.is_file() else info.get("scheduler") or {}
    return space.with_schedule(sched) if sched else space


def check_compatible(a: LatentSpace, b: LatentSpace, what_a: str, what_b: str) -> None:
    """One HistoError naming both sides when two records are not one latent space: another autoencoder,
    scaling factor, latent shape or noise schedule (shape and schedule compared when both know them)."""
    if a.vae_hash != b.vae_hash:
        raise HistoError(f"{what_a} holds latents of autoencoder {a.vae_hash[:12]}, {what_b} of {b.vae_hash[:12]}: "
                         f"they are not one latent space (encode / retrain with one autoencoder)")
    if not math.isclose(a.scaling_factor, b.scaling_factor, rel_tol=1e-6):
        raise HistoError(f"{what_a} scales latents by {a.scaling_factor}, {what_b} by {b.scaling_factor}: "
                         f"not one latent space")
    if a.latent_shape and b.latent_shape and tuple(a.latent_shape) != tuple(b.latent_shape):
        raise HistoError(f"{what_a} has latents of shape {list(a.latent_shape)}, {what_b} {list(b.latent_shape)}")
    sa, sb = dict(a.schedule), dict(b.schedule)
    diff = [k for k in SCHEDULE_KEYS if k in sa and k in sb and sa[k] != sb[k]]
    if diff:
        raise HistoError(f"{what_a} was trained with another noise schedule than {what_b} "
                         f"({', '.join(f'{k}={sa[k]} vs {sb[k]}' for k in diff)})")
