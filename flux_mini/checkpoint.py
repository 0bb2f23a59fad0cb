"""Reading safetensors checkpoints without copying them, and strict assignment into meta-built models.

A 24 GB Flux file must not be read into RAM and then copied into a model: we map the file once
(`MAP_PRIVATE`, so in-place edits never reach the disk), view each tensor in place, and assign those
views as the model's parameters. The only copies made are the casts and device moves the caller asks for.

Container format (spec §7): 8-byte little-endian header length N, an N-byte JSON header
`{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}`, then the raw tensor bytes,
offsets relative to the first byte after the header.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}

MAX_HEADER_BYTES = 100_000_000  # the reference writer's own limit; a larger "length" means not safetensors


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message says what and how to fix it."""


# ----------------------------------------------------------------------------------------------
# One file


PICKLE_MAGICS = (b"PK\x03\x04", b"\x80")  # torch.save's zip container, a bare pickle


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _parse_file(path: Path) -> tuple[dict[str, tuple[str, tuple[int, ...], int]], dict[str, str], int]:
    """-> ({name: (dtype, shape, data begin)}, __metadata__, byte offset of the data), all checked."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path} is not a safetensors file: it is only {size} bytes long")
        (n,) = struct.unpack("<Q", prefix)
        if n > min(size - 8, MAX_HEADER_BYTES):
            f.seek(8)
            starts_like_json = f.read(1) == b"{"
            if prefix.startswith(PICKLE_MAGICS) or not starts_like_json or n > MAX_HEADER_BYTES:
                raise CheckpointError(
                    f"{path} is not a safetensors file: its first 8 bytes give a header length of {n} bytes, "
                    f"but the file has {size} bytes (a pickle .pt/.ckpt file? convert it to .safetensors first)"
                )
            raise CheckpointError(
                f"{path} is a truncated or corrupt safetensors file: its header should be {n} bytes long but "
                f"only {size - 8} bytes follow; the download or copy was interrupted, fetch the file again"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path} is not a safetensors file: its header is not UTF-8 JSON") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a safetensors file: its header is not a JSON object")

    data_start, data_size = 8 + n, size - 8 - n
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: its __metadata__ is not a JSON object of strings; the file is corrupt")
    entries = {}
    for name, info in header.items():
        malformed = f"{path}: malformed header entry for tensor {name!r}: {info!r}"
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise CheckpointError(f"{malformed} (needs dtype, shape and data_offsets); the file is corrupt")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not (isinstance(shape, list) and all(_is_count(s) for s in shape)):
            raise CheckpointError(f"{malformed} (shape must be a list of non-negative integers); the file is corrupt")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
            raise CheckpointError(f"{malformed} (data_offsets must be two non-negative integers); the file is corrupt")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {dtype}, not one of {sorted(DTYPES)}")
        (begin, end), shape = offsets, tuple(shape)
        if end > data_size:
            raise CheckpointError(
                f"{path} is truncated: tensor {name!r} ends at byte {data_start + end} but the file has only "
                f"{size} bytes; the download or copy was interrupted, fetch the file again"
            )
        if end - begin != (needed := math.prod(shape) * DTYPES[dtype].itemsize):
            raise CheckpointError(
                f"{path}: tensor {name!r} has data_offsets {offsets} ({end - begin} bytes), but {dtype} "
                f"{list(shape)} needs {needed} bytes; the file is corrupt, write or fetch it again"
            )
        entries[name] = (dtype, shape, begin)
    _refuse_overlaps(path, {name: tuple(info["data_offsets"]) for name, info in header.items()})
    return entries, metadata, data_start


def _refuse_overlaps(path: Path, spans: dict[str, tuple[int, int]]) -> None:
    """Two tensors sharing bytes would alias each other (an edit of one changes the other): refuse."""
    previous_name, previous_end = None, 0
    for name, (begin, end) in sorted(spans.items(), key=lambda item: item[1]):
        if begin < previous_end and end > begin:
            raise CheckpointError(
                f"{path}: the data of tensors {previous_name!r} and {name!r} overlap (bytes {begin}..{previous_end}); "
                "the header is corrupt or hand-made, write the file again with safetensors"
            )
        if end > previous_end:
            previous_name, previous_end = name, end


def _map_file(path: Path) -> dict[str, Tensor]:
    entries, _, data_start = _parse_file(path)
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=path.stat().st_size)
    data = torch.empty(0, dtype=torch.uint8).set_(storage)
    tensors = {}
    for name, (dtype, shape, begin) in entries.items():
        dt = DTYPES[dtype]
        raw = data[data_start + begin : data_start + begin + math.prod(shape) * dt.itemsize]
        if (data_start + begin) % dt.itemsize:  # the reference writer aligns; foreign writers might not
            raw = raw.clone()
        tensors[name] = raw.view(dt).view(shape)
    return tensors


# ----------------------------------------------------------------------------------------------
# Files, index-sharded folders


def _locate(path: str | Path) -> tuple[list[Path], dict[str, str] | None]:
    """-> (safetensors files to read, index weight_map or None) for a file, an index json, or a folder."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; see weights/README.md for where the files go")
    index = None
    if path.is_dir():
        indexes = sorted(path.glob("*.safetensors.index.json"))
        if len(indexes) > 1:
            raise CheckpointError(
                f"{path} holds several shard indexes ({', '.join(p.name for p in indexes)}); pass the one to use"
            )
        if indexes:
            index = indexes[0]
        else:
            files = sorted(path.glob("*.safetensors"))
            if len(files) != 1:
                subdirs = sorted(p.name for p in path.iterdir() if p.is_dir() and any(p.glob("*.safetensors")))
                hint = f" (subfolders with weights: {', '.join(subdirs)}; pass one of them)" if subdirs else ""
                raise CheckpointError(
                    f"{path} holds {len(files)} .safetensors files and no *.safetensors.index.json; pass a file "
                    f"or a folder with exactly one file or an index{hint}"
                )
            return files, None
    elif path.name.endswith(".index.json"):
        index = path
    if index is None:
        return [path], None
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        raise CheckpointError(f"{index} is not a shard index (expected JSON with a 'weight_map')") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(
            f"{index}: its 'weight_map' must be a JSON object mapping tensor names to shard file names, got "
            f"{type(weight_map).__name__} {str(weight_map)[:80]}; download the index again"
        )
    outside = sorted({name for name in weight_map.values() if not _is_plain_file_name(name)})
    if outside:
        raise CheckpointError(
            f"{index} names shard files outside its own folder ({', '.join(outside[:3])}); an index may only "
            f"name files beside it: move the shards into {index.parent} and list them by file name"
        )
    shards = [index.parent / name for name in sorted(set(weight_map.values()))]
    missing = [p.name for p in shards if not p.exists()]
    if missing:
        raise CheckpointError(
            f"{index} names {len(missing)} shard file(s) that are missing from {index.parent}: "
            f"{', '.join(missing[:5])}; download every shard listed in the index"
        )
    return shards, weight_map


