"""Load any official Flux.1 transformer file into `Flux`, or fail with one message that says what the file is.

Accepted (spec §6.3, §6.4): a single .safetensors in the BFL layout, the same with a prefix such as
`model.diffusion_model.` (all-in-one files; other components are ignored), or the diffusers layout
(one file, or a folder such as `transformer/` with a sharded `*.safetensors.index.json`).

The config comes from, in order: the `config=` argument (a FluxConfig or a preset name); a
`flux_config` JSON entry in the file's safetensors metadata (written by `save_flux`); or the tensor
shapes. Shapes fix every field except the RoPE split `axes_dim`, which is taken as the official
(16, 56, 56) when the head dim is 128 and must otherwise come from `config=` or the metadata.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from safetensors.torch import save_file

from flux_mini.checkpoint import (
    CheckpointError,
    load_strict,
    read_header,
    read_metadata,
    read_safetensors,
    strip_prefix,
)
from flux_mini.convert import bfl_to_diffusers, diffusers_to_bfl, flux3_bfl_to_diffusers, flux3_diffusers_to_bfl
from flux_mini.flux1 import PRESETS, Flux, FluxConfig
from flux_mini.flux3 import PRESETS as FLUX3_PRESETS
from flux_mini.flux3 import Flux3, Flux3Config

OFFICIAL_AXES_DIM = (16, 56, 56)  # head dim 128
METADATA_KEY = "flux_config"

# A key that only each non-transformer layout has, and what to say about it (spec §6.4).
OTHER_LAYOUTS = {
    "encoder.down.0.block.0.conv1.weight": "a Flux autoencoder (ae.safetensors; load it with load_autoencoder)",
    "encoder.down_blocks.0.resnets.0.conv1.weight": "a diffusers VAE (vae/; load it with load_autoencoder)",
    "encoder.block.0.layer.0.SelfAttention.q.weight": "a T5 text encoder",
    "text_model.embeddings.token_embedding.weight": "a CLIP text encoder",
    "redux_up.weight": "the Redux image adapter (flux1-redux-dev), which is used beside a dev/schnell transformer",
}


@dataclass(frozen=True)
class CheckpointInfo:
    """What a file's header says: its layout, its tensor shapes under BFL names, the config they imply."""

    path: Path
    layout: str  # "bfl" or "diffusers"
    prefix: str  # stripped before loading, e.g. "model.diffusion_model."
    shapes: dict[str, tuple[int, ...]]  # BFL names
    dtypes: tuple[str, ...]  # distinct safetensors dtypes, e.g. ("BF16",)
    config: FluxConfig | None  # from the metadata, else from the shapes; None if the shapes do not tell

    def variant(self) -> str:
        names = [name for name, preset in PRESETS.items() if preset == self.config]
        return " / ".join(names) if names else "a non-official Flux"

    def describe(self) -> str:
        layout = "BFL layout" if self.layout == "bfl" else "diffusers layout"
        if self.prefix:
            layout += f" under prefix {self.prefix!r}"
        hidden, in_channels = self.shapes.get("img_in.weight", ("?", "?"))
        guidance = "has guidance_in" if "guidance_in.in_layer.weight" in self.shapes else "no guidance_in"
        doubles, singles = _count_blocks(self.shapes, "double_blocks"), _count_blocks(self.shapes, "single_blocks")
        return (
            f"{self.path} looks like {self.variant()} ({layout}, {guidance}, in_channels {in_channels}, "
            f"hidden {hidden}, {doubles} double + {singles} single blocks, {'/'.join(self.dtypes)})"
        )


def _count_blocks(shapes, name: str) -> int:
    return len({int(m.group(1)) for k in shapes if (m := re.match(rf"{name}\.(\d+)\.", k))})


def _find_bfl_prefix(names) -> str | None:
    """The prefix p with p + img_in.weight and p + final_layer.linear.weight present ("" preferred)."""
    candidates = {k[: -len("img_in.weight")] for k in names if k.endswith("img_in.weight")}
    found = sorted(p for p in candidates if p + "final_layer.linear.weight" in names)
    return found[0] if found else None


