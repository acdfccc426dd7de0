"""Class-balanced batches of a labeled dataset, and the small image classifiers trained on them (the decoder
fine-tune's auxiliary classifier, the latent classifier's image-space baseline).

A batch is drawn from a generator seeded by (seed, step, rank) (core/seeds.py), so a resumed run continues the
same sequence of batches.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..core.seeds import torch_generator
from ..core.transforms import dihedral
from ..runtime.errors import HistoError


def balanced_batch(by_class: list[np.ndarray], batch: int, g: torch.Generator) -> np.ndarray:
    """Indices of a class-balanced batch: a uniformly drawn class, then a uniformly drawn member."""
    cls = torch.randint(len(by_class), (batch,), generator=g).numpy()
    pick = torch.rand(batch, generator=g).numpy()
    return np.array([by_class[c][int(p * len(by_class[c]))] for c, p in zip(cls, pick)])


def class_members(labels: np.ndarray, classes: list[str], where: str) -> list[np.ndarray]:
    """Item indices per class present (balanced_batch's `by_class`); HistoError for unlabeled items or fewer
    than 2 classes."""
    if (labels < 0).any():
        raise HistoError(f"{where} holds unlabeled items; use a labeled subset")
    by_class = [np.flatnonzero(labels == c) for c in range(len(classes))]
    present = [m for m in by_class if len(m)]
    if len(present) < 2:
        raise HistoError(f"{where} has examples of {len(present)} class(es); a classifier needs at least 2")
    return present  # balanced over the classes present (item indices, so class ids are unaffected)


def pixel_batch(ds, idx, g: torch.Generator | None = None):
    """(images, labels) of items `idx` of a PixelDataset; with `g`, one random dihedral transform of the batch."""
    items = [ds[int(i)] for i in idx]
    x = torch.stack([it[0] for it in items])
    if g is not None:  # random dihedral augmentation: tissue has no orientation
        k = int(torch.randint(4, (1,), generator=g))  # quarter turns, then a flip with probability 1/2
        x = dihedral(x, k + 4 * int(torch.randint(2, (1,), generator=g)))
    return x, torch.tensor([it[1] for it in items])


@torch.no_grad()
def accuracy(clf, ds, idx, transform=None, batch: int = 64) -> float:
    """Accuracy of image classifier `clf` on items `idx` of a PixelDataset (`transform`: applied to the images)."""
    idx = list(idx)
    correct = 0
    for i in range(0, len(idx), batch):
        x, y = pixel_batch(ds, idx[i:i + batch])
        if transform is not None:
            x = transform(x)
        correct += int((clf(x).argmax(-1) == y).sum())
    return correct / max(1, len(idx))


def train_balanced(clf, ds, by_class, steps: int, batch_size: int, lr: float, weight_decay: float, seed: int,
                   augment: bool = True, log=None, what: str = "", channels_last: bool = True) -> None:
    """Train `clf` in place on class-balanced batches of a PixelDataset with AdamW (one process; batches from
    torch_generator(seed, step, 0), augmented when `augment`); with `log`, a loss line every 100 steps.

    `channels_last`: model and batches in the channels-last layout while training (oneDNN's fast convolution
    path on CPU, as models.classifier.train_classifier; the same arithmetic up to the order of float sums);
    `clf` is left in the default layout."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    clf.to(memory_format=layout)  # before the optimiser takes the parameters
    opt = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=weight_decay)
    clf.train()
    for step in range(steps):
        g = torch_generator(seed, step, 0)
        x, y = pixel_batch(ds, balanced_batch(by_class, batch_size, g), g if augment else None)
        loss = F.cross_entropy(clf(x.contiguous(memory_format=layout)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log is not None and (step + 1) % 100 == 0:
            log.info("%s step %d/%d loss %.4f", what, step + 1, steps, loss.item())
    clf.to(memory_format=torch.contiguous_format)
    clf.eval()
