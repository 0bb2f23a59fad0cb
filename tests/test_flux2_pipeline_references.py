"""FLUX.2 editing with reference images through the pipeline and the CLI, on the tiny random klein folder:
end to end against diffusers' Flux2KleinPipeline and Flux2KleinKVPipeline, BFL's reference preparation by
hand-computed sizes, crops and ids (where it differs from diffusers'), the refusals, and how a folder is known
to be klein 9B KV."""

import contextlib
import json
import shutil

import numpy as np
import pytest
import torch
from einops import rearrange
from PIL import Image

from flux_mini.cli import main
from flux_mini.flux2_pipeline import Flux2Pipeline, reference_pixels
from flux_mini.memory import RunSize, RunTooLargeError, estimate_bytes

diffusers = pytest.importorskip("diffusers")
from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402
from diffusers.pipelines.flux2.pipeline_flux2_klein_kv import Flux2KleinKVPipeline  # noqa: E402
# the tiny klein folders and the one-thread setting are test_flux2_pipeline's fixtures
from test_flux2_pipeline import PROMPT, diffusers_pipeline, klein, klein_base, one_thread  # noqa: E402, F401

ONE, SEVERAL = 2024**2, 1024**2


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """A random RGB picture (diffusers and we must encode the same pixels)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def klein_kv(klein, tmp_path_factory):
    """The same weights as klein 9B KV: the file name marks the variant (the keys cannot)."""
    folder = tmp_path_factory.mktemp("flux2") / "klein-kv"
    shutil.copytree(klein, folder)
    (folder / "flux-2-klein-tiny.safetensors").rename(folder / "flux-2-klein-9b-kv-tiny.safetensors")
    return folder


@pytest.mark.parametrize("variant", ["klein", "klein-base", "klein-kv"])
def test_editing_matches_diffusers_klein_pipelines(variant, klein, klein_base, klein_kv):
    """Two references (80 x 64 and 64 x 64: multiples of 16, where diffusers and BFL prepare alike) and two
    prompts: appended references (Flux2KleinPipeline; Base with CFG, the references in both passes) and cached
    ones (Flux2KleinKVPipeline)."""
    folder = {"klein": klein, "klein-base": klein_base, "klein-kv": klein_kv}[variant]
    pipe = Flux2Pipeline.from_folder(folder)
    assert pipe.variant == variant and pipe.defaults.reference_kv == (variant == "klein-kv")
    steps, guidance = (3, 4.0) if variant == "klein-base" else (4, None)  # Base: fewer than its 50 steps
    references = [picture(80, 64, seed=1), picture(64, 64, seed=2)]
    prompts = [PROMPT, "a blue bird flying over the sea"]
    txt, txt_ids = pipe.encode_prompt(prompts)
    negative = pipe.encode_prompt(["", ""])[0] if pipe.defaults.cfg else None
    cond, cond_ids = pipe.encode_references(references)
    if variant != "klein-kv":  # appended: one copy per image; KV caches the batch-1 references once for both
        cond, cond_ids = cond.repeat(2, 1, 1), cond_ids.repeat(2, 1, 1)
    img, img_ids = pipe.prepare_latents(2, 64, 64, seed=5)
    schedule = pipe.timesteps(steps, img.shape[1])
    tokens = pipe.denoise(img, img_ids, txt, txt_ids, schedule, guidance, negative, False, cond=cond, cond_ids=cond_ids)
    ours = (pipe.decode_tokens(tokens, 64, 64) + 1) / 2
    called = pipe(prompts, num_steps=steps, seed=5, references=references, progress=False)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(called, pipe.to_pil(ours * 2 - 1)))

    theirs = diffusers_pipeline(folder, pipe, distilled=variant != "klein-base")
    options = {"guidance_scale": 4.0} if variant == "klein-base" else {}
    if variant == "klein-kv":
        theirs = Flux2KleinKVPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential"),
            vae=theirs.vae, text_encoder=theirs.text_encoder, tokenizer=theirs.tokenizer,
            transformer=theirs.transformer,
        )  # fmt: skip
    noise = rearrange(img, "b (h w) c -> b c h w", h=16)
    with torch.no_grad():
        expected = theirs(image=references, prompt=prompts, height=64, width=64, num_inference_steps=steps,
                          latents=noise, max_sequence_length=32, output_type="pt", **options).images  # fmt: skip
    assert ours.shape == expected.shape == (2, 3, 64, 64)
    tolerance = 5e-4 if variant == "klein-base" else 5e-5  # measured 2e-4 and <= 1.7e-5: CFG 4 amplifies rounding
    torch.testing.assert_close(ours, expected, rtol=0, atol=tolerance)
    plain = pipe.denoise(img, img_ids, txt, txt_ids, schedule, guidance, negative, False)
    assert (pipe.decode_tokens(plain, 64, 64) - pipe.decode_tokens(tokens, 64, 64)).abs().max() > 0.1  # they matter


def test_kv_and_appended_references_differ_on_the_same_weights(klein, klein_kv):
    """The same weights and references: caching (references at time 0, attending only to themselves) is not
    appending; and a KV folder without references draws exactly the klein picture."""
    references = [picture(64, 64, seed=3)]
    appended = Flux2Pipeline.from_folder(klein)(PROMPT, seed=2, references=references, progress=False)
    kv = Flux2Pipeline.from_folder(klein_kv)
    assert np.abs(np.asarray(kv(PROMPT, seed=2, references=references, progress=False), dtype=float)
                  - np.asarray(appended, dtype=float)).max() > 2  # fmt: skip
    plain = Flux2Pipeline.from_folder(klein)(PROMPT, seed=2, progress=False)
    assert np.array_equal(np.asarray(kv(PROMPT, seed=2, progress=False)), np.asarray(plain))


def test_kv_runs_the_references_once_for_the_batch(klein_kv, monkeypatch):
    """Several prompts share the references: klein 9B KV builds their keys and values once, at batch 1."""
    pipe = Flux2Pipeline.from_folder(klein_kv)
    build, batches = pipe.model.reference_kv, []

    def reference_kv(cond, *args):
        batches.append(cond.shape[0])
        return build(cond, *args)

    monkeypatch.setattr(pipe.model, "reference_kv", reference_kv)
    pipe([PROMPT, "a blue bird flying over the sea", "a green tree"], references=[picture(64, 64)], progress=False)
    assert batches == [1]


def test_reference_ids_and_tokens(klein):
    """Reference i sits at t = 10 + 10 i on its own (rows, cols) grid, after the noise; L counts noise only."""
    pipe = Flux2Pipeline.from_folder(klein)
    cond, cond_ids = pipe.encode_references([picture(80, 64), picture(64, 96)])
    first, second = 20 * 16, 16 * 24  # the tiny AE: one token per 4 x 4 pixels
    assert cond.shape == (1, first + second, 16) and cond_ids.shape == (1, first + second, 4)
    grid = torch.tensor([[10.0, r, c, 0] for r in range(16) for c in range(20)])
    assert torch.equal(cond_ids[0, :first], grid)
    grid = torch.tensor([[20.0, r, c, 0] for r in range(24) for c in range(16)])
    assert torch.equal(cond_ids[0, first:], grid)
    pixels = reference_pixels(picture(80, 64), SEVERAL).to(pipe.device)
    assert torch.equal(cond[:, :first], pipe.autoencoder.encode(pixels).flatten(2).transpose(1, 2))


@pytest.mark.parametrize(
    "size, max_pixels, resized",
    [
        ((3000, 2000), ONE, (2478, 1652)),  # sqrt(2024^2 / 6e6) = 0.826295: 2478.88 x 1652.59, truncated
        ((3000, 2000), SEVERAL, (1254, 836)),  # 0.418046: 1254.14 x 836.09
        ((1100, 1136), SEVERAL, (1007, 1040)),  # 0.916040: 1007.64 -> 1007 -> crop 992 (rounding: 1008)
        ((1500, 1500), ONE, (1500, 1500)),  # under BFL's cap for one reference: kept (diffusers: 1024 x 1024)
    ],
)
def test_reference_sizes_by_hand(size, max_pixels, resized):
    """Area-preserving downscale with int() truncation (the count stays <= the cap), then a center crop to
    multiples of 16."""
    pixels = reference_pixels(Image.new("RGB", size), max_pixels)
    assert resized[0] * resized[1] <= max_pixels
    assert pixels.shape == (1, 3, resized[1] // 16 * 16, resized[0] // 16 * 16)


def test_reference_downscale_is_lanczos():
    """300 x 200 capped at 150 x 100 pixels: PIL's LANCZOS to 150 x 100, then the 144 x 96 centre (left 3, top 2)."""
    image = picture(300, 200, seed=6)
    resized = np.asarray(image.resize((150, 100), Image.LANCZOS), dtype=np.float32)[2:98, 3:147]
    expected = torch.from_numpy(resized).permute(2, 0, 1)[None] / 127.5 - 1
    assert torch.equal(reference_pixels(image, 150 * 100), expected)


