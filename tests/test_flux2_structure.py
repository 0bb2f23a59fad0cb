"""FLUX.2 at full size against the spec's key dumps, on the meta device, and its key conversion against
diffusers' own converter and model. No full-size weights are allocated."""

import json
from pathlib import Path

import pytest
import torch

from flux_mini import Flux2, Flux2Config
from flux_mini.convert import (
    flux2_bfl_to_diffusers,
    flux2_config_from_diffusers,
    flux2_diffusers_config,
    flux2_diffusers_to_bfl,
)
from flux_mini.flux2 import PRESETS
from flux_mini.loading import infer_flux2_config

SPEC_DIR = Path(__file__).parent / "data"  # copies of the official key lists (shared/spec)
KEY_FILE = {  # preset -> the dump with the same architecture (distilled, Base and KV share keys, spec §1.1)
    "flux2-dev": "flux2-dev",
    "flux2-klein-4b": "flux2-klein-4b",
    "flux2-klein-base-4b": "flux2-klein-4b",
    "flux2-klein-9b": "flux2-klein-9b",
    "flux2-klein-base-9b": "flux2-klein-9b",
    "flux2-klein-9b-kv": "flux2-klein-9b",
}
TENSORS = {"flux2-dev": (299, 331), "flux2-klein-4b": (149, 169), "flux2-klein-9b": (201, 233)}  # BFL, diffusers
PARAMS = {"flux2-dev": 32_223_281_152, "flux2-klein-4b": 3_875_544_576, "flux2-klein-9b": 9_078_581_248}


def spec(name: str) -> dict:
    return json.loads((SPEC_DIR / f"flux-keys-{name}.json").read_text())


def meta_state(shapes: dict) -> dict[str, torch.Tensor]:
    return {k: torch.empty(shape, device="meta") for k, shape in shapes.items()}


def test_every_preset_is_covered():
    assert set(KEY_FILE) == set(PRESETS)


@pytest.mark.parametrize("preset", sorted(KEY_FILE))
def test_preset_state_dict_matches_official_keys_and_shapes(preset):
    official = spec(KEY_FILE[preset])
    with torch.device("meta"):
        model = Flux2(Flux2Config.from_preset(preset))
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert list(ours) == list(official["keys"])  # same names, same order as the reference
    assert ours == official["keys"]
    assert Flux2Config.from_preset(preset).to_dict() == official["params"]
    assert len(ours) == TENSORS[KEY_FILE[preset]][0]
    assert sum(p.numel() for p in model.parameters()) == PARAMS[KEY_FILE[preset]]


@pytest.mark.parametrize("name", sorted(TENSORS))
def test_config_inferred_from_official_shapes_in_both_layouts(name):
    official = spec(name)
    shapes = {k: tuple(s) for k, s in official["keys"].items()}
    assert infer_flux2_config(shapes) == Flux2Config(**official["params"])
    round_trip = flux2_diffusers_to_bfl(flux2_bfl_to_diffusers(meta_state(shapes)))
    converted = {k: tuple(t.shape) for k, t in round_trip.items()}
    assert infer_flux2_config(converted) == Flux2Config(**official["params"])


@pytest.mark.parametrize("name", sorted(TENSORS))
def test_full_size_conversion_equals_diffusers(name):
    """Our converter against diffusers' converter and model, at the real widths. Values: each tensor is
    a [rows, 1] column of globally unique row ids, so every split and swap is checked row by row."""
    from diffusers import Flux2Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    official = spec(name)
    config = Flux2Config(**official["params"])
    ours = flux2_bfl_to_diffusers(meta_state(official["keys"]))
    with torch.device("meta"):
        reference_model = Flux2Transformer2DModel(**flux2_diffusers_config(config))
    expected = {k: tuple(v.shape) for k, v in reference_model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.items()} == expected
    assert len(expected) == TENSORS[name][1]

    start, ids = 0, {}
    for key, shape in official["keys"].items():
        ids[key] = torch.arange(start, start + shape[0], dtype=torch.float64).reshape(shape[0], *[1] * (len(shape) - 1))
        start += shape[0]
    reference = convert_flux2_transformer_checkpoint_to_diffusers(dict(ids))
    ours = flux2_bfl_to_diffusers(ids)
    assert set(ours) == set(reference)
    for key in reference:
        assert torch.equal(ours[key], reference[key]), key
    back = flux2_diffusers_to_bfl(ours)
    assert set(back) == set(ids) and all(torch.equal(back[k], ids[k]) for k in ids)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_diffusers_config_round_trip(preset):
    config = Flux2Config.from_preset(preset)
    assert flux2_config_from_diffusers(flux2_diffusers_config(config)) == config


def test_bad_configs_and_presets_say_why():
    with pytest.raises(ValueError, match="unknown FLUX.2 preset 'flux-dev'"):
        Flux2Config.from_preset("flux-dev")
    with pytest.raises(ValueError, match="axes_dim"):
        Flux2Config(axes_dim=(32, 32, 32))
    with pytest.raises(ValueError, match="not divisible"):
        Flux2Config(num_heads=5)
    with pytest.raises(ValueError, match="hidden_size 0, mlp_ratio -1.0: must be positive"):
        Flux2Config(hidden_size=0, mlp_ratio=-1.0)
