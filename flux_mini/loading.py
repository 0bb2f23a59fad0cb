"""Load any official Flux transformer file into its model, or fail with one message that says what the file is.

Generations: Flux.1 (`Flux`), FLUX.2 (`Flux2`) and FLUX.3 (`Flux3`), told apart by their keys in
`detect_generation`, the one place that knows them. Accepted layouts (flux-format.md §6.3, §6.4;
flux2-format.md §9; flux3-format.md §2, §8): a single
.safetensors in the BFL layout, the same with a prefix such as `model.diffusion_model.` (all-in-one
files; other components are ignored), or the diffusers layout (one file, or a folder such as
`transformer/` with a sharded `*.safetensors.index.json`).

The config comes from, in order: the `config=` argument (a config or a preset name of the file's
generation); a `flux_config` JSON entry in the file's safetensors metadata (written by `save_flux`); or
the tensor shapes. Shapes fix every field except the RoPE split `axes_dim` (and theta), which are taken
as the official ones when the head dim is 128 and must otherwise come from `config=` or the metadata.
Tensors a file ships that are not part of the model (FLUX.3's training-only REPA heads) are dropped with
a warning that names them.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from flux_mini.checkpoint import (
    CheckpointError,
    load_strict,
    read_header,
    read_metadata,
    read_safetensors,
    strip_prefix,
)
from flux_mini.convert import (
    bfl_to_diffusers,
    diffusers_to_bfl,
    flux2_bfl_to_diffusers,
    flux2_diffusers_to_bfl,
    flux3_bfl_to_diffusers,
    flux3_diffusers_to_bfl,
)
from flux_mini.flux1 import PRESETS, Flux, FluxConfig
from flux_mini.flux2 import PRESETS as FLUX2_PRESETS
from flux_mini.flux2 import Flux2, Flux2Config
from flux_mini.flux3 import PRESETS as FLUX3_PRESETS
from flux_mini.flux3 import Flux3, Flux3Config
from flux_mini.lowmem import dequantize_float8, has_float8, prepare_float8

OFFICIAL_AXES_DIM = (16, 56, 56)  # Flux.1, head dim 128
FLUX2_AXES_DIM = (32, 32, 32, 32)  # FLUX.2, head dim 128
FLUX3_AXES_DIM = (32, 32, 32, 32)  # FLUX.3, head dim 128
METADATA_KEY = "flux_config"

# A key that only each non-transformer layout has, and what to say about it (spec §6.4); first match wins.
OTHER_LAYOUTS = {
    "bn.running_mean": "a FLUX.2 autoencoder (ae.safetensors of FLUX.2-dev; load it with load_flux2_autoencoder)",
    "encoder.down.0.block.0.conv1.weight": "a Flux autoencoder (ae.safetensors; load it with load_autoencoder)",
    "encoder.down_blocks.0.resnets.0.conv1.weight": "a diffusers VAE (vae/; load it with load_autoencoder)",
    "encoder.block.0.layer.0.SelfAttention.q.weight": "a T5 text encoder",
    "text_model.embeddings.token_embedding.weight": "a CLIP text encoder",
    "model.embed_tokens.weight": "a language-model text encoder (FLUX.2 uses Qwen3 / Mistral-Small)",
    "redux_up.weight": "the Redux image adapter (flux1-redux-dev), which is used beside a dev/schnell transformer",
}


# ----------------------------------------------------------------------------------------------
# Generations


@dataclass(frozen=True)
class Generation:
    """What the loader needs to know about one Flux generation."""

    name: str
    model: type[nn.Module]
    config: type
    presets: Mapping[str, Any]
    bfl_markers: tuple[str, ...]  # a BFL file has one of these keys (under its prefix)
    diffusers_markers: tuple[str, ...]  # a diffusers file has one of these keys
    to_bfl: Callable[[Mapping], dict]  # diffusers names -> BFL names
    to_diffusers: Callable[[Mapping], dict]
    infer_config: Callable[..., Any]  # (BFL shapes, axes_dim=None) -> config, CheckpointError if they do not tell
    unused: tuple[str, ...] = ()  # prefixes of BFL tensors shipped in the files but not part of the model


def _count_blocks(shapes, name: str) -> int:
    return len({int(m.group(1)) for k in shapes if (m := re.match(rf"{name}\.(\d+)\.", k))})


def _mlp_shape(shapes) -> tuple[str | None, str | None]:
    """(a query-norm key, an MLP input key) of a BFL state dict, None where absent."""
    norm = next((k for k in shapes if k.endswith("query_norm.scale")), None)
    pattern = r"(double_blocks\.\d+\.img_mlp\.0|single_blocks\.\d+\.linear1)\.weight"
    return norm, next((k for k in shapes if re.fullmatch(pattern, k)), None)


def _check_inferable(shapes, needed: list[str], name: str) -> tuple[str, str]:
    norm, mlp = _mlp_shape(shapes)
    absent = [k for k in needed if k not in shapes]
    absent += ([] if norm else ["*.query_norm.scale"]) + ([] if mlp else ["MLP weights"])
    if absent:
        raise CheckpointError(f"cannot infer the {name} config: the checkpoint lacks {', '.join(absent)}; pass config=")
    return norm, mlp


def _official_axes(head_dim: int, axes_dim, official) -> tuple[int, ...]:
    if axes_dim is None and head_dim != 128:
        raise CheckpointError(
            f"the checkpoint has head dim {head_dim}; its RoPE split axes_dim cannot be read from shapes "
            f"(the official {official} is for head dim 128): pass config= with axes_dim"
        )
    return axes_dim or official


def infer_config(shapes: dict[str, tuple[int, ...]], axes_dim: tuple[int, ...] | None = None) -> FluxConfig:
    """The FluxConfig whose state dict has these BFL shapes (axes_dim: see the module docstring)."""
    needed = ["img_in.weight", "txt_in.weight", "vector_in.in_layer.weight", "final_layer.linear.weight"]
    norm, mlp = _check_inferable(shapes, needed, "Flux")
    hidden, in_channels = shapes["img_in.weight"]
    head_dim = shapes[norm][0]
    axes_dim = _official_axes(head_dim, axes_dim, OFFICIAL_AXES_DIM)
    mlp_hidden = shapes[mlp][0] - (3 * hidden if "linear1" in mlp else 0)
    try:
        return FluxConfig(
            in_channels=in_channels,
            out_channels=shapes["final_layer.linear.weight"][0],
            vec_in_dim=shapes["vector_in.in_layer.weight"][1],
            context_in_dim=shapes["txt_in.weight"][1],
            hidden_size=hidden,
            mlp_ratio=mlp_hidden / hidden,
            num_heads=hidden // head_dim,
            depth=_count_blocks(shapes, "double_blocks"),
            depth_single_blocks=_count_blocks(shapes, "single_blocks"),
            axes_dim=axes_dim,
            # without double blocks qkv_bias changes nothing; keep the official value then
            qkv_bias=any(k.endswith("qkv.bias") for k in shapes) or not any(k.endswith("qkv.weight") for k in shapes),
            guidance_embed="guidance_in.in_layer.weight" in shapes,
        )
    except ValueError as e:
        raise CheckpointError(f"the checkpoint's shapes imply no valid Flux config: {e}") from None


def infer_flux2_config(shapes: dict[str, tuple[int, ...]], axes_dim: tuple[int, ...] | None = None) -> Flux2Config:
    """The Flux2Config whose state dict has these BFL shapes; theta is the official 2000 (shapes cannot tell)."""
    norm, mlp = _check_inferable(shapes, ["img_in.weight", "txt_in.weight"], "FLUX.2")
    hidden, in_channels = shapes["img_in.weight"]
    head_dim = shapes[norm][0]
    axes_dim = _official_axes(head_dim, axes_dim, FLUX2_AXES_DIM)
    mlp_hidden = (shapes[mlp][0] - (3 * hidden if "linear1" in mlp else 0)) // 2  # fused gate and value
    try:
        return Flux2Config(
            in_channels=in_channels,
            context_in_dim=shapes["txt_in.weight"][1],
            hidden_size=hidden,
            num_heads=hidden // head_dim,
            depth=_count_blocks(shapes, "double_blocks"),
            depth_single_blocks=_count_blocks(shapes, "single_blocks"),
            axes_dim=axes_dim,
            mlp_ratio=mlp_hidden / hidden,
            use_guidance_embed="guidance_in.in_layer.weight" in shapes,
        )
    except ValueError as e:
        raise CheckpointError(f"the checkpoint's shapes imply no valid FLUX.2 config: {e}") from None


def infer_flux3_config(shapes: dict[str, tuple[int, ...]], axes_dim: tuple[int, ...] | None = None) -> Flux3Config:
    """The Flux3Config whose state dict has these BFL shapes; theta is the official 10000 (shapes cannot tell)."""
    needed = ["emb_in.image.weight", "emb_in.image_cond.weight", "txt_in.weight", "final_layer.image.linear.weight"]
    norm = next((k for k in shapes if k.endswith("query_norm.scale")), None)
    mlp = next((k for k in shapes if k.endswith(".mlp_in.weight")), None)
    absent = [k for k in needed if k not in shapes] + ([] if norm and mlp else ["block weights"])
    if absent:
        raise CheckpointError(f"cannot infer the FLUX.3 config: the checkpoint lacks {', '.join(absent)}; pass config=")
    hidden, in_channels = shapes["emb_in.image.weight"]
    head_dim = shapes[norm][0]
    try:
        return Flux3Config(
            in_channels=in_channels,
            cond_in_channels=shapes["emb_in.image_cond.weight"][1],
            out_channels=shapes["final_layer.image.linear.weight"][0],
            context_in_dim=shapes["txt_in.weight"][1],
            hidden_size=hidden,
            mlp_ratio=shapes[mlp][0] / 2 / hidden,  # fused gate and value
            num_heads=hidden // head_dim,
            depth=_count_blocks(shapes, "txt_mode_blocks"),
            depth_single_blocks=_count_blocks(shapes, "single_blocks"),
            axes_dim=_official_axes(head_dim, axes_dim, FLUX3_AXES_DIM),
            flow_map="ref_time_in.in_layer.weight" in shapes,
        )
    except ValueError as e:
        raise CheckpointError(f"the checkpoint's shapes imply no valid FLUX.3 config: {e}") from None


FLUX1 = Generation(
    "Flux.1", Flux, FluxConfig, PRESETS,
    bfl_markers=("img_in.weight",),
    diffusers_markers=("x_embedder.weight",),
    to_bfl=diffusers_to_bfl,
    to_diffusers=bfl_to_diffusers,
    infer_config=infer_config,
)
FLUX2 = Generation(
    "FLUX.2", Flux2, Flux2Config, FLUX2_PRESETS,
    bfl_markers=tuple(f"{m}.lin.weight" for m in ("single_stream_modulation", "double_stream_modulation_img")),
    diffusers_markers=tuple(f"{m}.linear.weight" for m in ("single_stream_modulation", "double_stream_modulation_img")),
    to_bfl=flux2_diffusers_to_bfl,
    to_diffusers=flux2_bfl_to_diffusers,
    infer_config=infer_flux2_config,
)
FLUX3 = Generation(
    "FLUX.3", Flux3, Flux3Config, FLUX3_PRESETS,
    bfl_markers=("early_stream_modulations.image.lin.weight",),
    diffusers_markers=("early_stream_modulations.image.linear.weight",),
    to_bfl=flux3_diffusers_to_bfl,
    to_diffusers=flux3_bfl_to_diffusers,
    infer_config=infer_flux3_config,
    # the REPA projection heads of training, and the unused output heads BFL's generic class may build (spec §2.1)
    unused=("repa_projectors.", "final_layer.image_cond.", "vector_in."),
)
# Most specific first: a FLUX.2 file also has every key that marks Flux.1 (img_in, x_embedder).
GENERATIONS = (FLUX3, FLUX2, FLUX1)


def detect_generation(names) -> tuple[Generation, str, str] | None:
    """-> (generation, layout "bfl" or "diffusers", prefix to strip) of a transformer's tensor names."""
    for generation in GENERATIONS:
        prefixes = sorted(k[: -len(m)] for k in names for m in generation.bfl_markers if k.endswith(m))
        if prefixes:
            return generation, "bfl", prefixes[0]  # "" sorts first
        if any(m in names for m in generation.diffusers_markers):
            return generation, "diffusers", ""
    return None


