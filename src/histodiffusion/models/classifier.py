"""Image classifiers for pixels: the downstream classifier, the selection feature extractor and the
decoder fine-tune's auxiliary classifier.

`small_cnn` is a 4-block CNN that trains in seconds on this CPU; any other name is a timm model,
created from scratch unless `weights` names a local file (safetensors, or a torch state dict loaded
with weights_only=True). Nothing is ever downloaded.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .. import FORMAT_VERSION
from ..core.transforms import DIHEDRAL, dihedral, flip_then_rotate
from ..runtime.errors import HistoError
from ..runtime.fileio import read_json, write_json_atomic
from ..runtime.rundirs import check_format_version


class SmallCNN(nn.Module):
    """Four conv blocks (conv-BN-ReLU x2, max-pool) and a linear head; `features()` gives the
    pooled penultimate embedding used for centroids and memorization distances."""

    def __init__(self, num_classes: int, width: int = 32, in_chans: int = 3):
        super().__init__()
        chans = [in_chans, width, width * 2, width * 4, width * 8]
        blocks = []
        for cin, cout in zip(chans[:-1], chans[1:]):
            blocks += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                       nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
        self.body = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = chans[-1]
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(self.num_features, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.body(x)).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class TimmClassifier(nn.Module):
    """A timm backbone with the same `features()` / `forward()` interface as SmallCNN."""

    def __init__(self, name: str, num_classes: int, image_size: int):
        super().__init__()
        import timm

        kw = {"img_size": image_size} if name.startswith(("vit", "deit", "swin")) else {}
        try:
            self.backbone = timm.create_model(name, pretrained=False, num_classes=0, **kw)
        except Exception as e:
            raise HistoError(f"unknown or unusable timm backbone {name!r}: {e}") from None
        self.num_features = self.backbone.num_features
        self.head = nn.Linear(self.num_features, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_classifier(name: str, num_classes: int, image_size: int, weights: str = "") -> nn.Module:
    """small_cnn or a timm model name; `weights`: a local backbone checkpoint (never downloaded)."""
    if num_classes < 2:
        raise HistoError(f"a classifier needs at least 2 classes, got {num_classes}")
    width = small_cnn_width(name)
    model: nn.Module = SmallCNN(num_classes, width) if width else TimmClassifier(name, num_classes, image_size)
    if weights:
        state = load_state_dict(weights)
        target = model.backbone if isinstance(model, TimmClassifier) else model
        missing, unexpected = target.load_state_dict(state, strict=False)
        loaded = len(state) - len(unexpected)
        if loaded == 0:
            raise HistoError(f"weights file {weights} matches no parameter of backbone {name!r}")
    return model


def small_cnn_width(name: str) -> int:
    """Base width of a SmallCNN name: "small_cnn" (32) or "small_cnn_w<N>" (e.g. small_cnn_w8); 0 for others."""
    if name == "small_cnn":
        return 32
    if name.startswith("small_cnn_w") and name[len("small_cnn_w"):].isdigit() and int(name[len("small_cnn_w"):]) > 0:
        return int(name[len("small_cnn_w"):])
    if name.startswith("small_cnn"):
        raise HistoError(f"bad small CNN name {name!r}: use small_cnn or small_cnn_w<width>, e.g. small_cnn_w16")
    return 0


def load_state_dict(path: str | Path) -> dict:
    """A state dict from .safetensors, or from a torch file with weights_only=True (no code runs)."""
    path = Path(path)
    if not path.is_file():
        raise HistoError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise HistoError(f"cannot read weights file {path}: {type(e).__name__}: {e}") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise HistoError(f"weights file {path} holds no state dict")
    return state


def save_classifier(model: nn.Module, directory: str | Path, info: dict) -> None:
    """model.safetensors + classifier.json (name, classes, image_size, ...) into `directory`."""
    from safetensors.torch import save_file

    from ..runtime.fileio import atomic_path

    directory = Path(directory)
    with atomic_path(directory) as tmp:
        tmp.mkdir(parents=True)
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        write_json_atomic(tmp / "classifier.json", {"format_version": FORMAT_VERSION, **info})


def load_classifier(directory: str | Path) -> tuple[nn.Module, dict]:
    directory = Path(directory)
    info_path = directory / "classifier.json"
    if not info_path.is_file():
        raise HistoError(f"not a saved classifier (no classifier.json): {directory}")
    info = read_json(info_path, "classifier info")
    check_format_version(info, info_path)
    model = build_classifier(info["name"], len(info["classes"]), int(info["image_size"]))
    state = load_state_dict(directory / "model.safetensors")
    model.load_state_dict(state)
    model.eval()
    return model, info


# --------------------------------------------------------------------------------------------
# Training and inference on in-memory uint8 tiles (downstream harness, selection features)
# --------------------------------------------------------------------------------------------
def to_model_input(x: torch.Tensor) -> torch.Tensor:
    """uint8 [N, H, W, 3] (or [N, 3, H, W]; a tensor or a numpy array) -> float [N, 3, H, W] in [-1, 1], as
    PixelDataset returns."""
    x = torch.as_tensor(x)
    if x.dtype != torch.uint8:
        raise HistoError(f"expected uint8 images, got {x.dtype}")
    if x.shape[-1] == 3 and x.shape[1] != 3:
        x = x.permute(0, 3, 1, 2)
    return x.float().div(127.5).sub(1.0)


def classic_augment(x: torch.Tensor, generator: torch.Generator, jitter: float = 0.1) -> torch.Tensor:
    """Per-sample random dihedral transform (flips, 90-degree rotations) and colour jitter
    (brightness, contrast, saturation by up to +-`jitter`) of a float batch in [-1, 1]."""
    n = x.shape[0]
    u = torch.rand(n, 5, generator=generator)
    flip = (u[:, 0] < 0.5).tolist()
    turns = torch.randint(0, 4, (n,), generator=generator).tolist()  # quarter turns after the flip
    square = x.shape[-1] == x.shape[-2]  # a non-square tile is only flipped
    x = torch.stack([dihedral(x[i], flip_then_rotate(flip[i], turns[i] if square else 0)) for i in range(n)])
    img = (x + 1) / 2
    b = 1 + jitter * (2 * u[:, 1] - 1)
    c = 1 + jitter * (2 * u[:, 2] - 1)
    s = 1 + jitter * (2 * u[:, 3] - 1)
    img = img * b[:, None, None, None]
    mean = img.mean(dim=(1, 2, 3), keepdim=True)
    img = (img - mean) * c[:, None, None, None] + mean
    grey = (0.299 * img[:, 0] + 0.587 * img[:, 1] + 0.114 * img[:, 2])[:, None]
    img = (img - grey) * s[:, None, None, None] + grey
    return img.clamp(0, 1) * 2 - 1


def val_rank(rec: dict) -> tuple:
    """Order of validation records, best first: highest accuracy, then lowest loss, then earliest step."""
    return -float(rec["accuracy"]), float(rec.get("loss", 0.0)), int(rec["step"])


def train_classifier(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, steps: int, batch_size: int,
                     lr: float, seed: int, augment: bool = False, weight_decay: float = 0.05,
                     desc: str = "train classifier", show_progress: bool = True,
                     validate: Callable[[nn.Module], dict] | None = None, val_every: int = 0,
                     history: list | None = None, ema_decay: float = 0.0,
                     sample_weight: torch.Tensor | None = None, channels_last: bool = True,
                     finish_n: int = 0, finish_steps: int = 0) -> nn.Module:
    """Train `model` for exactly `steps` AdamW steps (cosine learning-rate schedule) on uint8 tiles.

    Batches are drawn epoch by epoch from a permutation seeded by `seed` (same budget for every
    caller that passes the same steps / batch_size / lr). `augment`: classic_augment on each batch.

    `validate(model) -> {"accuracy", "loss", ...}` (with val_every > 0) is called in eval mode every
    `val_every` steps and after the last one; the weights of the best call (highest accuracy, then
    lowest loss, then earliest step) are restored at the end, and every call's record (with its
    "step") is appended to `history`. Validation draws no random numbers, so the training trajectory
    is the same with or without it.

    `ema_decay` > 0: an exponential moving average of the weights (BatchNorm statistics included) is
    kept; validation scores the average, and the returned model holds the average (of the best
    validation call, or of the last step). Averaging removes most of the step-to-step jitter of the
    final weights, the main source of seed-to-seed spread of a small classifier on a few hundred tiles.

    `sample_weight` [N] (positive): each image's weight in the batch loss, sum(w * loss) / sum(w) (None: the
    plain mean, bit for bit). Batches and augmentation draw the same random numbers either way.

    `channels_last`: the model and its batches are laid out channels-last while training (oneDNN's fast
    convolution path on CPU: 1.2-1.3x per step for small_cnn at 64 px, bench/harness_speed.py; the same
    arithmetic up to the order of float sums); the returned model is in the default layout again.

    `finish_steps` > 0: the last `finish_steps` steps draw their batches from the first `finish_n` images only
    (the real ones of a real + synthetic set: fine-tuning on the real tiles after mixed training), from a new
    permutation drawn at the switch; the steps before it are exactly those of finish_steps = 0.
    """
    from ..runtime.log import progress
    from ..runtime.distributed import seed_everything

    if steps <= 0:
        raise HistoError(f"training steps must be positive, got {steps}")
    if not 0.0 <= ema_decay < 1.0:
        raise HistoError(f"ema_decay must be in [0, 1), got {ema_decay}")
    if not 0 <= finish_steps < steps or (finish_steps and not 0 < finish_n <= images.shape[0]):
        raise HistoError(f"finish_steps must be in [0, {steps}) and finish_n in [1, {images.shape[0]}], got "
                         f"{finish_steps} and {finish_n}")
    seed_everything(seed)
    g = torch.Generator().manual_seed(seed)
    n = images.shape[0]
    bs = min(batch_size, n)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=layout)  # before the optimiser and the average take the parameters
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    loss_fn = nn.CrossEntropyLoss()
    if sample_weight is not None:
        sample_weight = torch.as_tensor(sample_weight, dtype=torch.float32)
        if sample_weight.shape != (n,) or not bool((sample_weight > 0).all()):
            low = f", min {float(sample_weight.min()):g}" if sample_weight.numel() else ""
            raise HistoError(f"sample_weight must hold one positive weight per image ({n}), got shape "
                             f"{tuple(sample_weight.shape)}{low}")
        per_sample = nn.CrossEntropyLoss(reduction="none")
    ema = None
    if ema_decay > 0:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=True)
    scored = model if ema is None else ema.module  # the weights validation scores and the caller gets
    model.train()
    order = torch.randperm(n, generator=g)
    pos = 0
    best_key, best_state = None, None
    switch = steps - finish_steps + 1  # the first step of the real-only finish (never reached with finish_steps 0)
    # one classifier of many (evaluate): its progress lines are debug lines (--verbose)
    for step in progress(range(1, steps + 1), desc=desc, disable=not show_progress, leave=False,
                         level=logging.DEBUG):
        if step == switch:
            n, bs = finish_n, min(batch_size, finish_n)
            order, pos = torch.randperm(n, generator=g), 0
        if pos + bs > n:
            order, pos = torch.randperm(n, generator=g), 0
        idx = order[pos:pos + bs]
        pos += bs
        x = to_model_input(images[idx])
        if augment:
            x = classic_augment(x, g)
        x = x.contiguous(memory_format=layout)
        if sample_weight is None:
            loss = loss_fn(model(x), labels[idx])
        else:
            w = sample_weight[idx]
            loss = (per_sample(model(x), labels[idx]) * w).sum() / w.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if ema is not None:
            ema.update_parameters(model)
        if validate is not None and val_every > 0 and (step % val_every == 0 or step == steps):
            scored.eval()
            rec = {"step": step, **validate(scored)}
            model.train()
            if history is not None:
                history.append(rec)
            key = val_rank(rec)
            if best_key is None or key < best_key:
                best_key = key
                best_state = {k: v.detach().clone() for k, v in scored.state_dict().items()}
    if best_state is None and ema is not None:
        best_state = ema.module.state_dict()
    if best_state is not None:
        model.load_state_dict(best_state)
    model.to(memory_format=torch.contiguous_format)  # saved and scored in the default layout
    model.eval()
    return model


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 256,
            tta: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax probabilities [N, C], features [N, D]) of uint8 tiles, in eval mode.

    `tta`: test-time augmentation, probabilities and features averaged over the 8 dihedral transforms
    of each tile (tissue has no orientation: a lower-variance prediction at 8x the cost)."""
    model.eval()
    views = range(DIHEDRAL) if tta else (0,)
    probs, feats = [], []
    for i in range(0, images.shape[0], batch_size):
        x = to_model_input(images[i:i + batch_size])
        f_sum, p_sum = 0.0, 0.0
        for k in views:
            f = model.features(dihedral(x, k))
            f_sum = f_sum + f
            p_sum = p_sum + model.head(f).softmax(-1)
        feats.append(f_sum / len(views))
        probs.append(p_sum / len(views))
    return torch.cat(probs), torch.cat(feats)


