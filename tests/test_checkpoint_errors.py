"""Hand-made bad safetensors headers, shard indexes and configs: each refused with one error that names the
file and the fix. Non-finite weights: refused at load on request, naming the tensor."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from flux_mini import FluxPipeline
from flux_mini.autoencoder import AutoEncoder, load_autoencoder
from flux_mini.checkpoint import CheckpointError, read_header, read_safetensors
from flux_mini.flux1 import Flux, FluxConfig
from flux_mini.loading import METADATA_KEY, load_flux, save_flux
from flux_mini.tiny import build_tiny_weights, randomize_, tiny_autoencoder_config, tiny_flux_config

CONFIG = tiny_flux_config()


def raw_file(path: Path, header: dict, data: bytes) -> Path:
    """A safetensors file with exactly this header (no checks by the writer)."""
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def two_tensors(**second) -> dict:
    entry = {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]} | second
    return {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": entry}


def assert_refused(path: Path, *words: str) -> None:
    with pytest.raises(CheckpointError) as info:
        read_safetensors(path)
    message = str(info.value)
    for word in (path.name, *words):
        assert word in message, f"{word!r} not in: {message}"
    assert info.value.__cause__ is None and (info.value.__context__ is None or info.value.__suppress_context__)


def test_a_well_formed_hand_made_file_reads(tmp_path):
    """The control for the cases below: the same writer, a valid header."""
    path = raw_file(tmp_path / "ok.safetensors", two_tensors(), struct.pack("<4f", 1, 2, 3, 4))
    tensors = read_safetensors(path)
    assert tensors["a"].tolist() == [1, 2] and tensors["b"].tolist() == [3, 4]


def test_overlapping_tensor_data_is_refused(tmp_path):
    header = two_tensors(data_offsets=[4, 12])  # b shares a's last float
    path = raw_file(tmp_path / "overlap.safetensors", header, bytes(16))
    assert_refused(path, "'a'", "'b'", "overlap", "write the file again")


@pytest.mark.parametrize(
    "entry, words",
    [
        (dict(data_offsets=["8", "16"]), ["'b'", "data_offsets must be two non-negative integers"]),
        (dict(data_offsets=[8]), ["'b'", "data_offsets"]),
        (dict(data_offsets=[16, 8]), ["'b'", "data_offsets"]),  # begin after end: -8 bytes
        (dict(shape=[-2]), ["'b'", "shape must be a list of non-negative integers"]),
        (dict(shape=[2.0]), ["'b'", "shape"]),
        (dict(shape="2"), ["'b'", "shape"]),
    ],
)
def test_malformed_entries_are_named(tmp_path, entry, words):
    path = raw_file(tmp_path / "bad.safetensors", two_tensors(**entry), bytes(16))
    assert_refused(path, *words)


def test_entry_that_is_not_an_object_is_named(tmp_path):
    path = raw_file(tmp_path / "bad.safetensors", {"a": [1, 2]}, b"")
    assert_refused(path, "'a'", "malformed")


def test_truncated_header_is_called_truncated_not_a_pickle(tmp_path):
    whole = tmp_path / "whole.safetensors"
    save_file({"x": torch.ones(3)}, whole)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(whole.read_bytes()[:30])  # inside the JSON header
    assert_refused(cut, "truncated", "fetch the file again")
    with pytest.raises(CheckpointError) as info:
        read_header(cut)
    assert "pickle" not in str(info.value)


def test_pickle_is_still_called_a_pickle(tmp_path):
    torch.save({"x": torch.ones(3)}, tmp_path / "model.pt")
    assert_refused(tmp_path / "model.pt", "not a safetensors file", "pickle")


# ----------------------------------------------------------------------------------------------
# Shard indexes


@pytest.fixture
def shard_folder(tmp_path):
    """transformer/ with one real shard and its index."""
    folder = tmp_path / "transformer"
    folder.mkdir()
    save_file({"x": torch.ones(2), "y": torch.zeros(2)}, folder / "part-1.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "part-1.safetensors",
                                                                                    "y": "part-1.safetensors"}}))
    return folder


def set_weight_map(folder: Path, weight_map) -> Path:
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": weight_map}))
    return index


def test_index_control_reads(shard_folder):
    assert read_safetensors(shard_folder)["x"].tolist() == [1, 1]


@pytest.mark.parametrize("where", ["../outside.safetensors", "absolute", "sub/part-1.safetensors"])
def test_index_naming_a_file_outside_its_folder_is_refused(shard_folder, where):
    outside = shard_folder.parent / "outside.safetensors"
    save_file({"y": torch.zeros(2)}, outside)
    (shard_folder / "sub").mkdir()
    save_file({"y": torch.zeros(2)}, shard_folder / "sub" / "part-1.safetensors")
    name = str(outside) if where == "absolute" else where
    index = set_weight_map(shard_folder, {"x": "part-1.safetensors", "y": name})
    with pytest.raises(CheckpointError) as info:
        read_safetensors(shard_folder)
    message = str(info.value)
    for word in (str(index), name, "outside its own folder", "by file name"):
        assert word in message, message


@pytest.mark.parametrize("weight_map", [["part-1.safetensors"], "part-1.safetensors", {"x": 3}])
def test_weight_map_that_is_not_a_name_map_is_refused(shard_folder, weight_map):
    index = set_weight_map(shard_folder, weight_map)
    with pytest.raises(CheckpointError) as info:
        read_header(shard_folder)
    assert str(index) in str(info.value) and "'weight_map' must be a JSON object" in str(info.value)


# ----------------------------------------------------------------------------------------------
# Configs


def test_zero_heads_in_the_file_metadata_is_a_clear_error(tmp_path):
    model = randomize_(Flux(CONFIG), seed=0)
    path = tmp_path / "zero.safetensors"
    save_flux(model, path)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, path, metadata={METADATA_KEY: json.dumps(CONFIG.to_dict() | {"num_heads": 0})})
    with pytest.raises(CheckpointError, match="num_heads 0: must be positive"):
        load_flux(path)


@pytest.mark.parametrize("field, value", [("num_heads", 0), ("hidden_size", -64), ("num_heads", 2.5),
                                          ("mlp_ratio", 0), ("theta", 0), ("in_channels", True)])
def test_config_refuses_non_positive_sizes(field, value):
    with pytest.raises(ValueError, match=f"{field} {value!r}: must be positive"):
        FluxConfig(**CONFIG.to_dict() | {field: value})


def test_flux_config_json_with_zero_heads_names_the_file(tmp_path):
    folder = build_tiny_weights(tmp_path / "tiny", seed=0)
    (folder / "flux_config.json").write_text(json.dumps(CONFIG.to_dict() | {"num_heads": 0}))
    with pytest.raises(ValueError) as info:
        FluxPipeline.from_folder(folder)
    assert "flux_config.json" in str(info.value) and "num_heads 0" in str(info.value)


# ----------------------------------------------------------------------------------------------
# Non-finite weights


def poisoned(tmp_path: Path, state: dict, name: str, value: float) -> Path:
    state = {k: v.detach().clone().contiguous() for k, v in state.items()}
    state[name].view(-1)[1] = value
    path = tmp_path / "poisoned.safetensors"
    save_file(state, path)
    return path


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_transformer_weight_is_named_on_request(tmp_path, value):
    model = randomize_(Flux(CONFIG), seed=1)
    path = poisoned(tmp_path, model.state_dict(), "double_blocks.1.txt_mlp.0.weight", value)
    loaded = load_flux(path, config=CONFIG)  # off by default: the mapped load reads no weight
    assert not torch.isfinite(loaded.double_blocks[1].txt_mlp[0].weight).all()
    with pytest.raises(CheckpointError) as info:
        load_flux(path, config=CONFIG, check_finite=True)
    message = str(info.value)
    assert "'double_blocks.1.txt_mlp.0.weight'" in message and "poisoned.safetensors" in message
    assert ("1 NaN" if value != value else "1 infinite") in message
    clean = tmp_path / "clean.safetensors"
    save_flux(model, clean)
    load_flux(clean, check_finite=True)  # finite weights pass


def test_weight_that_overflows_the_requested_dtype_is_named(tmp_path):
    model = randomize_(Flux(CONFIG), seed=1)
    path = poisoned(tmp_path, model.state_dict(), "txt_in.bias", 1e6)  # finite in float32, inf in float16
    load_flux(path, config=CONFIG, check_finite=True)
    with pytest.raises(CheckpointError, match="'txt_in.bias'.*overflow the requested dtype"):
        load_flux(path, config=CONFIG, dtype=torch.float16, check_finite=True)


def test_non_finite_autoencoder_weight_is_named_on_request(tmp_path):
    state = randomize_(AutoEncoder(tiny_autoencoder_config()), seed=0).state_dict()
    path = poisoned(tmp_path, state, "decoder.conv_in.weight", float("nan"))
    load_autoencoder(path)
    with pytest.raises(CheckpointError, match="'decoder.conv_in.weight' has 1 NaN"):
        load_autoencoder(path, check_finite=True)


@pytest.mark.parametrize("config, words", [("[1, 2]", "not a JSON object"), ('{"scaling_factor": "big"}', "finite"),
                                           ('{"scaling_factor": NaN}', "finite"), ("{oops", "not valid JSON")])
def test_bad_diffusers_vae_config_is_named(tmp_path, config, words):
    from flux_mini.autoencoder import bfl_to_diffusers

    state = randomize_(AutoEncoder(tiny_autoencoder_config()), seed=0).state_dict()
    folder = tmp_path / "vae"
    folder.mkdir()
    diffusers_state = {k: v.contiguous() for k, v in bfl_to_diffusers(state).items()}
    save_file(diffusers_state, folder / "diffusion_pytorch_model.safetensors")
    (folder / "config.json").write_text('{"scaling_factor": 0.5}')
    assert load_autoencoder(folder).config.scale_factor == 0.5  # the control
    (folder / "config.json").write_text(config)
    with pytest.raises(CheckpointError) as info:
        load_autoencoder(folder)
    assert str(folder / "config.json") in str(info.value) and words in str(info.value)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_non_finite_float8_weight_is_named(tmp_path, dtype):
    """fp8 files stay fp8 in the model (dtype=None), where torch has no isfinite kernel."""
    state = {k: v.to(torch.float8_e4m3fn) for k, v in randomize_(Flux(CONFIG), seed=1).state_dict().items()}
    state["double_blocks.0.img_attn.qkv.weight"].view(torch.uint8).view(-1)[3] = 0x7F  # e4m3fn NaN
    path = tmp_path / "f8.safetensors"
    save_file(state, path)
    load_flux(path, config=CONFIG, dtype=dtype)
    with pytest.raises(CheckpointError, match="'double_blocks.0.img_attn.qkv.weight' has 1 NaN"):
        load_flux(path, config=CONFIG, dtype=dtype, check_finite=True)
