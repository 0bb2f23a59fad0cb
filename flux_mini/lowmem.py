"""Low-memory weights: fp8 storage computed in bf16, and block-by-block offload.

A bf16 FLUX.1 transformer is 24 GB; most users have 16-24 GB. Two tools, which compose:

- fp8 storage. `Float8Linear` keeps a Linear's weight in float8 (one byte per value) with an optional
  float32 scale (per tensor, or per output row) and upcasts it for each call, so a block computes in bf16
  while only one layer's upcast weight exists at a time. `load_flux` keeps the Linear weights of an fp8
  file (`flux1-schnell-fp8-e4m3fn`, ComfyUI's scaled fp8 with `.scale_weight`, BFL's FLUX.2 `-fp8` files
  with `.weight_scale` / `.input_scale`) this way; `store_float8(model)` quantises a loaded model's block
  Linears on request.
- Block offload. `offload_blocks(model, device)` leaves the double and single blocks where they are (CPU
  RAM, pinned) and moves the rest to `device`; iterating a block list then copies each block into one of two
  device-resident slots just before it runs, the next one ahead on a side stream (CUDA). The model's own
  forward runs unchanged: the slot is a block like the others.

fp8 file conventions handled (the header tells which): float8 Linear weights (`F8_E4M3`, `F8_E5M2`); a
per-Linear weight scale named `weight_scale` (BFL, diffusers) or `scale_weight` (ComfyUI), multiplied in;
an activation scale `input_scale` / `scale_input`, which only fp8 matmuls use, dropped because we compute
in bf16; ComfyUI's empty `scaled_fp8` marker, dropped; any other float8 tensor (biases, norm gains,
embedders in fully-cast files), upcast at load.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FLOAT8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
WEIGHT_SCALE_SUFFIXES = (".weight_scale", ".scale_weight")
INPUT_SCALE_SUFFIXES = (".input_scale", ".scale_input")
SCALED_FP8_MARKER = "scaled_fp8"


# ----------------------------------------------------------------------------------------------
# fp8 storage


class Float8Linear(nn.Module):
    """A Linear with its weight stored in float8 and upcast per call: y = x (scale * W)^T + b.

    `weight` keeps the official key (and the file's one-byte dtype); `weight_scale` is a float32 scalar
    or one value per output row (1.0 for unscaled files); the bias is kept in the compute dtype."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        storage_dtype: torch.dtype = torch.float8_e4m3fn,
        compute_dtype: torch.dtype = torch.bfloat16,
        scale_shape: tuple[int, ...] = (),
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=storage_dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=compute_dtype)) if bias else None
        self.register_buffer("weight_scale", torch.ones(scale_shape, dtype=torch.float32))

    def dequantized_weight(self) -> Tensor:
        """The weight in the compute dtype, (out, in); scales apply in float32 before the cast."""
        scale = self.weight_scale.reshape(-1, 1) if self.weight_scale.numel() > 1 else self.weight_scale
        return (self.weight.to(torch.float32) * scale).to(self.compute_dtype)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.dequantized_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"storage={self.weight.dtype}, compute={self.compute_dtype}"
        )