def generation_of(model: nn.Module) -> Generation:
    for generation in GENERATIONS:
        if isinstance(model, generation.model):
            return generation
    raise TypeError(f"not a Flux transformer: {type(model).__name__}")


# ----------------------------------------------------------------------------------------------
# Inspecting and loading


@dataclass(frozen=True)
class CheckpointInfo:
    """What a file's header says: its generation and layout, its tensor shapes under BFL names, the config."""

    path: Path
    generation: Generation
    layout: str  # "bfl" or "diffusers"
    prefix: str  # stripped before loading, e.g. "model.diffusion_model."
    shapes: dict[str, tuple[int, ...]]  # BFL names
    dtypes: tuple[str, ...]  # distinct safetensors dtypes, e.g. ("BF16",)
    config: Any  # from the metadata, else from the shapes; None if the shapes do not tell

    def variant(self) -> str:
        names = [name for name, preset in self.generation.presets.items() if preset == self.config]
        return " / ".join(names) if names else f"a non-official {self.generation.name}"

    def describe(self) -> str:
        layout = "BFL layout" if self.layout == "bfl" else "diffusers layout"
        if self.prefix:
            layout += f" under prefix {self.prefix!r}"
        if self.generation is FLUX3:
            hidden, in_channels = self.shapes.get("emb_in.image.weight", ("?", "?"))
            extra = "flow map (has ref_time_in)" if "ref_time_in.in_layer.weight" in self.shapes else "no ref_time_in"
            blocks = f"{_count_blocks(self.shapes, 'txt_mode_blocks')} mode blocks per mode + "
            blocks += f"{_count_blocks(self.shapes, 'single_blocks')} joint blocks"
        else:
            hidden, in_channels = self.shapes.get("img_in.weight", ("?", "?"))
            extra = "has guidance_in" if "guidance_in.in_layer.weight" in self.shapes else "no guidance_in"
            doubles, singles = _count_blocks(self.shapes, "double_blocks"), _count_blocks(self.shapes, "single_blocks")
            blocks = f"{doubles} double + {singles} single blocks"
        return (
            f"{self.path} looks like {self.variant()} ({self.generation.name} transformer, {layout}, {extra}, "
            f"in_channels {in_channels}, hidden {hidden}, {blocks}, {'/'.join(self.dtypes)})"
        )


