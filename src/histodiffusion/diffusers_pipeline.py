"""HistoDiffusionPipeline: class-conditional synthesis by classifier guidance in latent space, as a
diffusers `DiffusionPipeline`; and `guided_sample`, the one guided sampling loop (the `sample` stage
runs it through this pipeline).

    eps'(z_t, t) = eps(z_t, t) - sqrt(1 - alpha_bar_t) * s * grad_z log p(y | z_t, t)      (guidance.py)

at the steps whose t lies in the guidance window, with diffusers' DDIM (eta configurable, no clipping)
or DPM-Solver++ (multistep, order 2). Components: `vae` (AutoencoderKL; its config holds the latent
scaling factor), `unet` (unconditional UNet2DModel), `scheduler` (the sampling scheduler, fed epsilon),
`latent_classifier` (the noise-aware p(y | z_t, t), class names in its config). The UNet's own output
type (epsilon or v_prediction) is the pipeline config's `prediction_type`.

    import histodiffusion.diffusers_pipeline          # makes the pipeline class known to diffusers
    pipe = DiffusionPipeline.from_pretrained("runs/default/samples/pipeline")
    out = pipe(class_labels=["lung_aca"] * 4, guidance_scale=10, generator=[torch.Generator().manual_seed(s)
                                                                             for s in range(4)])

Reproducibility: with one generator per sample (a list), each image depends on its own generator only,
not on the batch it is in; every model call runs on micro-batches of exactly MICRO_BATCH rows
(zero-padded), because CPU kernels give results that differ in the last bits with the number of rows.
"""
from __future__ import annotations

import inspect
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput

from .core.guidance import classifier_grad, eps_from_output, guided_eps, in_window
from .core.seeds import sample_seed  # noqa: F401  (the model cards name it here: the seed of sample i)
from .core.transforms import add_detail, match_color
from .models.latent_classifier import LatentClassifier  # noqa: F401  (diffusers resolves the component here)
from .runtime.errors import HistoError

SCHEDULERS = ("ddim", "dpmsolver++")
MICRO_BATCH = 16
OUTPUT_TYPES = ("pil", "np", "latent")


