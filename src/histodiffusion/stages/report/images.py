"""Report sections with images: real vs synthetic grids per class (the first screen) and the 2-D embedding
of real vs synthetic features (figures.py draws them)."""
from __future__ import annotations

import numpy as np

from .doc import Doc
from .figures import embedding_figure, grid_figure


def grid_scale(tile: int, scale: int = 0) -> int:
    """Display scale of the tiles in the grids: `scale`, or (0) the smallest that shows a tile at least
    128 px wide (2x for 64 px tiles)."""
    return scale if scale > 0 else max(1, -(-128 // max(tile, 1)))


def section_grids(doc: Doc, p: dict, subset: str, classes: list[str], n: int, scale: int = 0) -> tuple | None:
    from ...data.evaldata import load_real, load_sample_images, read_samples

    real = load_real(p["data"], subset)
    tile = int(real.images.shape[1])
    k = grid_scale(tile, scale)
    cols = max(1, min(n, 4 if tile * k >= 96 else 8))

    def grid(images, keep, title):
        return grid_figure(images, keep, title, cols=cols, scale=k)

    if not (p["samples"] / "samples.csv").is_file():
        doc.h(2, "Real images per class")
        doc.p(f"Up to {n} tiles per class of {subset!r}, {tile} px shown at {k}x.")
        doc.open_row()
        for ci, c in enumerate(classes):
            doc.image(grid(real.images[real.labels == ci][:n], None, c), f"grid_{ci}.png", f"{c}: real", cls="tiles")
        doc.close_row()
        return real, None, None, None
    rows = read_samples(p["samples"], classes)
    filt = {}
    if (p["select"] / "filtered.csv").is_file():
        from ...data.evaldata import read_filtered

        filt = {f["id"]: f for f in read_filtered(p["select"])}
    syn = load_sample_images(p["samples"], rows, tile)
    targets = np.array([classes.index(r["target"]) for r in rows])
    keep = np.array([int(filt[r["id"]]["keep"]) if r["id"] in filt else -1 for r in rows])
    doc.h(2, "Real and synthetic images per class")
    doc.p(f"Left: up to {n} real tiles of {subset!r} per class. Right: up to {n} synthetic samples" +
          (", kept ones first in rank order (dropped ones are framed red)" if filt else " (not yet selected)") +
          f". {tile} px tiles shown at {k}x.")
    for ci, c in enumerate(classes):
        idx = [i for i in range(len(rows)) if targets[i] == ci]
        if filt:
            idx.sort(key=lambda i: (-int(filt[rows[i]["id"]]["keep"]), int(filt[rows[i]["id"]]["rank"])))
        idx = idx[:n]
        doc.p(f"{c}: real (left), synthetic (right)", cls="caption")
        doc.open_row()
        doc.image(grid(real.images[real.labels == ci][:n], None, f"{c}: real"), f"grid_real_{ci}.png",
                  f"{c}: real", cls="tiles")
        doc.image(grid(syn[idx] if idx else syn[:0], keep[idx] if filt else None, f"{c}: synthetic"),
                  f"grid_syn_{ci}.png", f"{c}: synthetic" + (" (kept first)" if filt else ""), cls="tiles")
        doc.close_row()
    if filt and all(r.get("init_id") for r in rows):  # samples made from real tiles (sample --strength < 1)
        section_starts(doc, p, rows, syn, filt, classes, n, grid)
    return real, syn, targets, keep


def start_pairs(rows: list[dict], filt: dict, ds, c: str, n: int) -> tuple[list[int], np.ndarray, list[str]]:
    """(sample indices, their starting tiles turned by init_dihedral uint8 [k, H, W, 3], each tile's own label or
    ""): class c's first n kept samples in rank order whose starting tile is a train tile of `ds`."""
    from ...core.transforms import dihedral

    at = {r["id"]: j for j, r in enumerate(ds.rows)}
    idx = sorted((i for i, r in enumerate(rows) if r["target"] == c and r["id"] in filt
                  and int(filt[r["id"]]["keep"]) == 1 and r["init_id"] in at),
                 key=lambda i: int(filt[rows[i]["id"]]["rank"]))[:n]
    tiles = [dihedral(ds.uint8(at[rows[i]["init_id"]]), int(rows[i]["init_dihedral"] or 0), dims=(0, 1)).numpy()
             for i in idx]
    own = [ds.rows[at[rows[i]["init_id"]]]["label"] for i in idx]
    empty = np.zeros((0, *ds.uint8(0).shape) if len(ds) else (0, 1, 1, 3), np.uint8)
    return idx, np.stack(tiles) if tiles else empty, own


def section_starts(doc: Doc, p: dict, rows: list[dict], syn: np.ndarray, filt: dict, classes: list[str], n: int,
                   grid) -> None:
    """Samples made from real tiles: per class, the first kept samples beside the train tiles they started from
    (the same order), with the mean absolute pixel difference: what the diffusion step changes. A starting tile
    whose own label is another class than the sample's target is framed red (measurement only)."""
    from ...data.datasets import PixelDataset

    ds = PixelDataset(p["data"], subset="train")
    doc.h(2, "Kept samples and the tiles they started from")
    doc.p(f"Left: the train tiles (turned as the sampler turned them) that the first {n} kept samples of each class "
          "started from; right: those samples, in the same order. A tile framed red carries a label of another "
          "class than the sample's (the sampler never reads it). The evaluation's start and roundtrip arms, when "
          "evaluated, train on these tiles raw and after one pass through the autoencoder.")
    for ci, c in enumerate(classes):
        idx, tiles, own = start_pairs(rows, filt, ds, c, n)
        diff = float(np.abs(np.asarray(syn[idx], float) - tiles).mean()) if idx else float("nan")
        doc.p(f"{c}: starting tiles (left), kept samples (right); mean absolute difference {diff:.1f} / 255 over "
              f"these {len(idx)}", cls="caption")
        doc.open_row()
        doc.image(grid(tiles, np.array([int(not lab or lab == c) for lab in own]), f"{c}: starting tiles"),
                  f"grid_start_{ci}.png", f"{c}: starting tiles", cls="tiles")
        doc.image(grid(syn[idx] if idx else syn[:0], None, f"{c}: kept samples"), f"grid_kept_{ci}.png",
                  f"{c}: kept samples", cls="tiles")
        doc.close_row()


def section_embedding(doc: Doc, p: dict, real, syn, targets, keep, classes, method: str) -> None:
    from ...models.classifier import load_classifier, predict

    feats_name = "raw pixels (8x8 downsampled)"
    model = None
    for d in [p["samples"] / "selector" / "model", *sorted((p["eval"] / "classifiers").glob("real_*"))]:
        if (d / "classifier.json").is_file():
            model, _ = load_classifier(d)
            feats_name = f"penultimate features of {d.relative_to(d.parents[1])}"
            break
    xs = [real.images] + ([syn] if syn is not None else [])
    if model is not None:
        feats = [predict(model, x)[1].numpy() for x in xs]
    else:
        import torch

        feats = [torch.nn.functional.adaptive_avg_pool2d(x.permute(0, 3, 1, 2).float(), 8).flatten(1).numpy() for x in xs]
    png, used = embedding_figure(feats, real.labels.numpy(), targets, keep, classes, method)
    if syn is None:
        doc.h(2, "Embedding of real features")
        doc.p(f"2-D {used} embedding of {feats_name} of the real training subset (no synthetic samples found).")
    else:
        doc.h(2, "Embedding of real and synthetic features")
        doc.p(f"2-D {used} embedding of {feats_name}: circles are real tiles, crosses synthetic samples "
              f"(grey crosses: dropped by selection).")
    doc.image(png, "embedding.png", f"{used} of {'real vs synthetic' if syn is not None else 'real'} features", 760)