def test_encode_references_picks_the_cap_by_count(klein, monkeypatch):
    """A lone reference keeps up to 2024^2 pixels, each of several 1024^2: encode_references prepares the sizes
    reference_tokens counts (the tiny AE's encoder stands in for a cheap one: its attention would not fit)."""
    pipe = Flux2Pipeline.from_folder(klein)
    encoded = []

    def encode(pixels):  # (1, 3, H, W) -> a (1, 16, H / 4, W / 4) latent
        encoded.append(tuple(pixels.shape[2:]))
        return torch.zeros(1, 16, pixels.shape[2] // 4, pixels.shape[3] // 4)

    monkeypatch.setattr(pipe.autoencoder, "encode", encode)
    pair = [Image.new("RGB", (1100, 1136)), Image.new("RGB", (1200, 1000))]
    alone = [Image.new("RGB", (1500, 1500))]
    for images, sizes in ((pair, [(1040, 992), (928, 1120)]), (alone, [(1488, 1488)])):
        encoded.clear()
        assert pipe.reference_tokens(images) == pipe.encode_references(images)[0].shape[1]
        assert encoded == sizes  # (H, W): the pair at 1024^2 each (1007 x 1040, 1121 x 934), the lone one kept


def test_encode_references_runs_without_autograd_and_moves_the_ae_once(klein_kv, monkeypatch):
    """No graph through the AE, yet tokens a gradient-tracking denoise can take (klein 9B KV's reference pass
    could not save inference tensors for backward)."""
    pipe = Flux2Pipeline.from_folder(klein_kv)
    moved = []

    def on_device(*modules):
        moved.append(modules)
        return contextlib.nullcontext()

    monkeypatch.setattr(pipe, "on_device", on_device)
    cond, cond_ids = pipe.encode_references([picture(64, 64), picture(80, 64), picture(64, 96)])
    assert not cond.requires_grad and moved == [(pipe.autoencoder,)]
    img, img_ids = pipe.prepare_latents(1, 64, 64, seed=0)
    txt, txt_ids = pipe.encode_prompt([PROMPT])
    tokens = pipe.denoise(img, img_ids, txt, txt_ids, [1.0, 0.0], progress=False, grad=True, cond=cond,
                          cond_ids=cond_ids)  # fmt: skip
    assert tokens.requires_grad


def test_reference_crop_and_value_range():
    """100 x 70 -> the 96 x 64 centre: columns 2..97, rows 3..66; 0 -> -1 and 255 -> 1."""
    x, y = np.meshgrid(np.arange(100), np.arange(70))
    rgb = np.stack((x, y, np.full_like(x, 255)), axis=-1).astype(np.uint8)
    pixels = reference_pixels(Image.fromarray(rgb).convert("RGBA"), ONE)
    assert pixels.shape == (1, 3, 64, 96)
    assert torch.equal(pixels[0, 0, 0, :3], torch.tensor([2, 3, 4]) / 127.5 - 1)  # red = column
    assert torch.equal(pixels[0, 1, :3, 0], torch.tensor([3, 4, 5]) / 127.5 - 1)  # green = row
    assert torch.all(pixels[0, 2] == 1.0)
    assert reference_pixels(Image.new("L", (64, 512)), ONE).shape == (1, 3, 512, 64)  # grey -> RGB; aspect 8 is fine


def test_bad_references_are_refused_with_the_image_named(klein):
    pipe = Flux2Pipeline.from_folder(klein)
    with pytest.raises(ValueError, match=r"reference 2 is 63 x 200 pixels; FLUX.2 needs at least 64 pixels a side"):
        pipe(PROMPT, references=[picture(64, 64), Image.new("RGB", (63, 200))], progress=False)
    with pytest.raises(ValueError, match=r"reference 1 is 64 x 513 pixels, an aspect ratio above 8; crop it"):
        pipe(PROMPT, references=[Image.new("RGB", (64, 513))], progress=False)
    with pytest.raises(ValueError, match="non-empty list of PIL images"):
        pipe(PROMPT, references=[], progress=False)
    with pytest.raises(ValueError, match="non-empty list of PIL images"):
        pipe(PROMPT, references=picture(64, 64), progress=False)
    with pytest.raises(ValueError, match=r"references\[0\] is a ndarray, not a PIL image"):
        pipe(PROMPT, references=[np.zeros((64, 64, 3))], progress=False)


def test_kv_variant_detection(klein, klein_kv, tmp_path):
    """klein 9B KV is told by the file name (kv as a word), by diffusers' model_index.json class, or by choice."""
    assert Flux2Pipeline.from_folder(klein_kv).variant == "klein-kv"
    folder = tmp_path / "m"
    shutil.copytree(klein, folder)
    (folder / "flux-2-klein-tiny.safetensors").rename(folder / "flux-2-klein-kvasir-tiny.safetensors")
    assert Flux2Pipeline.from_folder(folder).variant == "klein"  # "kv" must be a word of the name
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "Flux2KleinKVPipeline", "is_distilled": True}))
    pipe = Flux2Pipeline.from_folder(folder)
    assert pipe.variant == "klein-kv" and pipe.defaults.num_steps == 4 and pipe.defaults.reference_kv
    assert Flux2Pipeline.from_folder(folder, variant="klein").variant == "klein"
    assert Flux2Pipeline.from_folder(klein, variant="klein-kv").defaults.reference_kv
    # the order: KV clues, then is_distilled, then "base" in the file name (module docstring, README)
    (folder / "flux-2-klein-kvasir-tiny.safetensors").rename(folder / "flux-2-klein-base-9b-kv.safetensors")
    (folder / "model_index.json").write_text(json.dumps({"is_distilled": True}))
    assert Flux2Pipeline.from_folder(folder).variant == "klein-kv"  # "kv" in the name beats is_distilled
    (folder / "flux-2-klein-base-9b-kv.safetensors").rename(folder / "flux-2-klein-base-9b.safetensors")
    assert Flux2Pipeline.from_folder(folder).variant == "klein"  # is_distilled beats "base" in the name