def inspect_checkpoint(path: str | Path) -> CheckpointInfo:
    """Read the header(s) of a transformer checkpoint and tell its layout; CheckpointError for anything else."""
    header = read_header(path)
    names = set(header)
    detected = detect_generation(names)
    if detected is None:
        what = next((what for key, what in OTHER_LAYOUTS.items() if any(n.endswith(key) for n in names)), None)
        raise CheckpointError(
            f"{path} is not a Flux transformer checkpoint: it looks like {what or 'an unknown layout'} "
            f"({len(names)} tensors, e.g. {', '.join(sorted(names)[:4])}). Expected the BFL layout "
            "(img_in.weight, double_blocks.*) or the diffusers layout (x_embedder.weight, transformer_blocks.*)"
        )
    generation, layout, prefix = detected
    if layout == "bfl":
        shapes = {k[len(prefix) :]: shape for k, (_, shape) in header.items() if k.startswith(prefix)}
    else:
        meta = {k: torch.empty(shape, device="meta") for k, (_, shape) in header.items()}
        shapes = {k: tuple(t.shape) for k, t in generation.to_bfl(meta).items()}
    dtypes = tuple(sorted({dtype for k, (dtype, _) in header.items() if k.startswith(prefix)}))
    stored = read_metadata(path).get(METADATA_KEY)
    if stored:
        config = _config_from_json(generation, stored, path)  # a broken stored config is the file's fault: say so
    else:
        try:
            config = generation.infer_config(shapes)
        except CheckpointError:
            config = None
    return CheckpointInfo(Path(path), generation, layout, prefix, shapes, dtypes, config)


