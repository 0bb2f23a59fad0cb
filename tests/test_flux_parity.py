"""A tiny random Flux saved in every accepted layout loads back exactly, and runs like diffusers' model.

diffusers' FluxTransformer2DModel is the independent reference: it is built from our BFL -> diffusers
conversion, so a wrong split, swap or rename shows up as an output difference."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from flux_mini.checkpoint import read_safetensors
from flux_mini.convert import bfl_to_diffusers, diffusers_config, diffusers_to_bfl
from flux_mini.loading import load_flux
from flux_mini.flux1 import Flux, FluxConfig
from flux_mini.tiny import randomize_, tiny_flux_config

LAYOUTS = ["bfl", "prefixed", "diffusers", "diffusers-sharded"]


def save_layouts(state: dict, folder) -> dict:
    """Write `state` (BFL names) in every layout; -> layout name -> path for load_flux."""
    folder.mkdir()
    state = {k: v.contiguous() for k, v in state.items()}
    diffusers = {k: v.contiguous() for k, v in bfl_to_diffusers(state).items()}
    save_file(state, folder / "bfl.safetensors")
    # an all-in-one file: the transformer under a prefix, beside other components that must be ignored
    prefixed = {f"model.diffusion_model.{k}": v for k, v in state.items()}
    prefixed["vae.decoder.conv_in.bias"] = torch.zeros(3)
    save_file(prefixed, folder / "prefixed.safetensors")
    save_file(diffusers, folder / "diffusers.safetensors")

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


@pytest.fixture(scope="module", params=[False, True], ids=["no-guidance", "guidance"])
def tiny(request, tmp_path_factory):
    config = tiny_flux_config(guidance_embed=request.param)
    model = randomize_(Flux(config), seed=1)
    paths = save_layouts(model.state_dict(), tmp_path_factory.mktemp("tiny") / "files")
    return config, model, paths


def inputs(config: FluxConfig, batch=2, text=7, rows=3, cols=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    img_ids = torch.zeros(rows, cols, 3)
    img_ids[..., 1] = torch.arange(rows)[:, None]
    img_ids[..., 2] = torch.arange(cols)[None, :]
    return dict(
        img=torch.randn(batch, rows * cols, config.in_channels, generator=g),
        img_ids=img_ids.reshape(1, rows * cols, 3).repeat(batch, 1, 1),
        txt=torch.randn(batch, text, config.context_in_dim, generator=g),
        txt_ids=torch.zeros(batch, text, 3),
        timesteps=torch.tensor([0.73, 0.21]),
        y=torch.randn(batch, config.vec_in_dim, generator=g),
        guidance=torch.tensor([3.5, 4.0]) if config.guidance_embed else None,
    )


def diffusers_model(config: FluxConfig, diffusers_state: dict):
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(**diffusers_config(config))
    model.load_state_dict(diffusers_state, strict=True)
    return model.eval()


def diffusers_forward(model, x: dict) -> torch.Tensor:
    """diffusers takes 2-D ids and the same t in [0, 1] (and raw guidance); it scales by 1000 itself."""
    return model(
        hidden_states=x["img"],
        encoder_hidden_states=x["txt"],
        pooled_projections=x["y"],
        timestep=x["timesteps"],
        img_ids=x["img_ids"][0],
        txt_ids=x["txt_ids"][0],
        guidance=x["guidance"],
        return_dict=False,
    )[0]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_loads_the_exact_weights(tiny, layout):
    config, model, paths = tiny
    loaded = load_flux(paths[layout], config=config)
    expected = model.state_dict()
    got = loaded.state_dict()
    assert list(got) == list(expected)
    for key in expected:
        assert got[key].dtype == torch.float32 and torch.equal(got[key], expected[key]), key


@torch.no_grad()
def test_loaded_models_match_diffusers(tiny):
    config, model, paths = tiny
    x = inputs(config)
    reference = diffusers_forward(diffusers_model(config, bfl_to_diffusers(model.state_dict())), x)
    scale = reference.abs().max()
    assert reference.shape == (2, 15, config.out_channels) and scale > 1.0
    for layout in LAYOUTS:
        out = load_flux(paths[layout], config=config)(**x)
        assert (out - reference).abs().max() <= 1e-5 * scale, layout

    # control: without the norm_out half swap the comparison above must fail
    unswapped = bfl_to_diffusers(model.state_dict())
    for p in ("weight", "bias"):
        unswapped[f"norm_out.linear.{p}"] = model.state_dict()[f"final_layer.adaLN_modulation.1.{p}"]
    wrong = diffusers_forward(diffusers_model(config, unswapped), x)
    assert (wrong - reference).abs().max() > 1e-2 * scale


@torch.no_grad()
def test_diffusers_layout_file_runs_in_diffusers(tiny):
    """The diffusers-layout file we wrote is a valid diffusers state dict in its own right."""
    config, model, paths = tiny
    x = inputs(config, seed=3)
    from_file = diffusers_forward(diffusers_model(config, read_safetensors(paths["diffusers-sharded"])), x)
    ours = model(**x)
    assert (from_file - ours).abs().max() <= 1e-5 * from_file.abs().max()


@settings(max_examples=25, deadline=None)
@given(
    depth=st.integers(0, 2),
    singles=st.integers(1, 2),
    heads=st.integers(1, 3),
    head_dim=st.sampled_from([2, 4]),
    mlp_ratio=st.sampled_from([1.0, 2.5, 4.0]),
    guidance=st.booleans(),
    in_channels=st.integers(1, 5),
)
def test_key_maps_round_trip(depth, singles, heads, head_dim, mlp_ratio, guidance, in_channels):
    config = FluxConfig(
        in_channels=in_channels,
        out_channels=3,
        vec_in_dim=5,
        context_in_dim=6,
        hidden_size=heads * head_dim,
        mlp_ratio=mlp_ratio,
        num_heads=heads,
        depth=depth,
        depth_single_blocks=singles,
        axes_dim=(head_dim,),
        guidance_embed=guidance,
    )
    bfl = randomize_(Flux(config)).state_dict()
    diffusers = bfl_to_diffusers(bfl)
    assert not set(diffusers) & set(bfl)  # every key was renamed
    assert len(diffusers) == len(bfl) + 8 * depth + 6 * singles  # qkv -> 3 (x2 streams, w+b); linear1 -> 4
    back = diffusers_to_bfl(diffusers)
    assert set(back) == set(bfl) and all(torch.equal(back[k], bfl[k]) for k in bfl)
    again = bfl_to_diffusers(back)
    assert set(again) == set(diffusers) and all(torch.equal(again[k], diffusers[k]) for k in diffusers)
    unknown = {"something.else": torch.ones(2)}
    assert diffusers_to_bfl(diffusers | unknown)["something.else"] is unknown["something.else"]
