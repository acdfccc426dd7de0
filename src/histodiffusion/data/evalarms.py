"""The arms of the downstream harness (stages/evaluate.py) and the images each arm trains on:
  real            the real training subset only, no augmentation
  real_aa         exactly `real` with another seed stream (training seed + AA_SEED_OFFSET): the
                  paired delta real_aa - real is the harness's A/A noise floor
  classic         real + classic augmentation
  classic_aa      exactly `classic` with another seed stream: classic_aa - classic is the A/A noise floor of
                  the augmented harness, the one every synthetic arm trains with
  selected@R      real + the synthetic images kept in filtered.csv, best-ranked first, at most
                  quota(R, real count) per class
  unselected@R    real + synthetic images drawn at random (seeded by the training seed and the class)
                  from samples.csv ignoring the filter, as many per class as selected@R
  pseudo@R        real + real tiles of the train split outside the training subset (their labels never
                  read), labelled by the mean probability of the pseudo_reader arm's classifiers (trained
                  first, in the same evaluation), quota(R, real count) per predicted class: the most confident
                  first, or a draw seeded by the training seed (pseudo_rank). Plain pseudo-labelling of the
                  target's unlabeled tiles, without any generator: the baseline `run --start-from unlabeled`
                  has to beat (BENCHMARKS.md, "The pseudo-labelling baseline as an evaluation arm")
  pseudo+selected@R  real + pseudo@R's tiles + selected@R's samples (2R x the real count added at most): does the
                  generator add anything on top of pseudo-labelling? Paired with pseudo@R in deltas_vs_pseudo
                  (evaluate a pseudo@2R arm too to compare at the same number of added images)
  start@R         real + the starting tiles of selected@R's samples (samples.csv init_id, a train-split tile of the
                  evaluated dataset, turned by init_dihedral), raw, each with its sample's target label: the
                  product's choice of tiles and labels without the diffusion step. Paired with selected@R in
                  deltas_vs_start: what the diffusion step adds (BENCHMARKS.md, "Does the diffusion step pay?")
  roundtrip@R     real + the same starting tiles as start@R after one pass through the samples' own autoencoder
                  (<samples>/pipeline/vae: encoded to the posterior mean, turned by init_dihedral in latent space
                  as the sampler turns it, decoded), with the samples' labels: the samples without the denoising
                  step. Splits selected@R - start@R in two: roundtrip@R - start@R (deltas_vs_start) is what the
                  autoencoder's round trip costs, selected@R - roundtrip@R (deltas_vs_roundtrip) what the
                  denoising (and guidance) step adds (BENCHMARKS.md, "Where the samples lose against their tiles").
                  Refused for samples made with detail=tile (they never went through the round trip).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..core.seeds import numpy_rng
from ..runtime.artifacts import MODEL_INFO, selection_dir
from ..runtime.config import EvaluateConfig
from ..runtime.errors import HistoError
from ..runtime.fileio import read_json
from ..runtime.log import get_logger
from .evaldata import Tiles, load_sample_images, quota, ranked_kept, read_filtered, read_samples

REAL_KINDS = ("real", "real_aa", "classic", "classic_aa")  # arms without synthetic images
AA_OF = {"real_aa": "real", "classic_aa": "classic"}  # A/A arm -> the arm it repeats with other seeds
AA_SEED_OFFSET = 1_000_003  # real_aa (classic_aa) with seed s trains exactly as real (classic) with seed s + offset
UNAUGMENTED_KINDS = ("real", "real_aa")  # every other arm trains with classic augmentation
SYNTHETIC_KINDS = ("selected", "unselected", "pseudo+selected", "start", "roundtrip")  # arms that need a sample directory
SELECTED_KINDS = ("selected", "pseudo+selected", "start", "roundtrip")  # arms that train on the keep-list (filtered.csv)
TILE_KINDS = ("start", "roundtrip")  # arms that train on the kept samples' starting tiles, not on the samples
PSEUDO_KINDS = ("pseudo", "pseudo+selected")  # arms that need the pool, read by the reader arm's classifiers


def expand_arms(arms, ratios, has_samples: bool) -> list[tuple[str, str, float]]:
    """[(arm name, kind, ratio)]: selected/unselected/pseudo become one arm per ratio ('selected@1'). The arm
    kinds and ratios themselves are configrules' VALUE_RULES (checked when the run directory starts)."""
    out = []
    for a in arms:
        if a in REAL_KINDS:
            out.append((a, a, 0.0))
            continue
        if a in SYNTHETIC_KINDS and not has_samples:
            raise HistoError(f"arm {a!r} needs synthetic samples: give --samples (a sample directory)")
        if not ratios:
            raise HistoError("the synthetic and pseudo arms need at least one ratio (--ratios)")
        for r in ratios:
            out.append((f"{a}@{r:g}", a, float(r)))
    names = {n for n, _, _ in out}
    for aa, of in AA_OF.items():
        if aa in names and of not in names:
            raise HistoError(f"arm {aa!r} is the A/A repeat of {of!r}: add {of!r} to the arms")
    if len(names) != len(out):
        raise HistoError(f"duplicate arms in {list(arms)} x ratios {list(ratios)}")
    return out


