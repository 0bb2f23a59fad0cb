"""End to end on tiny random model folders: against diffusers' FluxPipeline, both folder layouts, the CLI."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flux_mini import autoencoder as ae_module
from flux_mini.cli import main
from flux_mini.convert import bfl_to_diffusers, diffusers_config
from flux_mini.pipeline import FluxPipeline
from flux_mini.text_encoders import MissingFilesError
from flux_mini.tiny import build_tiny_weights

PROMPT = "a photo of a cat"


@pytest.fixture(scope="module")
def schnell_folder(tmp_path_factory):
    return build_tiny_weights(tmp_path_factory.mktemp("schnell"), seed=0)


@pytest.fixture(scope="module")
def schnell(schnell_folder):
    return FluxPipeline.from_folder(schnell_folder)


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    return FluxPipeline.from_folder(build_tiny_weights(tmp_path_factory.mktemp("dev"), seed=1, guidance_embed=True))


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_variants_and_defaults(schnell, dev):
    assert schnell.variant == "schnell" and schnell.is_schnell and schnell.defaults.num_steps == 4
    assert not schnell.defaults.shift
    assert dev.variant == "dev" and not dev.is_schnell and dev.defaults.shift and dev.defaults.guidance == 3.5
    assert schnell.t5.max_length == 32  # from the tiny folder's sampling.json
    txt, txt_ids, y = schnell.encode_prompt([PROMPT, "a dog"])
    assert txt.shape == (2, 32, 48) and y.shape == (2, 32) and txt_ids.shape == (2, 32, 3) and not txt_ids.any()


def test_fixed_seed_is_reproducible(schnell):
    a = schnell(PROMPT, width=64, height=48, seed=7, progress=False)
    assert isinstance(a, Image.Image) and a.size == (64, 48) and a.mode == "RGB"
    assert np.array_equal(pixels(a), pixels(schnell(PROMPT, width=64, height=48, seed=7, progress=False)))
    other_seed = schnell(PROMPT, width=64, height=48, seed=8, progress=False)
    other_prompt = schnell("a red car on the road", width=64, height=48, seed=7, progress=False)
    assert np.abs(pixels(a) - pixels(other_seed)).mean() > 5
    assert np.abs(pixels(a) - pixels(other_prompt)).mean() > 1
    assert pixels(a).std() > 10  # not a saturated or flat image


def test_guidance(schnell, dev):
    base = pixels(dev(PROMPT, width=32, height=32, num_steps=3, progress=False))
    assert np.array_equal(base, pixels(dev(PROMPT, width=32, height=32, num_steps=3, guidance=3.5, progress=False)))
    assert not np.array_equal(base, pixels(dev(PROMPT, width=32, height=32, num_steps=3, guidance=6.0, progress=False)))
    ignored = schnell(PROMPT, width=32, height=32, guidance=6.0, progress=False)
    assert np.array_equal(pixels(ignored), pixels(schnell(PROMPT, width=32, height=32, progress=False)))


def test_batch_of_prompts(schnell):
    images = schnell([PROMPT, "a dog"], width=32, height=32, progress=False)
    assert isinstance(images, list) and len(images) == 2 and images[1].size == (32, 32)


def test_to_pil_clamps_and_truncates():
    x = torch.tensor([-2.0, -1.0, -0.999, 0.0, 0.5, 0.999, 1.0, 3.0]).reshape(1, 1, 1, 8).expand(1, 3, 1, 8)
    (image,) = FluxPipeline.to_pil(x)
    assert pixels(image)[0, :, 0].tolist() == [0, 0, 0, 127, 191, 254, 255, 255]


def test_bad_size_is_a_clear_error(schnell):
    with pytest.raises(ValueError, match=r"width 66 is not a positive multiple of 4.*use e\.g\. 64 or 68"):
        schnell(PROMPT, width=66, height=64, progress=False)


# ----------------------------------------------------------------------------------------------
# Against diffusers' FluxPipeline, and loading the snapshot it saves


def diffusers_pipeline(pipe: FluxPipeline):
    """diffusers' FluxPipeline on the same weights: transformer and VAE converted to the diffusers layout."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from diffusers import FluxPipeline as DiffusersFluxPipeline

    c = pipe.model.config
    transformer = FluxTransformer2DModel(**diffusers_config(c))
    transformer.load_state_dict(bfl_to_diffusers(pipe.model.state_dict()), strict=True)
    a = pipe.autoencoder.config
    vae = AutoencoderKL(
        in_channels=a.in_channels,
        out_channels=a.out_ch,
        block_out_channels=list(a.level_widths),
        down_block_types=["DownEncoderBlock2D"] * len(a.ch_mult),
        up_block_types=["UpDecoderBlock2D"] * len(a.ch_mult),
        layers_per_block=a.num_res_blocks,
        latent_channels=a.z_channels,
        norm_num_groups=32,
        act_fn="silu",
        mid_block_add_attention=True,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=a.scale_factor,
        shift_factor=a.shift_factor,
    )
    vae.load_state_dict(ae_module.bfl_to_diffusers(pipe.autoencoder.state_dict()), strict=True)
    if pipe.is_schnell:  # the scheduler configs of the FLUX.1-schnell / -dev repos (spec §6.1)
        scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=False, shift=1.0)
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(
            use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
        )
    reference = DiffusersFluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=pipe.clip.model,
        tokenizer=pipe.clip.tokenizer,
        text_encoder_2=pipe.t5.model,
        tokenizer_2=pipe.t5.tokenizer,
        transformer=transformer,
    )
    reference.set_progress_bar_config(disable=True)
    return reference