def test_cli_edits_with_flux2_references(klein_kv, tmp_path, capsys):
    reference = tmp_path / "ref.png"
    picture(64, 80, seed=4).save(reference)
    out = tmp_path / "out.png"
    args = ["generate", "--weights", str(klein_kv), "--prompt", PROMPT, "--out", str(out), "--seed", "3",
            "--device", "cpu", "--quiet"]  # fmt: skip
    assert main([*args, "--reference", str(reference), "--reference", str(reference)]) == 0
    assert "klein-kv" in capsys.readouterr().out
    expected = Flux2Pipeline.from_folder(klein_kv)(PROMPT, seed=3, references=[Image.open(reference)] * 2,
                                                    progress=False)  # fmt: skip
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(expected))
    small = tmp_path / "small.png"
    Image.new("RGB", (40, 40)).save(small)
    assert main([*args, "--reference", str(small)]) == 2
    assert f"reference 1 ({small}) is 40 x 40 pixels" in capsys.readouterr().err


def autoencoder_bytes(pipe: Flux2Pipeline, batch: int, width: int, height: int) -> int:
    """The AE stage of flux_mini.memory's estimate for `batch` images of width x height (no other stage)."""
    config = pipe.autoencoder.config
    size = RunSize(batch=batch, image_tokens=0, text_tokens=0, hidden=1, heads=1, mlp_ratio=1.0, token_channels=0,
                   dtype_bytes=4, pixels=width * height,
                   autoencoder_channels=config.ch * config.ch_mult[0])  # fmt: skip
    return estimate_bytes(size)["autoencoder"]


