"""Stage `prepare`: slides / images / labeled patches -> a dataset directory (see artifacts.py).

Unlabeled (`sources`): every slide or image is tiled with tissue detection (data/slides.py); each
tile keeps its source and level-0 coordinates; split "unlabeled", group = source image.
Labeled (`labels_csv` with path,label[,group_id], or `class_folders` <root>/<class>/*.tif): each
patch is centre-cropped to a square and resized to tile_size; the split (train/val/test) is
stratified by class and assigned by group with a fixed seed; few-shot subsets of train are written
to subsets/<name>.csv. `unlabeled_tiles` adds the same cohort's unlabeled tiles to a labeled dataset: train
split only, label "", each its own group `unlabeled/<path>` (never in a few-shot subset), for the stages
that use train tiles without their labels (sample --init-labels classifier, finetune-decoder
--unlabeled-subset, pretrain --subset train).

Tiles stream into pixel shards (data/writer.py) in a temporary directory renamed into place at the
end, with sources.csv (sha256 of every source file) and meta.json. Unreadable files inside a folder
or a labels CSV are skipped and counted (--strict true makes them errors), as are slides in a source
folder that are smaller than one patch; an explicitly named bad source, a missing file, an unknown
label, a refused image mode or a labeled patch smaller than tile_size is always an error.
"""
from __future__ import annotations

import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from .. import FORMAT_VERSION, __version__
from ..data import default, scale, slides
from ..data.leakage import SOURCES_COLUMNS, SOURCES_CSV, find_overlap
from ..data.resolution import resolution_record, scale_warnings
from ..data.splits import fewshot_groups, group_labels, holdout_groups, split_groups
from ..data.writer import DatasetWriter
from ..runtime.artifacts import UNLABELED_SPLIT
from ..runtime.config import PrepareConfig
from ..runtime.configtypes import config_to_dict
from ..runtime.contract import completion_record
from ..runtime.errors import HistoError
from ..runtime.fileio import read_csv, read_json, sha256_file, write_csv_atomic, write_json_atomic
from ..runtime.log import closes_stage_logs, get_logger, progress
from ..runtime.rundirs import CONFIG_FILE, comparable_config, ensure_writable, is_complete

UNLABELED_TILE_PREFIX = "unlabeled/"  # ids and groups of the cohort's unlabeled tiles in a labeled dataset
MAX_LISTED_SKIPS = 200  # meta.json lists this many skipped files (the count is always complete)
SHOWN_SKIPS = 5  # the warning names this many


class _Skips:
    def __init__(self, strict: bool, log):
        self.strict, self.log, self.items, self.count = strict, log, [], 0

    def add(self, path, reason: str) -> None:
        if self.strict:
            raise HistoError(f"{reason} (--strict true; use --strict false to skip such files)")
        self.count += 1
        if len(self.items) < MAX_LISTED_SKIPS:
            self.items.append({"path": str(path), "reason": reason})

    def summary(self) -> dict:
        if self.count:
            reasons = Counter(i["reason"].split(":")[0] for i in self.items)
            names = ", ".join(Path(i["path"]).name for i in self.items[:SHOWN_SKIPS])
            more = f" and {self.count - SHOWN_SKIPS} more" if self.count > SHOWN_SKIPS else ""
            self.log.warning(f"skipped {self.count} unreadable file(s): {names}{more} ({dict(reasons)}); "
                             f"listed in meta.json")
        return {"count": self.count, "files": self.items}


