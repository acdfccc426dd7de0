"""Image classifiers for pixels: the downstream classifier, the selection feature extractor and the
decoder fine-tune's auxiliary classifier.

`small_cnn` is a 4-block CNN that trains in seconds on this CPU; any other name is a timm model,
created from scratch unless `weights` names a local file (safetensors, or a torch state dict loaded
with weights_only=True). Nothing is ever downloaded.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..runtime import HistoError, write_json_atomic


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
    model: nn.Module = SmallCNN(num_classes) if name == "small_cnn" else TimmClassifier(name, num_classes, image_size)
    if weights:
        state = load_state_dict(weights)
        target = model.backbone if isinstance(model, TimmClassifier) else model
        missing, unexpected = target.load_state_dict(state, strict=False)
        loaded = len(state) - len(unexpected)
        if loaded == 0:
            raise HistoError(f"weights file {weights} matches no parameter of backbone {name!r}")
    return model


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

    from ..runtime import atomic_path

    directory = Path(directory)
    with atomic_path(directory) as tmp:
        tmp.mkdir(parents=True)
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        write_json_atomic(tmp / "classifier.json", info)


def load_classifier(directory: str | Path) -> tuple[nn.Module, dict]:
    directory = Path(directory)
    info_path = directory / "classifier.json"
    if not info_path.is_file():
        raise HistoError(f"not a saved classifier (no classifier.json): {directory}")
    info = json.loads(info_path.read_text())
    model = build_classifier(info["name"], len(info["classes"]), int(info["image_size"]))
    state = load_state_dict(directory / "model.safetensors")
    model.load_state_dict(state)
    model.eval()
    return model, info
