"""A tiny random FLUX.3 runs exactly like diffusers' Flux3Transformer2DModel built from our BFL -> diffusers
conversion: distilled and Base, with and without reference tokens, float32."""

import pytest
import torch

from flux_mini.convert import flux3_bfl_to_diffusers, flux3_diffusers_config
from flux_mini.flux3 import Flux3
from flux_mini.tiny import randomize_, tiny_flux3_config


def reference_model(model: Flux3):
    from diffusers import Flux3Transformer2DModel

    reference = Flux3Transformer2DModel(**flux3_diffusers_config(model.config))
    reference.load_state_dict(flux3_bfl_to_diffusers(model.state_dict()), strict=True)
    return reference.eval()


def grid_ids(rows: int, cols: int, scale: float, l: float) -> torch.Tensor:
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    zeros = torch.zeros(rows * cols)
    return torch.stack([zeros, scale * r.flatten(), scale * c.flatten(), torch.full_like(zeros, l)], dim=-1)


def inputs(config, batch=2, text=9, rows=3, cols=4, refs=0, seed=0) -> dict:
    """Inputs in the pipeline's conventions: 0.5-scaled image ids, references on the l axis, text on l."""
    g = torch.Generator().manual_seed(seed)
    out = dict(
        img=torch.randn(batch, rows * cols, config.in_channels, generator=g),
        img_ids=grid_ids(rows, cols, config.image_rope_scale, 0.0),
        txt=torch.randn(batch, text, config.context_in_dim, generator=g),
        txt_ids=torch.stack([torch.zeros(text)] * 3 + [torch.arange(text, dtype=torch.float32)], dim=-1),
        timesteps=torch.tensor([0.8, 0.35][:batch]),
        target_timesteps=torch.tensor([0.6, 0.1][:batch]) if config.flow_map else None,
        cond=None,
        cond_ids=None,
    )
    if refs:
        out["cond"] = torch.randn(batch, refs * 2 * 3, config.cond_in_channels, generator=g)
        out["cond_ids"] = torch.cat([grid_ids(2, 3, config.image_rope_scale, -(1.0 + i)) for i in range(refs)])
    return out


def ours(model: Flux3, x: dict) -> torch.Tensor:
    def batched(ids):
        return None if ids is None else ids.expand(x["img"].shape[0], -1, -1)

    return model(
        x["img"], batched(x["img_ids"]), x["txt"], batched(x["txt_ids"]), x["timesteps"],
        x["cond"], batched(x["cond_ids"]), x["target_timesteps"],
    )


def theirs(reference, x: dict) -> torch.Tensor:
    return reference(
        hidden_states=x["img"], encoder_hidden_states=x["txt"], timestep=x["timesteps"], img_ids=x["img_ids"],
        txt_ids=x["txt_ids"], image_cond_hidden_states=x["cond"], image_cond_ids=x["cond_ids"],
        target_timestep=x["target_timesteps"],
    ).sample


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("refs", [0, 2], ids=["text-to-image", "two-references"])
@pytest.mark.parametrize("flow_map", [True, False], ids=["distilled", "base"])
@torch.no_grad()
def test_forward_matches_diffusers(flow_map, refs):
    model = randomize_(Flux3(tiny_flux3_config(flow_map=flow_map)), seed=3).eval()
    x = inputs(model.config, refs=refs)
    expected = theirs(reference_model(model), x)
    got = ours(model, x)
    assert got.shape == expected.shape == x["img"].shape
    assert relative_error(got, expected) <= 1e-5


@torch.no_grad()
def test_every_input_matters():
    """The parity above could hide an ignored input; each one must change the output."""
    model = randomize_(Flux3(tiny_flux3_config()), seed=4).eval()
    x = inputs(model.config, refs=1)
    base = ours(model, x)
    changes = {
        "timesteps": dict(timesteps=x["timesteps"] * 0.5),
        "target_timesteps": dict(target_timesteps=x["target_timesteps"] * 0.5),
        "cond": dict(cond=x["cond"] + 0.5),
        "cond_ids": dict(cond_ids=x["cond_ids"] * 2.0),
        "txt_ids": dict(txt_ids=x["txt_ids"].flip(0)),
        "no references": dict(cond=None, cond_ids=None),
    }
    for name, change in changes.items():
        assert not torch.allclose(ours(model, {**x, **change}), base, atol=1e-4), name


def test_flow_map_and_base_refuse_the_wrong_target():
    distilled, base = Flux3(tiny_flux3_config()), Flux3(tiny_flux3_config(flow_map=False))
    x = inputs(distilled.config)
    with pytest.raises(ValueError, match="pass target_timesteps"):
        ours(distilled, {**x, "target_timesteps": None})
    with pytest.raises(ValueError, match="Base"):
        ours(base, x)


def test_bad_shapes_are_named():
    model = Flux3(tiny_flux3_config())
    x = inputs(model.config, refs=1)
    with pytest.raises(ValueError, match="cond_ids"):
        ours(model, {**x, "cond_ids": None})
    with pytest.raises(ValueError, match="img_ids"):
        ours(model, {**x, "img_ids": x["img_ids"][:, :3]})