def check_groups_disjoint(train: Tiles, test: Tiles, what: str, train_what: str = "the training subset") -> None:
    """The harness's honesty check: no training (or validation) group may appear in the test set."""
    shared = sorted(set(train.groups) & set(test.groups))
    if shared:
        raise HistoError(f"{len(shared)} group(s) of {train_what} are also in {what}, e.g. {shared[0]!r}: "
                         f"the split leaks; re-run prepare (splits must be by group)")


def train_seed(kind: str, seed: int) -> int:
    """The seed a job trains with: the seed itself, or the A/A arm's own stream."""
    return seed + AA_SEED_OFFSET if kind in AA_OF else seed


def relabel(tiles: Tiles, classes: list[str], what: str) -> Tiles:
    """Map a dataset's labels into `classes` order (same class names required)."""
    if sorted(tiles.classes) != sorted(classes):
        raise HistoError(f"{what} has classes {tiles.classes}, the classifier {classes}")
    m = torch.tensor([classes.index(c) for c in tiles.classes])
    return Tiles(tiles.images, m[tiles.labels], tiles.ids, tiles.groups, list(classes))


def synthetic_sets(cfg: EvaluateConfig, arms, real: Tiles) -> list[dict]:
    """The added-image sets of the arms that need a sample directory ([] without such arms), each with its
    "kind": the samples ("samples": images, None when only start/roundtrip arms are evaluated; labels, indices
    per class and, per arm and class, the chosen sample indices (selected: kept, by rank) or the count to draw
    (unselected: as many as selected uses)), then with start arms their samples' starting tiles ("start",
    start_tiles), with roundtrip arms those tiles' round trip ("roundtrip", roundtrip_tiles), under the same
    indices."""
    kinds = {k for _, k, _ in arms}
    if not kinds & set(SYNTHETIC_KINDS):
        return []
    rows = read_samples(cfg.samples, real.classes)
    # the sample images themselves only when an arm trains on them (start and roundtrip arms read the starting tiles)
    trains_on_samples = bool((kinds - set(TILE_KINDS)) & set(SYNTHETIC_KINDS))
    images = load_sample_images(cfg.samples, rows, int(real.images.shape[1])) if trains_on_samples else None
    index = {r["id"]: i for i, r in enumerate(rows)}
    by_class = {c: [i for i, r in enumerate(rows) if r["target"] == c] for c in real.classes}
    kept: dict[str, list[int]] = {}
    reads_keep_list = bool(kinds & set(SELECTED_KINDS))  # then unselected@R draws as many as selected@R keeps
    if reads_keep_list:
        filt = read_filtered(selection_dir(cfg.samples, cfg.selection))
        unknown = [f["id"] for f in filt if f["id"] not in index]
        if unknown:
            raise HistoError(f"filtered.csv in {selection_dir(cfg.samples, cfg.selection)} lists sample {unknown[0]!r} "
                             f"that {cfg.samples}/samples.csv lacks: re-run select")
        kept = {c: [index[f["id"]] for f in ks] for c, ks in ranked_kept(filt, real.classes).items()}
    real_counts = real.counts()
    chosen: dict[str, dict] = {}
    for name, kind, ratio in arms:
        if kind not in SYNTHETIC_KINDS:
            continue
        per_class = {}
        for c in real.classes:
            want = quota(ratio, real_counts[c])
            if want > len(by_class[c]):
                raise HistoError(f"ratio {ratio:g} asks for {want} synthetic {c!r} images "
                                 f"({ratio:g} x {real_counts[c]} real) but {cfg.samples}/samples.csv has only "
                                 f"{len(by_class[c])}: sample more or lower --ratios")
            n_sel = min(want, len(kept[c])) if reads_keep_list else want
            if n_sel < want and kind in SELECTED_KINDS:
                get_logger("evaluate").warning("%s: selection kept only %d of the %d %r samples asked for; the arm "
                                               "uses %d (unselected: the same count); select --quota-ratio %g fills "
                                               "each class from its ranked list (filtered.json: short = too few "
                                               "candidates, sample more)", name, n_sel, want, c, n_sel,
                                               max(r for _, k, r in arms if k in SELECTED_KINDS))
            per_class[c] = kept[c][:n_sel] if kind in SELECTED_KINDS else n_sel
        chosen[name] = per_class
    labels = torch.tensor([real.classes.index(r["target"]) for r in rows], dtype=torch.long)
    of = {k: {n: chosen[n] for n, kk, _ in arms if kk == k} for k in TILE_KINDS}
    out = [{"kind": "samples", "images": images, "labels": labels, "by_class": by_class,
            "chosen": {n: v for n, v in chosen.items() if not any(n in v2 for v2 in of.values())}}]
    # each tile kind turns (start) or decodes (roundtrip) only the tiles of its own arms' samples
    need = {k: sorted({i for per_class in v.values() for idx in per_class.values() for i in idx}) for k, v in of.items()}
    if of["start"] or of["roundtrip"]:
        ds, at, true = starting_tiles(cfg, rows, sorted({*need["start"], *need["roundtrip"]}), real.classes)
        make = {"start": lambda: start_tiles(len(rows), need["start"], ds, at),
                "roundtrip": lambda: roundtrip_tiles(cfg, rows, need["roundtrip"], ds, at)}
        out += [{"kind": k, "images": make[k](), "labels": labels, "true": true, "by_class": by_class, "rows": rows,
                 "chosen": of[k]} for k in TILE_KINDS if of[k]]
    return out