def _config_from_json(generation: Generation, text: str, path):
    try:
        return generation.config(**json.loads(text))
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise CheckpointError(
            f"{path}: the {METADATA_KEY!r} metadata is not a valid {generation.config.__name__} ({e})"
        ) from None


def _config_differences(found, wanted) -> str:
    diffs = [
        f"{f.name}: file {getattr(found, f.name)}, requested {getattr(wanted, f.name)}"
        for f in fields(wanted)
        if getattr(found, f.name) != getattr(wanted, f.name)
    ]
    return f" (differs in {'; '.join(diffs)})" if diffs else ""


def _requested_config(info: CheckpointInfo, config):
    """A config or preset name -> the generation's config; CheckpointError when it is another generation's."""
    generation = info.generation
    others = [g for g in GENERATIONS if g is not generation]
    other = next((g for g in others if config in g.presets or isinstance(config, g.config)), None)
    if other is not None:
        what = f"preset {config!r}" if isinstance(config, str) else f"a {type(config).__name__}"
        raise CheckpointError(
            f"{info.describe()}, but {what} of {other.name} was requested: this is a {generation.name} "
            f"transformer; pass one of {sorted(generation.presets)}, a {generation.config.__name__}, or no config"
        )
    return generation.config.from_preset(config) if isinstance(config, str) else config


