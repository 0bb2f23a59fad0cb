"""FLUX.2 sampling pieces against the spec's numbers (flux2-format.md §7, §10) and diffusers' own functions."""

import numpy as np
import pytest
import torch
from torch import nn

from flux_mini.sampling import (
    denoise_flux2,
    flux2_image_ids,
    flux2_mu,
    flux2_pack,
    flux2_text_ids,
    flux2_unpack,
    get_flux2_noise,
    get_flux2_schedule,
)

diffusers = pytest.importorskip("diffusers")
from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402
from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline, compute_empirical_mu  # noqa: E402

CASES = [(50, 4096), (28, 4096), (4, 4096), (4, 1024), (50, 1024), (50, 4080), (28, 16384), (4, 16384),
         (50, 4300), (50, 4301), (1, 6), (7, 15)]


def test_mu_spec_vectors():
    expected = {(4096, 4): 2.291180, (4096, 28): 2.151443, (4096, 50): 2.023351, (1024, 4): 2.030690,
                (1024, 28): 1.859177, (1024, 50): 1.701956, (4080, 50): 2.021677, (4300, 50): 2.044694,
                (4301, 50): 1.184697}
    for (tokens, steps), mu in expected.items():
        assert flux2_mu(tokens, steps) == pytest.approx(mu, abs=2e-6), (tokens, steps)
    assert [flux2_mu(16384, n) for n in (1, 4, 28, 50)] == pytest.approx([3.229986] * 4, abs=2e-6)


@pytest.mark.parametrize("num_steps, tokens", CASES)
def test_mu_equals_diffusers(num_steps, tokens):
    assert flux2_mu(tokens, num_steps) == pytest.approx(compute_empirical_mu(tokens, num_steps), rel=1e-12)


def test_schedule_spec_vectors():
    spec = {
        (4, 4096): [1.0, 0.967384, 0.908144, 0.7672, 0.0],
        (4, 1024): [1.0, 0.958085, 0.883982, 0.717497, 0.0],
        (4, 16384): [1.0, 0.986986, 0.961947, 0.893915, 0.0],
    }
    for (n, tokens), values in spec.items():
        np.testing.assert_allclose(get_flux2_schedule(n, tokens), values, atol=1e-6)
    s = get_flux2_schedule(50, 4096)
    np.testing.assert_allclose(s[:4] + s[-3:], [1.0, 0.997309, 0.994521, 0.991632, 0.239631, 0.133719, 0.0], atol=1e-6)
    s = get_flux2_schedule(28, 4096)
    np.testing.assert_allclose(s[:4] + s[-3:], [1.0, 0.99571, 0.991132, 0.986234, 0.398072, 0.241515, 0.0], atol=1e-6)


@pytest.mark.parametrize("num_steps, tokens", CASES)
def test_schedule_equals_diffusers_scheduler(num_steps, tokens):
    """The diffusers pipelines' recipe: sigmas linspace(1, 1/N, N), exponential dynamic shift with the same mu."""
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential")
    sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
    scheduler.set_timesteps(sigmas=sigmas, mu=compute_empirical_mu(tokens, num_steps))
    theirs = scheduler.sigmas.tolist()
    ours = get_flux2_schedule(num_steps, tokens)
    assert len(ours) == num_steps + 1 and ours[-1] == 0.0  # ours[0] is 1 up to float32 rounding of e^mu
    np.testing.assert_allclose(ours, theirs, atol=2e-7)


def test_schedule_rejects_zero_steps():
    with pytest.raises(ValueError, match="at least 1"):
        get_flux2_schedule(0, 4096)


def test_ids_equal_diffusers():
    latents = torch.zeros(2, 128, 3, 5)
    theirs = Flux2Pipeline._prepare_latent_ids(latents)
    ours = flux2_image_ids(2, 3, 5)
    assert ours.shape == (2, 15, 4) and torch.equal(ours, theirs.to(ours.dtype).expand(2, -1, -1))
    assert ours[0, 7].tolist() == [0, 1, 2, 0]  # token r*w + c = 1*5 + 2
    txt = torch.zeros(2, 6, 8)
    assert torch.equal(flux2_text_ids(2, 6), Flux2Pipeline._prepare_text_ids(txt).float())
    assert flux2_image_ids(1, 2, 2, t=10)[0, :, 0].tolist() == [10] * 4  # a reference image's time offset


def test_pack_equals_diffusers_and_round_trips():
    latent = torch.randn(2, 128, 3, 5)
    tokens = flux2_pack(latent)
    assert torch.equal(tokens, Flux2Pipeline._pack_latents(latent))
    ids = flux2_image_ids(2, 3, 5)
    assert torch.equal(flux2_unpack(tokens, 3, 5), Flux2Pipeline._unpack_latents_with_ids(tokens, ids))


def test_noise_shape_dtype_and_seed():
    a = get_flux2_noise(1, 768, 1360, seed=3)
    assert a.shape == (1, 128, 48, 85) and a.dtype == torch.bfloat16  # spec §7.1: 1360x768 -> 85 x 48 tokens
    assert torch.equal(a, get_flux2_noise(1, 768, 1360, seed=3))
    b = get_flux2_noise(1, 768, 1360, seed=4, dtype=torch.float32)
    expected = torch.randn(1, 128, 48, 85, generator=torch.Generator().manual_seed(4))
    assert torch.equal(b, expected)


class Recorder(nn.Module):
    """A fake model: velocity = a fixed function of (img, txt, t), recording every call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, img, img_ids, txt, txt_ids, timesteps, guidance=None):
        self.calls.append((txt.sum().item(), timesteps.tolist(), None if guidance is None else guidance.tolist()))
        return img * timesteps[:, None, None] + txt.mean(dim=(1, 2))[:, None, None]


def test_denoise_distilled_and_cfg_against_a_hand_loop():
    g = torch.Generator().manual_seed(0)
    img, txt, neg = (torch.randn(2, 6, 4, generator=g) for _ in range(3))
    ids, txt_ids = flux2_image_ids(2, 2, 3), flux2_text_ids(2, 4)
    schedule = get_flux2_schedule(3, 6)

    def velocity(x, text, t):
        return x * t + text.mean(dim=(1, 2))[:, None, None]

    model = Recorder()
    out = denoise_flux2(model, img, ids, txt, txt_ids, schedule, guidance=4.0, progress=False)
    x = img
    for t0, t1 in zip(schedule[:-1], schedule[1:]):
        x = x + (t1 - t0) * velocity(x, txt, t0)
    torch.testing.assert_close(out, x)
    assert len(model.calls) == 3 and all(c[2] == [4.0, 4.0] for c in model.calls)

    model = Recorder()
    out = denoise_flux2(model, img, ids, txt, txt_ids, schedule, negative_txt=neg, cfg_scale=3.0, progress=False)
    x = img
    for t0, t1 in zip(schedule[:-1], schedule[1:]):
        uncond = velocity(x, neg, t0)
        x = x + (t1 - t0) * (uncond + 3.0 * (velocity(x, txt, t0) - uncond))
    torch.testing.assert_close(out, x)
    assert len(model.calls) == 6 and all(c[2] is None for c in model.calls)
    with pytest.raises(ValueError, match="both negative_txt and cfg_scale"):
        denoise_flux2(model, img, ids, txt, txt_ids, schedule, negative_txt=neg)