class _Contents:
    """Byte-identical files among image inputs: a file named twice by the user is an error; a copy found
    inside a folder (many public sets hold some) is skipped and listed."""

    def __init__(self, what: str):
        self.what, self.seen, self.duplicates = what, {}, []

    def copy(self, f: Path, sha: str, explicit: bool) -> bool:
        """True (and listed) if f repeats an earlier file's content sha; an error if f was named explicitly."""
        if sha not in self.seen:
            self.seen[sha] = f
            return False
        if explicit:
            raise HistoError(f"{self.what} {f} has the same content as {self.seen[sha]} (given twice?)")
        self.duplicates.append(f"{f.name} (= {self.seen[sha].name})")
        return True


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------
def _labeled_entries(cfg: PrepareConfig, skips: _Skips) -> tuple[Path, list[tuple[Path, str, str, str]]]:
    """(root, [(file, relative path, label, group)]) from labels_csv or class_folders."""
    if cfg.labels_csv:
        csv_path = default.labels_csv() if cfg.labels_csv == "default" else Path(cfg.labels_csv)
        rows = read_labels_csv(csv_path)
        root, allowed, out = csv_path.parent, set(cfg.classes), []
        for i, r in enumerate(rows, start=2):
            rel, label = (r.get("path") or "").strip(), (r.get("label") or "").strip()
            if not rel or not label:
                raise HistoError(f"labels CSV {csv_path} line {i}: empty path or label")
            if allowed and label not in allowed:
                raise HistoError(f"labels CSV {csv_path} line {i}: label {label!r} of {rel} is not a class; "
                                 f"classes: {sorted(allowed)}")
            f = root / rel
            if not f.is_file():
                raise HistoError(f"labels CSV {csv_path} line {i}: missing file {f}")
            out.append((f, rel, label, (r.get("group_id") or "").strip() or rel))
        return root, out
    root = Path(cfg.class_folders)
    if not root.is_dir():
        raise HistoError(f"class folder root not found: {root}")
    dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not dirs:
        raise HistoError(f"class folder root {root} has no class sub-folders")
    if len(dirs) == 1:
        raise HistoError(f"class folder root {root} has a single class sub-folder ({dirs[0].name}): a classifier "
                         f"needs at least two classes")
    out = []
    for d in dirs:
        files = sorted(p for p in d.rglob("*") if p.is_file() and not p.name.startswith("."))
        images = [p for p in files if slides.is_image_file(p)]
        if not images:
            raise HistoError(f"empty class folder: {d} has no image files")
        for p in files:
            rel = p.relative_to(root).as_posix()
            if p in images:
                out.append((p, rel, d.name, rel))
            else:
                skips.add(p, f"not an image file (suffix {p.suffix or 'none'}): {p}")
    return root, out


def read_labels_csv(csv_path: Path) -> list[dict]:
    """Rows of a labels CSV (path,label[,group_id]); refused when it has no rows or a single class."""
    rows = read_csv(csv_path, ["path", "label"], "labels CSV")
    if not rows:
        raise HistoError(f"labels CSV {csv_path} has no rows")
    labels = {(r.get("label") or "").strip() for r in rows} - {""}
    if len(labels) == 1:
        raise HistoError(f"labels CSV {csv_path} has a single class ({labels.pop()!r}): a classifier needs at "
                         f"least two classes")
    return rows


def _image_files(paths, skips: _Skips, what: str) -> list[tuple[Path, bool, str]]:
    """[(file, explicit, path relative to the folder given)]: explicit files must be good, files found in
    folders may be skipped ("default": the built-in unlabeled images)."""
    out: list[tuple[Path, bool, str]] = []
    for s in paths:
        if s == "default":
            out += [(p, True, p.name) for p in default.unlabeled_sources()]
            continue
        p = Path(s)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
            for f in files:
                if slides.is_image_file(f):
                    out.append((f, False, f.relative_to(p).as_posix()))
                else:
                    skips.add(f, f"not an image file (suffix {f.suffix or 'none'}): {f}")
        elif p.is_file():
            out.append((p, True, p.name))
        else:
            raise HistoError(f"missing {what}: {p} (no such file or folder)")
    if not out:
        raise HistoError(f"no image files in {what}s {list(paths)}")
    return out


# --------------------------------------------------------------------------------------------
# Tiles
# --------------------------------------------------------------------------------------------
def _square_tile(path: Path, tile_size: int, image_mode: str) -> tuple[np.ndarray, int, float | None]:
    """(tile, source pixels of its edge, the file's microns per pixel or None): the centred square, resized."""
    pix, info = slides.read_rgb(path, image_mode, draft=tile_size)
    h, w = pix.shape[:2]  # may be reduced by JPEG draft decoding; info has the file's size
    side = min(h, w)
    if side < tile_size:
        raise slides.ImageTooSmall(f"image {path} ({w}x{h}) is smaller than the tile size {tile_size}x{tile_size}")
    y, x = (h - side) // 2, (w - side) // 2
    return (slides.resize_tile(pix[y:y + side, x:x + side], tile_size), min(info["width"], info["height"]),
            info["mpp"])


