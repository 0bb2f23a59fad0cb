"""FLUX.2 pipeline end to end on a tiny random folder written by `flux-mini tiny --generation flux2`:
parity with diffusers' Flux2KleinPipeline (distilled and Base/CFG) on the same weights, folder and variant
detection, and `flux-mini generate` choosing the generation from the folder."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from flux_mini.autoencoder_flux2 import flux2_bfl_to_diffusers
from flux_mini.cli import main
from flux_mini.flux2_pipeline import Flux2Pipeline, is_flux2_folder

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel  # noqa: E402
from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers  # noqa: E402
from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

PROMPT = "a red cat sitting on the grass"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def klein(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flux2") / "klein"
    assert main(["tiny", "--generation", "flux2", str(folder)]) == 0
    return folder


@pytest.fixture(scope="module")
def klein_base(klein, tmp_path_factory):
    """The same weights as a klein Base checkpoint: only the file name differs (the keys cannot tell)."""
    folder = tmp_path_factory.mktemp("flux2") / "klein-base"
    shutil.copytree(klein, folder)
    (folder / "flux-2-klein-tiny.safetensors").rename(folder / "flux-2-klein-base-tiny.safetensors")
    return folder


def diffusers_pipeline(folder, pipe: Flux2Pipeline, distilled: bool) -> Flux2KleinPipeline:
    """diffusers' own klein pipeline on the folder's weights, converted with diffusers' own converter."""
    c = pipe.model.config
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=c.in_channels, num_layers=c.depth, num_single_layers=c.depth_single_blocks,
        attention_head_dim=c.head_dim, num_attention_heads=c.num_heads, joint_attention_dim=c.context_in_dim,
        mlp_ratio=c.mlp_ratio, axes_dims_rope=c.axes_dim, rope_theta=c.theta, guidance_embeds=False,
    )
    bfl = load_file(next(folder.glob("flux-2-*.safetensors")))
    transformer.load_state_dict(convert_flux2_transformer_checkpoint_to_diffusers(bfl), strict=True)
    a = pipe.autoencoder.config
    vae = AutoencoderKLFlux2(
        block_out_channels=tuple(a.ch * m for m in a.ch_mult), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=a.num_res_blocks, latent_channels=a.z_channels,
    )
    vae.load_state_dict(flux2_bfl_to_diffusers(load_file(folder / "ae.safetensors")), strict=True)
    return Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential"),
        vae=vae.eval(),
        text_encoder=AutoModelForCausalLM.from_pretrained(folder / "text_encoder").eval(),
        tokenizer=AutoTokenizer.from_pretrained(folder / "text_encoder"),
        transformer=transformer.eval(),
        is_distilled=distilled,
    )


@pytest.mark.parametrize("variant", ["klein", "klein-base"])
def test_generation_matches_diffusers_klein_pipeline(variant, klein, klein_base):
    folder = klein if variant == "klein" else klein_base
    pipe = Flux2Pipeline.from_folder(folder)
    assert pipe.variant == variant and pipe.defaults.cfg == (variant == "klein-base")
    steps = 4 if variant == "klein" else 3  # Base: fewer than its 50 to keep the test fast
    prompts = [PROMPT, "a blue bird flying over the sea"]
    txt, txt_ids = pipe.encode_prompt(prompts)
    negative = pipe.encode_prompt(["", ""])[0]
    img, img_ids = pipe.prepare_latents(2, 64, 64, seed=5)
    tokens = pipe.denoise(img, img_ids, txt, txt_ids, pipe.timesteps(steps, img.shape[1]), None, negative, False)
    ours = (pipe.decode_tokens(tokens, 64, 64) + 1) / 2

    reference = diffusers_pipeline(folder, pipe, distilled=variant == "klein")
    noise = img.reshape(2, 16, 16, 16).permute(0, 3, 1, 2)  # tokens (B, h*w, C) back to (B, C, h, w)
    with torch.no_grad():
        theirs = reference(
            prompt=prompts, height=64, width=64, num_inference_steps=steps, latents=noise, max_sequence_length=32,
            guidance_scale=1.0 if variant == "klein" else 4.0, output_type="pt",
        ).images
    assert ours.shape == theirs.shape == (2, 3, 64, 64)
    tolerance = 1e-4 if variant == "klein" else 1e-3  # CFG scale 4 amplifies float32 rounding (t ~1e-7 apart)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=tolerance)
    assert ours.std() > 0.05 and (ours[0] - ours[1]).abs().max() > 0.05  # a real picture, prompts differ


