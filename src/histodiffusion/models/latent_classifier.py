"""Noise-aware latent classifier p(y | z_t, t) for classifier guidance in latent space.

A diffusers ModelMixin + ConfigMixin (save_pretrained / from_pretrained give config.json + safetensors):
conv stem -> per stage a ResNet block conditioned on the timestep embedding, then a strided-conv
downsample -> a middle ResNet block -> GroupNorm/SiLU, global average pool, linear head.
Only GroupNorm (per sample, no batch statistics), so each sample's output and gradient depend on
that sample alone: the guidance gradient of one sample does not change with the batch.

With `trunk` (a UNet2DModel config, `unet_trunk_config`), the trunk is instead the encoder half of that UNet
(its timestep embedding, conv_in, down blocks and mid block, built by diffusers' UNet2DModel, up blocks
dropped): each down block's and the mid block's output pass GroupNorm/SiLU and a spatial mean, and the
linear head reads them concatenated. `init_trunk_from_unet` copies the pretrained UNet's weights into it,
so the classifier starts from features learnt on unlabeled tissue (BENCHMARKS.md, "A latent classifier on
the pretrained UNet's encoder").

Its config (config.json) names the classes (`class_names`), so it loads as a pipeline component on
its own. The exported folder also holds histodiffusion.json (artifacts.MODEL_INFO): classes, vae_hash
of the autoencoder whose latents it was trained on, scaling_factor, cache path and the noise scheduler
config. A folder exported before class names were in the config reads them from histodiffusion.json.
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.resnet import Downsample2D, ResnetBlock2D
from diffusers.models.unets.unet_2d import UNet2DModel
from torch import nn

from ..runtime.artifacts import MODEL_INFO, model_info
from ..runtime.errors import HistoError
from ..runtime.fileio import sha256_dir
from ..runtime.rundirs import check_format_version


class LatentClassifier(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, in_channels: int = 4, num_classes: int = 2, width: int = 64, depth: int = 2,
                 norm_num_groups: int = 8, dropout: float = 0.0, class_names: list[str] | None = None,
                 trunk: dict | None = None):
        super().__init__()
        if num_classes < 2:
            raise HistoError(f"a latent classifier needs at least 2 classes, got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise HistoError(f"latent classifier: {len(class_names)} class names {list(class_names)} for "
                             f"num_classes={num_classes}")
        if trunk is not None:
            self._build_unet_trunk(dict(trunk), in_channels, num_classes)
            return
        temb = width * 4
        self.time_proj = Timesteps(width, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(width, temb)
        self.conv_in = nn.Conv2d(in_channels, width, 3, padding=1)
        blocks, downs = [], []
        ch = width
        for i in range(depth):
            out = width * 2 ** min(i, 2)
            blocks.append(ResnetBlock2D(in_channels=ch, out_channels=out, temb_channels=temb,
                                        groups=norm_num_groups, dropout=dropout))
            downs.append(Downsample2D(out, use_conv=True, out_channels=out, padding=1, name="op"))
            ch = out
        self.blocks = nn.ModuleList(blocks)
        self.downs = nn.ModuleList(downs)
        self.mid = ResnetBlock2D(in_channels=ch, out_channels=ch, temb_channels=temb, groups=norm_num_groups,
                                 dropout=dropout)
        self.norm_out = nn.GroupNorm(norm_num_groups, ch)
        self.head = nn.Linear(ch, num_classes)

    def _build_unet_trunk(self, trunk: dict, in_channels: int, num_classes: int) -> None:
        if int(trunk.get("in_channels", -1)) != in_channels:
            raise HistoError(f"latent classifier: the UNet trunk takes {trunk.get('in_channels')} latent channels, "
                             f"the latents have {in_channels}")
        unet = UNet2DModel(**trunk)
        self.time_proj, self.time_embedding, self.conv_in = unet.time_proj, unet.time_embedding, unet.conv_in
        self.down_blocks, self.mid_block = unet.down_blocks, unet.mid_block
        chans = [b.resnets[-1].out_channels for b in self.down_blocks] + [self.mid_block.resnets[-1].out_channels]
        groups = int(trunk.get("norm_num_groups") or 32)
        self.trunk_norms = nn.ModuleList([nn.GroupNorm(groups, c) for c in chans])
        self.head = nn.Linear(sum(chans), num_classes)

    def trunk_parameters(self) -> list[nn.Parameter]:
        """The UNet trunk's parameters (those init_trunk_from_unet copies); [] for the small trunk."""
        if self.config.trunk is None:
            return []
        return [p for name, p in self.named_parameters() if name.startswith(TRUNK_PREFIXES)]

    def forward(self, z: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """Logits [B, num_classes] for noisy latents z [B, C, h, w] at timesteps t (scalar or [B])."""
        t = torch.as_tensor(t, device=z.device)
        if t.ndim == 0:
            t = t.expand(z.shape[0])
        emb = self.time_embedding(self.time_proj(t).to(z.dtype))
        h = self.conv_in(z)
        if self.config.trunk is not None:
            feats = []
            for block in self.down_blocks:
                h, _ = block(hidden_states=h, temb=emb)
                feats.append(h)
            feats.append(self.mid_block(h, emb))
            pooled = [nn.functional.silu(norm(f)).mean(dim=(2, 3)) for norm, f in zip(self.trunk_norms, feats)]
            return self.head(torch.cat(pooled, dim=1))
        for block, down in zip(self.blocks, self.downs):
            h = down(block(h, emb))
        h = self.mid(h, emb)
        h = nn.functional.silu(self.norm_out(h)).mean(dim=(2, 3))
        return self.head(h)


TRUNK_PREFIXES = ("time_proj.", "time_embedding.", "conv_in.", "down_blocks.", "mid_block.")


def unet_trunk_config(unet: UNet2DModel) -> dict:
    """The UNet2DModel config a LatentClassifier trunk is built from (JSON-serialisable, diffusers' keys)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in unet.config.items() if not k.startswith("_")}


def init_trunk_from_unet(model: LatentClassifier, unet: UNet2DModel) -> int:
    """Copy the pretrained UNet's encoder weights into the classifier's UNet trunk; the number of tensors."""
    if model.config.trunk is None:
        raise HistoError("init_trunk_from_unet: this latent classifier has no UNet trunk")
    state = {k: v for k, v in unet.state_dict().items() if k.startswith(TRUNK_PREFIXES)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    wrong = [k for k in missing if k.startswith(TRUNK_PREFIXES)] + list(unexpected)
    if wrong:
        raise HistoError(f"the UNet's encoder does not match the classifier's trunk (e.g. {wrong[0]!r})")
    return len(state)


def load_latent_classifier(directory: str | Path) -> tuple[LatentClassifier, dict, str]:
    """(model in eval mode, its histodiffusion.json, content hash) of an exported latent classifier."""
    directory = Path(directory)
    if not (directory / "config.json").is_file() or not (directory / MODEL_INFO).is_file():
        raise HistoError(f"not an exported latent classifier (needs config.json and {MODEL_INFO}): {directory}")
    info = model_info(directory)
    check_format_version(info, directory / MODEL_INFO)
    if info.get("kind") != "latent_classifier":
        raise HistoError(f"{directory / MODEL_INFO} describes a {info.get('kind')!r}, not a latent_classifier")
    try:
        model = LatentClassifier.from_pretrained(str(directory))
    except (OSError, ValueError, RuntimeError) as e:  # missing or truncated weights
        raise HistoError(f"cannot load latent classifier from {directory}: {type(e).__name__}: {e}") from None
    classes = list(info.get("classes") or [])
    names = model.config.class_names
    if names is None:  # exported before the class names were in the config
        model.register_to_config(class_names=classes)
    elif list(names) != classes:
        raise HistoError(f"{directory}: config.json class_names {list(names)} differ from {MODEL_INFO} "
                         f"classes {classes}")
    if len(classes) != model.config.num_classes:
        raise HistoError(f"{directory}: {MODEL_INFO} names {len(classes)} classes, the model has "
                         f"{model.config.num_classes} outputs")
    model.eval().requires_grad_(False)
    return model, info, sha256_dir(directory)