def inspect_checkpoint(path: str | Path) -> CheckpointInfo:
    """Read the header(s) of a transformer checkpoint and tell its layout; CheckpointError for anything else."""
    header = read_header(path)
    names = set(header)
    prefix = _find_bfl_prefix(names)
    if prefix is not None:
        layout = "bfl"
        shapes = {k[len(prefix) :]: shape for k, (_, shape) in header.items() if k.startswith(prefix)}
    elif "x_embedder.weight" in names and "proj_out.weight" in names:
        layout, prefix = "diffusers", ""
        meta = {k: torch.empty(shape, device="meta") for k, (_, shape) in header.items()}
        shapes = {k: tuple(t.shape) for k, t in diffusers_to_bfl(meta).items()}
    else:
        what = next((what for key, what in OTHER_LAYOUTS.items() if any(n.endswith(key) for n in names)), None)
        raise CheckpointError(
            f"{path} is not a Flux transformer checkpoint: it looks like {what or 'an unknown layout'} "
            f"({len(names)} tensors, e.g. {', '.join(sorted(names)[:4])}). Expected the BFL layout "
            "(img_in.weight, double_blocks.*) or the diffusers layout (x_embedder.weight, transformer_blocks.*)"
        )
    dtypes = tuple(sorted({dtype for k, (dtype, _) in header.items() if k.startswith(prefix)}))
    stored = read_metadata(path).get(METADATA_KEY)
    try:
        config = _config_from_json(stored, path) if stored else infer_config(shapes)
    except CheckpointError:
        config = None
    return CheckpointInfo(Path(path), layout, prefix, shapes, dtypes, config)


def _config_from_json(text: str, path) -> FluxConfig:
    try:
        return FluxConfig(**json.loads(text))
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: the {METADATA_KEY!r} metadata is not a valid FluxConfig ({e})") from None


def infer_config(shapes: dict[str, tuple[int, ...]], axes_dim: tuple[int, ...] | None = None) -> FluxConfig:
    """The FluxConfig whose state dict has these BFL shapes (axes_dim: see the module docstring)."""
    norm = next((k for k in shapes if k.endswith("query_norm.scale")), None)
    mlp_pattern = r"(double_blocks\.\d+\.img_mlp\.0|single_blocks\.\d+\.linear1)\.weight"
    mlp = next((k for k in shapes if re.fullmatch(mlp_pattern, k)), None)
    needed = ["img_in.weight", "txt_in.weight", "vector_in.in_layer.weight", "final_layer.linear.weight"]
    absent = [k for k in needed if k not in shapes]
    absent += ([] if norm else ["*.query_norm.scale"]) + ([] if mlp else ["MLP weights"])
    if absent:
        raise CheckpointError(f"cannot infer the Flux config: the checkpoint lacks {', '.join(absent)}; pass config=")
    hidden, in_channels = shapes["img_in.weight"]
    head_dim = shapes[norm][0]
    if axes_dim is None and head_dim != 128:
        raise CheckpointError(
            f"the checkpoint has head dim {head_dim}; its RoPE split axes_dim cannot be read from shapes "
            "(the official (16, 56, 56) is for head dim 128): pass config= with axes_dim"
        )
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
            axes_dim=axes_dim or OFFICIAL_AXES_DIM,
            # without double blocks qkv_bias changes nothing; keep the official value then
            qkv_bias=any(k.endswith("qkv.bias") for k in shapes) or not any(k.endswith("qkv.weight") for k in shapes),
            guidance_embed="guidance_in.in_layer.weight" in shapes,
        )
    except ValueError as e:
        raise CheckpointError(f"the checkpoint's shapes imply no valid Flux config: {e}") from None


def _config_differences(found: FluxConfig, wanted: FluxConfig) -> str:
    diffs = [
        f"{f.name}: file {getattr(found, f.name)}, requested {getattr(wanted, f.name)}"
        for f in fields(FluxConfig)
        if getattr(found, f.name) != getattr(wanted, f.name)
    ]
    return f" (differs in {'; '.join(diffs)})" if diffs else ""