def _is_plain_file_name(name: str) -> bool:
    """A bare file name such as `model-00001-of-00003.safetensors`: no folders, no `..`, not absolute."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name and ":" not in name


def _merge(per_file: dict[Path, dict], weight_map: dict[str, str] | None) -> dict:
    merged: dict = {}
    for file, entries in per_file.items():
        for name, value in entries.items():
            if name in merged:
                raise CheckpointError(f"tensor {name!r} appears in more than one shard (again in {file})")
            if weight_map is not None and weight_map.get(name, file.name) != file.name:
                raise CheckpointError(f"{file} holds {name!r}, but the index places it in {weight_map[name]}")
            merged[name] = value
    if weight_map is not None:
        absent = sorted(set(weight_map) - set(merged))
        if absent:
            raise CheckpointError(
                f"the shard index lists {len(absent)} tensor(s) that its shards do not hold, e.g. {absent[:3]} "
                f"(expected in {weight_map[absent[0]]}); the shards do not belong to this index"
            )
    return merged


def read_header(path: str | Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (safetensors dtype string, shape), reading only the JSON headers."""
    files, weight_map = _locate(path)
    per_file = {}
    for file in files:
        entries, _, _ = _parse_file(file)
        per_file[file] = {name: (dtype, shape) for name, (dtype, shape, _) in entries.items()}
    return _merge(per_file, weight_map)


def read_metadata(path: str | Path) -> dict[str, str]:
    """The `__metadata__` strings of a file (of the first shard for a sharded folder)."""
    files, _ = _locate(path)
    return _parse_file(files[0])[1]


def read_safetensors(path: str | Path) -> dict[str, Tensor]:
    """name -> tensor, memory-mapped copy-on-write: no tensor data is read until it is used."""
    files, weight_map = _locate(path)
    return _merge({file: _map_file(file) for file in files}, weight_map)


def strip_prefix(tensors: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The tensors under `prefix` (e.g. "model.diffusion_model."), renamed without it; the rest are dropped."""
    return {name[len(prefix) :]: t for name, t in tensors.items() if name.startswith(prefix)}


# ----------------------------------------------------------------------------------------------
# Strict assignment


def _listing(title: str, items: list[str], limit: int = 5) -> str:
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return f"\n  {title} ({len(items)}): {', '.join(items[:limit])}{more}"


def load_strict(
    model: nn.Module,
    tensors: Mapping[str, Tensor],
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    description: str = "",
    check_finite: bool = False,
) -> nn.Module:
    """Make the checkpoint the model's parameters: same keys, same shapes, or one CheckpointError.

    `model` is normally built on the meta device. Tensors are assigned as they are (keeping the file's
    dtype and, for mapped files, its pages) unless `dtype`/`device` ask for a cast or move.
    check_finite=True reads every weight once (after the cast) and refuses NaN or Inf values."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    mismatched = [
        f"{k} file {list(tensors[k].shape)} vs model {list(expected[k].shape)}"
        for k in expected
        if k in tensors and tensors[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        message = f"checkpoint does not fit {type(model).__name__}"
        if description:
            message += f": {description}"
        if missing:
            message += _listing("missing keys", missing)
        if unexpected:
            message += _listing("unexpected keys", unexpected)
        if mismatched:
            message += _listing("shape mismatches", mismatched, limit=3)
        raise CheckpointError(message)

    device = torch.device(device)
    state = {k: tensors[k].to(device=device, dtype=dtype if dtype is not None else tensors[k].dtype) for k in expected}
    if check_finite:
        refuse_non_finite(state, description or type(model).__name__)
    model.load_state_dict(state, strict=True, assign=True)
    left_on_meta = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left_on_meta:
        raise CheckpointError(
            f"{type(model).__name__} still has tensors on the meta device after loading "
            f"({', '.join(left_on_meta[:5])}): non-persistent buffers are not in checkpoints, recompute them"
        )
    return model


def refuse_non_finite(tensors: Mapping[str, Tensor], source: str) -> None:
    """CheckpointError naming the first tensor with a NaN or Inf value (one read of every float tensor)."""
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            continue
        if tensor.element_size() == 1:  # float8: no isfinite kernel; bf16 holds every float8 value
            tensor = tensor.to(torch.bfloat16)
        if not torch.isfinite(tensor).all():
            nan, inf = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
            raise CheckpointError(
                f"{source}: tensor {name!r} has {nan} NaN and {inf} infinite value(s) of {tensor.numel()}; "
                "the weights are corrupt (or overflow the requested dtype): fetch or export them again"
            )
