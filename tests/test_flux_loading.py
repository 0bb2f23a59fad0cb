"""load_flux on bad input (one readable CheckpointError each), dtype casts, and zero-copy mapping."""

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from flux_mini.checkpoint import CheckpointError, read_header, read_safetensors
from flux_mini.loading import load_flux, save_flux
from flux_mini.flux1 import Flux, FluxConfig
from flux_mini.tiny import randomize_, tiny_flux_config

SPEC_DIR = Path(__file__).parent / "data"  # copies of the official key lists (shared/spec)
CONFIG = tiny_flux_config(guidance_embed=True)


@pytest.fixture(scope="module")
def state():
    return {k: v.contiguous() for k, v in randomize_(Flux(CONFIG), seed=2).state_dict().items()}


def write(path: Path, tensors: dict) -> Path:
    save_file(tensors, path)
    return path


def write_sparse(path: Path, shapes: dict, dtype: str = "BF16", itemsize: int = 2) -> Path:
    """A full-size safetensors file whose data is a hole: the header is real, the 24 GB take no disk."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = itemsize * torch.Size(shape).numel()
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return path


# ----------------------------------------------------------------------------------------------
# Errors: each case builds a bad checkpoint and names the words its message must contain.


def truncated(tmp, state):
    path = write(tmp / "t.safetensors", state)
    path.write_bytes(path.read_bytes()[:-100])
    return path, {}, ["truncated", "t.safetensors", "fetch the file again"]


def pickle_file(tmp, state):
    torch.save(state, tmp / "model.pt")
    return tmp / "model.pt", {}, ["not a safetensors file", "model.pt", "header length"]


def bad_json(tmp, state):
    (tmp / "x.safetensors").write_bytes(struct.pack("<Q", 4) + b"\xff{[}")
    return tmp / "x.safetensors", {}, ["not a safetensors file", "JSON"]


def missing_key(tmp, state):
    path = write(tmp / "m.safetensors", {k: v for k, v in state.items() if k != "double_blocks.1.img_attn.proj.bias"})
    return path, {"config": CONFIG}, ["missing keys (1): double_blocks.1.img_attn.proj.bias"]


def wrong_shape(tmp, state):
    path = write(tmp / "s.safetensors", state | {"txt_in.weight": torch.zeros(64, 40)})
    words = ["shape mismatches (1)", "txt_in.weight file [64, 40] vs model [64, 48]"]
    words.append("context_in_dim: file 40, requested 48")
    return path, {"config": CONFIG}, words


def wrong_variant(tmp, state):
    path = write(tmp / "dev.safetensors", state)
    config = tiny_flux_config(guidance_embed=False)
    words = ["has guidance_in", "guidance_embed: file True, requested False", "unexpected keys (4): guidance_in."]
    return path, {"config": config}, words


def autoencoder(tmp, state):
    names = ["encoder.down.0.block.0.conv1.weight", "decoder.up.0.block.0.conv1.weight", "encoder.conv_out.weight"]
    path = write(tmp / "ae.safetensors", {n: torch.zeros(1) for n in names})
    return path, {}, ["not a Flux transformer", "autoencoder", "load_autoencoder"]


def random_keys(tmp, state):
    path = write(tmp / "r.safetensors", {"foo.weight": torch.zeros(2), "bar": torch.zeros(1)})
    return path, {}, ["not a Flux transformer", "unknown layout", "foo.weight"]


def missing_shard(tmp, state):
    folder = tmp / "transformer"
    folder.mkdir()
    names = sorted(state)
    write(folder / "part-1.safetensors", {k: state[k] for k in names[:10]})
    weight_map = {k: "part-1.safetensors" for k in names[:10]} | {k: "part-2.safetensors" for k in names[10:]}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder, {}, ["missing", "part-2.safetensors", "download every shard"]


def two_files_no_index(tmp, state):
    write(tmp / "a.safetensors", state)
    write(tmp / "b.safetensors", state)
    return tmp, {}, ["2 .safetensors files", "no *.safetensors.index.json"]


def missing_path(tmp, state):
    words = ["does not exist", "flux1-dev.safetensors", "weights/README.md"]
    return tmp / "nowhere" / "flux1-dev.safetensors", {}, words


def unknown_axes(tmp, state):
    """Head dim 16 is not official, so axes_dim cannot be guessed: ask for config=."""
    return write(tmp / "tiny.safetensors", state), {}, ["head dim 16", "axes_dim", "config="]


ERRORS = [truncated, pickle_file, bad_json, missing_key, wrong_shape, wrong_variant, autoencoder, random_keys,
          missing_shard, two_files_no_index, missing_path, unknown_axes]  # fmt: skip


@pytest.mark.parametrize("case", ERRORS, ids=[f.__name__ for f in ERRORS])
def test_bad_checkpoints_raise_one_readable_error(case, tmp_path, state):
    path, kwargs, words = case(tmp_path, state)
    with pytest.raises(CheckpointError) as info:
        load_flux(path, **kwargs)
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in: {message}"
    assert info.value.__context__ is None or info.value.__suppress_context__  # no chained traceback soup


def test_full_size_dev_file_loads_as_dev_and_not_as_schnell_or_fill(tmp_path):
    shapes = json.loads((SPEC_DIR / "flux-keys-flux-dev.json").read_text())["keys"]
    path = write_sparse(tmp_path / "flux1-dev.safetensors", shapes)

    model = load_flux(path)
    assert model.config == FluxConfig.from_preset("flux-dev")
    assert model.img_in.weight.dtype == torch.bfloat16 and not model.img_in.weight.is_meta
    assert model.double_blocks[18].img_attn.qkv.weight.shape == (9216, 3072)

    with pytest.raises(CheckpointError) as info:
        load_flux(path, config="flux-schnell")
    message = str(info.value)
    for word in ["looks like flux-dev / flux-dev-krea / flux-dev-kontext", "BFL layout", "has guidance_in",
                 "config 'flux-schnell' was requested", "unexpected keys (4): guidance_in."]:  # fmt: skip
        assert word in message, message
    with pytest.raises(CheckpointError, match=r"img_in.weight file \[3072, 64\] vs model \[3072, 384\]"):
        load_flux(path, config="flux-dev-fill")


# ----------------------------------------------------------------------------------------------
# dtypes, metadata config, memory


def test_bf16_file_loads_as_bf16_or_cast_to_fp32(tmp_path, state):
    path = write(tmp_path / "bf16.safetensors", {k: v.bfloat16() for k, v in state.items()})
    assert {dtype for dtype, _ in read_header(path).values()} == {"BF16"}
    as_stored = load_flux(path, config=CONFIG)
    cast = load_flux(path, config=CONFIG, dtype=torch.float32)
    for key, value in state.items():
        assert as_stored.state_dict()[key].dtype == torch.bfloat16
        assert cast.state_dict()[key].dtype == torch.float32
        assert torch.equal(cast.state_dict()[key], value.bfloat16().float())


def test_float8_file_casts_to_bf16(tmp_path, state):
    path = write(tmp_path / "f8.safetensors", {k: v.to(torch.float8_e4m3fn) for k, v in state.items()})
    assert {dtype for dtype, _ in read_header(path).values()} == {"F8_E4M3"}
    model = load_flux(path, config=CONFIG, dtype=torch.bfloat16)
    assert torch.equal(model.txt_in.weight, state["txt_in.weight"].to(torch.float8_e4m3fn).bfloat16())


def test_saved_config_makes_config_argument_unnecessary(tmp_path, state):
    model = Flux(CONFIG)
    model.load_state_dict(state)
    for layout in ("bfl", "diffusers"):
        save_flux(model, tmp_path / f"{layout}.safetensors", layout=layout)
        loaded = load_flux(tmp_path / f"{layout}.safetensors")
        assert loaded.config == CONFIG
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())


def test_uncast_load_maps_the_file_without_copying(tmp_path, state):
    path = write(tmp_path / "f32.safetensors", state)
    model = load_flux(path, config=CONFIG)
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert len(storages) == 1  # every parameter is a view of one storage ...
    assert model.txt_in.weight.untyped_storage().nbytes() == path.stat().st_size  # ... the whole mapped file
    with torch.no_grad():  # copy-on-write: editing the model never writes to the file
        model.txt_in.weight.add_(1.0)
    assert torch.equal(read_safetensors(path)["txt_in.weight"], state["txt_in.weight"])
    cast = load_flux(path, config=CONFIG, dtype=torch.float64)
    assert cast.txt_in.weight.untyped_storage().nbytes() == state["txt_in.weight"].numel() * 8
