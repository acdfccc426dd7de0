"""guidance.py: the guided step equals the formula computed by hand; gradients are per sample."""
import math

import torch

from histodiffusion.core.guidance import classifier_grad, eps_from_output, guided_eps, in_window
from histodiffusion.diffusers_pipeline import guided_sample
from histodiffusion.diffusers_pipeline import make_scheduler
from histodiffusion.models.latent_classifier import LatentClassifier
from histodiffusion.models.unet import build_scheduler, build_unet

from helpers_sample import ToyClassifier


def toy_grad_by_hand(z, y, w):
    """d/dz log softmax([-m, m])[y], m = w * mean(z[:, 0]): only channel 0 gets gradient."""
    m = z[:, 0].mean(dim=(1, 2)) * w
    sign = torch.where(y == 1, 1.0, -1.0)
    dlogp_dm = 2 * torch.sigmoid(-2 * sign * m) * sign  # d/dm of -log(1 + exp(-2 sign m))
    g = torch.zeros_like(z)
    g[:, 0] = (dlogp_dm * w / (z.shape[2] * z.shape[3]))[:, None, None]
    return g


def test_classifier_grad_matches_hand_gradient():
    torch.manual_seed(0)
    z = torch.randn(3, 4, 8, 8)
    y = torch.tensor([1, 0, 1])
    g = classifier_grad(ToyClassifier(3.0), z, 500, y)
    torch.testing.assert_close(g, toy_grad_by_hand(z, y, 3.0), rtol=1e-5, atol=1e-7)


def test_gradient_is_per_sample():
    torch.manual_seed(0)
    clf = LatentClassifier(in_channels=4, num_classes=3, width=16, depth=2).eval()
    z = torch.randn(3, 4, 8, 8)
    y = torch.tensor([2, 0, 1])
    t = torch.tensor([10, 500, 900])
    batch = classifier_grad(clf, z, t, y)
    single = torch.cat([classifier_grad(clf, z[i:i + 1], t[i:i + 1], y[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(batch, single, rtol=1e-5, atol=1e-7)
    z2 = z.clone()
    z2[1:] = torch.randn(2, 4, 8, 8)  # other samples change: sample 0's gradient does not
    torch.testing.assert_close(classifier_grad(clf, z2, t, y)[0], batch[0], rtol=1e-5, atol=1e-7)
    assert batch[1].abs().sum() > 0 and not torch.allclose(batch[0], batch[1])


def test_guided_eps_formula():
    torch.manual_seed(0)
    eps, grad = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    out = guided_eps(eps, grad, torch.tensor(0.64), 3.0)
    torch.testing.assert_close(out, eps - math.sqrt(1 - 0.64) * 3.0 * grad)
    assert torch.equal(guided_eps(eps, grad, 0.5, 0.0), eps)


def test_in_window():
    assert in_window(999, (0, 0)) and in_window(0, None)
    assert in_window(300, (200, 400)) and in_window(200, (200, 400)) and in_window(400, (200, 400))
    assert not in_window(199, (200, 400)) and not in_window(401, (200, 400))
    assert in_window(torch.tensor(250), (200, 400))


def test_v_prediction_converted_to_eps():
    torch.manual_seed(0)
    x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    ab = torch.tensor(0.3)
    zt = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    v = ab.sqrt() * eps - (1 - ab).sqrt() * x0
    torch.testing.assert_close(eps_from_output(v, zt, ab, "v_prediction"), eps, rtol=1e-5, atol=1e-5)
    assert eps_from_output(eps, zt, ab, "epsilon") is eps


def test_guided_ddim_loop_equals_hand_computation():
    """Two DDIM steps (eta 0) with guidance at every step, recomputed by hand from the formula."""
    torch.manual_seed(0)
    unet = build_unet((16, 32), 1, False, 4, 8).eval()
    train = build_scheduler()
    clf = ToyClassifier(2.0)
    noise = torch.randn(3, 4, 8, 8)
    y = torch.tensor([0, 1, 1])
    s = 4.0
    sched = make_scheduler("ddim", dict(train.config))
    out = guided_sample(unet, clf, sched, noise, y, None, steps=2, scale=s, micro_batch=None)

    ts = sched.timesteps.tolist()
    assert len(ts) == 2
    ac = train.alphas_cumprod
    z = noise.clone()
    for k, t in enumerate(ts):
        with torch.no_grad():
            eps = unet(z, t).sample
        a = ac[t]
        eps = eps - torch.sqrt(1 - a) * s * toy_grad_by_hand(z, y, 2.0)
        a_prev = ac[ts[k + 1]] if k + 1 < len(ts) else sched.final_alpha_cumprod
        x0 = (z - torch.sqrt(1 - a) * eps) / torch.sqrt(a)
        z = torch.sqrt(a_prev) * x0 + torch.sqrt(1 - a_prev) * eps
    torch.testing.assert_close(out, z, rtol=1e-4, atol=1e-5)
    # and guidance made a difference
    plain = guided_sample(unet, clf, make_scheduler("ddim", dict(train.config)), noise, y, None, steps=2,
                          scale=0.0, micro_batch=None)
    assert (plain - out).abs().max() > 1e-3