def starting_tiles(cfg: EvaluateConfig, rows: list[dict], needed: list[int], classes: list[str]):
    """(the train split of cfg.data, {sample index: (its starting tile's index there, init_dihedral)} for the
    samples at `needed`, own labels): each tile's label index in `classes` for every row (-1: unlabeled, or a
    sample not needed). One error names the first sample without a starting tile, with one the dataset lacks or
    with a bad init_dihedral."""
    from ..core.transforms import DIHEDRAL
    from .datasets import PixelDataset

    path = f"{cfg.samples}/samples.csv"
    bad = next((rows[i] for i in needed if not rows[i].get("init_id")), None)
    if bad is not None:
        raise HistoError(f"start and roundtrip arms need samples made from tiles: sample {bad['id']!r} in {path} has "
                         f"no starting tile (init_id; sample with --strength < 1 and --init-subset)")
    ds = PixelDataset(cfg.data, subset="train")
    where = {r["id"]: j for j, r in enumerate(ds.rows)}
    bad = next((rows[i] for i in needed if rows[i]["init_id"] not in where), None)
    if bad is not None:
        raise HistoError(f"sample {bad['id']!r} in {path} starts from tile {bad['init_id']!r}, which is not a "
                         f"train-split tile of {cfg.data}: the start and roundtrip arms read the starting tiles from "
                         f"the evaluated dataset")
    at, true = {}, torch.full((len(rows),), -1, dtype=torch.long)
    for i in needed:
        k = str(rows[i].get("init_dihedral") or "0")
        if not k.isdigit() or int(k) >= DIHEDRAL:
            raise HistoError(f"sample {rows[i]['id']!r} in {path} has init_dihedral {k!r}, not 0..{DIHEDRAL - 1}")
        at[i] = (where[rows[i]["init_id"]], int(k))
        label = ds.rows[at[i][0]]["label"]
        true[i] = classes.index(label) if label in classes else -1
    return ds, at, true


def start_tiles(n: int, needed: list[int], ds, at: dict) -> torch.Tensor:
    """uint8 images [n, H, W, 3] (one per samples.csv row): for the samples at `needed`, the tile each started
    from, turned by its init_dihedral; zeros elsewhere."""
    from ..core.transforms import dihedral

    images = torch.zeros((n, *ds.uint8(0).shape), dtype=torch.uint8)
    for i in needed:
        j, k = at[i]
        images[i] = dihedral(ds.uint8(j), k, dims=(0, 1))
    return images


