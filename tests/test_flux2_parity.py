"""A tiny random FLUX.2 saved in every accepted layout loads back exactly and runs like diffusers' model.

diffusers' Flux2Transformer2DModel is the independent reference, built from our BFL -> diffusers
conversion: a wrong split, swap, rename, modulation order, SwiGLU half or RoPE axis shows as an output
difference. Every weight (modulations and norm gains included) is random and non-zero."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from flux_mini import Flux2, Flux2Config
from flux_mini.checkpoint import read_safetensors
from flux_mini.convert import flux2_bfl_to_diffusers, flux2_diffusers_config, flux2_diffusers_to_bfl
from flux_mini.loading import load_flux, save_flux
from flux_mini.tiny import randomize_, tiny_flux2_config

torch.set_num_threads(1)
LAYOUTS = ["bfl", "prefixed", "diffusers", "diffusers-sharded"]


def save_layouts(model: Flux2, folder) -> dict:
    """Write the model in every layout; -> layout name -> path for load_flux."""
    folder.mkdir()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_flux(model, folder / "bfl.safetensors")
    # an all-in-one file: the transformer under a prefix, beside another component that must be ignored
    prefixed = {f"model.diffusion_model.{k}": v for k, v in state.items()} | {"vae.decoder.conv_in.bias": torch.ones(3)}
    save_file(prefixed, folder / "prefixed.safetensors")
    save_flux(model, folder / "diffusers.safetensors", layout="diffusers")

    diffusers = {k: v.contiguous() for k, v in flux2_bfl_to_diffusers(state).items()}
    sharded = folder / "transformer"
    sharded.mkdir()
    names = sorted(diffusers)
    shards = {f"diffusion_pytorch_model-0000{i + 1}-of-00002.safetensors": names[i::2] for i in range(2)}
    for file, keys in shards.items():
        save_file({k: diffusers[k] for k in keys}, sharded / file)
    index = {"metadata": {}, "weight_map": {k: file for file, keys in shards.items() for k in keys}}
    (sharded / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    return {
        "bfl": folder / "bfl.safetensors",
        "prefixed": folder / "prefixed.safetensors",
        "diffusers": folder / "diffusers.safetensors",
        "diffusers-sharded": sharded,
    }


@pytest.fixture(scope="module", params=[False, True], ids=["klein-like", "dev-like"])
def tiny(request, tmp_path_factory):
    config = tiny_flux2_config(use_guidance_embed=request.param)
    model = randomize_(Flux2(config), seed=1).eval()
    return config, model, save_layouts(model, tmp_path_factory.mktemp("tiny2") / "files")


def inputs(config: Flux2Config, batch=2, text=7, rows=3, cols=5, seed=0):
    """Noise tokens (0, r, c, 0) plus a 2x2 reference image at t = 10, text (0, 0, 0, n): all 4 axes move."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.zeros(rows, cols, 4)
    noise[..., 1], noise[..., 2] = torch.arange(rows)[:, None], torch.arange(cols)[None, :]
    reference = torch.zeros(2, 2, 4)
    reference[..., 0], reference[..., 1], reference[..., 2] = 10, torch.arange(2)[:, None], torch.arange(2)[None, :]
    img_ids = torch.cat((noise.reshape(-1, 4), reference.reshape(-1, 4)))
    txt_ids = torch.zeros(text, 4)
    txt_ids[:, 3] = torch.arange(text)
    tokens = img_ids.shape[0]
    return dict(
        img=torch.randn(batch, tokens, config.in_channels, generator=g),
        img_ids=img_ids.repeat(batch, 1, 1),
        txt=torch.randn(batch, text, config.context_in_dim, generator=g),
        txt_ids=txt_ids.repeat(batch, 1, 1),
        timesteps=torch.tensor([0.73, 0.21]),
        guidance=torch.tensor([4.0, 2.5]) if config.use_guidance_embed else None,
    )


def diffusers_model(config: Flux2Config, diffusers_state: dict):
    from diffusers import Flux2Transformer2DModel

    model = Flux2Transformer2DModel(**flux2_diffusers_config(config))
    model.load_state_dict(diffusers_state, strict=True)
    return model.eval()


def diffusers_forward(model, x: dict) -> torch.Tensor:
    """diffusers takes 2-D ids (batch element 0) and the same t in [0, 1]; it scales by 1000 itself."""
    return model(
        hidden_states=x["img"],
        encoder_hidden_states=x["txt"],
        timestep=x["timesteps"],
        img_ids=x["img_ids"][0],
        txt_ids=x["txt_ids"][0],
        guidance=x["guidance"],
        return_dict=False,
    )[0]