class FeatureExtractor(nn.Module):
    """uint8 [N, 3, H, W] images -> features of a classifier (`num_features` set, as torchmetrics expects)."""

    def __init__(self, model: nn.Module, image_size: int | None = None):
        super().__init__()
        self.model = model.eval()
        self.num_features = int(model.num_features)
        self.image_size = image_size

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = to_model_input(x)
        if self.image_size and x.shape[-1] != self.image_size:
            x = nn.functional.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                                          antialias=True, align_corners=False)
        return self.model.features(x)


def inception_extractor(weights: str):
    """torchvision Inception-v3 from a LOCAL weights file -> 2048-d pool features of uint8 images.

    Images are resized to 299 px and normalised with ImageNet statistics. torchvision's weights give
    values close to, but not identical with, the TF-Inception numbers papers report.
    """
    import torch
    from torch import nn
    from torchvision.models import inception_v3

    net = inception_v3(weights=None, aux_logits=True, init_weights=False)
    missing, _ = net.load_state_dict(load_state_dict(weights), strict=False)
    if [k for k in missing if not k.startswith("AuxLogits")]:
        raise HistoError(f"{weights} is not an Inception-v3 state dict (missing {missing[:3]} ...)")
    net.fc = nn.Identity()
    net.eval()

    class _Inception(nn.Module):
        num_features = 2048

        def __init__(self):
            super().__init__()
            self.net = net
            self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

        @torch.no_grad()
        def forward(self, x):
            x = x.float() / 255.0
            x = nn.functional.interpolate(x, size=(299, 299), mode="bilinear", antialias=True, align_corners=False)
            return self.net((x - self.mean) / self.std)

    return _Inception()
