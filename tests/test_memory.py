"""The memory estimate that refuses runs the machine cannot hold, and the size it proposes instead."""

from __future__ import annotations

from dataclasses import replace

import pytest

from flux_mini.memory import GiB, RunSize, available_bytes, estimate_bytes, fitting_size

FLUX1_1024 = RunSize(  # FLUX.1 [schnell] at 1024x1024 in bfloat16, 3 concepts, the real autoencoder and T5-XXL
    batch=1, image_tokens=4096, text_tokens=256, hidden=3072, heads=24, mlp_ratio=4.0, token_channels=64,
    dtype_bytes=2, concepts=3, pixels=1024 * 1024, autoencoder_channels=128, t5_heads=64,
)


def test_each_stage_grows_with_its_own_sizes_only():
    base = estimate_bytes(FLUX1_1024)
    more_text = estimate_bytes(replace(FLUX1_1024, text_tokens=512))
    assert more_text["text encoder"] > 2.5 * base["text encoder"]  # T5 materialises (heads, T, T) scores
    assert more_text["autoencoder"] == base["autoencoder"]
    bigger = estimate_bytes(replace(FLUX1_1024, image_tokens=4 * 4096, pixels=4 * 1024 * 1024))
    assert bigger["autoencoder"] == 4 * base["autoencoder"] and bigger["text encoder"] == base["text encoder"]
    assert 3 * base["transformer"] < bigger["transformer"] < 4 * base["transformer"]  # text tokens do not grow
    batch = estimate_bytes(replace(FLUX1_1024, batch=2))
    assert all(batch[k] == 2 * base[k] for k in base)
    identity = estimate_bytes(replace(FLUX1_1024, autoencoder_channels=0))
    assert identity["autoencoder"] == 3 * 1024 * 1024 * 3 * 4  # pixels in, pixels out, a copy: float32 RGB


def test_real_size_estimates_are_plausible():
    """FLUX.1 at 1024x1024: the decoder's 128-channel full-resolution activations dominate (~1.5 GiB), and
    100000x100000 pixels (39M tokens) needs terabytes: the run that used to be killed by the kernel."""
    parts = estimate_bytes(FLUX1_1024)
    assert 1.0 * GiB < parts["autoencoder"] < 2.0 * GiB
    assert 0.2 * GiB < parts["transformer"] < 1.0 * GiB
    huge = estimate_bytes(replace(FLUX1_1024, image_tokens=6250**2, pixels=100000**2))
    assert max(huge.values()) > 1000 * GiB


def test_fitting_size_is_the_largest_that_fits():
    def needed(h: int, w: int) -> int:
        return h * w * 100

    budget = 100 * 300 * 200 + 5
    h, w = fitting_size(1200, 800, 16, needed, budget)
    assert (h % 16, w % 16) == (0, 0) and needed(h, w) <= budget
    assert abs(h / w - 1.5) < 0.1  # the aspect ratio is kept
    assert needed(h + 16, w + 16) > budget and needed(h + 24, w + 16) > budget  # one step larger does not fit
    assert fitting_size(1200, 800, 16, lambda h, w: 10**12 + h * w, budget) is None  # nothing fits


def test_available_memory_is_known_on_this_machine():
    assert 64 * 2**20 < available_bytes("cpu") < 2**50


@pytest.mark.parametrize("width", [100000, 12000])
def test_the_sizes_from_the_issue_are_refused_on_the_demo_model(width):
    from concept_attention.demo import DEMO_WEIGHTS
    from flux_mini.pipeline import FluxPipeline

    pipe = FluxPipeline.from_folder(DEMO_WEIGHTS)
    with pytest.raises(ValueError, match=r"needs about .* use a size that fits, e.g. width \d+ and height \d+"):
        pipe.check_memory(width, width, available=8 * GiB)
