"""The full-size FLUX.3 Klein layout against the official key list, on the meta device, and the key conversion
against diffusers' own converter and model."""

import json
from pathlib import Path

import pytest
import torch

from flux_mini.convert import flux3_bfl_to_diffusers, flux3_diffusers_config, flux3_diffusers_to_bfl
from flux_mini.flux3 import PRESETS, Flux3, Flux3Config

SPEC = json.loads((Path(__file__).parent / "data" / "flux-keys-flux3-klein.json").read_text())
TARGET_KEYS = ("ref_time_in.in_layer.weight", "ref_time_in.out_layer.weight")


def official_keys(preset: str) -> dict[str, list[int]]:
    """The distilled list; Base is the same without the target-time embedder."""
    keys = SPEC["keys"]
    return keys if preset == "flux3-klein" else {k: v for k, v in keys.items() if k not in TARGET_KEYS}


def meta_state(shapes: dict) -> dict[str, torch.Tensor]:
    return {k: torch.empty(shape, device="meta") for k, shape in shapes.items()}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_state_dict_matches_official_keys_and_shapes(preset):
    with torch.device("meta"):
        model = Flux3(Flux3Config.from_preset(preset))
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert list(ours) == list(official_keys(preset))  # same names in the same order
    assert ours == official_keys(preset)
    assert len(ours) == (359 if preset == "flux3-klein" else 357)
    total = sum(torch.Size(s).numel() for s in ours.values())
    assert total == (5_548_681_984 if preset == "flux3-klein" else 5_538_458_368)  # spec §1


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_matches_official_params(preset):
    config, params = Flux3Config.from_preset(preset), SPEC["params"]
    ours = {
        "in_channels": {"image": config.in_channels, "image_cond": config.cond_in_channels},
        **{k: v for k, v in config.to_dict().items() if k not in ("in_channels", "cond_in_channels")},
    }
    assert ours == {**params, "flow_map": preset == "flux3-klein"}


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="flux3-klein-base"):
        Flux3Config.from_preset("flux3-klein-dev")


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_full_size_conversion_equals_diffusers(preset):
    """Our renames against diffusers' converter and model at the real widths. Values: each tensor is a [rows, 1]
    column of globally unique row ids, so a wrong rename or a missing half swap shows row by row."""
    from diffusers import Flux3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux3_transformer_checkpoint_to_diffusers

    shapes = official_keys(preset)
    with torch.device("meta"):
        reference = Flux3Transformer2DModel(**flux3_diffusers_config(Flux3Config.from_preset(preset)))
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in flux3_bfl_to_diffusers(meta_state(shapes)).items()} == expected

    start, ids = 0, {}
    for key, shape in shapes.items():
        ids[key] = torch.arange(start, start + shape[0], dtype=torch.float64)[:, None]
        start += shape[0]
    ours = flux3_bfl_to_diffusers(ids)
    theirs = convert_flux3_transformer_checkpoint_to_diffusers(
        {**ids, "repa_projectors.0.weight": torch.zeros(1, 1)}
    )
    assert set(ours) == set(theirs)
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key
    back = flux3_diffusers_to_bfl(ours)
    assert set(back) == set(ids) and all(torch.equal(back[k], ids[k]) for k in ids)