def run_stages(pipe: FluxPipeline, height: int, width: int, steps: int, seed: int, guidance=None) -> torch.Tensor:
    txt, txt_ids, y = pipe.encode_prompt([PROMPT])
    img, img_ids = pipe.prepare_latents(1, height, width, seed)
    tokens = pipe.denoise(img, img_ids, txt, txt_ids, y, pipe.timesteps(steps, img.shape[1]), guidance, progress=False)
    return pipe.decode_tokens(tokens, height, width)


@pytest.mark.parametrize("variant", ["schnell", "dev"])
def test_matches_diffusers_flux_pipeline(variant, schnell, dev, schnell_folder, tmp_path):
    """Same noise (seeded CPU generator), tokenizers, encoders, schedule and Euler steps: float32 images agree."""
    pipe = {"schnell": schnell, "dev": dev}[variant]
    reference = diffusers_pipeline(pipe)
    expected = reference(
        PROMPT,
        height=64,
        width=48,
        num_inference_steps=4,
        guidance_scale=4.0,
        max_sequence_length=pipe.t5.max_length,
        generator=torch.Generator().manual_seed(5),
        output_type="pt",
    ).images
    ours = run_stages(pipe, 64, 48, steps=4, seed=5, guidance=4.0)
    assert ours.shape == expected.shape == (1, 3, 64, 48)
    torch.testing.assert_close((ours + 1) / 2, expected, rtol=0, atol=1e-5)
    assert expected.std() > 0.1

    if variant == "schnell":  # the snapshot diffusers writes loads, and gives the same image as the single file
        reference.save_pretrained(tmp_path / "snapshot")
        shutil.copy(schnell_folder / "sampling.json", tmp_path / "snapshot")
        from_snapshot = FluxPipeline.from_folder(tmp_path / "snapshot")
        assert from_snapshot.model.config == pipe.model.config
        same = run_stages(from_snapshot, 64, 48, steps=4, seed=5)
        assert torch.equal(same, run_stages(pipe, 64, 48, steps=4, seed=5))


# ----------------------------------------------------------------------------------------------
# Other folder layouts and errors


