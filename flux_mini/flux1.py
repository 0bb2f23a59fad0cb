"""The Flux.1 transformer, module by module, in the official (BFL) parameter layout.

Shapes: B batch, T text tokens, L image tokens, D hidden size, H heads, Dh head dim, r concepts.
The math follows `shared/spec/flux-format.md` §3; every module name matches a key of the official
state dict, so `model.state_dict()` *is* the checkpoint layout. The pieces every generation shares
(RoPE, norms, attention, the concept-attention step, named sites) are in `layers.py`.

Named sites (`flux_mini.interp`), listed in the `SITES` of `Flux` and of each block class, in the order a
forward visits them: `vec`, `img_in`, `txt_in`; per double block `double_blocks.N.` + `q`, `k`, `v` (joint
[txt ; img], after QK-norm and RoPE, (B, H, T + L, Dh)), `txt_attn`, `img_attn` (attention outputs before the
projection, heads concatenated), `img_mlp`, `txt_mlp` (MLP outputs before the gate), `img`, `txt` (the
streams after the block), and, when the concept stream runs, `concept_q`, `concept_k` (B, H, r, Dh),
`concept_attn` (B, r, D), `concepts` (the concept stream after the block); per single block
`single_blocks.N.` + `q`, `k`, `v`, `attn`, `mlp` (GELU activations, (B, T + L, M)), `x` ([txt ; img] after
the block), and the same four concept sites.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flux_mini.layers import (
    CONCEPT_SITES,
    NO_SITES,
    ConceptLayer,
    ConceptStream,
    LayerOutput,
    ModulationOut,
    QKNorm,
    RoPE,
    Sites,
    apply_rope,
    attention,
    concept_attention,
    concept_heads,
    concept_layer,
    few_token_linear,
    few_token_mlp,
    layer_norm,
    linear_weight,
    merge_heads,
    split_heads,
    timestep_embedding,
)

# ----------------------------------------------------------------------------------------------
# Configuration


def _is_positive(value, kind: type | tuple[type, ...] = (int, float)) -> bool:
    return isinstance(value, kind) and not isinstance(value, bool) and value > 0


@dataclass(frozen=True)
class FluxConfig:
    """Hyperparameters, with the field names of the official code."""

    in_channels: int = 64
    out_channels: int = 64
    vec_in_dim: int = 768
    context_in_dim: int = 4096
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    axes_dim: tuple[int, ...] = (16, 56, 56)
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "axes_dim", tuple(int(a) for a in self.axes_dim))
        sizes = ("in_channels", "out_channels", "vec_in_dim", "context_in_dim", "hidden_size", "num_heads")
        bad = [f"{name} {getattr(self, name)!r}" for name in sizes if not _is_positive(getattr(self, name), int)]
        bad += [f"{name} {getattr(self, name)!r}" for name in ("mlp_ratio", "theta")
                if not _is_positive(getattr(self, name))]
        if bad:
            raise ValueError(f"{', '.join(bad)}: must be positive (sizes and head counts integers)")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if sum(self.axes_dim) != self.head_dim:
            raise ValueError(
                f"axes_dim {list(self.axes_dim)} sums to {sum(self.axes_dim)}, but the head dim is "
                f"{self.head_dim} (hidden_size / num_heads); RoPE must cover the whole head"
            )
        if any(a % 2 for a in self.axes_dim):
            raise ValueError(f"every RoPE axis dim must be even, got axes_dim {list(self.axes_dim)}")
        if min(self.depth, self.depth_single_blocks) < 0 or self.depth + self.depth_single_blocks == 0:
            raise ValueError(
                f"depth {self.depth} and depth_single_blocks {self.depth_single_blocks} must be >= 0 with at least one block"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def num_layers(self) -> int:
        """Double plus single blocks: the layer numbering used for concept maps."""
        return self.depth + self.depth_single_blocks

    @property
    def concept_layers(self) -> tuple[int, ...]:
        """Layers whose concept maps are averaged when none are named: the double blocks (the paper's)."""
        return tuple(range(self.depth))

    @property
    def map_layers(self) -> range:
        """Every layer that can give concept maps: all of them (single blocks when asked)."""
        return range(self.num_layers)

    @classmethod
    def from_preset(cls, name: str) -> FluxConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown Flux preset {name!r}; choose one of {sorted(PRESETS)}")
        return PRESETS[name]

    def to_dict(self) -> dict:
        return {**asdict(self), "axes_dim": list(self.axes_dim)}


_SCHNELL = FluxConfig()
_DEV = replace(_SCHNELL, guidance_embed=True)
PRESETS: dict[str, FluxConfig] = {
    "flux-schnell": _SCHNELL,
    "flux-dev": _DEV,
    "flux-dev-krea": _DEV,
    "flux-dev-kontext": _DEV,
    "flux-dev-fill": replace(_DEV, in_channels=384),
    "flux-dev-canny": replace(_DEV, in_channels=128),
    "flux-dev-depth": replace(_DEV, in_channels=128),
}

# ----------------------------------------------------------------------------------------------
# Embeddings


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear: lifts timesteps, guidance and the pooled CLIP vector to D."""

    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim)
        self.out_layer = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


# ----------------------------------------------------------------------------------------------
# Modulation


class Modulation(nn.Module):
    """vec (B, D) -> one (double=False) or two (double=True) ModulationOut sets."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim)

    def forward(self, vec: Tensor) -> list[ModulationOut]:
        chunks = self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)
        return [ModulationOut(*chunks[i : i + 3]) for i in range(0, self.multiplier, 3)]


