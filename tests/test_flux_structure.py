"""The full-size model layout against the spec's key dumps, and the key conversion against diffusers.

Everything runs on the meta device or on [rows, 1] stand-ins: no full-size weights are allocated."""

import json
from pathlib import Path

import pytest
import torch

from flux_mini.convert import bfl_to_diffusers, config_from_diffusers, diffusers_config, diffusers_to_bfl
from flux_mini.loading import infer_config
from flux_mini.flux1 import PRESETS, Flux, FluxConfig

SPEC_DIR = Path(__file__).parent / "data"  # copies of the official key lists (shared/spec)
KEY_FILE = {  # preset -> the spec's dump with the same architecture
    "flux-schnell": "flux-schnell",
    "flux-dev": "flux-dev",
    "flux-dev-krea": "flux-dev",
    "flux-dev-kontext": "flux-dev",
    "flux-dev-fill": "flux-dev-fill",
    "flux-dev-canny": "flux-dev-canny",
    "flux-dev-depth": "flux-dev-canny",
}



def spec_keys(name: str) -> dict:
    return json.loads((SPEC_DIR / f"flux-keys-{name}.json").read_text())


def meta_state(shapes: dict) -> dict[str, torch.Tensor]:
    return {k: torch.empty(shape, device="meta") for k, shape in shapes.items()}


def test_every_preset_is_covered():
    assert set(KEY_FILE) == set(PRESETS)


@pytest.mark.parametrize("preset", sorted(KEY_FILE))
def test_preset_state_dict_matches_official_keys_and_shapes(preset):
    spec = spec_keys(KEY_FILE[preset])
    with torch.device("meta"):
        model = Flux(FluxConfig.from_preset(preset))
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert list(ours) == list(spec["keys"])  # same names, same order as the reference
    assert ours == spec["keys"]
    assert FluxConfig.from_preset(preset).to_dict() == spec["params"]


@pytest.mark.parametrize("name", sorted(set(KEY_FILE.values())))
def test_config_inferred_from_official_shapes(name):
    spec = spec_keys(name)
    shapes = {k: tuple(s) for k, s in spec["keys"].items()}
    assert infer_config(shapes) == FluxConfig(**spec["params"])
    # and through the diffusers layout
    converted = {k: tuple(t.shape) for k, t in diffusers_to_bfl(bfl_to_diffusers(meta_state(shapes))).items()}
    assert infer_config(converted) == FluxConfig(**spec["params"])


@pytest.mark.parametrize("name", ["flux-schnell", "flux-dev", "flux-dev-fill"])
def test_full_size_conversion_equals_diffusers(name):
    """Our table-driven converter against diffusers' own converter and model, at the real widths.

    Shapes: meta tensors. Values: each tensor is replaced by a [rows, 1] column of globally unique row
    ids, so every split, concatenation and swap along dim 0 is checked row by row."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    params = spec_keys(name)["params"]
    shapes = spec_keys(name)["keys"]
    ours = bfl_to_diffusers(meta_state(shapes))
    with torch.device("meta"):
        reference_model = FluxTransformer2DModel(**diffusers_config(FluxConfig(**params)))
    expected = {k: tuple(v.shape) for k, v in reference_model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.items()} == expected
    assert len(expected) == (1160 if params["guidance_embed"] else 1156)

    start, ids = 0, {}
    for key, shape in shapes.items():
        ids[key] = torch.arange(start, start + shape[0], dtype=torch.float64).reshape(shape[0], *[1] * (len(shape) - 1))
        start += shape[0]
    reference = convert_flux_transformer_checkpoint_to_diffusers(dict(ids))
    ours = bfl_to_diffusers(ids)
    assert set(ours) == set(reference)
    for key in reference:
        assert torch.equal(ours[key], reference[key]), key
    back = diffusers_to_bfl(ours)
    assert set(back) == set(ids) and all(torch.equal(back[k], ids[k]) for k in ids)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_diffusers_config_round_trip(name):
    config = FluxConfig.from_preset(name)
    assert config_from_diffusers(diffusers_config(config)) == config
    with pytest.raises(ValueError, match="mlp_ratio 4"):
        diffusers_config(FluxConfig(mlp_ratio=2.0))