def _add_labeled(w: DatasetWriter, cfg: PrepareConfig, skips: _Skips, sample: scale.TileSample, log
                 ) -> tuple[dict, list[dict], list[tuple]]:
    root, entries = _labeled_entries(cfg, skips)
    sources, geometry = [], []
    seen: dict[str, tuple[str, str]] = {}  # sha256 -> (path, group): one image in two groups could leak across splits
    for f, rel, label, group in progress(entries, desc="prepare", mininterval=2.0, log=log):
        sha = sha256_file(f)
        if sha in seen and (seen[sha][1] != group or seen[sha][0] == rel):
            raise HistoError(f"{rel} has the same content as {seen[sha][0]} (groups {group!r} and {seen[sha][1]!r}): "
                             f"listed twice or copied; duplicates in two groups can land in two splits (train/test "
                             f"leak): remove one, or give both one group_id")
        seen.setdefault(sha, (rel, group))
        try:
            tile, side, mpp = _square_tile(f, cfg.tile_size, cfg.image_mode)
        except slides.UnreadableImage as e:  # ImageTooSmall is always an error (no upscaling)
            skips.add(f, str(e))
            continue
        row = w.add(tile, id=Path(rel).with_suffix("").as_posix(), source=rel, path=rel, label=label, group=group)
        sample.offer(row["hash"], tile)
        sources.append({"path": rel, "sha256": sha})
        geometry.append((side, mpp, 1))
    present = Counter(r["label"] for r in w.iter_rows())
    lost = sorted({e[2] for e in entries} - set(present))
    if lost:
        raise HistoError(f"class(es) {lost} have no readable image (see skipped files); nothing written")
    unlabeled = _add_unlabeled_tiles(w, cfg, skips, sample, {sha: rel for sha, (rel, _) in seen.items()},
                                     sources, geometry, log) if cfg.unlabeled_tiles else None
    return ({"root": str(root.resolve()), "files": len(sources), "list": SOURCES_CSV,
             **({"unlabeled_tiles": unlabeled} if unlabeled else {})}, sources, geometry)


def _add_unlabeled_tiles(w: DatasetWriter, cfg: PrepareConfig, skips: _Skips, sample: scale.TileSample,
                         labeled: dict[str, str], sources: list, geometry: list, log) -> dict:
    """The cohort's unlabeled tiles (cfg.unlabeled_tiles), each its own group `unlabeled/<path>` with label
    "": the train split only (run() keeps them out of the class-stratified splits and the few-shot
    subsets). A file identical to a labeled one is that tile, so it is skipped: as an unlabeled train tile
    it would leak a validation/test tile into adaptation. Returns the counts for meta.json."""
    contents = _Contents("unlabeled tile")
    ids = Counter(r["id"] for r in w.iter_rows())  # an unlabeled tile's id never repeats a labeled one's
    counts = {"tiles": 0, "also_labeled": 0}  # + "duplicates": the copies `contents` listed
    for f, explicit, rel in progress(_image_files(cfg.unlabeled_tiles, skips, "unlabeled tile input"),
                                     desc="prepare unlabeled tiles", mininterval=2.0, log=log):
        sha = sha256_file(f)
        if sha in labeled:
            counts["also_labeled"] += 1
            continue
        if contents.copy(f, sha, explicit):
            continue
        try:
            tile, side, mpp = _square_tile(f, cfg.tile_size, cfg.image_mode)
        except slides.UnreadableImage as e:  # ImageTooSmall is always an error (no upscaling)
            if explicit:
                raise
            skips.add(f, str(e))
            continue
        tid = f"{UNLABELED_TILE_PREFIX}{Path(rel).with_suffix('').as_posix()}"
        ids[tid] += 1
        tid = tid if ids[tid] == 1 else f"{tid}-{ids[tid] - 1}"  # e.g. the same relative path in two folders
        row = w.add(tile, id=tid, source=str(f), path=str(f), label="", group=tid)
        sample.offer(row["hash"], tile)
        sources.append({"path": str(f), "sha256": sha})
        geometry.append((side, mpp, 1))
        counts["tiles"] += 1
    counts["duplicates"] = len(contents.duplicates)
    if not counts["tiles"]:
        raise HistoError(f"no unlabeled tile kept from {list(cfg.unlabeled_tiles)} (all unreadable or identical "
                         f"to labeled tiles); nothing written")
    log.info("%d unlabeled tiles join the train split (%d identical to labeled tiles and %d byte-identical "
             "duplicates skipped)", counts["tiles"], counts["also_labeled"], counts["duplicates"])
    return counts