# ----------------------------------------------------------------------------------------------
# Attention


class SelfAttention(nn.Module):
    """The per-stream attention parameters of a double block: fused qkv, QK-norm, output projection."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Modulated tokens (B, L, D) -> normalised q, k and raw v, each (B, H, L, Dh)."""
        return self.heads(self.qkv(x))

    def heads(self, qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return split_heads(qkv, self.num_heads, self.norm)

    def concept_heads(self, qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """`heads` for the concept stream's few tokens (the same values in fewer launches)."""
        return concept_heads(qkv, self.num_heads, self.norm)


def mlp(dim: int, hidden: int) -> nn.Sequential:
    """Linear -> GELU(tanh) -> Linear; indices 0 and 2 are the official keys."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


# ----------------------------------------------------------------------------------------------
# Blocks

class DoubleStreamBlock(nn.Module):
    """Image and text keep separate weights and meet only in one joint attention."""

    SITES = ("q", "k", "v", "txt_attn", "img_attn", "img_mlp", "img", "txt_mlp", "txt") + CONCEPT_SITES

    def __init__(self, config: FluxConfig):
        super().__init__()
        dim, heads = config.hidden_size, config.num_heads
        self.num_heads = heads
        self.img_mod = Modulation(dim, double=True)
        self.img_attn = SelfAttention(dim, heads, config.qkv_bias)
        self.img_mlp = mlp(dim, config.mlp_hidden_dim)
        self.txt_mod = Modulation(dim, double=True)
        self.txt_attn = SelfAttention(dim, heads, config.qkv_bias)
        self.txt_mlp = mlp(dim, config.mlp_hidden_dim)

    def forward(
        self,
        img: Tensor,
        txt: Tensor,
        vec: Tensor,
        pe: Tensor,
        concepts: ConceptStream | None = None,
        sites: Sites = NO_SITES,
    ) -> tuple[Tensor, Tensor, ConceptLayer | None]:
        """img (B, L, D), txt (B, T, D), vec (B, D), pe over [txt ; img] -> (img, txt, concept layer or None)."""
        img_mod1, img_mod2 = self.img_mod(vec)
        txt_mod1, txt_mod2 = self.txt_mod(vec)
        img_q, img_k, img_v = self.img_attn.qkv_heads(img_mod1.modulate(img))
        txt_q, txt_k, txt_v = self.txt_attn.qkv_heads(txt_mod1.modulate(txt))

        num_txt = txt.shape[1]
        q = sites("q", apply_rope(torch.cat((txt_q, img_q), dim=2), pe))
        k = sites("k", apply_rope(torch.cat((txt_k, img_k), dim=2), pe))
        v = sites("v", torch.cat((txt_v, img_v), dim=2))
        out = merge_heads(attention(q, k, v))  # (B, T + L, D)
        txt_out, img_out = sites("txt_attn", out[:, :num_txt]), sites("img_attn", out[:, num_txt:])

        img = img_mod1.residual(img, self.img_attn.proj(img_out))
        img = sites("img", img_mod2.residual(img, sites("img_mlp", self.img_mlp(img_mod2.modulate(img)))))
        txt = txt_mod1.residual(txt, self.txt_attn.proj(txt_out))
        txt = sites("txt", txt_mod2.residual(txt, sites("txt_mlp", self.txt_mlp(txt_mod2.modulate(txt)))))
        if concepts is None:
            return img, txt, None
        concept = self.concept_forward(concepts, img_q, k[:, :, num_txt:], v[:, :, num_txt:], img_out, sites)
        return img, txt, concept

    def concept_forward(
        self, concepts: ConceptStream, img_q: Tensor, img_k: Tensor, img_v: Tensor, img_out: Tensor, sites: Sites
    ) -> ConceptLayer:
        """The concept stream through this block's *text* weights; img_k is RoPE-rotated, img_q is not."""
        mod1, mod2 = self.txt_mod(concepts.vec)
        qkv = few_token_linear(self.txt_attn.qkv, mod1.modulate(concepts.tokens))
        q_c, k_c, v_c = self.txt_attn.concept_heads(qkv)
        q_c, k_c = sites("concept_q", q_c), sites("concept_k", k_c)
        o_c = concept_attention(q_c, k_c, v_c, img_k, img_v, concepts.attention)
        o_c = sites("concept_attn", merge_heads(o_c))  # (B, r, D)
        c = mod1.residual(concepts.tokens, few_token_linear(self.txt_attn.proj, o_c))
        c = sites("concepts", mod2.residual(c, few_token_mlp(self.txt_mlp, mod2.modulate(c))))
        return concept_layer(concepts.advance(c), o_c, k_c, v_c, img_q, img_v, img_out)


class SingleStreamBlock(nn.Module):
    """Text and image as one sequence; attention and MLP run in parallel from fused projections."""

    SITES = ("q", "k", "v", "attn", "mlp", "x") + CONCEPT_SITES

    def __init__(self, config: FluxConfig):
        super().__init__()
        dim = config.hidden_size
        self.num_heads = config.num_heads
        self.hidden_size = dim
        self.mlp_hidden_dim = config.mlp_hidden_dim
        self.linear1 = nn.Linear(dim, 3 * dim + self.mlp_hidden_dim)
        self.linear2 = nn.Linear(dim + self.mlp_hidden_dim, dim)
        self.norm = QKNorm(config.head_dim)
        self.modulation = Modulation(dim, double=False)

    def forward(
        self,
        x: Tensor,
        vec: Tensor,
        pe: Tensor,
        concepts: ConceptStream | None = None,
        num_txt: int = 0,
        sites: Sites = NO_SITES,
    ) -> tuple[Tensor, ConceptLayer | None]:
        """x (B, T + L, D), text first -> (x, concept layer or None); num_txt = T is needed with concepts."""
        (mod,) = self.modulation(vec)
        q_raw, k, v, mlp_in = self.split(self.linear1(mod.modulate(x)))
        q, k, v = sites("q", apply_rope(q_raw, pe)), sites("k", apply_rope(k, pe)), sites("v", v)
        out = sites("attn", merge_heads(attention(q, k, v)))
        mlp_act = sites("mlp", F.gelu(mlp_in, approximate="tanh"))
        x_next = sites("x", mod.residual(x, self.output(out, mlp_act)))
        if concepts is None:
            return x_next, None
        img = slice(num_txt, None)
        concept = self.concept_forward(concepts, q_raw[:, :, img], k[:, :, img], v[:, :, img], out[:, img], sites)
        return x_next, concept

    def split(self, h: Tensor, heads=split_heads) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """linear1's output -> normalised q, k, raw v (B, H, L, Dh) and the MLP input (B, L, M)."""
        qkv, mlp_in = h.split([3 * self.hidden_size, self.mlp_hidden_dim], dim=-1)
        return *heads(qkv, self.num_heads, self.norm), mlp_in

    def output(self, attn: Tensor, mlp_act: Tensor) -> Tensor:
        """linear2 of [attn ; mlp_act], as the sum of two products over the weight's column blocks:
        the same map without building the (T + L) x (D + M) concatenation."""
        weight, dim = linear_weight(self.linear2).to(attn.dtype), self.hidden_size
        return F.linear(attn, weight[:, :dim], self.linear2.bias.to(attn.dtype)) + F.linear(mlp_act, weight[:, dim:])

    def concept_forward(
        self, concepts: ConceptStream, img_q: Tensor, img_k: Tensor, img_v: Tensor, img_out: Tensor, sites: Sites
    ) -> ConceptLayer:
        """Extension beyond the paper: concepts through this block's shared weights."""
        (mod,) = self.modulation(concepts.vec)
        projected = few_token_linear(self.linear1, mod.modulate(concepts.tokens))
        q_c, k_c, v_c, mlp_c = self.split(projected, concept_heads)
        q_c, k_c = sites("concept_q", q_c), sites("concept_k", k_c)
        o_c = concept_attention(q_c, k_c, v_c, img_k, img_v, concepts.attention)
        o_c = sites("concept_attn", merge_heads(o_c))  # (B, r, D)
        h = torch.cat((o_c, F.gelu(mlp_c, approximate="tanh")), dim=-1)
        c = sites("concepts", mod.residual(concepts.tokens, few_token_linear(self.linear2, h)))
        return concept_layer(concepts.advance(c), o_c, k_c, v_c, img_q, img_v, img_out)


class LastLayer(nn.Module):
    """Final adaLN (shift, scale; no gate) and the projection to output channels."""

    def __init__(self, dim: int, out_channels: int):
        super().__init__()
        self.linear = nn.Linear(dim, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, img: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)
        return self.linear((1 + scale) * layer_norm(img) + shift)


# ----------------------------------------------------------------------------------------------
# The model


class Flux(nn.Module):
    """Flow-matching transformer: packed latent tokens + T5 tokens + pooled CLIP -> velocity."""

    SITES = ("vec", "img_in", "txt_in")  # its blocks' sites follow, under their module names

    def __init__(self, config: FluxConfig):
        super().__init__()
        self.config = config
        dim = config.hidden_size
        self.pe_embedder = RoPE(config.axes_dim, config.theta)
        self.img_in = nn.Linear(config.in_channels, dim)
        self.time_in = MLPEmbedder(256, dim)
        self.vector_in = MLPEmbedder(config.vec_in_dim, dim)
        self.guidance_in = MLPEmbedder(256, dim) if config.guidance_embed else nn.Identity()
        self.txt_in = nn.Linear(config.context_in_dim, dim)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(config) for _ in range(config.depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(config) for _ in range(config.depth_single_blocks))
        self.final_layer = LastLayer(dim, config.out_channels)

    def conditioning(self, timesteps: Tensor, y: Tensor, guidance: Tensor | None = None) -> Tensor:
        """The modulation vector: time, then guidance (dev family), then pooled text; (B, D)."""
        vec = self.time_in(timestep_embedding(timesteps))
        if self.config.guidance_embed:
            if guidance is None:
                raise ValueError("this Flux variant is guidance-distilled (dev family): pass `guidance`, e.g. 3.5")
            vec = vec + self.guidance_in(timestep_embedding(guidance))
        return vec + self.vector_in(y)

    def concept_stream(
        self,
        concept_txt: Tensor,
        timesteps: Tensor,
        concept_y: Tensor | None = None,
        guidance: Tensor | None = None,
        attention: str = "both",
        cross_attention: bool = False,
        values: bool = False,
    ) -> ConceptStream:
        """Concept embeddings in T5 space (B, r, context_in_dim) -> the initial concept stream.

        Its modulation vector uses `concept_y` as pooled input, zeros when None (the authors' choice)."""
        if concept_y is None:
            concept_y = concept_txt.new_zeros(concept_txt.shape[0], self.config.vec_in_dim)
        return ConceptStream(
            tokens=few_token_linear(self.txt_in, concept_txt),
            vec=self.conditioning(timesteps, concept_y, guidance),
            attention=attention,
            cross_attention=cross_attention,
            values=values,
        )

    def layers(
        self,
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        timesteps: Tensor,
        y: Tensor,
        guidance: Tensor | None = None,
        concepts: ConceptStream | None = None,
        concepts_in_single_blocks: bool = False,
        sites: Sites = NO_SITES,
    ) -> Iterator[LayerOutput]:
        """Run the blocks one by one, yielding after each; stop iterating to stop the model early.

        Layers are numbered 0..depth-1 (double blocks), then depth.. (single blocks). The concept stream,
        when given, runs through the double blocks, and through the single blocks too when asked.
        `sites` reads or replaces named values on the way (`flux_mini.interp`)."""
        if img.ndim != 3 or txt.ndim != 3:
            raise ValueError(f"img and txt must be (B, tokens, channels), got {tuple(img.shape)} and {tuple(txt.shape)}")
        vec = sites("vec", self.conditioning(timesteps, y, guidance))
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))
        img, txt = sites("img_in", self.img_in(img)), sites("txt_in", self.txt_in(txt))
        for index, block in enumerate(self.double_blocks):
            img, txt, concept = block(img, txt, vec, pe, concepts, sites.scoped(f"double_blocks.{index}"))
            concepts = concept.stream if concept is not None else None
            yield LayerOutput(index, img, vec, concept)
        concepts = concepts if concepts_in_single_blocks else None
        num_txt = txt.shape[1]
        x = torch.cat((txt, img), dim=1)
        for index, block in enumerate(self.single_blocks):
            x, concept = block(x, vec, pe, concepts, num_txt, sites.scoped(f"single_blocks.{index}"))
            concepts = concept.stream if concept is not None else None
            yield LayerOutput(self.config.depth + index, x[:, num_txt:], vec, concept)

    def concept_pass(
        self,
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        timesteps: Tensor,
        concept_txt: Tensor,
        y: Tensor,
        guidance: Tensor | None = None,
        concept_y: Tensor | None = None,
        attention: str = "both",
        cross_attention: bool = False,
        values: bool = False,
        last_layer: int | None = None,
        sites: Sites = NO_SITES,
    ) -> Iterator[LayerOutput]:
        """`layers` with a fresh concept stream (the call `concept_attention.maps` makes for every generation);
        the stream enters the single blocks only when `last_layer` (None: the last) is one of them."""
        stream = self.concept_stream(concept_txt, timesteps, concept_y, guidance, attention, cross_attention, values)
        through_single = last_layer is None or last_layer >= self.config.depth
        return self.layers(img, img_ids, txt, txt_ids, timesteps, y, guidance, stream, through_single, sites)

    def velocity(self, last: LayerOutput) -> Tensor:
        """The output of the final layer on the last LayerOutput of `layers`: (B, L, out_channels)."""
        return self.final_layer(last.img, last.vec)

    def forward(
        self,
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        timesteps: Tensor,
        y: Tensor,
        guidance: Tensor | None = None,
        sites: Sites = NO_SITES,
    ) -> Tensor:
        """img (B, L, in_channels), img_ids (B, L, 3), txt (B, T, context_in_dim), txt_ids (B, T, 3),
        timesteps (B,) in [0, 1], y (B, vec_in_dim), guidance (B,) -> velocity (B, L, out_channels)."""
        for layer in self.layers(img, img_ids, txt, txt_ids, timesteps, y, guidance, sites=sites):
            pass
        return self.final_layer(layer.img, layer.vec)