def load(paths: dict, layout: str, config: Flux2Config) -> Flux2:
    """save_flux's files carry their config; the others need it (head dim 16 has no official RoPE split)."""
    return load_flux(paths[layout], config=None if layout in ("bfl", "diffusers") else config)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_loads_the_exact_weights(tiny, layout):
    config, model, paths = tiny
    loaded = load(paths, layout, config)
    assert isinstance(loaded, Flux2) and loaded.config == config
    expected, got = model.state_dict(), loaded.state_dict()
    assert list(got) == list(expected)
    for key in expected:
        assert got[key].dtype == torch.float32 and torch.equal(got[key], expected[key]), key


@torch.no_grad()
def test_loaded_models_match_diffusers(tiny):
    config, model, paths = tiny
    x = inputs(config)
    reference = diffusers_forward(diffusers_model(config, flux2_bfl_to_diffusers(model.state_dict())), x)
    scale = reference.abs().max()
    assert reference.shape == (2, 19, config.in_channels) and scale > 1.0
    for layout in LAYOUTS:
        out = load(paths, layout, config)(**x)
        assert (out - reference).abs().max() <= 1e-5 * scale, layout

    # controls: each of these plausible bugs must break the comparison above
    state = model.state_dict()
    unswapped = flux2_bfl_to_diffusers(state)
    unswapped["norm_out.linear.weight"] = state["final_layer.adaLN_modulation.1.weight"]
    wrong = diffusers_forward(diffusers_model(config, unswapped), x)
    assert (wrong - reference).abs().max() > 1e-2 * scale
    swapped_swiglu = dict(state)
    gate, value = state["double_blocks.0.img_mlp.0.weight"].chunk(2)
    swapped_swiglu["double_blocks.0.img_mlp.0.weight"] = torch.cat((value, gate))
    twisted = Flux2(config)
    twisted.load_state_dict(swapped_swiglu)
    assert (twisted(**x) - reference).abs().max() > 1e-2 * scale


@torch.no_grad()
def test_diffusers_layout_file_runs_in_diffusers(tiny):
    """The diffusers-layout files we wrote are valid diffusers state dicts in their own right."""
    config, model, paths = tiny
    x = inputs(config, seed=3)
    ours = model(**x)
    for layout in ("diffusers", "diffusers-sharded"):
        from_file = diffusers_forward(diffusers_model(config, read_safetensors(paths[layout])), x)
        assert (from_file - ours).abs().max() <= 1e-5 * from_file.abs().max(), layout


def test_klein_ignores_guidance_and_dev_requires_it(tiny):
    config, model, _ = tiny
    x = inputs(config)
    with torch.no_grad():
        if config.use_guidance_embed:
            with pytest.raises(ValueError, match="pass `guidance`"):
                model(**x | {"guidance": None})
            assert not torch.equal(model(**x), model(**x | {"guidance": torch.tensor([1.0, 1.0])}))
        else:  # the reference passes a guidance value to klein, which has no guidance_in
            assert torch.equal(model(**x), model(**x | {"guidance": torch.tensor([4.0, 4.0])}))


@settings(max_examples=20, deadline=None)
@given(
    depth=st.integers(0, 2),
    singles=st.integers(0, 2),
    heads=st.integers(1, 3),
    mlp_ratio=st.sampled_from([1.0, 2.5, 3.0]),
    guidance=st.booleans(),
)
def test_key_maps_round_trip(depth, singles, heads, mlp_ratio, guidance):
    if depth + singles == 0:
        singles = 1
    config = Flux2Config(
        in_channels=3, context_in_dim=5, hidden_size=heads * 8, num_heads=heads, depth=depth,
        depth_single_blocks=singles, axes_dim=(2, 2, 2, 2), mlp_ratio=mlp_ratio, use_guidance_embed=guidance,
    )  # fmt: skip
    bfl = randomize_(Flux2(config)).state_dict()
    diffusers = flux2_bfl_to_diffusers(bfl)
    assert not set(diffusers) & set(bfl)  # every key was renamed
    assert len(diffusers) == len(bfl) + 4 * depth  # each double block: two fused qkv -> 3 tensors each
    back = flux2_diffusers_to_bfl(diffusers)
    assert set(back) == set(bfl) and all(torch.equal(back[k], bfl[k]) for k in bfl)
    unknown = {"something.else": torch.ones(2)}
    assert flux2_diffusers_to_bfl(diffusers | unknown)["something.else"] is unknown["something.else"]