def _add_unlabeled(w: DatasetWriter, cfg: PrepareConfig, skips: _Skips, sample: scale.TileSample, log
                   ) -> tuple[list, list[dict], dict]:
    params = slides.TileParams(cfg.tile_size, cfg.patch_size, cfg.stride, cfg.downscale, cfg.target_mpp,
                               cfg.min_tissue, cfg.max_gray_mean, cfg.min_saturation, cfg.tissue_method,
                               cfg.max_ink)
    info, sources, stems = [], [], Counter()
    contents, no_tissue = _Contents("source"), []
    for f, explicit, _ in _image_files(cfg.sources, skips, "source"):
        sha = sha256_file(f)
        if contents.copy(f, sha, explicit):
            continue
        try:
            slide = slides.Slide(f, cfg.image_mode)
            stats = slides.TilingStats()
            patch, _ = slides.patch_geometry(slide, params)
            stem = f.stem if not stems[f.stem] else f"{f.stem}-{stems[f.stem]}"
            stems[f.stem] += 1
            for x, y, patch, tile in slides.iter_tiles(slide, params, stats):
                group = f"{stem}_r{y // cfg.group_px}c{x // cfg.group_px}" if cfg.group_px else stem
                row = w.add(tile, id=f"{stem}_x{x}_y{y}", source=str(f), x=x, y=y, width=patch, height=patch,
                            group=group, split=UNLABELED_SPLIT)
                sample.offer(row["hash"], tile)
        except (slides.UnreadableImage, slides.ImageTooSmall) as e:
            if explicit:
                raise
            skips.add(f, str(e))
            continue
        sources.append({"path": str(f), "sha256": sha})
        info.append({"path": str(f), "sha256": sha, "width": slide.width, "height": slide.height,
                     "mode": slide.mode, "mpp": slide.mpp, "patch": patch, "candidates": stats.candidates,
                     "background": stats.background, "ink": stats.ink, "tiles": stats.kept})
        if not stats.kept:
            no_tissue.append(f.name)
        log.debug(f"{f.name}: {slide.width}x{slide.height}, mpp {slide.mpp}, {stats.kept} tiles kept of "
                  f"{stats.candidates} ({stats.background} background, {stats.ink} ink)")
    if contents.duplicates:
        log.warning(f"skipped {len(contents.duplicates)} byte-identical duplicate file(s) inside source folders, "
                    f"e.g. {', '.join(contents.duplicates[:5])}")
    if no_tissue:
        log.warning(f"{len(no_tissue)} image(s) gave no tissue tile, e.g. {', '.join(no_tissue[:5])}")
    kept = sum(s["tiles"] for s in info)
    log.info(f"{len(info)} source image(s), {kept} tiles kept")
    return info, sources, {"duplicates": len(contents.duplicates),
                           "duplicate_files": contents.duplicates[:MAX_LISTED_SKIPS],
                           "no_tissue": len(no_tissue), "no_tissue_files": no_tissue[:MAX_LISTED_SKIPS]}