def test_pixel_space_model(tmp_path):
    pipe = FluxPipeline.from_folder(build_tiny_weights(tmp_path, seed=2, pixel_space=True))
    assert pipe.autoencoder.downsample_factor == 1 and pipe.model.config.in_channels == 12
    img, img_ids = pipe.prepare_latents(1, 6, 10, seed=0)
    tokens = pipe.denoise(img, img_ids, *pipe.encode_prompt(PROMPT), [1.0, 0.0], progress=False)
    images = pipe.decode_tokens(tokens, 6, 10)
    assert images.shape == (1, 3, 6, 10)
    manual = tokens.reshape(1, 3, 5, 3, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(1, 3, 6, 10)  # (h w)(c py px)
    torch.testing.assert_close(images, manual.clamp(-1, 1))
    with pytest.raises(ValueError, match="multiple of 2"):
        pipe(PROMPT, width=7, height=6, progress=False)


def test_pixel_space_model_with_4x4_pixel_tokens(tmp_path):
    """A space-to-depth pixel autoencoder (f = 2): each token is a 4x4 block of pixels, channels (c py px)."""
    pipe = FluxPipeline.from_folder(build_tiny_weights(tmp_path, seed=2, pixel_space=True, pixel_downsample=2))
    assert pipe.autoencoder.downsample_factor == 2 and pipe.model.config.in_channels == 48
    img, img_ids = pipe.prepare_latents(1, 8, 12, seed=0)
    assert img.shape == (1, 2 * 3, 48) and img_ids[0, -1].tolist() == [0, 1, 2]
    tokens = pipe.denoise(img, img_ids, *pipe.encode_prompt(PROMPT), [1.0, 0.0], progress=False)
    images = pipe.decode_tokens(tokens, 8, 12)
    # token channel (c, p, q, py, px): latent channel c*4 + p*2 + q of the 2x2 patch, pixel row 4h + 2py + p
    manual = tokens.reshape(1, 2, 3, 3, 2, 2, 2, 2).permute(0, 3, 1, 6, 4, 2, 7, 5).reshape(1, 3, 8, 12)
    torch.testing.assert_close(images, manual.clamp(-1, 1))
    with pytest.raises(ValueError, match="multiple of 4"):
        pipe(PROMPT, width=6, height=8, progress=False)


def test_missing_components_are_named(schnell_folder, tmp_path):
    folder = shutil.copytree(schnell_folder, tmp_path / "model")
    shutil.rmtree(folder / "clip")
    with pytest.raises(MissingFilesError, match=r"no CLIP encoder .*clip/"):
        FluxPipeline.from_folder(folder)
    shutil.rmtree(folder / "t5")
    with pytest.raises(MissingFilesError, match=r"no T5 encoder .*t5/"):
        FluxPipeline.from_folder(folder)
    (folder / "ae.safetensors").unlink()
    with pytest.raises(MissingFilesError, match="ae.safetensors"):
        FluxPipeline.from_folder(folder)
    with pytest.raises(MissingFilesError, match=r"no transformer .*flux1-\*\.safetensors"):
        FluxPipeline.from_folder(tmp_path)


def test_mismatched_components_are_named(schnell_folder, tmp_path):
    folder = shutil.copytree(schnell_folder, tmp_path / "model")
    (folder / "ae.safetensors").unlink()
    (folder / "identity-autoencoder.json").write_text('{"channels": 3}')
    with pytest.raises(ValueError, match=r"do not belong together.*in_channels.* is 16, but the component gives 12"):
        FluxPipeline.from_folder(folder)
    (folder / "sampling.json").write_text('{"t5_length": 8}')
    with pytest.raises(ValueError, match=r"unknown keys \['t5_length'\]"):
        FluxPipeline.from_folder(folder)


def test_official_folder_names_are_accepted(schnell_folder, tmp_path):
    """The FLUX.1 repos' text_encoder(_2)/ + tokenizer(_2)/ next to the single-file transformer and AE."""
    folder = shutil.copytree(schnell_folder, tmp_path / "model")
    (folder / "t5").rename(folder / "text_encoder_2")
    (folder / "clip").rename(folder / "text_encoder")
    tokenizer_2 = folder / "tokenizer_2"
    tokenizer_2.mkdir()
    for name in ("spiece.model", "tokenizer.json", "tokenizer_config.json"):
        (folder / "text_encoder_2" / name).rename(tokenizer_2 / name)
    pipe = FluxPipeline.from_folder(folder)
    assert pipe.t5.tokenizer.name_or_path.endswith("tokenizer_2")
    assert pipe.clip.tokenizer.name_or_path.endswith("text_encoder")  # no tokenizer/: files beside the model


# ----------------------------------------------------------------------------------------------
# Command line


def test_cli_writes_png(schnell, schnell_folder, tmp_path, capsys):
    out = tmp_path / "images" / "cat.png"
    args = ["generate", "--weights", str(schnell_folder), "--prompt", PROMPT, "--out", str(out),
            "--width", "32", "--height", "48", "--seed", "3", "--dtype", "float32", "--device", "cpu", "--quiet"]
    assert main(args) == 0
    image = Image.open(out)
    assert image.format == "PNG" and image.size == (32, 48)
    expected = schnell(PROMPT, width=32, height=48, seed=3, progress=False)
    assert np.array_equal(pixels(image), pixels(expected))

    assert main(args[:-5] + ["--width", "30", "--quiet"]) == 2
    assert "width 30 is not a positive multiple of 4" in capsys.readouterr().err


def test_cli_as_module(schnell_folder, tmp_path):
    out = tmp_path / "cat.png"
    result = subprocess.run(
        [sys.executable, "-m", "flux_mini.cli", "generate", "--weights", str(schnell_folder), "--prompt", PROMPT,
         "--out", str(out), "--width", "16", "--height", "16", "--steps", "1", "--quiet"],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[1],
    )
    assert result.returncode == 0, result.stderr
    assert Image.open(out).size == (16, 16) and "wrote" in result.stdout
