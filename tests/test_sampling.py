"""Sampling pieces against the spec's formulas and measured vectors (flux-format.md §5, §8) and diffusers."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from flux_mini.sampling import (
    denoise,
    euler_step,
    get_noise,
    get_schedule,
    image_ids,
    latent_size,
    pack,
    text_ids,
    unpack,
)


def spec_schedule(num_steps: int, seq_len: int, shift: bool) -> list[float]:
    """§5.5 in float64: linspace(1, 0), then t -> e^mu / (e^mu + 1/t - 1), mu on the line (256, .5)-(4096, 1.15)."""
    ts = [1 - i / num_steps for i in range(num_steps + 1)]
    if not shift:
        return ts
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (seq_len - 256)
    return [0.0 if t == 0 else math.exp(mu) / (math.exp(mu) + 1 / t - 1) for t in ts]


@pytest.mark.parametrize("num_steps, seq_len", [(50, 4096), (28, 1024), (50, 4080), (4, 4096), (1, 64), (10, 9000)])
@pytest.mark.parametrize("shift", [True, False])
def test_schedule_matches_spec_formula(num_steps, seq_len, shift):
    ours = get_schedule(num_steps, seq_len, shift=shift)
    assert len(ours) == num_steps + 1 and ours[0] == 1.0 and ours[-1] == 0.0
    np.testing.assert_allclose(ours, spec_schedule(num_steps, seq_len, shift), atol=2e-7)


def test_schedule_spec_test_vectors():
    s = get_schedule(50, 4096)
    np.testing.assert_allclose(s[:5], [1.0, 0.99358, 0.986979, 0.98019, 0.973204], atol=1e-6)
    np.testing.assert_allclose(s[-3:], [0.116289, 0.06055, 0.0], atol=1e-6)
    s = get_schedule(28, 1024)
    np.testing.assert_allclose(s[:5], [1.0, 0.980656, 0.960644, 0.939928, 0.918472], atol=1e-6)
    np.testing.assert_allclose(s[-3:], [0.126204, 0.06502, 0.0], atol=1e-6)
    np.testing.assert_allclose(get_schedule(4, 4096), [1.0, 0.904531, 0.759511, 0.512844, 0.0], atol=1e-6)
    assert get_schedule(4, 4096, shift=False) == [1.0, 0.75, 0.5, 0.25, 0.0]


@pytest.mark.parametrize("num_steps, seq_len", [(50, 4096), (28, 1024), (7, 300)])
def test_schedule_matches_diffusers_scheduler(num_steps, seq_len):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
    )
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (seq_len - 256)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps).tolist(), mu=mu)
    np.testing.assert_allclose(get_schedule(num_steps, seq_len), scheduler.sigmas.numpy(), atol=2e-7)

    schnell = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=False, shift=1.0)
    schnell.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps).tolist())
    np.testing.assert_allclose(get_schedule(num_steps, seq_len, shift=False), schnell.sigmas.numpy(), atol=2e-7)


def test_schedule_rejects_zero_steps():
    with pytest.raises(ValueError, match="num_steps"):
        get_schedule(0, 256)


# ----------------------------------------------------------------------------------------------
# Packing and ids


@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(1, 3),
    c=st.integers(1, 5),
    h=st.integers(1, 6).map(lambda n: 2 * n),
    w=st.integers(1, 6).map(lambda n: 2 * n),
)
def test_pack_unpack_round_trip_and_layout(b, c, h, w):
    latent = torch.randn(b, c, h, w, dtype=torch.float64)
    tokens = pack(latent)
    assert tokens.shape == (b, h // 2 * w // 2, 4 * c)
    assert torch.equal(unpack(tokens, h, w), latent)
    # spec §5.3, element by element: token r*(w/2)+c', feature ch*4 + py*2 + px
    for _ in range(5):
        bi, ch, y, x = (int(torch.randint(n, ())) for n in (b, c, h, w))
        r, col, py, px = y // 2, x // 2, y % 2, x % 2
        assert tokens[bi, r * (w // 2) + col, ch * 4 + py * 2 + px] == latent[bi, ch, y, x]


def test_pack_feature_order_spec_example():
    ch, y, x = torch.meshgrid(torch.arange(16), torch.arange(4), torch.arange(6), indexing="ij")
    tokens = pack((ch * 24 + y * 6 + x)[None])
    assert tokens.shape == (1, 6, 64)
    assert tokens[0, 0, :8].tolist() == [0, 1, 6, 7, 24, 25, 30, 31]
    assert tokens[0, 1, :4].tolist() == [2, 3, 8, 9]
    assert tokens[0, 3, :4].tolist() == [12, 13, 18, 19]


def test_ids_layout():
    ids = image_ids(2, 3, 5)
    assert ids.shape == (2, 15, 3) and ids.dtype == torch.float32
    for r in range(3):
        for c in range(5):
            assert ids[1, r * 5 + c].tolist() == [0.0, r, c]
    txt = text_ids(2, 7)
    assert txt.shape == (2, 7, 3) and txt.dtype == torch.float32 and not txt.any()


# ----------------------------------------------------------------------------------------------
# Noise


def test_noise_spec_test_vector_and_ceil_rule():
    noise = get_noise(1, 1024, 1024, dtype=torch.bfloat16, seed=42)
    assert noise.shape == (1, 16, 128, 128) and noise.dtype == torch.bfloat16
    assert noise.flatten()[:4].tolist() == [1.9296875, 1.484375, 0.90234375, -2.109375]
    assert get_noise(1, 1000, 600, seed=0).shape == (1, 16, 126, 76)
    assert latent_size(1000, 600) == (126, 76)
    # pixel space (f = 1, 3 channels): 2 * ceil(H / 2)
    assert get_noise(2, 31, 34, channels=3, downsample_factor=1, dtype=torch.float32, seed=0).shape == (2, 3, 32, 34)


def test_noise_is_seeded_and_drawn_in_dtype():
    a = get_noise(1, 64, 48, dtype=torch.float32, seed=3)
    assert torch.equal(a, get_noise(1, 64, 48, dtype=torch.float32, seed=3))
    assert not torch.equal(a, get_noise(1, 64, 48, dtype=torch.float32, seed=4))
    expected = torch.randn(1, 16, 8, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float32)
    assert torch.equal(a, expected)


# ----------------------------------------------------------------------------------------------
# Euler loop


class LinearField(nn.Module):
    """v(x, t) = x; records what it was called with."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None):
        self.calls.append((timesteps, guidance))
        return img