# --------------------------------------------------------------------------------------------
# Stage
# --------------------------------------------------------------------------------------------
def _check_config(cfg: PrepareConfig) -> str:
    labeled_inputs = [n for n in ("labels_csv", "class_folders") if getattr(cfg, n)]
    if len(labeled_inputs) > 1:
        raise HistoError("give either labels_csv or class_folders, not both")
    if not labeled_inputs and not cfg.sources:
        raise HistoError("no inputs given: pass --sources (slides/images/folders), --labels-csv or "
                         "--class-folders ('default' selects the built-in default data)")
    if labeled_inputs and cfg.sources:
        raise HistoError("give either unlabeled sources or labeled patches (labels_csv/class_folders), not both")
    kind = cfg.kind if cfg.kind != "auto" else ("labeled" if labeled_inputs else "unlabeled")
    if kind not in ("labeled", "unlabeled"):
        raise HistoError(f"kind must be labeled, unlabeled or auto, not {cfg.kind!r}")
    if (kind == "labeled") != bool(labeled_inputs):
        raise HistoError(f"kind={kind} does not match the inputs given")
    if cfg.image_mode not in ("convert", "refuse"):
        raise HistoError(f"image_mode must be convert or refuse, not {cfg.image_mode!r}")
    if cfg.tissue_method not in ("fixed", "otsu"):
        raise HistoError(f"tissue_method must be fixed or otsu, not {cfg.tissue_method!r}")
    for name in ("tile_size", "shard_size"):
        if getattr(cfg, name) < 1:
            raise HistoError(f"{name} must be >= 1, not {getattr(cfg, name)}")
    if not 0 <= cfg.holdout_frac < 1 or cfg.group_px < 0:
        raise HistoError(f"holdout_frac must be in [0, 1) and group_px >= 0, got {cfg.holdout_frac}, {cfg.group_px}")
    if cfg.unlabeled_tiles and kind != "labeled":
        raise HistoError("unlabeled_tiles join a labeled target's train split: give them with labels_csv or "
                         "class_folders (unlabeled sources for pretraining go to --sources)")
    if kind == "labeled" and (cfg.holdout_frac or cfg.group_px):
        raise HistoError("holdout_frac and group_px are for unlabeled sources (labeled data has val/test splits)")
    if cfg.downscale <= 0 or cfg.patch_size < 0 or cfg.stride < 0 or cfg.target_mpp < 0:
        raise HistoError("downscale must be > 0; patch_size, stride and target_mpp must be >= 0")
    return kind


def _unlabeled_groups(rows, labeled_groups: dict[str, str]) -> dict[str, str]:
    """group -> "train" for the unlabeled tiles' groups (a labeled group of the same name is an error)."""
    out = {r["group"]: "train" for r in rows if not r["label"]}
    clash = sorted(set(out) & set(labeled_groups))
    if clash:
        raise HistoError(f"group {clash[0]!r} holds labeled and unlabeled tiles: rename the labeled group")
    return out


def _counts(rows: list[dict], labeled: bool) -> tuple[dict, dict]:
    """Per split: tiles and groups per label (of a labeled dataset: per class; its unlabeled tiles are counted
    in meta.json's "sources")."""
    tiles: dict = defaultdict(Counter)
    groups: dict = defaultdict(lambda: defaultdict(set))
    for r in rows:
        if labeled and not r["label"]:
            continue
        tiles[r["split"]][r["label"]] += 1
        groups[r["split"]][r["label"]].add(r["group"])
    return ({s: dict(sorted(c.items())) for s, c in tiles.items()},
            {s: {c: len(g) for c, g in sorted(d.items())} for s, d in groups.items()})


_NEUTRAL = {"out", "scale_tolerance"}  # fields that do not change the dataset


def _comparable(cfg_dict: dict) -> dict:
    """A dataset's config for "same config?": fields added since it was prepared count at their default."""
    return comparable_config(cfg_dict, tuple(_NEUTRAL), PrepareConfig)


