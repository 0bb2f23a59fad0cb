"""Flux3Pipeline end to end on tiny random FLUX.3 folders: the denoising loop against diffusers' transformer and
scheduler, references, Base CFG, the CLI, and missing files."""

import contextlib
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from flux_mini import flux3_sampling as s3
from flux_mini.flux3_pipeline import Flux3Pipeline, reference_pixels
from flux_mini.memory import RunTooLargeError
from flux_mini.text_encoders import MissingFilesError
from flux_mini.tiny import build_tiny_flux3_weights


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    return build_tiny_flux3_weights(tmp_path_factory.mktemp("flux3") / "klein")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_tiny_flux3_weights(tmp_path_factory.mktemp("flux3") / "klein-base", base=True)


@pytest.fixture(scope="module")
def pipe(distilled):
    return Flux3Pipeline.from_folder(distilled)


@torch.no_grad()
def test_denoising_matches_diffusers_transformer_and_scheduler(pipe):
    """Our flow-map loop (schedule, targets, Euler) against Flux3Transformer2DModel stepped by diffusers'
    FlowMatchEulerDiscreteScheduler with the FLUX.3 shift, as diffusers' FLUX.3 denoise loop does."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from test_flux3_parity import reference_model

    txt, txt_ids = pipe.encode_prompt("a red cat on the grass")
    img, img_ids = pipe.prepare_latents(1, 32, 48, seed=5)
    ours = s3.denoise(pipe.model, img, img_ids, txt, txt_ids, s3.get_schedule(4), progress=False)

    reference = reference_model(pipe.model)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=s3.FLUX3_SHIFT)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 4, 4))
    latents, timesteps = img.clone(), scheduler.timesteps
    for i, t in enumerate(timesteps):
        next_t = timesteps[i + 1] if i + 1 < len(timesteps) else torch.zeros_like(t)
        pred = reference(
            hidden_states=latents, encoder_hidden_states=txt, timestep=(t / 1000).expand(1), img_ids=img_ids[0],
            txt_ids=txt_ids[0], target_timestep=(next_t / 1000).expand(1),
        ).sample  # fmt: skip
        latents = scheduler.step(pred, t, latents).prev_sample
    assert torch.allclose(ours, latents, rtol=1e-5, atol=1e-5 * latents.abs().max().item())


def test_generation_is_seeded_and_references_condition_it(pipe):
    plain = np.asarray(pipe("a red cat", seed=1, progress=False))
    assert plain.shape == (64, 64, 3)
    assert np.array_equal(plain, np.asarray(pipe("a red cat", seed=1, progress=False)))
    red, blue = Image.new("RGB", (80, 48), (220, 20, 20)), Image.new("RGB", (40, 40), (20, 20, 220))
    with_red = np.asarray(pipe("a red cat", seed=1, references=[red], progress=False))
    with_both = np.asarray(pipe("a red cat", seed=1, references=[red, blue], progress=False))
    assert not np.array_equal(plain, with_red) and not np.array_equal(with_red, with_both)
    cond, cond_ids = pipe.encode_references([red, blue])
    # 80x48 stays 80x48, 40x40 is cropped to 32x32; the tiny AE has factor 4 -> 20x12 + 8x8 tokens
    assert cond.shape == (1, 20 * 12 + 8 * 8, pipe.autoencoder.latent_channels)
    assert cond_ids[0, :240, 3].eq(-1).all() and cond_ids[0, 240:, 3].eq(-2).all()


def test_reference_pixels_are_downscaled_and_cropped_to_16():
    assert reference_pixels(Image.new("RGB", (100, 50))).shape == (1, 3, 48, 96)
    big = reference_pixels(Image.new("RGB", (2000, 1000), (255, 0, 0)))
    assert big.shape[2] * big.shape[3] <= 1024 * 1024 and big.shape[2] % 16 == big.shape[3] % 16 == 0
    assert big[0, 0].eq(1.0).all() and big[0, 1].eq(-1.0).all()
    with pytest.raises(ValueError, match="at least 16"):
        reference_pixels(Image.new("RGB", (10, 40)))


def test_base_uses_cfg_and_the_distilled_model_refuses_it(base, pipe):
    base_pipe = Flux3Pipeline.from_folder(base)
    assert base_pipe.variant == "flux3-klein-base" and base_pipe.defaults.guidance == 4.0
    guided = np.asarray(base_pipe("a red cat", seed=2, progress=False))
    unguided = np.asarray(base_pipe("a red cat", seed=2, guidance=1.0, progress=False))
    assert not np.array_equal(guided, unguided)
    with pytest.raises(ValueError, match="takes no guidance"):
        pipe("a red cat", guidance=3.5, progress=False)
    with pytest.raises(ValueError, match="does not fit"):
        Flux3Pipeline.from_folder(base, variant="flux3-klein")


def test_cli_generates_with_references(distilled, tmp_path):
    from flux_mini.cli import main

    reference = tmp_path / "ref.png"
    Image.new("RGB", (64, 48), (10, 200, 10)).save(reference)
    out = tmp_path / "out.png"
    args = ["generate", "--weights", str(distilled), "--prompt", "a green field", "--out", str(out), "--quiet"]
    assert main([*args, "--reference", str(reference), "--reference", str(reference)]) == 0
    assert Image.open(out).size == (64, 64)


def test_missing_components_are_named(distilled, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(distilled, partial)
    (partial / "ae.safetensors").unlink()
    with pytest.raises(MissingFilesError, match="FLUX.3 uses the FLUX.2 autoencoder"):
        Flux3Pipeline.from_folder(partial)
    shutil.rmtree(partial / "text_encoder")
    with pytest.raises(MissingFilesError, match="Qwen3-VL"):
        Flux3Pipeline.from_folder(partial)


def test_sizes_too_large_nan_weights_and_generators(pipe):
    """Refused up front with the estimate (before the noise exists), NaN latents named, a Generator seeds."""
    from flux_mini.pipeline import NonFiniteError

    with pytest.raises(RunTooLargeError, match=r"100000x100000 needs about .* GiB .*use a size that fits"):
        pipe("a red cat", width=100000, height=100000, progress=False)
    assert pipe.memory_estimate(128, 128)["autoencoder"] == 4 * pipe.memory_estimate(64, 64)["autoencoder"]
    with_generator = pipe("a red cat", seed=torch.Generator().manual_seed(1), progress=False)
    assert np.array_equal(np.asarray(with_generator), np.asarray(pipe("a red cat", seed=1, progress=False)))
    weight = pipe.model.emb_in["image"].weight
    saved = weight[0, 0].item()
    with torch.no_grad():
        weight[0, 0] = float("nan")
    try:
        with pytest.raises(NonFiniteError, match="latents"):
            pipe("a red cat", seed=1, progress=False)
    finally:
        with torch.no_grad():
            weight[0, 0] = saved
    short, cap = pipe.text_encoder.window("a red cat"), pipe.text_encoder.max_length
    assert short % 80 == 0 and short < cap  # the estimate counts the prompt's window, not the cap
    assert pipe.memory_estimate(64, 64, text_tokens=short)["text encoder"] < pipe.memory_estimate(
        64, 64, text_tokens=cap)["text encoder"]


def test_encode_references_moves_the_ae_once(pipe, monkeypatch):
    """With offload every move copies the AE's weights: once for all the references, not once per image."""
    moved = []

    def on_device(*modules):
        moved.append(modules)
        return contextlib.nullcontext()

    monkeypatch.setattr(pipe, "on_device", on_device)
    images = [Image.new("RGB", (64, 64)), Image.new("RGB", (80, 48)), Image.new("RGB", (32, 32))]
    cond, _ = pipe.encode_references(images)
    assert moved == [(pipe.autoencoder,)]
    assert cond.shape[1] == pipe.reference_tokens(images) == 16 * 16 + 20 * 12 + 8 * 8


