"""load_flux / save_flux on FLUX.3 files: both layouts, prefixed all-in-one files, the training-only keys, strict
errors for the wrong variant or missing keys, zero-copy mapping, and the full-size key list."""

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from flux_mini.checkpoint import CheckpointError
from flux_mini.convert import flux3_bfl_to_diffusers
from flux_mini.flux1 import Flux
from flux_mini.flux3 import Flux3, Flux3Config
from flux_mini.loading import load_flux, save_flux
from flux_mini.tiny import randomize_, tiny_flux3_config, tiny_flux_config

from test_flux3_parity import inputs, ours, reference_model, relative_error, theirs

SPEC = json.loads((Path(__file__).parent / "data" / "flux-keys-flux3-klein.json").read_text())


@pytest.fixture(scope="module", params=[True, False], ids=["distilled", "base"])
def tiny(request):
    return randomize_(Flux3(tiny_flux3_config(flow_map=request.param)), seed=5).eval()


def state_of(model) -> dict:
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def assert_same_weights(loaded, model):
    assert loaded.config == model.config
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("layout", ["bfl", "diffusers"])
def test_saved_file_loads_back_and_runs_like_diffusers(tiny, layout, tmp_path):
    """save_flux -> load_flux in each layout, then the loaded model against diffusers' model loaded from the
    diffusers-layout file (so that file is what diffusers itself reads)."""
    save_flux(tiny, tmp_path / "bfl.safetensors")
    save_flux(tiny, tmp_path / "diffusers.safetensors", layout="diffusers")
    loaded = load_flux(tmp_path / f"{layout}.safetensors")
    assert isinstance(loaded, Flux3)
    assert_same_weights(loaded, tiny)

    reference = reference_model(tiny)
    reference.load_state_dict(load_file(tmp_path / "diffusers.safetensors"), strict=True)
    x = inputs(tiny.config, refs=1)
    with torch.no_grad():
        assert relative_error(ours(loaded, x), theirs(reference, x)) <= 1e-5


def test_all_in_one_file_with_training_keys_loads_and_says_what_it_dropped(tiny, tmp_path):
    """BFL names under `model.diffusion_model.`, beside another component and the REPA heads of training."""
    state = {f"model.diffusion_model.{k}": v for k, v in state_of(tiny).items()}
    state["model.diffusion_model.repa_projectors.0.weight"] = torch.zeros(8, 4)
    state["model.diffusion_model.repa_projectors.1.weight"] = torch.zeros(8, 4)
    state["vae.decoder.conv_in.bias"] = torch.zeros(3)
    save_file(state, tmp_path / "all.safetensors")
    with pytest.warns(UserWarning, match=r"not loading 2 tensor.*repa_projectors.0.weight, repa_projectors.1.weight"):
        loaded = load_flux(tmp_path / "all.safetensors", config=tiny.config)
    assert_same_weights(loaded, tiny)


def test_diffusers_folder_without_metadata_needs_config_for_a_tiny_head_dim(tiny, tmp_path):
    folder = tmp_path / "transformer"
    folder.mkdir()
    save_file(flux3_bfl_to_diffusers(state_of(tiny)), folder / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match="head dim 16.*pass config="):
        load_flux(folder)
    assert_same_weights(load_flux(folder, config=tiny.config), tiny)


def write_sparse(path: Path, shapes: dict) -> Path:
    """A full-size bf16 safetensors file whose data is a hole: the header is real, the 11 GB take no disk."""
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


def test_full_size_files_load_as_their_variant_and_refuse_the_other(tmp_path):
    distilled = write_sparse(tmp_path / "flux3-image-klein.safetensors", SPEC["keys"])
    model = load_flux(distilled)  # no metadata: the config comes from the shapes
    assert model.config == Flux3Config.from_preset("flux3-klein")
    assert model.single_blocks[27].mlp_in.weight.shape == (18432, 3072)
    assert model.txt_in.weight.dtype == torch.bfloat16 and not model.txt_in.weight.is_meta
    assert model.txt_in.weight.untyped_storage().nbytes() == distilled.stat().st_size  # a view of the mapped file

    base_keys = {k: v for k, v in SPEC["keys"].items() if not k.startswith("ref_time_in.")}
    base = write_sparse(tmp_path / "flux3-image-klein-base.safetensors", base_keys)
    assert load_flux(base).config == Flux3Config.from_preset("flux3-klein-base")

    with pytest.raises(CheckpointError) as info:
        load_flux(base, config="flux3-klein")
    for words in ["looks like flux3-klein-base (FLUX.3 transformer, BFL layout, no ref_time_in, in_channels 128, "
                  "hidden 3072, 5 mode blocks per mode + 28 joint blocks, BF16)", "config 'flux3-klein' was requested",
                  "flow_map: file False, requested True", "missing keys (2)", "ref_time_in.in_layer.weight"]:  # fmt: skip
        assert words in str(info.value)
    wrong_base = "(?s)looks like flux3-klein .*flow map.*unexpected keys .2.: ref_time_in"
    with pytest.raises(CheckpointError, match=wrong_base):
        load_flux(distilled, config="flux3-klein-base")


def test_missing_key_is_named(tiny, tmp_path):
    state = state_of(tiny)
    del state["single_blocks.1.mlp_out.weight"]
    save_file(state, tmp_path / "broken.safetensors")
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): single_blocks.1.mlp_out.weight"):
        load_flux(tmp_path / "broken.safetensors", config=tiny.config)


def test_generation_mismatch_is_named(tiny, tmp_path):
    save_flux(tiny, tmp_path / "flux3.safetensors")
    with pytest.raises(CheckpointError, match="preset 'flux-dev' of Flux.1 was requested: this is a FLUX.3"):
        load_flux(tmp_path / "flux3.safetensors", config="flux-dev")
    save_flux(Flux(tiny_flux_config()), tmp_path / "flux1.safetensors")
    with pytest.raises(CheckpointError, match="preset 'flux3-klein' of FLUX.3 was requested: this is a Flux.1"):
        load_flux(tmp_path / "flux1.safetensors", config="flux3-klein")
