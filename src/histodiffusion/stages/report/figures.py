"""Figures of the report as PNG bytes: image grids, the 2-D embedding of real vs synthetic features and
the downstream classifiers' validation curves.

Embedding method: UMAP when umap-learn is installed (imported lazily), else t-SNE (scikit-learn),
else PCA for fewer than 5 points; `method` forces one. The caller prints the method actually used.
"""
from __future__ import annotations

import io
import math

import numpy as np


def grid_figure(images, keep=None, title: str = "", cols: int = 8, scale: int = 0) -> bytes:
    """A grid of uint8 [N, H, W, 3] tiles (upscaled to >= 48 px); keep==0 tiles get a red frame."""
    from PIL import Image, ImageDraw

    from ...core.grids import tile_grid

    imgs = np.asarray(images)
    n = len(imgs)
    size = imgs.shape[1] if n else 32
    scale = scale or max(1, math.ceil(48 / size))
    cell, pad = size * scale, 4  # a frame 2 px wide fits into the gap around a tile
    cols = max(1, min(cols, n or 1))
    big = imgs.repeat(scale, axis=1).repeat(scale, axis=2) if n else np.full((1, cell, cell, 3), 255, np.uint8)
    canvas = Image.fromarray(tile_grid(big, cols, pad=pad))
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        if keep is not None and int(keep[i]) == 0:
            x, y = pad + (i % cols) * (cell + pad), pad + (i // cols) * (cell + pad)
            draw.rectangle([x - 2, y - 2, x + cell + 1, y + cell + 1], outline=(220, 30, 30), width=2)
    if n == 0:
        draw.text((6, 8), "none", fill=(120, 120, 120))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


def reduce_2d(x: np.ndarray, method: str = "auto", seed: int = 0) -> tuple[np.ndarray, str]:
    """(N x 2 coordinates, method used)."""
    from sklearn.preprocessing import StandardScaler

    x = StandardScaler().fit_transform(np.asarray(x, dtype=np.float64))
    n = len(x)
    if method in ("auto", "umap") and n >= 5:
        try:
            import umap  # optional

            return umap.UMAP(n_neighbors=min(15, n - 1), random_state=seed).fit_transform(x), "UMAP"
        except ImportError:
            if method == "umap":
                from ...runtime.errors import HistoError

                raise HistoError("embedding=umap needs umap-learn (pip install umap-learn); use tsne or pca") from None
    if method in ("auto", "umap", "tsne") and n >= 5:
        from sklearn.manifold import TSNE

        return TSNE(n_components=2, perplexity=min(30.0, (n - 1) / 3), init="pca", random_state=seed).fit_transform(x), "t-SNE"
    from sklearn.decomposition import PCA

    return PCA(n_components=2, random_state=seed).fit_transform(x), "PCA"


def embedding_figure(feats: list, real_labels, syn_targets, syn_keep, classes: list[str], method: str = "auto") -> tuple[bytes, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    real = np.asarray(feats[0])
    allx = np.concatenate(feats) if len(feats) > 1 else real
    xy, used = reduce_2d(allx, method)
    r, s = xy[:len(real)], xy[len(real):]
    colors = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(7.2, 5.4), dpi=100)
    for ci, c in enumerate(classes):
        m = np.asarray(real_labels) == ci
        ax.scatter(r[m, 0], r[m, 1], s=22, marker="o", color=colors(ci), alpha=0.75, label=f"{c} real")
        if len(s):
            t = np.asarray(syn_targets) == ci
            kept = t & (np.asarray(syn_keep) != 0)
            dropped = t & (np.asarray(syn_keep) == 0)
            ax.scatter(s[kept, 0], s[kept, 1], s=30, marker="x", color=colors(ci), label=f"{c} synthetic")
            if dropped.any():
                ax.scatter(s[dropped, 0], s[dropped, 1], s=22, marker="x", color="0.6", alpha=0.8)
    ax.set_title(f"{used}: real (o) vs synthetic (x); grey x = dropped" if len(s) else f"{used}: real tiles", fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=8, loc="best", ncol=2)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue(), used


def curve_figure(curves: dict, title: str) -> bytes:
    """Mean validation accuracy against training step, one line per arm ({arm: {"step", "accuracy"}})."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=100)
    for i, (arm, c) in enumerate(curves.items()):
        style = "-" if arm in ("real", "real_aa") else "--"
        ax.plot(c["step"], c["accuracy"], style, marker=".", color=plt.get_cmap("tab10")(i % 10), label=arm)
    ax.set_xlabel("training step")
    ax.set_ylabel("validation accuracy (mean over seeds)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right", ncol=2)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