def load_flux(
    path: str | Path,
    config: Any = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    check_finite: bool = False,
) -> nn.Module:
    """The file's transformer (`Flux`, `Flux2` or `Flux3`) with the checkpoint's tensors as parameters:
    memory-mapped, in the file's dtype unless `dtype` is given. Peak memory is about one copy of the weights
    (diffusers layout: plus its fused parts). `config`: a config or preset name of the file's generation, or None.

    fp8 files (BFL layout): the Linear weights stay in fp8 with their scales and compute in bf16
    (`flux_mini.lowmem`); `dtype=` dequantizes everything instead. check_finite=True refuses a NaN or Inf
    weight, naming it; it reads the whole file once, which costs more than the (lazy, mapped) load itself,
    hence opt-in."""
    info = inspect_checkpoint(path)
    generation, description = info.generation, info.describe()
    if config is None:
        config = info.config or generation.infer_config(info.shapes)  # the second call raises the reason
    else:
        requested = f"config {config!r}" if isinstance(config, str) else "the given config"
        config = _requested_config(info, config)
        description += f", but {requested} was requested"
        try:
            found = info.config or generation.infer_config(info.shapes, axes_dim=config.axes_dim)
            description += _config_differences(found, config)
        except CheckpointError:
            pass  # the shapes imply no config; the key listing below says what is wrong

    tensors = read_safetensors(path)
    tensors = strip_prefix(tensors, info.prefix) if info.layout == "bfl" else tensors
    if has_float8(tensors) and (dtype is not None or info.layout == "diffusers"):
        tensors = dequantize_float8(tensors, dtype or torch.bfloat16)  # dtype= casts everything; fusing needs it
    tensors = generation.to_bfl(tensors) if info.layout == "diffusers" else tensors
    tensors = _drop_unused(tensors, generation, path)
    with torch.device("meta"):
        model = generation.model(config)
    if has_float8(tensors):  # Linear weights stay one byte each; the rest is upcast to bf16
        try:
            tensors, _ = prepare_float8(model, tensors)
        except ValueError as e:
            raise CheckpointError(f"{description}: {e}") from None
    return load_strict(
        model, tensors, dtype=dtype, device=device, description=description, check_finite=check_finite
    ).eval()


def _drop_unused(tensors: dict, generation: Generation, path) -> dict:
    """The tensors without those the generation ships but does not use, with a warning naming them."""
    unused = sorted(k for k in tensors if generation.unused and k.startswith(generation.unused))
    if unused:
        more = f", ... ({len(unused) - 5} more)" if len(unused) > 5 else ""
        warnings.warn(
            f"{path}: not loading {len(unused)} tensor(s) that the {generation.name} model does not use "
            f"(training-only or unused heads): {', '.join(unused[:5])}{more}",
            stacklevel=3,
        )
    return {k: v for k, v in tensors.items() if k not in unused}


def save_flux(model: nn.Module, path: str | Path, layout: str = "bfl") -> None:
    """Write a checkpoint that `load_flux(path)` reads back without config=: the config rides in the metadata."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if layout == "diffusers":
        state = {k: v.contiguous() for k, v in generation_of(model).to_diffusers(state).items()}
    elif layout != "bfl":
        raise ValueError(f"layout must be 'bfl' or 'diffusers', got {layout!r}")
    save_file(state, str(path), metadata={METADATA_KEY: json.dumps(model.config.to_dict())})