@closes_stage_logs
def run(cfg: PrepareConfig) -> Path:
    out = Path(cfg.out)
    log = get_logger("prepare")
    cfg_dict = config_to_dict(cfg)
    if is_complete(out):
        old = read_json(out / "meta.json", "dataset meta").get("config", {})
        if _comparable(old) == _comparable(cfg_dict):
            log.info(f"dataset {out} is complete with the same config: skipped")
            return out
        raise HistoError(f"{out} holds a dataset prepared with a different config; use another --out or delete it")
    kind = _check_config(cfg)
    ensure_writable(out.parent)
    t0 = time.time()
    skips = _Skips(cfg.strict, log)
    sample = scale.TileSample(cfg.scale_sample)
    writer = DatasetWriter(out, cfg.tile_size, cfg.shard_size)
    log = get_logger("prepare", writer.tmp / "log.txt")  # renamed into place with the dataset
    try:
        if kind == "labeled":
            source_info, sources, geometry = _add_labeled(writer, cfg, skips, sample, log)
            dropped = {}
            groups = group_labels(r for r in writer.iter_rows() if r["label"])  # the unlabeled tiles: train
            split = split_groups(groups, cfg.val_frac, cfg.test_frac, cfg.seed)  # applied by finish()
            split.update(_unlabeled_groups(writer.iter_rows(), groups))
            fs = fewshot_groups(groups, split, cfg.fewshot_fracs, cfg.fewshot_k, cfg.seed, cfg.fewshot_draws)
            fs_sets = {name: set(gs) for name, gs in fs.items()}
            subsets = {name: [] for name in fs_sets}
            for r in writer.iter_rows():
                for name, gs in fs_sets.items():
                    if r["group"] in gs:
                        subsets[name].append(r["id"])
            classes = sorted(set(groups.values()))
        else:
            source_info, sources, dropped = _add_unlabeled(writer, cfg, skips, sample, log)
            geometry = [(s["patch"], s["mpp"], s["tiles"]) for s in source_info]
            subsets, classes = {}, []
            split = holdout_groups(writer.iter_rows(), cfg.holdout_frac, cfg.seed) if cfg.holdout_frac else None
        if not writer.count:
            raise HistoError(f"no tiles kept from the inputs (all background or unreadable); nothing written to {out}")
        tile_hashes = {r["hash"]: r["id"] for r in writer.iter_rows()} if cfg.exclude else {}
        source_hashes = {s["sha256"]: s["path"] for s in sources}
        for ex in cfg.exclude:
            example = find_overlap(source_hashes, tile_hashes, ex)
            if example:
                raise HistoError(f"new dataset {out} shares images with excluded dataset {ex} (leakage): {example}")
        measured = scale.nucleus_size(sample.tiles()) if cfg.scale_sample else {}
        if measured:
            px = measured["nucleus_px"]
            log.info(f"scale: nuclei {f'{px:g} px wide' if px else 'too few to measure'} (area-weighted median "
                     f"of {measured['nuclei']} nuclei in {measured['tiles_measured']} of {measured['tiles']} "
                     f"sampled tiles)")
        checks = scale_warnings(out, measured.get("nucleus_px"), cfg.exclude, cfg.scale_tolerance)
        for c in checks:
            if c["warning"]:
                log.warning(c["warning"])
        tiles, groups_count = _counts(writer.iter_rows(split), kind == "labeled")
        meta = {"name": cfg.name or out.name, "kind": kind, "classes": classes, "tile_size": cfg.tile_size,
                "resolution": resolution_record(cfg, source_info, geometry, measured),
                **({"scale_checks": checks} if checks else {}),
                "count": writer.count, "counts": tiles, "group_counts": groups_count,
                "subsets": {k: len(v) for k, v in subsets.items()}, "sources": source_info,
                "skipped": skips.summary(), **({"dropped": dropped} if dropped else {}),
                "seconds": round(time.time() - t0, 1), "config": cfg_dict}
        write_csv_atomic(writer.tmp / SOURCES_CSV, sources, SOURCES_COLUMNS)
        write_json_atomic(writer.tmp / CONFIG_FILE, {"format_version": FORMAT_VERSION, "version": __version__,
                                                     "stage": "prepare", "config": cfg_dict})
        writer.finish(meta, subsets, split_of=split, marker=completion_record(cfg))
    except BaseException:
        writer.abort()
        raise
    log.info(f"prepared {kind} dataset {out}: {writer.count} tiles {tiles} in {time.time() - t0:.1f}s")
    return out