def load_flux(
    path: str | Path,
    config: FluxConfig | Flux3Config | str | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> Flux | Flux3:
    """A Flux (or Flux3, for a FLUX.3 file) whose parameters are the checkpoint's tensors: memory-mapped, in the
    file's dtype unless `dtype` is given. Peak memory is about one copy of the weights (diffusers layout: plus
    its fused parts)."""
    flux3 = flux3_layout(read_header(path))
    if flux3 is not None or isinstance(config, Flux3Config) or config in FLUX3_PRESETS:
        return load_flux3(path, flux3, config, dtype, device)
    info = inspect_checkpoint(path)
    description = info.describe()
    if config is None:
        config = info.config or infer_config(info.shapes)  # the second call raises the reason
    else:
        requested = f"config {config!r}" if isinstance(config, str) else "the given config"
        config = FluxConfig.from_preset(config) if isinstance(config, str) else config
        description += f", but {requested} was requested"
        try:
            found = info.config or infer_config(info.shapes, axes_dim=config.axes_dim)
            description += _config_differences(found, config)
        except CheckpointError:
            pass  # the shapes imply no config; the key listing below says what is wrong

    tensors = read_safetensors(path)
    tensors = strip_prefix(tensors, info.prefix) if info.layout == "bfl" else diffusers_to_bfl(tensors)
    with torch.device("meta"):
        model = Flux(config)
    return load_strict(model, tensors, dtype=dtype, device=device, description=description).eval()


def save_flux(model: Flux | Flux3, path: str | Path, layout: str = "bfl") -> None:
    """Write a checkpoint that `load_flux(path)` reads back without config=: the config rides in the metadata."""
    flux3 = isinstance(model, Flux3)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if layout == "diffusers":
        state = {k: v.contiguous() for k, v in (flux3_bfl_to_diffusers if flux3 else bfl_to_diffusers)(state).items()}
    elif layout != "bfl":
        raise ValueError(f"layout must be 'bfl' or 'diffusers', got {layout!r}")
    key = FLUX3_METADATA_KEY if flux3 else METADATA_KEY
    save_file(state, str(path), metadata={key: json.dumps(model.config.to_dict())})


# ----------------------------------------------------------------------------------------------
# FLUX.3 (flux3-format.md §2 and §8): BFL or diffusers layout, optionally under a prefix; the config comes from
# config=, the `flux3_config` metadata, or the shapes (axes_dim: the official (32, 32, 32, 32) for head dim 128).

FLUX3_METADATA_KEY = "flux3_config"
FLUX3_MARKERS = {  # a key only a FLUX.3 transformer has, per layout
    "bfl": "early_stream_modulations.image.lin.weight",
    "diffusers": "early_stream_modulations.image.linear.weight",
}
# Shipped beside the weights but not part of the model: the REPA projection heads of training, and the unused
# heads the generic BFL class may build (spec §2.1). Dropped on load, with a warning that names them.
FLUX3_UNUSED_PREFIXES = ("repa_projectors.", "final_layer.image_cond.", "vector_in.")


def flux3_layout(header) -> tuple[str, str] | None:
    """(layout, prefix) when the tensor names are a FLUX.3 transformer's, else None."""
    for name in sorted(header):
        for layout, marker in FLUX3_MARKERS.items():
            if name.endswith(marker):
                return layout, name[: -len(marker)]
    return None


def infer_flux3_config(shapes: dict[str, tuple[int, ...]], axes_dim: tuple[int, ...] | None = None) -> Flux3Config:
    """The Flux3Config whose state dict has these BFL shapes."""
    needed = ["emb_in.image.weight", "emb_in.image_cond.weight", "txt_in.weight", "final_layer.image.linear.weight"]
    norm = next((k for k in shapes if k.endswith("query_norm.scale")), None)
    mlp = next((k for k in shapes if k.endswith("mlp_in.weight")), None)
    absent = [k for k in needed if k not in shapes] + ([] if norm and mlp else ["block weights"])
    if absent:
        raise CheckpointError(f"cannot infer the FLUX.3 config: the checkpoint lacks {', '.join(absent)}; pass config=")
    hidden, in_channels = shapes["emb_in.image.weight"]
    head_dim = shapes[norm][0]
    if axes_dim is None and head_dim != 128:
        raise CheckpointError(f"the checkpoint has head dim {head_dim}: its RoPE axes_dim is unknown; pass config=")
    try:
        return Flux3Config(
            in_channels=in_channels,
            cond_in_channels=shapes["emb_in.image_cond.weight"][1],
            out_channels=shapes["final_layer.image.linear.weight"][0],
            context_in_dim=shapes["txt_in.weight"][1],
            hidden_size=hidden,
            mlp_ratio=shapes[mlp][0] / 2 / hidden,
            num_heads=hidden // head_dim,
            depth=_count_blocks(shapes, "txt_mode_blocks"),
            depth_single_blocks=_count_blocks(shapes, "single_blocks"),
            axes_dim=axes_dim or (32, 32, 32, 32),
            flow_map="ref_time_in.in_layer.weight" in shapes,
        )
    except ValueError as e:
        raise CheckpointError(f"the checkpoint's shapes imply no valid FLUX.3 config: {e}") from None


def load_flux3(path, found: tuple[str, str] | None, config, dtype, device) -> Flux3:
    """`load_flux` for a FLUX.3 file (`found` = its layout and prefix, None when it is not FLUX.3)."""
    if found is None:
        raise CheckpointError(
            f"a FLUX.3 config was requested, but {path} is not a FLUX.3 transformer (it has no "
            f"{FLUX3_MARKERS['bfl']!r} in any layout); load it without config= to see what it is"
        )
    if isinstance(config, FluxConfig) or (isinstance(config, str) and config not in FLUX3_PRESETS):
        raise CheckpointError(
            f"{path} is a FLUX.3 transformer, but the Flux.1 config {config!r} was requested; pass "
            f"config=None or one of {sorted(FLUX3_PRESETS)}"
        )
    layout, prefix = found
    tensors = strip_prefix(read_safetensors(path), prefix)
    tensors = flux3_diffusers_to_bfl(tensors) if layout == "diffusers" else tensors
    unused = sorted(k for k in tensors if k.startswith(FLUX3_UNUSED_PREFIXES))
    if unused:
        more = f", ... ({len(unused) - 5} more)" if len(unused) > 5 else ""
        warnings.warn(
            f"{path}: not loading {len(unused)} tensor(s) that the FLUX.3 model does not use (training-only REPA "
            f"heads or unused output heads): {', '.join(unused[:5])}{more}",
            stacklevel=3,
        )
        tensors = {k: v for k, v in tensors.items() if k not in unused}
    shapes = {k: tuple(t.shape) for k, t in tensors.items()}
    variant = "FLUX.3 Klein (distilled flow map)" if "ref_time_in.in_layer.weight" in shapes else "FLUX.3 Klein Base"
    where = ("BFL" if layout == "bfl" else "diffusers") + " layout" + (f" under prefix {prefix!r}" if prefix else "")
    description = f"{path} looks like {variant} ({where})"
    stored = read_metadata(path).get(FLUX3_METADATA_KEY)
    if config is not None:
        description += f", but {f'config {config!r}' if isinstance(config, str) else 'the given config'} was requested"
        config = Flux3Config.from_preset(config) if isinstance(config, str) else config
    elif config is None and stored:
        try:
            config = Flux3Config(**json.loads(stored))
        except (json.JSONDecodeError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: its {FLUX3_METADATA_KEY} metadata is no valid Flux3Config ({e})") from None
    config = config or infer_flux3_config(shapes)
    with torch.device("meta"):
        model = Flux3(config)
    return load_strict(model, tensors, dtype=dtype, device=device, description=description).eval()