def roundtrip_tiles(cfg: EvaluateConfig, rows: list[dict], needed: list[int], ds, at: dict) -> torch.Tensor:
    """uint8 images [len(rows), H, W, 3]: for the samples at `needed`, the tile each started from after one pass
    through the autoencoder that decoded the samples (<samples>/pipeline/vae, checked against samples.csv's
    vae_id): its posterior mean turned by init_dihedral in latent space (as the sampler turns it), decoded; zeros
    elsewhere. Each (tile, turn) is decoded once."""
    from ..models.autoencoder import load_vae, roundtrip_uint8, vae_id

    folder = f"{cfg.samples}/pipeline/vae"
    if not (Path(folder) / "config.json").is_file():
        raise HistoError(f"roundtrip arms need the autoencoder that decoded the samples: {folder} is missing "
                         f"(written by sample)")
    record = Path(cfg.samples) / "pipeline" / MODEL_INFO
    if record.is_file() and (read_json(record, "pipeline record").get("sampling") or {}).get("detail") == "tile":
        raise HistoError(f"the samples in {cfg.samples} were made with detail=tile ({record}): they carry their "
                         f"starting tiles' detail and never went through the round trip, so roundtrip arms do not "
                         f"split selected - start (which is the denoising step's change alone); evaluate start")
    own = vae_id(folder)
    bad = next((rows[i] for i in needed if (rows[i].get("vae_id") or own) != own), None)
    if bad is not None:
        raise HistoError(f"sample {bad['id']!r} in {cfg.samples}/samples.csv was decoded by autoencoder "
                         f"{bad['vae_id'][:12]}, {folder} is {own[:12]}: the roundtrip arms need the samples' own")
    pairs = sorted({at[i] for i in needed})
    recs, _ = roundtrip_uint8(load_vae(folder), torch.stack([ds.uint8(j) for j, _ in pairs]),
                              turns=[k for _, k in pairs])
    where = {p: n for n, p in enumerate(pairs)}
    images = torch.zeros((len(rows), *recs.shape[1:]), dtype=torch.uint8)
    for i in needed:
        images[i] = recs[where[at[i]]]
    return images


def label_agreement(assigned: torch.Tensor, true: torch.Tensor, idx) -> dict:
    """Measurement only: of the images at idx, how many carry a label of their own (true >= 0) and the share of
    those whose assigned (training) label is it."""
    idx = torch.as_tensor(idx, dtype=torch.long)
    known = true[idx] >= 0
    n = int(known.sum())
    right = (assigned[idx] == true[idx])[known]
    return {"right": round(float(right.float().mean()), 4) if n else None, "n_labeled": n, "n": len(idx)}


START_COLUMNS = ["arm", "class_rank", "sample_id", "target", "tile_id", "dihedral", "tile_label"]


def start_rows(arms, start: dict, classes: list[str]) -> list[dict]:
    """One row per (start arm, chosen sample): the train tile it started from (tile_id, turned by dihedral) that
    the arm trains on with the sample's target, class_rank its place in the class's keep-list order, and
    (measurement only) the tile's own label ("" for an unlabeled tile): the product's choice of tiles and
    labels as an augmentation set without the diffusion step."""
    rows = []
    for name, kind, _ in arms:
        if kind != "start":
            continue
        for ci, c in enumerate(classes):
            for k, i in enumerate(start["chosen"][name][c]):
                t, sample = int(start["true"][i]), start["rows"][i]
                rows.append({"arm": name, "class_rank": k + 1, "sample_id": sample["id"], "target": c,
                             "tile_id": sample["init_id"], "dihedral": sample["init_dihedral"],
                             "tile_label": classes[t] if t >= 0 else ""})
    return rows


def start_summary(arms, start: dict, real: Tiles) -> dict:
    """Per start arm: how many distinct tiles its samples start from, how many of those are tiles of the
    training subset, and per class the share of its starting tiles whose own label (where they have one) is
    the sample's target (measurement only)."""
    out = {}
    subset = set(real.ids)
    for name, kind, _ in arms:
        if kind != "start":
            continue
        idx = [i for v in start["chosen"][name].values() for i in v]
        tiles = {start["rows"][i]["init_id"] for i in idx}
        out[name] = {"distinct_tiles": len(tiles), "training_subset_tiles": len(tiles & subset),
                     "right": {c: label_agreement(start["labels"], start["true"], v)
                               for c, v in start["chosen"][name].items()},
                     "right_all": label_agreement(start["labels"], start["true"], idx)}
    return out