def _swap(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def float8_linear_names(model: nn.Module, tensors: Mapping[str, Tensor]) -> list[str]:
    """The model's Linear modules whose weight is stored in float8 in `tensors` (BFL names)."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and tensors.get(f"{name}.weight", torch.empty(0)).dtype in FLOAT8_DTYPES
    ]


def prepare_float8(
    model: nn.Module, tensors: Mapping[str, Tensor], compute_dtype: torch.dtype = torch.bfloat16
) -> tuple[dict[str, Tensor], list[str]]:
    """Fit a meta-built model to an fp8 checkpoint: Linears with float8 weights become Float8Linear.

    Returns the tensors to assign strictly (weight scales renamed to `weight_scale`, 1.0 where the file
    has none; other float8 tensors upcast to `compute_dtype`) and the names of what was dropped (activation
    scales, the `scaled_fp8` marker). A scale without its fp8 weight, or a scale of the wrong size, is an error."""
    names = set(float8_linear_names(model, tensors))
    out: dict[str, Tensor] = {}
    dropped: list[str] = []
    for key, tensor in tensors.items():
        module, _, leaf = key.rpartition(".")
        if leaf == SCALED_FP8_MARKER or key == SCALED_FP8_MARKER or key.endswith(INPUT_SCALE_SUFFIXES):
            dropped.append(key)
        elif key.endswith(WEIGHT_SCALE_SUFFIXES):
            if module not in names:
                raise ValueError(f"{key}: a weight scale for {module!r}, whose weight is not a float8 Linear weight")
            out[f"{module}.weight_scale"] = tensor.to(torch.float32)
        elif module in names and leaf == "weight":
            out[key] = tensor
        else:  # biases, norm gains, embedders: the compute dtype, as a bf16 model would hold them
            out[key] = tensor.to(compute_dtype) if tensor.is_floating_point() else tensor
    for name in sorted(names):
        linear = model.get_submodule(name)
        scale = out.setdefault(f"{name}.weight_scale", torch.ones((), dtype=torch.float32))
        if scale.numel() not in (1, linear.out_features):
            raise ValueError(
                f"{name}.weight_scale has {scale.numel()} values; expected 1 (per tensor) or "
                f"{linear.out_features} (per output row)"
            )
        storage = tensors[f"{name}.weight"].dtype
        with torch.device("meta"):
            fp8 = Float8Linear(
                linear.in_features, linear.out_features, linear.bias is not None, storage, compute_dtype, tuple(scale.shape)
            )
        _swap(model, name, fp8)
    return out, dropped


def has_float8(tensors: Mapping[str, Tensor]) -> bool:
    return any(t.dtype in FLOAT8_DTYPES for t in tensors.values())


def dequantize_float8(tensors: Mapping[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    """Every float8 tensor as `dtype`, its weight scale multiplied in (in float32); scales and markers
    removed. For `load_flux(fp8_file, dtype=...)` and for layouts whose conversion fuses tensors."""
    scales = {k.rpartition(".")[0]: t for k, t in tensors.items() if k.endswith(WEIGHT_SCALE_SUFFIXES)}
    out = {}
    for key, tensor in tensors.items():
        module = key.rpartition(".")[0]
        if key.endswith(WEIGHT_SCALE_SUFFIXES + INPUT_SCALE_SUFFIXES) or key.rpartition(".")[2] == SCALED_FP8_MARKER:
            continue
        if tensor.dtype in FLOAT8_DTYPES:
            scale = scales.get(module) if key.endswith(".weight") else None
            if scale is not None and scale.numel() > 1:
                scale = scale.reshape(-1, *([1] * (tensor.ndim - 1)))
            tensor = tensor.to(torch.float32) * (scale.to(torch.float32) if scale is not None else 1.0)
            out[key] = tensor.to(dtype)
        else:
            out[key] = tensor
    return out


FLOAT8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}
# The block lists of every generation (FLUX.3 adds its per-mode blocks); they hold almost all the weights.
BLOCK_LISTS = ("double_blocks", "single_blocks", "txt_mode_blocks", "content_mode_blocks")
# The block lists a forward iterates in order, so that they can stream through device slots (FLUX.3's mode
# blocks are indexed per mode and stay on the device).
STREAMED_LISTS = ("double_blocks", "single_blocks")


@torch.no_grad()
def store_float8(
    model: nn.Module, storage_dtype: torch.dtype = torch.float8_e4m3fn, blocks: tuple[str, ...] = BLOCK_LISTS
) -> nn.Module:
    """Quantise the Linears inside the transformer blocks to float8 with one scale per tensor (amax / max),
    in place; the embedders, shared modulations and the final layer keep their precision.

    `blocks`: the module names whose Linears are stored in fp8 (every generation's block lists by default).
    Compute stays in the weights' current floating dtype (bf16 for a bf16 model)."""
    if storage_dtype not in FLOAT8_MAX:
        raise ValueError(f"storage_dtype must be one of {list(FLOAT8_MAX)}, got {storage_dtype}")
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or not name.startswith(tuple(b + "." for b in blocks)):
            continue
        weight = module.weight.detach()
        amax = weight.abs().amax().to(torch.float32).clamp_min(1e-12)
        scale = amax / FLOAT8_MAX[storage_dtype]
        fp8 = Float8Linear(
            module.in_features, module.out_features, module.bias is not None, storage_dtype, weight.dtype
        ).to(weight.device)
        fp8.weight.data = (weight.to(torch.float32) / scale).to(storage_dtype)
        fp8.weight_scale.copy_(scale)
        if module.bias is not None:
            fp8.bias.data = module.bias.detach().clone()
        _swap(model, name, fp8)
    return model


# ----------------------------------------------------------------------------------------------
# Block offload


class OffloadedBlocks(nn.ModuleList):
    """A block list whose blocks stay off the device; iterating yields each one copied into a device slot.

    The stored blocks are the list's registered children, so `state_dict()` keys are unchanged. Two slots
    (plain attributes, not submodules) alternate: while block i runs in one, block i + 1 is copied into the
    other on a side stream. Indexing returns the stored block, not a slot."""

    def __init__(self, blocks: nn.ModuleList, device: torch.device | str):
        super().__init__(blocks)
        self.device = torch.device(device)
        if len(blocks):
            self.slots = [copy.deepcopy(blocks[0]).to(self.device) for _ in range(min(2, len(blocks)))]
        if self.device.type == "cuda":
            for block in blocks:
                for tensor in (*block.parameters(), *block.buffers()):
                    tensor.data = tensor.data.pin_memory()

    def _fill(self, slot: nn.Module, block: nn.Module, stream) -> None:
        destinations = (*slot.parameters(), *slot.buffers())
        sources = (*block.parameters(), *block.buffers())
        if stream is None:
            for dst, src in zip(destinations, sources):
                dst.data.copy_(src.data)
            return
        stream.wait_stream(torch.cuda.current_stream(self.device))  # the slot's previous block has finished
        with torch.cuda.stream(stream):
            for dst, src in zip(destinations, sources):
                dst.data.copy_(src.data, non_blocking=True)

    def __iter__(self) -> Iterator[nn.Module]:
        stored = list(self._modules.values())
        if not stored:
            return
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._fill(self.slots[0], stored[0], stream)
        for index in range(len(stored)):
            if stream is not None:
                torch.cuda.current_stream(self.device).wait_stream(stream)  # block `index` has arrived
            if index + 1 < len(stored):
                self._fill(self.slots[(index + 1) % len(self.slots)], stored[index + 1], stream)
            yield self.slots[index % len(self.slots)]


def offload_blocks(model: nn.Module, device: torch.device | str, lists: tuple[str, ...] = STREAMED_LISTS) -> nn.Module:
    """Keep the block lists named in `lists` off the device and stream their blocks through two slots each;
    move everything else to `device`. Returns the model."""
    for name, child in list(model.named_children()):
        if name in lists and isinstance(child, nn.ModuleList):
            setattr(model, name, OffloadedBlocks(child, device))
        else:
            child.to(device)
    return model
