"""FLUX.3 sampling against the spec's test vectors and diffusers' scheduler: schedule, ids, RoPE angles, noise, and
the flow-map / CFG loops on stub models that record what they are given."""

from dataclasses import dataclass

import pytest
import torch

from flux_mini import flux3_sampling as s3
from flux_mini.layers import RoPE

SIGMAS_16 = [1.0, 0.990472, 0.979802, 0.967773, 0.954107, 0.938446, 0.920319, 0.899092, 0.873897, 0.843506,
             0.806126, 0.759036, 0.697885, 0.615271, 0.497487, 0.316005, 0.0]  # spec §9  # fmt: skip


def test_schedule_matches_the_spec_vectors():
    assert s3.get_schedule(16) == pytest.approx(SIGMAS_16, abs=1e-6)
    fifty = s3.get_schedule(50)
    assert len(fifty) == 51
    assert fifty[:5] == pytest.approx([1.0, 0.997064, 0.994023, 0.990873, 0.987608], abs=1e-6)
    assert fifty[-4:] == pytest.approx([0.306682, 0.224054, 0.123905, 0.0], abs=1e-6)


@pytest.mark.parametrize("steps", [1, 4, 16, 50])
def test_schedule_matches_diffusers_scheduler(steps):
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=6.93)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps))
    assert s3.get_schedule(steps) == pytest.approx(scheduler.sigmas.tolist(), abs=2e-7)


def test_ids_and_rope_angle_match_the_spec():
    ids = s3.image_ids(1, 4, 5)
    assert ids.shape == (1, 20, 4)
    assert ids[0, 3 * 5 + 2].tolist() == [0.0, 1.5, 1.0, 0.0]  # row 3, column 2
    assert s3.image_ids(2, 2, 2, reference=1)[1, 3].tolist() == [0.0, 0.5, 0.5, -2.0]
    assert s3.text_ids(1, 3)[0].tolist() == [[0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 2]]
    rotation = RoPE((32, 32, 32, 32), 10_000)(ids)[0, 0, 3 * 5]  # (64,) complex: 16 pairs per axis
    h_pair_1 = rotation[16 + 1]
    assert torch.angle(h_pair_1).item() == pytest.approx(0.843512, abs=1e-6)  # 1.5 x 0.562341
    assert (h_pair_1.real.item(), h_pair_1.imag.item()) == pytest.approx((0.664844, 0.746983), abs=1e-6)


def test_noise_is_float32_draw_then_cast_and_sizes_are_checked():
    noise = s3.get_noise(1, 64, 32, seed=3, dtype=torch.bfloat16)
    expected = torch.randn(1, 128, 4, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float32)
    assert noise.dtype == torch.bfloat16 and torch.equal(noise, expected.bfloat16())
    assert torch.equal(s3.unpack(s3.pack(expected), 4, 2), expected)
    assert s3.pack(expected)[0, 1].tolist() == expected[0, :, 0, 1].tolist()  # row-major tokens
    with pytest.raises(ValueError, match="multiples of 16"):
        s3.get_noise(1, 64, 40, seed=0, dtype=torch.float32)


def test_noise_takes_a_generator_or_a_checked_integer_seed():
    """A torch.Generator draws the batch itself (the same numbers as the integer seed it was seeded with);
    floats and seeds outside [0, 2**32) are refused, as in the other generations."""
    from_generator = s3.get_noise(2, 32, 32, seed=torch.Generator().manual_seed(7), dtype=torch.float32)
    assert torch.equal(from_generator, s3.get_noise(2, 32, 32, seed=7, dtype=torch.float32))
    assert not torch.equal(from_generator, s3.get_noise(2, 32, 32, seed=8, dtype=torch.float32))
    for bad in (1.5, -1, 2**32):
        with pytest.raises(ValueError, match="seed"):
            s3.get_noise(1, 32, 32, seed=bad, dtype=torch.float32)


@dataclass
class StubConfig:
    flow_map: bool


class Stub(torch.nn.Module):
    """v = (text length) + t: the call log shows the times, the target times and which text was used."""

    def __init__(self, flow_map: bool):
        super().__init__()
        self.config, self.calls = StubConfig(flow_map), []

    def forward(self, img, img_ids, txt, txt_ids, t, cond=None, cond_ids=None, target=None):
        self.calls.append((txt.shape[1], t[0].item(), None if target is None else target[0].item()))
        return torch.full_like(img, float(txt.shape[1])) + t[:, None, None]


def test_flow_map_steps_get_the_next_sigma_as_target():
    model, sigmas = Stub(flow_map=True), s3.get_schedule(4)
    img = torch.zeros(1, 3, 2)
    out = s3.denoise(model, img, None, torch.zeros(1, 80, 1), None, sigmas, progress=False)
    assert [c[2] for c in model.calls] == pytest.approx(sigmas[1:])  # ... and 0 after the last step
    assert [c[1] for c in model.calls] == pytest.approx(sigmas[:-1])
    expected = sum((b - a) * (80 + a) for a, b in zip(sigmas[:-1], sigmas[1:]))
    assert out[0, 0, 0].item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="no classifier-free guidance"):
        s3.denoise(model, img, None, torch.zeros(1, 80, 1), None, sigmas, cfg_scale=4.0, progress=False)


def test_base_cfg_uses_the_negative_window_and_the_guidance_formula():
    model, sigmas = Stub(flow_map=False), [1.0, 0.5, 0.0]
    txt, negative = torch.zeros(1, 160, 1), torch.zeros(1, 80, 1)
    out = s3.denoise(model, torch.zeros(1, 3, 2), None, txt, None, sigmas, negative_txt=negative,
                     negative_txt_ids=torch.zeros(1, 80, 4), cfg_scale=4.0, progress=False)  # fmt: skip
    assert [(c[0], c[2]) for c in model.calls] == [(160, None), (80, None)] * 2  # no target; own windows
    v = 80 + 4.0 * (160 - 80)  # the time terms cancel in the difference
    assert out[0, 0, 0].item() == pytest.approx(-0.5 * (v + 1.0) - 0.5 * (v + 0.5), rel=1e-6)
    with pytest.raises(ValueError, match="negative prompt"):
        s3.denoise(model, torch.zeros(1, 3, 2), None, txt, None, sigmas, cfg_scale=4.0, progress=False)