def pseudo_pool(cfg: EvaluateConfig, real: Tiles) -> tuple[Tiles, int]:
    """(the pseudo arms' pool, exact copies left out): the train split's tiles outside the training subset,
    labeled or not (label -1: none; the labels serve the measurement in pseudo_labels.csv only, never training),
    without tiles identical to a training tile."""
    from .datasets import PixelDataset

    ds = PixelDataset(cfg.data, subset="train")
    train_ids = set(real.ids)
    train_hashes = {r["hash"] for r in ds.all_rows if r["id"] in train_ids}
    outside = [i for i, r in enumerate(ds.rows) if r["id"] not in train_ids]
    keep = [i for i in outside if ds.rows[i]["hash"] not in train_hashes]
    if not keep:
        raise HistoError(f"the pseudo arms need tiles of the train split of {cfg.data} outside the training subset "
                         f"{cfg.subset!r}: there are none")
    classes = list(real.classes)
    labels = [classes.index(ds.rows[i]["label"]) if ds.rows[i]["label"] in classes else -1 for i in keep]
    pool = Tiles(torch.stack([ds.uint8(i) for i in keep]), torch.tensor(labels), [ds.rows[i]["id"] for i in keep],
                 [ds.rows[i]["group"] for i in keep], classes)
    return pool, len(outside) - len(keep)


def pseudo_sets(cfg: EvaluateConfig, arms, real: Tiles, pool: Tiles, readers: list) -> dict:
    """Pseudo-labels of the pool (the mean probability of the reader arm's classifiers `readers`) and, per pseudo
    arm and class, the chosen pool indices (pseudo_rank confidence: the most confident first) or the count to
    draw from the tiles read as the class (random)."""
    from ..models.classifier import predict

    probs = torch.stack([predict(model, pool.images)[0] for model in readers]).mean(0)
    conf, pred = probs.max(dim=1)
    by_class = {}
    for ci, c in enumerate(real.classes):
        idx = (pred == ci).nonzero().flatten()
        by_class[c] = idx[conf[idx].argsort(descending=True, stable=True)].tolist()
    real_counts = real.counts()
    chosen: dict[str, dict] = {}
    for name, kind, ratio in arms:
        if kind not in PSEUDO_KINDS:
            continue
        per_class = {}
        for c in real.classes:
            want = quota(ratio, real_counts[c])
            n = min(want, len(by_class[c]))
            if n < want:
                get_logger("evaluate").warning("%s: the reader reads only %d pool tiles as %r, %d asked for; the "
                                               "arm uses %d", name, len(by_class[c]), c, want, n)
            per_class[c] = by_class[c][:n] if cfg.pseudo_rank == "confidence" else n
        chosen[name] = per_class
    return {"images": pool.images, "labels": pred, "probs": probs, "true": pool.labels, "by_class": by_class,
            "chosen": chosen}


def training_set(kind: str, name: str, seed: int, real: Tiles,
                 extras: list[dict]) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(uint8 images, labels, added images per class) of one arm and seed: the real tiles, then from each of
    `extras` (synthetic_sets, pseudo_sets) that chose images for the arm, those images, or as many drawn at random
    (seeded by the training seed and the class) from those of the class."""
    if kind in REAL_KINDS:
        return real.images, real.labels, {c: 0 for c in real.classes}
    images, labels, counts = [real.images], [real.labels], {c: 0 for c in real.classes}
    for extra in (e for e in extras if e and name in e["chosen"]):
        idx = []
        for ci, c in enumerate(real.classes):
            pick = extra["chosen"][name][c]
            if isinstance(pick, int):
                rng = numpy_rng(seed, ci)
                pool = extra["by_class"][c]
                pick = [pool[j] for j in rng.choice(len(pool), size=pick, replace=False)] if pick else []
            idx += pick
            counts[c] += len(pick)
        idx_t = torch.as_tensor(idx, dtype=torch.long)
        images.append(extra["images"][idx_t])
        labels.append(extra["labels"][idx_t])
    return torch.cat(images), torch.cat(labels), counts