def test_cli_refuses_bad_references_before_loading(klein, tmp_path, capsys, monkeypatch):
    """A reference FLUX.2 cannot take is refused before the model loads; Flux.1 takes no --reference at all."""
    small = tmp_path / "small.png"
    Image.new("RGB", (40, 40)).save(small)
    args = ["generate", "--prompt", PROMPT, "--out", str(tmp_path / "out.png"), "--device", "cpu", "--quiet",
            "--reference", str(small)]  # fmt: skip

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the references were checked")

    monkeypatch.setattr(Flux2Pipeline, "from_folder", load)
    assert main([*args, "--weights", str(klein)]) == 2
    assert f"reference 1 ({small}) is 40 x 40 pixels" in capsys.readouterr().err
    flux1 = tmp_path / "flux1"
    assert main(["tiny", str(flux1)]) == 0
    capsys.readouterr()
    assert main([*args, "--weights", str(flux1)]) == 2
    error = capsys.readouterr().err
    assert "--reference needs a FLUX.2 or FLUX.3 model folder (Flux.1 generates from text here)" in error


def test_memory_guard_counts_the_references(klein, klein_kv, monkeypatch):
    """R = the prepared references' tokens (one per 4 x 4 pixels in the tiny AE); they count as image tokens, and
    klein 9B KV also keeps a key and a value per reference token in every block, once for the batch. The AE stage
    is the larger of encoding the largest prepared reference and decoding the outputs."""
    pipe, kv = Flux2Pipeline.from_folder(klein), Flux2Pipeline.from_folder(klein_kv)
    references = [Image.new("RGB", (3000, 2000)), Image.new("RGB", (80, 64))]  # 1254 x 836 -> 1248 x 832; 80 x 64
    assert pipe.reference_tokens(references) == 312 * 208 + 20 * 16
    assert pipe.reference_tokens(references[:1]) == 616 * 412  # alone: 2478 x 1652 -> 2464 x 1648
    plain = pipe.memory_estimate(64, 64)
    edit = pipe.memory_estimate(64, 64, reference_tokens=1000, reference_pixels=1248 * 832)
    assert edit["transformer"] > plain["transformer"] and plain["autoencoder"] == autoencoder_bytes(pipe, 1, 64, 64)
    assert edit["autoencoder"] == autoencoder_bytes(pipe, 1, 1248, 832)  # the reference, not the 64 x 64 output
    large = pipe.memory_estimate(1024, 1024, batch=2, reference_tokens=1000, reference_pixels=1248 * 832)
    assert large["autoencoder"] == autoencoder_bytes(pipe, 2, 1024, 1024)  # decoding two 1024^2 outputs is larger
    config = kv.model.config
    cache = 2 * config.num_layers * 1000 * config.hidden_size * 4
    for batch in (1, 3):
        edit = pipe.memory_estimate(64, 64, batch, reference_tokens=1000)
        assert kv.memory_estimate(64, 64, batch, reference_tokens=1000)["transformer"] == edit["transformer"] + cache
    pipe.check_memory(64, 64, available=max(plain.values()) * 10)

    asked = {}

    def check_memory(*args, **kwargs):
        asked.update(kwargs)
        raise RunTooLargeError("stop")

    monkeypatch.setattr(pipe, "check_memory", check_memory)
    with pytest.raises(RunTooLargeError, match="stop"):
        pipe(PROMPT, references=references, progress=False)
    assert asked == {"reference_tokens": 312 * 208 + 20 * 16, "reference_pixels": 1248 * 832}
    with pytest.raises(RunTooLargeError, match="stop"):
        pipe(PROMPT, references=references[:1], progress=False)
    assert asked == {"reference_tokens": 616 * 412, "reference_pixels": 2464 * 1648}


def test_memory_refusal_names_the_references(klein):
    pipe = Flux2Pipeline.from_folder(klein)
    budget = max(pipe.memory_estimate(256, 256, reference_tokens=1000).values())
    with pytest.raises(RunTooLargeError, match=r"^1024x1024 with 1000 reference-image tokens needs about .* e\.g\. "
                                                r"width \d+ and height \d+, or fewer or smaller reference images$"):
        pipe.check_memory(1024, 1024, reference_tokens=1000, available=budget)
    budget = max(pipe.memory_estimate(64, 64).values()) * 10
    with pytest.raises(RunTooLargeError, match=r"with 1000000 reference-image tokens needs .* the reference images "
                                                r"alone do not fit, whatever the output size: use fewer or smaller"):
        pipe.check_memory(64, 64, reference_tokens=10**6, available=budget)
    with pytest.raises(RunTooLargeError, match=r"^1024x1024 needs about .* e\.g\. width \d+ and height \d+$"):
        pipe.check_memory(1024, 1024, available=max(pipe.memory_estimate(256, 256).values()))  # no references