def test_memory_guard_counts_the_references(pipe, monkeypatch):
    """R = the prepared references' tokens (one per 4 x 4 pixels in the tiny AE), counted as image tokens; the AE
    stage is the larger of encoding the largest prepared reference and decoding the output."""
    references = [Image.new("RGB", (3000, 2000)), Image.new("RGB", (1100, 1136)), Image.new("RGB", (80, 64))]
    # sqrt(1024^2 / 6e6) = 0.418046: 1254.14 x 836.09 -> 1254 x 836 -> 1248 x 832; sqrt(1024^2 / 1249600) =
    # 0.916040: 1007.64 x 1040.62 -> 1008 x 1041 (rounded) -> 1008 x 1040; 80 x 64 is kept
    tokens = 312 * 208 + 252 * 260 + 20 * 16
    assert pipe.reference_tokens(references) == tokens
    assert reference_pixels(references[1]).shape == (1, 3, 1040, 1008)  # the preparation makes the counted size
    plain = pipe.memory_estimate(64, 64)
    edit = pipe.memory_estimate(64, 64, reference_tokens=256, reference_pixels=1248 * 832)
    assert edit["transformer"] == pipe.memory_estimate(128, 64)["transformer"]  # 16 x 16 + 256 = 32 x 16 tokens
    assert edit["autoencoder"] == pipe.memory_estimate(1248, 832)["autoencoder"]  # encoding it, not the 64 x 64
    assert edit["text encoder"] == plain["text encoder"]
    large = pipe.memory_estimate(1280, 1280, reference_pixels=1248 * 832)
    assert large["autoencoder"] == pipe.memory_estimate(1280, 1280)["autoencoder"]  # decoding is the larger

    asked = {}

    def check_memory(*args, **kwargs):
        asked.update(kwargs)
        raise RunTooLargeError("stop")

    monkeypatch.setattr(pipe, "check_memory", check_memory)
    with pytest.raises(RunTooLargeError, match="stop"):
        pipe("a red cat", references=references, progress=False)
    assert asked["reference_tokens"] == tokens  # the largest prepared reference: 1008 x 1040 > 1248 x 832 pixels
    assert asked["reference_pixels"] == 1008 * 1040


