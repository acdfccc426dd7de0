"""Classifier guidance in latent space: small pure functions, called by the guided sampling loop
(diffusers_pipeline.py) and by the tests.

    eps'(z_t, t) = eps(z_t, t) - sqrt(1 - alpha_bar_t) * s * grad_z log p(y | z_t, t)

(Dhariwal & Nichol 2021, eq. 14; HistoDiffusion applies it to the latents of the autoencoder.)
"""
from __future__ import annotations

import torch


def classifier_grad(classifier, z_t: torch.Tensor, t, y: torch.Tensor) -> torch.Tensor:
    """grad_z log p(y | z_t, t) for every sample of the batch.

    log-probabilities of the target classes are summed over the batch before differentiating; as the
    classifier treats samples independently (no batch statistics), each sample's gradient is its own.
    """
    with torch.enable_grad():
        z = z_t.detach().requires_grad_(True)
        logits = classifier(z, t)
        logp = torch.log_softmax(logits.float(), dim=-1)
        selected = logp[torch.arange(z.shape[0], device=z.device), y.to(z.device)]
        (grad,) = torch.autograd.grad(selected.sum(), z)
    return grad.detach()


def guided_eps(eps: torch.Tensor, grad: torch.Tensor, alpha_bar_t, scale: float) -> torch.Tensor:
    """eps - sqrt(1 - alpha_bar_t) * scale * grad."""
    alpha_bar_t = torch.as_tensor(alpha_bar_t, dtype=eps.dtype, device=eps.device)
    return eps - torch.sqrt(1.0 - alpha_bar_t) * scale * grad.to(eps.dtype)


def in_window(t, window: tuple[int, int] | None) -> bool:
    """Whether guidance applies at timestep t: lo <= t <= hi; None or (0, 0) means every step."""
    if window is None or tuple(window) == (0, 0):
        return True
    lo, hi = window
    t = int(t)
    return lo <= t <= hi


def eps_from_output(output: torch.Tensor, z_t: torch.Tensor, alpha_bar_t, prediction_type: str) -> torch.Tensor:
    """The UNet's output as an epsilon prediction (converts v-prediction; epsilon passes through)."""
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        a = torch.as_tensor(alpha_bar_t, dtype=z_t.dtype, device=z_t.device)
        return a.sqrt() * output + (1 - a).sqrt() * z_t
    raise ValueError(f"unsupported prediction_type {prediction_type!r} (epsilon or v_prediction)")
