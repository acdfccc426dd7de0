"""Stage `encode`: cache the autoencoder's posterior (mean, std) of every tile of a dataset.

Layout (artifacts.py): index.csv, latents_NNNNN.safetensors ("mean", "std" float32 [N, C, h, w]),
subsets/ (from the dataset), meta.json (dataset, classes, count), latent_space.json (the latent-space
record: autoencoder hash, scaling factor, latent shape; latent_space.py), _COMPLETE.json last. z is
sampled from (mean, std) at load time (data/datasets.LatentDataset).

Streaming: one shard of latents is held in memory at a time. Atomic: everything goes into a
temporary directory renamed over the destination after the completion marker. Several processes
(torchrun / accelerate launch): rank r encodes shards r, r+W, r+2W, ... into the shared temporary
directory; rank 0 writes the index and meta and renames. A complete cache made with the same
autoencoder (content hash) and scaling is reused; a cache made with another one is an error.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from ..core.transforms import DIHEDRAL, dihedral
from ..runtime.artifacts import INDEX, INDEX_COLUMNS, META, SUBSETS_DIR, format_meta, latent_shard_name, read_dataset
from ..runtime.config import EncodeConfig
from ..runtime.configtypes import config_to_dict
from ..runtime.contract import completion_record
from ..runtime.distributed import make_accelerator, raise_if_any_rank_failed
from ..runtime.errors import HistoError
from ..runtime.fileio import read_csv, read_json, remove_path, write_csv_atomic, write_json_atomic
from ..runtime.log import closes_stage_logs, get_logger, progress
from ..runtime.rundirs import CONFIG_FILE, is_complete, mark_complete


def variant_id(tile_id: str, k: int) -> str:
    return tile_id if k == 0 else f"{tile_id}~d{k}"


def _check_existing(out: Path, space, data: Path, flips: bool, log) -> bool:
    """True when `out` is a complete cache of the same inputs (skip); error when it is of other inputs."""
    from ..runtime.latent_space import of_cache

    if not out.exists():
        return False
    if not is_complete(out):
        if any(out.iterdir()):
            raise HistoError(f"{out} exists and is not a latent cache; choose another --out or delete it")
        return False
    meta = read_json(out / META, "latent cache meta")
    old = of_cache(out)
    same = (old.vae_hash == space.vae_hash and abs(old.scaling_factor - space.scaling_factor) < 1e-9
            and meta.get("dataset") == str(data) and bool(meta.get("flips")) == flips)
    if not same:
        raise HistoError(f"latent cache {out} was made from {meta.get('dataset')} with autoencoder "
                         f"{old.vae_hash[:12]} (scaling {old.scaling_factor}); this run uses "
                         f"{data} with {space.vae_hash[:12]} (scaling {space.scaling_factor}). Use another --out or "
                         f"delete it")
    log.info("latent cache %s is complete and matches: skipped", out)
    return True


@closes_stage_logs
def run(cfg: EncodeConfig) -> Path:
    import torch
    from safetensors.torch import save_file

    from ..data.datasets import PixelDataset
    from ..runtime.latent_space import of_autoencoder
    from ..models.autoencoder import downsample_factor, encode_posterior, load_vae

    if cfg.batch_size < 1 or cfg.shard_size < 1:
        raise HistoError(f"batch_size and shard_size must be >= 1, got {cfg.batch_size}, {cfg.shard_size}")
    acc = make_accelerator("no")
    rank, world, main = acc.process_index, acc.num_processes, acc.is_main_process
    log = get_logger("encode", is_main=main)
    data, out = Path(cfg.data).resolve(), Path(cfg.out)
    ds_meta, _ = read_dataset(data)
    vae_dir = Path(cfg.vae).resolve()
    vae = load_vae(vae_dir)
    space = of_autoencoder(vae_dir, vae, cfg.scaling_factor)  # the one place a scaling factor is decided
    if _check_existing(out, space, data, cfg.flips, log):
        return out
    ds = PixelDataset(data, "all")
    tile = int(ds_meta.get("tile_size") or ds.uint8(0).shape[0])
    f = downsample_factor(vae.config.block_out_channels)
    if tile % f:
        raise HistoError(f"tile size {tile} of {data} is not divisible by the autoencoder's downsampling {f}")
    items = [(i, k) for i in range(len(ds)) for k in (range(DIHEDRAL) if cfg.flips else (0,))]
    shards = [items[s:s + cfg.shard_size] for s in range(0, len(items), cfg.shard_size)]
    tmp = out.parent / f".{out.name}.tmp-encode"
    if main:
        remove_path(tmp)
        tmp.mkdir(parents=True)
        write_json_atomic(tmp / CONFIG_FILE, {**format_meta(), "stage": "encode", "config": config_to_dict(cfg)})
        log = get_logger("encode", tmp / "log.txt")  # renamed into place with the cache
    acc.wait_for_everyone()
    log.info("encoding %d latents of %s in %d shard(s) with %d process(es)", len(items), data, len(shards), world)

    # 1. each rank encodes its shards (r, r+W, ...), one shard in memory at a time
    mine = list(range(rank, len(shards), world))
    bar = progress(total=sum(len(shards[s]) for s in mine), desc="encode", disable=not main,
                   log=log if main else None)
    try:
        with torch.inference_mode():
            for s in mine:
                means, stds = [], []
                for b in range(0, len(shards[s]), cfg.batch_size):
                    chunk = shards[s][b:b + cfg.batch_size]
                    x = torch.stack([dihedral(ds[i][0], k) for i, k in chunk])
                    m, sd = encode_posterior(vae, x)
                    means.append(m)
                    stds.append(sd)
                    bar.update(len(chunk))
                mean, std = torch.cat(means), torch.cat(stds)
                # one metadata key: safetensors writes a metadata map in random key order (bytes would vary)
                save_file({"mean": mean.contiguous(), "std": std.contiguous()}, str(tmp / latent_shard_name(s)),
                          metadata={"format_version": str(format_meta()["format_version"])})
        error = None
    except Exception as e:  # unreadable shard, ...: reported collectively, so no rank waits for this one
        error = e
    except BaseException:  # interrupt: leave no temporary cache behind
        remove_path(tmp)
        raise
    bar.close()
    try:
        raise_if_any_rank_failed(error, "encode")
    except BaseException:
        if main:
            remove_path(tmp)
        raise

    # 2. rank 0: index, subsets, meta, completion marker, rename into place
    if main:
        try:
            _finish(cfg, ds, ds_meta, data, space, shards, tmp, out)
        except BaseException:
            remove_path(tmp)
            raise
        log.info("latent cache written: %s (%d latents, scaling %.5f from %s)", out, len(items),
                 space.scaling_factor, space.source)
    acc.wait_for_everyone()
    return out


def _finish(cfg, ds, ds_meta, data, space, shards, tmp: Path, out: Path):
    from safetensors import safe_open

    from ..runtime.latent_space import write_cache_record

    with safe_open(str(tmp / latent_shard_name(0)), framework="pt") as fh:
        latent_shape = list(fh.get_slice("mean").get_shape()[1:])
    rows = []
    for s, shard in enumerate(shards):
        if not (tmp / latent_shard_name(s)).is_file():
            raise HistoError(f"latent shard {s} was not written to {tmp} (a process failed)")
        for j, (i, k) in enumerate(shard):
            r = ds.rows[i]
            rows.append({"id": variant_id(r["id"], k), "label": r["label"], "group": r["group"],
                         "split": r["split"], "shard": s, "index": j})
    write_csv_atomic(tmp / INDEX, rows, INDEX_COLUMNS)
    sub_dir = data / SUBSETS_DIR
    if sub_dir.is_dir():
        for p in sorted(sub_dir.glob("*.csv")):
            ids = [r["id"] for r in read_csv(p, ["id"], "subset file")]
            ks = range(DIHEDRAL) if cfg.flips else (0,)
            write_csv_atomic(tmp / SUBSETS_DIR / p.name, ({"id": variant_id(i, k)} for i in ids for k in ks), ["id"])
    meta = format_meta(dataset=str(data), dataset_name=ds_meta.get("name", data.name),
                       kind=ds_meta.get("kind", ""), classes=list(ds_meta.get("classes") or []),
                       tile_size=ds_meta.get("tile_size"), count=len(rows), shards=len(shards), flips=bool(cfg.flips))
    write_json_atomic(tmp / META, meta)
    write_cache_record(tmp, space.with_shape(latent_shape))  # the latent-space record, written once
    mark_complete(tmp, **completion_record(cfg), count=len(rows))
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out)