def test_memory_refusal_names_the_references(pipe):
    budget = max(pipe.memory_estimate(256, 256, reference_tokens=1000).values())
    with pytest.raises(RunTooLargeError, match=r"^1024x1024 with 1000 reference-image tokens needs about .* e\.g\. "
                                                r"width \d+ and height \d+, or fewer or smaller reference images$"):
        pipe.check_memory(1024, 1024, reference_tokens=1000, available=budget)
    budget = max(pipe.memory_estimate(64, 64).values()) * 10
    with pytest.raises(RunTooLargeError, match=r"with 1000000 reference-image tokens needs .* the reference images "
                                                r"alone do not fit, whatever the output size: use fewer or smaller"):
        pipe.check_memory(64, 64, reference_tokens=10**6, available=budget)


def test_bad_references_are_refused_with_the_image_named(pipe):
    with pytest.raises(ValueError, match=r"reference 2 is 15 x 200 pixels; FLUX.3 needs at least 16 pixels a side"):
        pipe("a red cat", references=[Image.new("RGB", (64, 64)), Image.new("RGB", (15, 200))], progress=False)
    with pytest.raises(ValueError, match="FLUX.3 takes 1 to 10 reference images, got 11; use fewer"):
        pipe("a red cat", references=[Image.new("RGB", (64, 64))] * 11, progress=False)
    with pytest.raises(ValueError, match="non-empty list of PIL images"):
        pipe("a red cat", references=[], progress=False)


def test_cli_refuses_bad_references_before_loading(distilled, tmp_path, capsys, monkeypatch):
    from flux_mini.cli import main

    small, fine = tmp_path / "small.png", tmp_path / "fine.png"
    Image.new("RGB", (10, 40)).save(small)
    Image.new("RGB", (64, 64)).save(fine)
    args = ["generate", "--weights", str(distilled), "--prompt", "a red cat", "--out", str(tmp_path / "out.png"),
            "--device", "cpu", "--quiet"]  # fmt: skip

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the references were checked")

    monkeypatch.setattr(Flux3Pipeline, "from_folder", load)
    assert main([*args, "--reference", str(fine), "--reference", str(small)]) == 2
    assert f"reference 2 ({small}) is 10 x 40 pixels; FLUX.3 needs at least 16" in capsys.readouterr().err
    assert main([*args, *["--reference", str(fine)] * 11]) == 2
    assert "FLUX.3 takes 1 to 10 reference images, got 11" in capsys.readouterr().err