def test_call_draws_the_loop_and_the_variant_defaults(klein):
    pipe = Flux2Pipeline.from_folder(klein)
    image = pipe(PROMPT, seed=5, progress=False)
    assert image.size == (64, 64)  # sampling.json's size
    txt, txt_ids = pipe.encode_prompt([PROMPT])
    img, ids = pipe.prepare_latents(1, 64, 64, seed=5)
    tokens = pipe.denoise(img, ids, txt, txt_ids, pipe.timesteps(4, 256), progress=False)
    assert np.array_equal(np.asarray(image), np.asarray(pipe.to_pil(pipe.decode_tokens(tokens, 64, 64))[0]))


def test_variant_detection(klein, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(klein, folder)
    (folder / "model_index.json").write_text(json.dumps({"is_distilled": False}))
    assert Flux2Pipeline.from_folder(folder).variant == "klein-base"
    (folder / "sampling.json").write_text(json.dumps({"variant": "klein", "max_length": 32}))
    pipe = Flux2Pipeline.from_folder(folder)
    assert pipe.variant == "klein" and pipe.defaults.num_steps == 4 and pipe.defaults.max_length == 32
    with pytest.raises(ValueError, match="variant .dev. does not fit the transformer, which has no guidance embedder"):
        Flux2Pipeline.from_folder(folder, variant="dev")
    (folder / "sampling.json").write_text(json.dumps({"steps": 3}))
    with pytest.raises(ValueError, match="sampling.json: expected a JSON object with keys among"):
        Flux2Pipeline.from_folder(folder)


def test_folder_errors(klein, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(klein, folder, ignore=shutil.ignore_patterns("ae.safetensors"))
    with pytest.raises(FileNotFoundError, match="no autoencoder .*FLUX.2 ae.safetensors"):
        Flux2Pipeline.from_folder(folder)
    shutil.rmtree(folder / "text_encoder")
    with pytest.raises(FileNotFoundError, match="no text encoder .*text_encoder/"):
        Flux2Pipeline.from_folder(folder)
    pipe = Flux2Pipeline.from_folder(klein)
    with pytest.raises(ValueError, match="width 70 is not a positive multiple of 4"):
        pipe(PROMPT, width=70, progress=False)


def test_cli_generate_detects_flux2(klein, tmp_path, capsys):
    assert is_flux2_folder(klein)
    out = tmp_path / "out.png"
    assert main(["generate", "--weights", str(klein), "--prompt", PROMPT, "--out", str(out), "--seed", "5",
                 "--dtype", "float32", "--device", "cpu", "--quiet"]) == 0
    assert "klein" in capsys.readouterr().out
    expected = Flux2Pipeline.from_folder(klein)(PROMPT, seed=5, progress=False)
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(expected))


def test_dev_variant_embeds_guidance_against_a_hand_loop(tmp_path):
    """[dev]: Mistral text encoder, guidance 4 through guidance_in; recomputed here step by step."""
    from flux_mini.sampling import flux2_image_ids, flux2_text_ids, get_flux2_schedule
    from flux_mini.tiny import build_tiny_flux2_weights

    pipe = Flux2Pipeline.from_folder(build_tiny_flux2_weights(tmp_path / "dev", seed=1, variant="dev"))
    assert pipe.variant == "dev" and pipe.defaults.guidance == 4.0 and pipe.text_encoder.max_length == 64
    image = pipe(PROMPT, seed=2, num_steps=3, progress=False)
    txt = pipe.text_encoder([PROMPT])
    x = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(2)).flatten(2).transpose(1, 2)
    schedule = get_flux2_schedule(3, 256)
    with torch.no_grad():
        for t0, t1 in zip(schedule[:-1], schedule[1:]):
            v = pipe.model(x, flux2_image_ids(1, 16, 16), txt, flux2_text_ids(1, 64), torch.tensor([t0]),
                           torch.tensor([4.0]))
            x = x + (t1 - t0) * v
    expected = pipe.to_pil(pipe.decode_tokens(x, 64, 64))[0]
    assert np.array_equal(np.asarray(image), np.asarray(expected))
    other = pipe(PROMPT, seed=2, num_steps=3, guidance=1.5, progress=False)
    assert np.abs(np.asarray(other, dtype=float) - np.asarray(image, dtype=float)).max() > 2
