"""Transformer state dicts: BFL layout (ours) <-> diffusers layout, for `FluxTransformer2DModel` (Flux.1,
spec flux-format.md §6.1) and `Flux2Transformer2DModel` (FLUX.2, flux2-format.md §4.2).

diffusers splits the fused projections (double-block qkv; Flux.1 single-block linear1) into separate
tensors and stores the final modulation as (scale, shift) instead of (shift, scale). Split widths are
read off the tensors themselves, so any hidden size and MLP ratio converts (diffusers' own single-file
converter assumes 3072 and ratio 4).

Keys that no rule knows pass through unchanged, so a strict load afterwards names them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from flux_mini.flux1 import FluxConfig
from flux_mini.flux2 import Flux2Config


@dataclass(frozen=True)
class Rule:
    """One BFL tensor and the diffusers tensor(s) it becomes.

    kind: "same" (renamed only), "swap" (the two halves of dim 0 exchanged: shift/scale <-> scale/shift),
    "split" (dim 0 cut into equal parts), "split_mlp" (dim 0 cut into D, D, D and the MLP rest, where D
    is the output width, dim 0, of `width_key`)."""

    bfl: str
    diffusers: tuple[str, ...]
    kind: str = "same"
    width_key: str = ""


def _weight_and_bias(bfl: str, diffusers: str | tuple[str, ...], kind: str = "same", width_key: str = "") -> list[Rule]:
    names = (diffusers,) if isinstance(diffusers, str) else diffusers
    return [Rule(f"{bfl}.{p}", tuple(f"{n}.{p}" for n in names), kind, width_key) for p in ("weight", "bias")]


def _global_rules() -> list[Rule]:
    stems = [
        ("img_in", "x_embedder"),
        ("txt_in", "context_embedder"),
        ("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
        ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
        ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
        ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
        ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
        ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
        ("final_layer.linear", "proj_out"),
    ]
    rules = [r for bfl, dif in stems for r in _weight_and_bias(bfl, dif)]
    return rules + _weight_and_bias("final_layer.adaLN_modulation.1", "norm_out.linear", kind="swap")


def _double_rules(i: int) -> list[Rule]:
    b, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
    rules = []
    streams = {  # BFL stream -> diffusers (modulation, q/k/v, out projection, feed-forward, qk-norm infix)
        "img": ("norm1", ("to_q", "to_k", "to_v"), "to_out.0", "ff", ""),
        "txt": ("norm1_context", ("add_q_proj", "add_k_proj", "add_v_proj"), "to_add_out", "ff_context", "added_"),
    }
    for s, (mod, qkv, proj, ff, added) in streams.items():
        rules += _weight_and_bias(f"{b}.{s}_mod.lin", f"{d}.{mod}.linear")
        rules += _weight_and_bias(f"{b}.{s}_attn.qkv", tuple(f"{d}.attn.{n}" for n in qkv), kind="split")
        rules += _weight_and_bias(f"{b}.{s}_attn.proj", f"{d}.attn.{proj}")
        rules += _weight_and_bias(f"{b}.{s}_mlp.0", f"{d}.{ff}.net.0.proj")
        rules += _weight_and_bias(f"{b}.{s}_mlp.2", f"{d}.{ff}.net.2")
        rules += [
            Rule(f"{b}.{s}_attn.norm.query_norm.scale", (f"{d}.attn.norm_{added}q.weight",)),
            Rule(f"{b}.{s}_attn.norm.key_norm.scale", (f"{d}.attn.norm_{added}k.weight",)),
        ]
    return rules


def _single_rules(i: int) -> list[Rule]:
    b, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
    fused = tuple(f"{d}.{n}" for n in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"))
    return [
        *_weight_and_bias(f"{b}.linear1", fused, kind="split_mlp", width_key=f"{b}.linear2.weight"),
        *_weight_and_bias(f"{b}.linear2", f"{d}.proj_out"),
        Rule(f"{b}.norm.query_norm.scale", (f"{d}.attn.norm_q.weight",)),
        Rule(f"{b}.norm.key_norm.scale", (f"{d}.attn.norm_k.weight",)),
        *_weight_and_bias(f"{b}.modulation.lin", f"{d}.norm.linear"),
    ]


def _block_indices(keys, pattern: str) -> list[int]:
    return sorted({int(m.group(1)) for k in keys if (m := re.match(pattern, k))})


def _blocks(keys) -> tuple[list[int], list[int]]:
    """The double and single block indices that occur in `keys` (either layout)."""
    doubles = _block_indices(keys, r"(?:double_blocks|transformer_blocks)\.(\d+)\.")
    singles = _block_indices(keys, r"(?:single_blocks|single_transformer_blocks)\.(\d+)\.")
    return doubles, singles


def rules_for(keys) -> list[Rule]:
    """The Flux.1 rules for every block index that occurs in `keys` (either layout)."""
    doubles, singles = _blocks(keys)
    blocks = [r for i in doubles for r in _double_rules(i)] + [r for i in singles for r in _single_rules(i)]
    return _global_rules() + blocks


# FLUX.2 (spec flux2-format.md §4.2): no biases, shared modulations, single-block projections stay fused.


def _flux2_global_rules() -> list[Rule]:
    stems = [
        ("img_in", "x_embedder"),
        ("txt_in", "context_embedder"),
        ("time_in.in_layer", "time_guidance_embed.timestep_embedder.linear_1"),
        ("time_in.out_layer", "time_guidance_embed.timestep_embedder.linear_2"),
        ("guidance_in.in_layer", "time_guidance_embed.guidance_embedder.linear_1"),
        ("guidance_in.out_layer", "time_guidance_embed.guidance_embedder.linear_2"),
        ("double_stream_modulation_img.lin", "double_stream_modulation_img.linear"),
        ("double_stream_modulation_txt.lin", "double_stream_modulation_txt.linear"),
        ("single_stream_modulation.lin", "single_stream_modulation.linear"),
        ("final_layer.linear", "proj_out"),
    ]
    rules = [Rule(f"{bfl}.weight", (f"{dif}.weight",)) for bfl, dif in stems]
    return rules + [Rule("final_layer.adaLN_modulation.1.weight", ("norm_out.linear.weight",), kind="swap")]


def _flux2_double_rules(i: int) -> list[Rule]:
    b, d = f"double_blocks.{i}", f"transformer_blocks.{i}.attn"
    rules = []
    streams = {  # BFL stream -> diffusers (q/k/v, out projection, feed-forward, qk-norm infix)
        "img": (("to_q", "to_k", "to_v"), "to_out.0", "ff", ""),
        "txt": (("add_q_proj", "add_k_proj", "add_v_proj"), "to_add_out", "ff_context", "added_"),
    }
    for s, (qkv, proj, ff, added) in streams.items():
        rules += [
            Rule(f"{b}.{s}_attn.qkv.weight", tuple(f"{d}.{n}.weight" for n in qkv), kind="split"),
            Rule(f"{b}.{s}_attn.proj.weight", (f"{d}.{proj}.weight",)),
            Rule(f"{b}.{s}_attn.norm.query_norm.scale", (f"{d}.norm_{added}q.weight",)),
            Rule(f"{b}.{s}_attn.norm.key_norm.scale", (f"{d}.norm_{added}k.weight",)),
            Rule(f"{b}.{s}_mlp.0.weight", (f"transformer_blocks.{i}.{ff}.linear_in.weight",)),
            Rule(f"{b}.{s}_mlp.2.weight", (f"transformer_blocks.{i}.{ff}.linear_out.weight",)),
        ]
    return rules


def _flux2_single_rules(i: int) -> list[Rule]:
    b, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}.attn"
    return [
        Rule(f"{b}.linear1.weight", (f"{d}.to_qkv_mlp_proj.weight",)),
        Rule(f"{b}.linear2.weight", (f"{d}.to_out.weight",)),
        Rule(f"{b}.norm.query_norm.scale", (f"{d}.norm_q.weight",)),
        Rule(f"{b}.norm.key_norm.scale", (f"{d}.norm_k.weight",)),
    ]


def flux2_rules_for(keys) -> list[Rule]:
    """The FLUX.2 rules for every block index that occurs in `keys` (either layout)."""
    doubles, singles = _blocks(keys)
    blocks = [r for i in doubles for r in _flux2_double_rules(i)] + [r for i in singles for r in _flux2_single_rules(i)]
    return _flux2_global_rules() + blocks


def _swap_halves(t: Tensor) -> Tensor:
    first, second = t.chunk(2, dim=0)
    return torch.cat((second, first), dim=0)


def bfl_to_diffusers(tensors: Mapping[str, Tensor], rules: Callable[..., list[Rule]] = rules_for) -> dict[str, Tensor]:
    """BFL names -> diffusers names (Flux.1 rules unless told); splits are views, the norm_out swap copies."""
    rest, out = dict(tensors), {}
    for rule in rules(tensors):
        if rule.bfl not in rest or (rule.width_key and rule.width_key not in tensors):
            continue
        t = rest.pop(rule.bfl)
        if rule.kind == "same":
            parts = (t,)
        elif rule.kind == "swap":
            parts = (_swap_halves(t),)
        elif rule.kind == "split":
            parts = t.chunk(len(rule.diffusers), dim=0)
        else:  # split_mlp: [q, k, v, mlp_in]
            width = tensors[rule.width_key].shape[0]
            parts = t.split([width, width, width, t.shape[0] - 3 * width], dim=0)
        out.update(zip(rule.diffusers, parts))
    return out | rest


def diffusers_to_bfl(tensors: Mapping[str, Tensor], rules: Callable[..., list[Rule]] = rules_for) -> dict[str, Tensor]:
    """diffusers names -> BFL names; fused tensors are concatenated (a copy) in the order q, k, v(, mlp)."""
    rest, out = dict(tensors), {}
    for rule in rules(tensors):
        if not all(name in rest for name in rule.diffusers):
            continue
        parts = [rest.pop(name) for name in rule.diffusers]
        if rule.kind == "same":
            out[rule.bfl] = parts[0]
        elif rule.kind == "swap":
            out[rule.bfl] = _swap_halves(parts[0])
        else:
            out[rule.bfl] = torch.cat(parts, dim=0)
    return out | rest


def flux2_bfl_to_diffusers(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return bfl_to_diffusers(tensors, flux2_rules_for)


def flux2_diffusers_to_bfl(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return diffusers_to_bfl(tensors, flux2_rules_for)


# ----------------------------------------------------------------------------------------------
# Configs


def diffusers_config(config: FluxConfig) -> dict:
    """The `FluxTransformer2DModel` config equivalent to `config` (spec §6.1). diffusers fixes the MLP
    ratio at 4 and RoPE theta at 10000, so other values have no diffusers twin."""
    if config.mlp_ratio != 4.0 or config.theta != 10_000:
        raise ValueError(
            f"diffusers' FluxTransformer2DModel fixes mlp_ratio 4 and theta 10000; this config has "
            f"{config.mlp_ratio} and {config.theta}"
        )
    return dict(
        patch_size=1,
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        num_layers=config.depth,
        num_single_layers=config.depth_single_blocks,
        attention_head_dim=config.head_dim,
        num_attention_heads=config.num_heads,
        joint_attention_dim=config.context_in_dim,
        pooled_projection_dim=config.vec_in_dim,
        guidance_embeds=config.guidance_embed,
        axes_dims_rope=tuple(config.axes_dim),
    )


def config_from_diffusers(c: Mapping) -> FluxConfig:
    """The FluxConfig of a diffusers transformer `config.json` (its `out_channels` may be null = in_channels)."""
    return FluxConfig(
        in_channels=c["in_channels"],
        out_channels=c.get("out_channels") or c["in_channels"],
        vec_in_dim=c["pooled_projection_dim"],
        context_in_dim=c["joint_attention_dim"],
        hidden_size=c["num_attention_heads"] * c["attention_head_dim"],
        num_heads=c["num_attention_heads"],
        depth=c["num_layers"],
        depth_single_blocks=c["num_single_layers"],
        axes_dim=tuple(c["axes_dims_rope"]),
        guidance_embed=c["guidance_embeds"],
    )


def flux2_diffusers_config(config: Flux2Config) -> dict:
    """The `Flux2Transformer2DModel` config equivalent to `config` (spec flux2-format.md §4.1)."""
    return dict(
        patch_size=1,
        in_channels=config.in_channels,
        out_channels=None,
        num_layers=config.depth,
        num_single_layers=config.depth_single_blocks,
        attention_head_dim=config.head_dim,
        num_attention_heads=config.num_heads,
        joint_attention_dim=config.context_in_dim,
        timestep_guidance_channels=256,
        mlp_ratio=config.mlp_ratio,
        axes_dims_rope=tuple(config.axes_dim),
        rope_theta=config.theta,
        guidance_embeds=config.use_guidance_embed,
    )


def flux2_config_from_diffusers(c: Mapping) -> Flux2Config:
    """The Flux2Config of a diffusers `Flux2Transformer2DModel` config.json (class defaults are [dev]'s)."""
    defaults = Flux2Config()
    in_channels = c.get("in_channels", defaults.in_channels)
    if (c.get("out_channels") or in_channels) != in_channels:
        raise ValueError(f"FLUX.2 has out_channels = in_channels, not {c['out_channels']} and {in_channels}")
    heads = c.get("num_attention_heads", defaults.num_heads)
    return Flux2Config(
        in_channels=in_channels,
        context_in_dim=c.get("joint_attention_dim", defaults.context_in_dim),
        hidden_size=heads * c.get("attention_head_dim", defaults.head_dim),
        num_heads=heads,
        depth=c.get("num_layers", defaults.depth),
        depth_single_blocks=c.get("num_single_layers", defaults.depth_single_blocks),
        axes_dim=tuple(c.get("axes_dims_rope", defaults.axes_dim)),
        theta=c.get("rope_theta", defaults.theta),
        mlp_ratio=c.get("mlp_ratio", defaults.mlp_ratio),
        use_guidance_embed=c.get("guidance_embeds", defaults.use_guidance_embed),
    )


# ----------------------------------------------------------------------------------------------
# FLUX.3 (flux3-format.md §2.2): renames only, plus the final modulation's half swap; no fused tensors.


def _flux3_global_names() -> dict[str, str]:
    names = {
        "txt_in.weight": "context_embedder.weight",
        "final_layer.image.linear.weight": "proj_out.weight",
        "final_layer.image.adaLN_modulation.1.weight": "norm_out.linear.weight",  # swapped
    }
    for bfl, dif in (("time_in", "timestep_embedder"), ("ref_time_in", "target_timestep_embedder")):
        names[f"{bfl}.in_layer.weight"] = f"{dif}.linear_1.weight"
        names[f"{bfl}.out_layer.weight"] = f"{dif}.linear_2.weight"
    for mode in ("image", "image_cond"):
        names[f"emb_in.{mode}.weight"] = f"x_embedders.{mode}.weight"
    for kind in ("early", "single"):
        for mode in ("image", "image_cond", "txt"):
            names[f"{kind}_stream_modulations.{mode}.lin.weight"] = f"{kind}_stream_modulations.{mode}.linear.weight"
    return names


FLUX3_GLOBAL_NAMES = _flux3_global_names()
FLUX3_BLOCK_PREFIXES = {  # BFL -> diffusers; a block index (and the mode for content blocks) follows
    "content_mode_blocks.": "mode_blocks.",
    "txt_mode_blocks.": "txt_mode_blocks.",
    "single_blocks.": "single_transformer_blocks.",
}
FLUX3_BLOCK_PARTS = {
    "q_proj.weight": "attn.to_q.weight",
    "k_proj.weight": "attn.to_k.weight",
    "v_proj.weight": "attn.to_v.weight",
    "attn_out.weight": "attn.to_out.0.weight",
    "norm.query_norm.scale": "attn.norm_q.weight",
    "norm.key_norm.scale": "attn.norm_k.weight",
    "mlp_in.weight": "ff.linear_in.weight",
    "mlp_out.weight": "ff.linear_out.weight",
}


def _flux3_rename(name: str, to_diffusers: bool) -> str:
    """One key in the other layout; unknown keys come back unchanged (a strict load then names them)."""
    def direction(table: Mapping[str, str]) -> dict[str, str]:
        return dict(table) if to_diffusers else {v: k for k, v in table.items()}

    if name in (names := direction(FLUX3_GLOBAL_NAMES)):
        return names[name]
    parts = direction(FLUX3_BLOCK_PARTS)
    for source, target in direction(FLUX3_BLOCK_PREFIXES).items():
        match = re.fullmatch(re.escape(source) + r"((?:\w+\.)?\d+)\.(.+)", name)
        if match and match.group(2) in parts:
            return f"{target}{match.group(1)}.{parts[match.group(2)]}"
    return name


def _flux3_convert(tensors: Mapping[str, Tensor], to_diffusers: bool) -> dict[str, Tensor]:
    swapped = "norm_out.linear.weight" if not to_diffusers else "final_layer.image.adaLN_modulation.1.weight"
    return {_flux3_rename(k, to_diffusers): _swap_halves(t) if k == swapped else t for k, t in tensors.items()}


def flux3_bfl_to_diffusers(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """BFL FLUX.3 names -> `Flux3Transformer2DModel` names; the final modulation becomes [scale ; shift] (a copy)."""
    return _flux3_convert(tensors, to_diffusers=True)


def flux3_diffusers_to_bfl(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of `flux3_bfl_to_diffusers`."""
    return _flux3_convert(tensors, to_diffusers=False)


def flux3_diffusers_config(config) -> dict:
    """The `Flux3Transformer2DModel` config equivalent to a `Flux3Config` (diffusers outputs in_channels)."""
    if config.out_channels != config.in_channels:
        raise ValueError(f"diffusers' Flux3Transformer2DModel outputs in_channels, not {config.out_channels} channels")
    return dict(
        in_channels=config.in_channels,
        cond_in_channels=config.cond_in_channels,
        num_layers=config.depth,
        num_single_layers=config.depth_single_blocks,
        attention_head_dim=config.head_dim,
        num_attention_heads=config.num_heads,
        joint_attention_dim=config.context_in_dim,
        mlp_ratio=config.mlp_ratio,
        axes_dims_rope=tuple(config.axes_dim),
        rope_theta=config.theta,
        flow_map=config.flow_map,
    )