def test_denoise_is_euler_on_the_schedule():
    img = torch.randn(2, 6, 8, dtype=torch.float64)
    timesteps = get_schedule(5, 6)
    model = LinearField()
    out = denoise(model, img, image_ids(2, 2, 3), torch.zeros(2, 4, 3), text_ids(2, 4), torch.zeros(2, 3),
                  timesteps, guidance=None, progress=False)
    factor = math.prod(1 + (t_prev - t_curr) for t_curr, t_prev in zip(timesteps[:-1], timesteps[1:]))
    torch.testing.assert_close(out, img * factor, rtol=1e-12, atol=0)
    assert [float(t[0]) for t, _ in model.calls] == timesteps[:-1]
    assert all(g is None for _, g in model.calls)
    assert torch.equal(euler_step(torch.ones(1), torch.full((1,), 2.0), 0.75, 0.5), torch.full((1,), 0.5))


def test_denoise_timestep_and_guidance_in_latent_dtype():
    """Spec §3.11/§8: t and guidance are rounded to the latent dtype (bf16) before the model sees them."""
    model = LinearField()
    img = torch.randn(1, 4, 4, dtype=torch.bfloat16)
    denoise(model, img, image_ids(1, 2, 2), torch.zeros(1, 2, 3), text_ids(1, 2), torch.zeros(1, 3),
            [0.75951093, 0.06055027, 0.0], guidance=3.5, progress=False)
    (t0, g0), (t1, _) = model.calls
    assert t0.dtype == g0.dtype == torch.bfloat16 and t0.shape == g0.shape == (1,)
    assert t0.item() == 0.7578125 and t1.item() == 0.060546875 and g0.item() == 3.5
