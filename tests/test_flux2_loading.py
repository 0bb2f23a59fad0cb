"""load_flux on FLUX.2 files: the generation is detected (never confused with Flux.1), the official
full-size headers load as their preset, and bad input gives one readable CheckpointError."""

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from flux_mini import Flux, Flux2, Flux2Config, FluxConfig
from flux_mini.checkpoint import CheckpointError, read_safetensors
from flux_mini.convert import flux2_bfl_to_diffusers
from flux_mini.loading import FLUX1, FLUX2, inspect_checkpoint, load_flux, save_flux
from flux_mini.tiny import randomize_, tiny_flux2_config, tiny_flux_config

SPEC_DIR = Path(__file__).parent / "data"
CONFIG = tiny_flux2_config(use_guidance_embed=True)


@pytest.fixture(scope="module")
def state():
    return {k: v.contiguous() for k, v in randomize_(Flux2(CONFIG), seed=2).state_dict().items()}


def write(path: Path, tensors: dict) -> Path:
    save_file(tensors, path)
    return path


def write_sparse(path: Path, shapes: dict) -> Path:
    """A full-size BF16 safetensors file whose data is a hole: a real header, no disk used."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 2 * torch.Size(shape).numel()
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return path


def official_shapes(name: str) -> dict:
    return json.loads((SPEC_DIR / f"flux-keys-{name}.json").read_text())["keys"]


@pytest.mark.parametrize(
    "name, generation, variant",
    [
        ("flux2-dev", FLUX2, "flux2-dev"),
        ("flux2-klein-4b", FLUX2, "flux2-klein-4b / flux2-klein-base-4b"),
        ("flux2-klein-9b", FLUX2, "flux2-klein-9b / flux2-klein-base-9b / flux2-klein-9b-kv"),
        ("flux-dev", FLUX1, "flux-dev / flux-dev-krea / flux-dev-kontext"),
        ("flux-schnell", FLUX1, "flux-schnell"),
    ],
)
def test_official_headers_are_told_apart(tmp_path, name, generation, variant):
    """From the header alone, BFL and prefixed: each file is its own generation and preset."""
    shapes = official_shapes(name)
    for prefix in ("", "model.diffusion_model."):
        path = write_sparse(tmp_path / f"{prefix}{name}.safetensors", {prefix + k: v for k, v in shapes.items()})
        info = inspect_checkpoint(path)
        assert info.generation is generation and info.prefix == prefix and info.variant() == variant
        assert info.config == generation.presets[name]


def test_full_size_klein_file_loads_as_klein_and_not_as_dev(tmp_path):
    path = write_sparse(tmp_path / "flux-2-klein-4b.safetensors", official_shapes("flux2-klein-4b"))
    model = load_flux(path)
    assert isinstance(model, Flux2) and model.config == Flux2Config.from_preset("flux2-klein-4b")
    assert model.img_in.weight.dtype == torch.bfloat16 and not model.img_in.weight.is_meta
    assert model.single_blocks[19].linear1.weight.shape == (27648, 3072)

    with pytest.raises(CheckpointError) as info:
        load_flux(path, config="flux2-dev")
    message = str(info.value)
    for word in ["looks like flux2-klein-4b / flux2-klein-base-4b", "FLUX.2 transformer", "no guidance_in",
                 "config 'flux2-dev' was requested", "use_guidance_embed: file False, requested True",
                 "hidden_size: file 3072, requested 6144", "depth: file 5, requested 8",
                 "missing keys (150): guidance_in.in_layer.weight"]:  # fmt: skip
        assert word in message, message


GENERATION_MIXUPS = [
    ("flux2", "flux-dev", ["preset 'flux-dev' of Flux.1 was requested", "a FLUX.2 transformer", "flux2-klein-4b"]),
    ("flux2", FluxConfig(), ["a FluxConfig of Flux.1 was requested", "this is a FLUX.2 transformer"]),
    ("flux1", "flux2-klein-4b", ["preset 'flux2-klein-4b' of FLUX.2 was requested", "this is a Flux.1 transformer"]),
    ("flux1", Flux2Config(), ["a Flux2Config of FLUX.2 was requested", "this is a Flux.1 transformer"]),
]


@pytest.mark.parametrize("kind, config, words", GENERATION_MIXUPS)
def test_a_config_of_the_other_generation_is_refused(tmp_path, state, kind, config, words):
    if kind == "flux2":
        path = write(tmp_path / "f2.safetensors", state)
    else:
        flux1 = randomize_(Flux(tiny_flux_config()), seed=0).state_dict()
        path = write(tmp_path / "f1.safetensors", {k: v.contiguous() for k, v in flux1.items()})
    with pytest.raises(CheckpointError) as info:
        load_flux(path, config=config)
    for word in words:
        assert word in str(info.value), str(info.value)


# ----------------------------------------------------------------------------------------------
# Bad files: each case builds one and names the words its message must contain.


def truncated(tmp, state):
    path = write(tmp / "t.safetensors", state)
    path.write_bytes(path.read_bytes()[:-100])
    return path, {}, ["truncated", "t.safetensors", "fetch the file again"]


def missing_key(tmp, state):
    path = write(tmp / "m.safetensors", {k: v for k, v in state.items() if k != "single_blocks.1.linear2.weight"})
    return path, {"config": CONFIG}, ["FLUX.2 transformer", "missing keys (1): single_blocks.1.linear2.weight"]


def missing_key_diffusers(tmp, state):
    diffusers = {k: v.contiguous() for k, v in flux2_bfl_to_diffusers(state).items()}
    del diffusers["transformer_blocks.0.attn.add_k_proj.weight"]
    path = write(tmp / "d.safetensors", diffusers)
    words = ["FLUX.2 transformer", "diffusers layout", "unexpected keys (2): transformer_blocks.0.attn.add_q_proj"]
    return path, {"config": CONFIG}, words + ["missing keys (1): double_blocks.0.txt_attn.qkv.weight"]


def wrong_shape(tmp, state):
    path = write(tmp / "s.safetensors", state | {"txt_in.weight": torch.zeros(64, 40)})
    words = ["txt_in.weight file [64, 40] vs model [64, 48]", "context_in_dim: file 40, requested 48"]
    return path, {"config": CONFIG}, words


def klein_as_dev(tmp, state):
    path = write(tmp / "klein.safetensors", {k: v for k, v in state.items() if not k.startswith("guidance_in")})
    words = ["no guidance_in", "use_guidance_embed: file False, requested True", "missing keys (2): guidance_in."]
    return path, {"config": CONFIG}, words


def flux2_autoencoder(tmp, state):
    names = ["encoder.down.0.block.0.conv1.weight", "encoder.quant_conv.weight", "bn.running_mean", "bn.running_var"]
    path = write(tmp / "ae.safetensors", {n: torch.zeros(1) for n in names})
    return path, {}, ["not a Flux transformer", "FLUX.2 autoencoder", "load_flux2_autoencoder"]


def qwen3_text_encoder(tmp, state):
    names = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_norm.weight"]
    path = write(tmp / "model.safetensors", {n: torch.zeros(1) for n in names})
    return path, {}, ["not a Flux transformer", "language-model text encoder"]


def unknown_axes(tmp, state):
    """Head dim 16 is not official, so the RoPE split cannot be guessed: ask for config=."""
    return write(tmp / "tiny.safetensors", state), {}, ["head dim 16", "(32, 32, 32, 32)", "config="]


ERRORS = [truncated, missing_key, missing_key_diffusers, wrong_shape, klein_as_dev, flux2_autoencoder,
          qwen3_text_encoder, unknown_axes]  # fmt: skip


@pytest.mark.parametrize("case", ERRORS, ids=[f.__name__ for f in ERRORS])
def test_bad_checkpoints_raise_one_readable_error(case, tmp_path, state):
    path, kwargs, words = case(tmp_path, state)
    with pytest.raises(CheckpointError) as info:
        load_flux(path, **kwargs)
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in: {message}"
    assert info.value.__context__ is None or info.value.__suppress_context__


# ----------------------------------------------------------------------------------------------
# Saving, dtypes, memory


def test_save_flux_round_trips_both_layouts_without_config(tmp_path, state):
    model = Flux2(CONFIG)
    model.load_state_dict(state)
    for layout in ("bfl", "diffusers"):
        save_flux(model, tmp_path / f"{layout}.safetensors", layout=layout)
        loaded = load_flux(tmp_path / f"{layout}.safetensors")
        assert isinstance(loaded, Flux2) and loaded.config == CONFIG
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
    assert "double_stream_modulation_img.linear.weight" in read_safetensors(tmp_path / "diffusers.safetensors")
    with pytest.raises(ValueError, match="layout must be"):
        save_flux(model, tmp_path / "x.safetensors", layout="comfy")


def test_uncast_load_maps_the_file_without_copying(tmp_path, state):
    path = write(tmp_path / "f32.safetensors", state)
    model = load_flux(path, config=CONFIG)
    assert len({p.untyped_storage().data_ptr() for p in model.parameters()}) == 1  # views of one mapped file
    assert model.txt_in.weight.untyped_storage().nbytes() == path.stat().st_size
    cast = load_flux(path, config=CONFIG, dtype=torch.bfloat16)
    assert cast.txt_in.weight.dtype == torch.bfloat16
    assert torch.equal(cast.txt_in.weight, state["txt_in.weight"].bfloat16())