# --------------------------------------------------------------------------------------------------
# Pure helpers: schedulers, micro-batches
# --------------------------------------------------------------------------------------------------
def make_scheduler(name: str, config: dict):
    """A sampling scheduler built from the training scheduler's config (fed epsilon by the loop)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    if name == "ddim":
        return DDIMScheduler.from_config(config, clip_sample=False, thresholding=False, prediction_type="epsilon")
    if name == "dpmsolver++":
        return DPMSolverMultistepScheduler.from_config(
            config, algorithm_type="dpmsolver++", solver_order=2, thresholding=False, prediction_type="epsilon",
            timestep_spacing="linspace", lower_order_final=True)
    raise HistoError(f"scheduler must be one of {', '.join(SCHEDULERS)}, not {name!r}")


def by_rows(fn, x: torch.Tensor, *rows: torch.Tensor, micro_batch: int | None = MICRO_BATCH) -> torch.Tensor:
    """fn(x, *rows) evaluated on micro-batches of exactly `micro_batch` rows (zero-padded); None: at once."""
    if not micro_batch:
        return fn(x, *rows)
    outs = []
    for s in range(0, len(x), micro_batch):
        parts = [a[s:s + micro_batch] for a in (x, *rows)]
        n = len(parts[0])
        if n < micro_batch:
            parts = [torch.cat([a, a.new_zeros((micro_batch - n, *a.shape[1:]))]) for a in parts]
        outs.append(fn(*parts)[:n])
    return torch.cat(outs)


def step_kwargs(scheduler, eta: float, generators) -> dict:
    """eta and the generator(s), passed to scheduler.step only when its signature takes them."""
    params = inspect.signature(scheduler.step).parameters
    extra = {}
    if "eta" in params:
        extra["eta"] = eta
    elif eta:
        raise HistoError(f"eta={eta} is given but {type(scheduler).__name__}.step takes no eta (DDIM does)")
    if "generator" in params:
        extra["generator"] = generators
    return extra


# --------------------------------------------------------------------------------------------------
# The guided sampling loop
# --------------------------------------------------------------------------------------------------
def start_index(steps: int, strength: float) -> int:
    """Index of the first of `steps` timesteps run when a clean latent is noised to `strength` (SDEdit:
    the last round(strength * steps) steps are run; strength 1: all of them)."""
    if not 0 < strength <= 1:
        raise HistoError(f"strength must be in (0, 1], got {strength}")
    run = int(round(strength * steps))
    if run < 1:
        raise HistoError(f"strength {strength} of {steps} steps runs no step: raise strength or steps")
    return steps - run


def guided_sample(unet, classifier, scheduler, noise: torch.Tensor, y: torch.Tensor, generators, *, steps: int,
                  scale: float, window=(0, 0), eta: float = 0.0, prediction_type: str = "epsilon",
                  micro_batch: int | None = MICRO_BATCH, init: torch.Tensor | None = None,
                  strength: float = 1.0) -> torch.Tensor:
    """Run the reverse process from unit-Gaussian `noise` [B, C, h, w] to latents z_0 (scaled space).

    `generators`: one per sample (DDIM's eta noise), one for the batch, or None. Model calls run on
    fixed-size micro-batches. `classifier` may be None when `scale` is 0. `init`: clean latents (scaled
    space) noised with `noise` to the timestep at `strength` of the schedule, from which the remaining
    steps run (SDEdit, Meng et al. 2022: variations of real tiles); None: from pure noise.
    """
    # 1. timesteps of the sampling schedule (with init: only its last `strength` share)
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps
    if init is None:
        # 2. initial latents (unit noise scaled to the scheduler's initial sigma)
        z = noise * scheduler.init_noise_sigma
    else:
        # 2'. initial latents: the clean latents noised to the first timestep that is run
        begin = start_index(steps, strength) * scheduler.order
        timesteps = timesteps[begin:]
        if hasattr(scheduler, "set_begin_index"):  # multistep solvers count their steps from here
            scheduler.set_begin_index(begin)
        if init.shape != noise.shape:
            raise HistoError(f"init latents have shape {tuple(init.shape)}, the noise {tuple(noise.shape)}")
        z = scheduler.add_noise(init.to(noise), noise, timesteps[:1].repeat(len(noise)))
    extra = step_kwargs(scheduler, eta, generators)
    for t in timesteps:
        # 3. scheduler-specific input scaling (identity for DDIM and DPM-Solver++)
        z_in = scheduler.scale_model_input(z, t)
        # 4. predict the noise eps(z_t, t) with the unconditional UNet
        with torch.no_grad():
            out = by_rows(lambda zz: unet(zz, t).sample, z_in, micro_batch=micro_batch)
        alpha_bar = scheduler.alphas_cumprod[int(t)]
        eps = eps_from_output(out, z_in, alpha_bar, prediction_type)
        # 5. classifier guidance inside the window: eps' = eps - sqrt(1 - alpha_bar_t) * s * grad log p(y | z_t, t)
        if scale != 0 and in_window(t, window):
            grad = by_rows(lambda zz, yy: classifier_grad(classifier, zz, t, yy), z_in, y, micro_batch=micro_batch)
            eps = guided_eps(eps, grad, alpha_bar, scale)
        # 6. compute the previous latents z_{t-1} (DDIM draws its eta noise from each sample's generator)
        z = scheduler.step(eps, t, z, **extra).prev_sample
    return z


@torch.no_grad()
def decode_uint8(vae, z: torch.Tensor, scaling_factor: float, micro_batch: int | None = MICRO_BATCH) -> np.ndarray:
    """Latents (scaled space) -> uint8 images [B, H, W, 3]."""
    x = by_rows(lambda zz: vae.decode(zz).sample, z / scaling_factor, micro_batch=micro_batch)
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def encode_latents(vae, tiles: np.ndarray, scaling_factor: float,
                   micro_batch: int | None = MICRO_BATCH) -> torch.Tensor:
    """uint8 tiles [B, H, W, 3] -> their posterior means in the scaled latent space [B, C, h, w] (what `encode`
    caches and `sample` starts from)."""
    from .models.autoencoder import encode_posterior
    from .models.classifier import to_model_input

    x = to_model_input(torch.from_numpy(np.ascontiguousarray(tiles))).to(vae.device, vae.dtype)
    return by_rows(lambda xx: encode_posterior(vae, xx)[0], x, micro_batch=micro_batch) * scaling_factor


def tiles_uint8(image) -> np.ndarray:
    """The starting tiles as uint8 [B, H, W, 3]: from a uint8 array or tensor [B, H, W, 3], or a list of RGB PIL
    images or uint8 [H, W, 3] arrays (other modes and dtypes are refused, not converted)."""
    if isinstance(image, (list, tuple)):
        arrays = []
        for i, im in enumerate(image):
            if hasattr(im, "mode") and hasattr(im, "size"):  # a PIL image
                if im.mode != "RGB":
                    raise HistoError(f"image {i} is a PIL image of mode {im.mode}: give RGB tiles "
                                     f"(Image.convert('RGB') if that is what you mean)")
                im = np.asarray(im)
            arrays.append(im.cpu().numpy() if torch.is_tensor(im) else np.asarray(im))
        if not arrays or len({a.shape for a in arrays}) > 1:
            raise HistoError(f"image holds {len(arrays)} tiles of sizes {sorted({a.shape for a in arrays})}: give "
                             f"one or more tiles of one size")
        if len({a.dtype for a in arrays}) > 1:
            raise HistoError(f"image mixes tiles of dtypes {sorted({str(a.dtype) for a in arrays})}: give uint8 tiles")
        image = np.stack(arrays)
    x = image.cpu().numpy() if torch.is_tensor(image) else np.asarray(image)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise HistoError(f"image must hold uint8 RGB tiles [B, H, W, 3] (or a list of RGB PIL images), got "
                         f"{x.dtype} of shape {tuple(x.shape)}")
    return x


@torch.no_grad()
def class_probabilities(classifier, z: torch.Tensor, micro_batch: int | None = MICRO_BATCH) -> torch.Tensor:
    """p(y | z, t=0) of every class [B, C]: the latent classifier's reading of clean latents."""
    return torch.softmax(by_rows(lambda zz: classifier(zz, 0), z, micro_batch=micro_batch).float(), dim=-1)


def target_confidence(classifier, z: torch.Tensor, y: torch.Tensor, micro_batch: int | None = MICRO_BATCH):
    """p(y | z, t=0) of the final latents."""
    probs = class_probabilities(classifier, z, micro_batch)
    return probs[torch.arange(len(y)), y.to(probs.device)]


# --------------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------------
@dataclass
class HistoDiffusionPipelineOutput(BaseOutput):
    """images: PIL images, float32 [B, H, W, 3] in [0, 1] (np: the PNGs' uint8 values / 255) or the final
    latents [B, C, h, w] (latent); class_labels: the target class of each; confidence: p(y | z_0, t=0)."""

    images: list | np.ndarray | torch.Tensor
    class_labels: list[str]
    confidence: np.ndarray


class HistoDiffusionPipeline(DiffusionPipeline):
    """Classifier-guided latent diffusion for histopathology tiles (HistoDiffusion, Ye et al. 2023)."""

    model_cpu_offload_seq = "latent_classifier->unet->vae"

    def __init__(self, vae, unet, scheduler, latent_classifier, prediction_type: str = "epsilon"):
        super().__init__()
        if prediction_type not in ("epsilon", "v_prediction"):
            raise HistoError(f"prediction_type must be epsilon or v_prediction, not {prediction_type!r}")
        latent_classifier.eval().requires_grad_(False)  # guidance differentiates wrt the latents only
        self.register_modules(vae=vae, unet=unet, scheduler=scheduler, latent_classifier=latent_classifier)
        self.register_to_config(prediction_type=prediction_type)

    @classmethod
    def from_components(cls, m: dict, scheduler: str = "dpmsolver++") -> "HistoDiffusionPipeline":
        """From models/bundle.py's checked components, with sampling scheduler `scheduler` (ddim | dpmsolver++)."""
        return cls(vae=m["vae"], unet=m["unet"], scheduler=make_scheduler(scheduler, m["scheduler_config"]),
                   latent_classifier=m["classifier"], prediction_type=m["prediction_type"])

    @classmethod
    def from_models(cls, model: str | Path, classifier: str | Path, vae: str | Path = "",
                    scheduler: str = "dpmsolver++") -> "HistoDiffusionPipeline":
        """From histodiffusion folders: an LDM or base (`model`), a latent classifier, optionally another
        autoencoder (e.g. the fine-tuned decoder), checked to share one latent space."""
        from .models.bundle import load_components

        return cls.from_components(load_components(model, classifier, vae), scheduler)

    @property
    def class_names(self) -> list[str]:
        names = getattr(self.latent_classifier.config, "class_names", None)
        return list(names) if names else [str(i) for i in range(self.latent_classifier.config.num_classes)]

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    def class_indices(self, class_labels) -> list[int]:
        """Class names or indices (ints, or digit strings that are not a class name) -> indices."""
        names = self.class_names
        if isinstance(class_labels, (str, int, np.integer)) or torch.is_tensor(class_labels) and class_labels.ndim == 0:
            class_labels = [class_labels]
        out = []
        for c in (class_labels.tolist() if torch.is_tensor(class_labels) else class_labels):
            if isinstance(c, str) and c in names:
                out.append(names.index(c))
            elif str(c).isdigit() and int(c) < len(names):
                out.append(int(c))
            else:
                raise HistoError(f"class {c!r} is not one of the latent classifier's classes {names} "
                                 f"(or an index 0..{len(names) - 1})")
        if not out:
            raise HistoError("class_labels is empty: give one class name or index per image")
        return out

    def initial_noise(self, n: int, generator=None) -> torch.Tensor:
        """Unit Gaussian latents [n, C, h, w]: one draw per generator when `generator` is a list."""
        cfg = self.unet.config
        shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
        if isinstance(generator, (list, tuple)):
            if len(generator) != n:
                raise HistoError(f"{len(generator)} generators for {n} class labels: give one per image")
            return torch.cat([torch.randn((1, *shape), generator=g, device=g.device) for g in generator])
        return torch.randn((n, *shape), generator=generator,
                           device=generator.device if generator is not None else "cpu")

    @property
    def tile_size(self) -> int:
        """Edge of the tiles in pixels: the latents' edge times the autoencoder's downsampling factor."""
        from .models.autoencoder import downsample_factor

        return int(self.unet.config.sample_size) * downsample_factor(self.vae.config.block_out_channels)

    def decode_uint8(self, latents: torch.Tensor, micro_batch: int | None = MICRO_BATCH) -> np.ndarray:
        """Final latents -> uint8 images [B, H, W, 3], with the scaling factor of the autoencoder's config."""
        return decode_uint8(self.vae, latents.to(self.vae.device, self.vae.dtype), self.scaling_factor, micro_batch)

    def check_window(self, guidance_window) -> tuple[int, int]:
        T = int(self.scheduler.config.num_train_timesteps)
        lo, hi = (0, 0) if guidance_window is None else (int(v) for v in guidance_window)
        if not 0 <= lo <= hi <= T:
            raise HistoError(f"guidance_window {lo},{hi} must satisfy 0 <= lo <= hi <= T={T}")
        return lo, hi

    def check_tiles(self, image) -> np.ndarray:
        """`image` as uint8 tiles [B, H, W, 3], checked to be of this pipeline's tile size."""
        tiles = tiles_uint8(image)
        if tiles.shape[1:3] != (self.tile_size, self.tile_size):
            raise HistoError(f"image holds {tiles.shape[1]}x{tiles.shape[2]} px tiles, this pipeline's autoencoder "
                             f"makes {self.tile_size}x{self.tile_size} px tiles")
        return tiles

    @torch.no_grad()
    def read_classes(self, image=None, init_latents: torch.Tensor | None = None,
                     micro_batch: int | None = MICRO_BATCH) -> tuple[list[str], np.ndarray]:
        """(class names, probabilities [B, C]) the latent classifier reads in real tiles at t = 0: `image` (uint8
        [B, H, W, 3] or RGB PIL images, encoded to their posterior means) or their clean latents `init_latents`.
        How `run --start-from unlabeled` labels the target's unlabeled tiles before starting samples from them;
        the names can be passed on as class_labels with the same image."""
        if (image is None) == (init_latents is None):
            raise HistoError("read_classes reads image or init_latents: give one of them")
        device = self._execution_device
        z = (encode_latents(self.vae, self.check_tiles(image), self.scaling_factor, micro_batch) if image is not None
             else init_latents).to(device, self.unet.dtype)
        probs = class_probabilities(self.latent_classifier, z, micro_batch).cpu().numpy()
        return [self.class_names[int(i)] for i in probs.argmax(1)], probs

    @torch.no_grad()
    def __call__(self, class_labels, guidance_scale: float = 10.0, num_inference_steps: int = 20, generator=None,
                 guidance_window: tuple[int, int] | None = None, eta: float = 0.0, latents: torch.Tensor | None = None,
                 output_type: str = "pil", return_dict: bool = True, micro_batch: int | None = MICRO_BATCH,
                 init_latents: torch.Tensor | None = None, strength: float = 1.0, image=None, detail: bool = False,
                 color_match: bool = False):
        """Synthesise one tile per entry of `class_labels` (class names or indices).

        guidance_scale: s (0: unguided); guidance_window: guide only for t in [lo, hi] (None: every step);
        generator: one torch.Generator per image (images then do not depend on the batch), one for the
        batch, or None; eta: DDIM's noise (schedulers without eta refuse a non-zero one); latents: unit
        Gaussian starting latents instead of drawing them; output_type: "pil", "np" or "latent";
        init_latents: clean latents (scaled space, one per image, e.g. of real tiles of the target class)
        noised to `strength` of the schedule (0 < strength <= 1) and denoised from there: SDEdit variations;
        image: the real tiles the samples start from (uint8 [B, H, W, 3], or a list of RGB PIL images), one per
        class label, needing strength < 1: encoded to their posterior means unless init_latents are given
        (then image holds the pixels those latents came from, turned as they are);
        detail: each decoded sample gets back what the autoencoder's round trip loses on its starting tile
        (sample + tile - the tile's latent decoded, core.transforms.add_detail), so it keeps the tile's nuclei
        and colours and carries only the denoising step's change; color_match: each decoded sample then takes
        its tile's per-channel mean and std (core.transforms.match_color). Both need image and decoded output.
        """
        # 1. check the arguments; class labels (names or indices) -> indices
        if output_type not in OUTPUT_TYPES:
            raise HistoError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, not {output_type!r}")
        if self.scheduler.config.get("prediction_type", "epsilon") != "epsilon":
            raise HistoError(f"the loop feeds the scheduler epsilon: build {type(self.scheduler).__name__} with "
                             f"prediction_type='epsilon' (the UNet's own type is the pipeline's prediction_type)")
        if guidance_scale < 0 or num_inference_steps < 1:
            raise HistoError(f"need guidance_scale >= 0 and num_inference_steps >= 1, got {guidance_scale}, "
                             f"{num_inference_steps}")
        window = self.check_window(guidance_window)
        if init_latents is None and image is None and strength != 1.0:
            raise HistoError(f"strength {strength} needs image or init_latents (the tiles or clean latents to start "
                             f"from)")
        y = torch.tensor(self.class_indices(class_labels), dtype=torch.long)
        tiles = None
        if image is not None:
            if strength >= 1:
                raise HistoError(f"image gives the tiles to start from: strength must be below 1 (1 starts from pure "
                                 f"noise), got {strength}")
            tiles = self.check_tiles(image)
            if len(tiles) != len(y):
                raise HistoError(f"image holds {len(tiles)} tiles for {len(y)} class labels: give one per image")
        for name, on in (("detail", detail), ("color_match", color_match)):
            if on and tiles is None:
                raise HistoError(f"{name}=True finishes each sample with its starting tile: give image= (the tiles "
                                 f"the samples start from)")
            if on and output_type == "latent":
                raise HistoError(f"{name}=True works on decoded images, output_type 'latent' returns none")
        # 2. initial unit-Gaussian latents (one draw per generator when given a list)
        noise = self.initial_noise(len(y), generator) if latents is None else latents
        if noise.shape[0] != len(y):
            raise HistoError(f"latents hold {noise.shape[0]} samples for {len(y)} class labels")
        device = self._execution_device
        noise, y = noise.to(device, self.unet.dtype), y.to(device)
        if init_latents is None and tiles is not None:
            # 2'. the starting tiles' clean latents: their posterior means in the scaled space
            init_latents = encode_latents(self.vae, tiles, self.scaling_factor, micro_batch)
        if init_latents is not None:
            init_latents = init_latents.to(device, self.unet.dtype)
        # 3. the guided reverse process: the one loop, shared with the sample stage
        z0 = guided_sample(self.unet, self.latent_classifier, self.scheduler, noise, y, generator,
                           steps=num_inference_steps, scale=guidance_scale, window=window, eta=eta,
                           prediction_type=self.config.prediction_type, micro_batch=micro_batch,
                           init=init_latents, strength=strength)
        # 4. how confidently the latent classifier sees the target class in the final latents
        conf = target_confidence(self.latent_classifier, z0, y, micro_batch).cpu().numpy()
        # 5. decode with the autoencoder (scaling factor from its config), quantise as the PNGs are
        if output_type == "latent":
            images = z0
        else:
            uint8 = self.decode_uint8(z0, micro_batch)
            # 6. finish each sample with its starting tile: what the round trip lost on it, then its colours
            if detail:
                trip = self.decode_uint8(init_latents, micro_batch)
                uint8 = np.stack([add_detail(im, t, r) for im, t, r in zip(uint8, tiles, trip)])
            if color_match:
                uint8 = np.stack([match_color(im, t) for im, t in zip(uint8, tiles)])
            images = _to_pil(uint8) if output_type == "pil" else uint8.astype(np.float32) / 255.0
        self.maybe_free_model_hooks()
        labels = [self.class_names[int(i)] for i in y.tolist()]
        if not return_dict:
            return images, labels, conf
        return HistoDiffusionPipelineOutput(images=images, class_labels=labels, confidence=conf)


def export_pipeline(pipe: HistoDiffusionPipeline, folder: str | Path, record: dict) -> Path:
    """Write `pipe` as a diffusers pipeline folder, atomically: model_index.json, vae/, unet/, scheduler/,
    latent_classifier/ (save_pretrained, safetensors), the histodiffusion.json records of the autoencoder
    and the latent classifier beside their weights (so each sub-folder also loads as a histodiffusion model
    folder), histodiffusion.json (kind "pipeline": where the models came from, how they were used) and the
    model card README.md. `record` names the source folders "vae" and "classifier" (records copied)."""
    from .runtime.artifacts import MODEL_INFO, format_meta
    from .models.cards import CARD, pipeline_card
    from .runtime.fileio import atomic_path, write_json_atomic, write_text_atomic

    folder = Path(folder)
    record = {**record, "scheduler_class": type(pipe.scheduler).__name__,
              "prediction_type": pipe.config.prediction_type, "class_names": pipe.class_names}
    with atomic_path(folder) as tmp:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        for sub, key in (("vae", "vae"), ("latent_classifier", "classifier")):
            src = Path(record.get(key) or "") / MODEL_INFO
            if record.get(key) and src.is_file():
                shutil.copy2(src, tmp / sub / MODEL_INFO)
        write_json_atomic(tmp / MODEL_INFO, format_meta(kind="pipeline", **record))
        write_text_atomic(tmp / CARD, pipeline_card(tmp, folder.name, record))
    return folder


def _to_pil(images: np.ndarray) -> list:
    from PIL import Image

    return [Image.fromarray(im) for im in images]


def register_with_diffusers() -> None:
    """Make `DiffusionPipeline.from_pretrained` find this class by the name in model_index.json
    (diffusers looks `_class_name` up in its own namespace); done when this module is imported."""
    import diffusers

    if getattr(diffusers, HistoDiffusionPipeline.__name__, None) is not HistoDiffusionPipeline:
        setattr(diffusers, HistoDiffusionPipeline.__name__, HistoDiffusionPipeline)


register_with_diffusers()
