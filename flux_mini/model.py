"""The Flux.1 transformer, module by module, in the official (BFL) parameter layout.

Shapes: B batch, T text tokens, L image tokens, D hidden size, H heads, Dh head dim, r concepts.
The math follows `shared/spec/flux-format.md` §3; every module name matches a key of the official
state dict, so `model.state_dict()` *is* the checkpoint layout.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

# ----------------------------------------------------------------------------------------------
# Configuration


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


def timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 10_000.0, time_factor: float = 1000.0) -> Tensor:
    """Sinusoidal embedding of t in [0, 1] (or a guidance value): (B,) -> (B, dim), cosines first.

    `time_factor * t` is computed in t's dtype, as the reference does (it matters in bf16); the angles
    in float32 (float64 for a float64 t)."""
    t = time_factor * t
    half = dim // 2
    precision = upcast(t.dtype) if torch.is_floating_point(t) else torch.float32
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=precision, device=t.device) / half)
    args = t[:, None].to(precision) * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb.to(t.dtype) if torch.is_floating_point(t) else emb


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear: lifts timesteps, guidance and the pooled CLIP vector to D."""

    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim)
        self.out_layer = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class RoPE(nn.Module):
    """N-axis rotary embedding: ids (B, L, n_axes) -> unit complex rotations (B, 1, L, Dh/2).

    Each axis rotates its own slice of the head dims, in interleaved pairs (2p, 2p+1) read as complex
    numbers x[2p] + i x[2p+1]. Angles are formed in float64 so that positions of large grids stay exact;
    the rotations are complex64 (complex128 for float64 ids)."""

    def __init__(self, axes_dim: tuple[int, ...], theta: int):
        super().__init__()
        self.axes_dim = axes_dim
        self.theta = theta

    def forward(self, ids: Tensor) -> Tensor:
        angles = []
        for axis, dim in enumerate(self.axes_dim):
            omega = 1.0 / self.theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=ids.device) / dim)
            angles.append(ids[..., axis, None].double() * omega)  # (B, L, dim/2)
        angle = rearrange(torch.cat(angles, dim=-1), "b l p -> b 1 l p").to(upcast(ids.dtype))
        return torch.polar(torch.ones_like(angle), angle)


def upcast(dtype: torch.dtype) -> torch.dtype:
    """The precision for norms and rotations: float32, or float64 when the model runs in float64."""
    return torch.promote_types(dtype, torch.float32)


def apply_rope(x: Tensor, pe: Tensor) -> Tensor:
    """Rotate each pair (x0, x1) -> (cos x0 - sin x1, sin x0 + cos x1), i.e. multiply x0 + i x1 by
    e^(i angle), in float32 (or higher); x: (B, H, L, Dh)."""
    pairs = torch.view_as_complex(rearrange(x.to(upcast(x.dtype)), "... (p two) -> ... p two", two=2))
    return rearrange(torch.view_as_real(pairs * pe), "... p two -> ... (p two)").to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Normalisation and modulation


class RMSNorm(nn.Module):
    """RMS norm over the head dim with a learned gain, statistics in float32."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x.to(upcast(x.dtype)), (x.shape[-1],), eps=1e-6).to(x.dtype) * self.scale


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


@dataclass
class ModulationOut:
    """One adaLN set: x -> (1 + scale) * LN(x) + shift, and the residual gate of the branch."""

    shift: Tensor  # (B, 1, D)
    scale: Tensor
    gate: Tensor

    def modulate(self, x: Tensor) -> Tensor:
        return torch.addcmul(self.shift, 1 + self.scale, layer_norm(x))

    def residual(self, x: Tensor, branch: Tensor) -> Tensor:
        """x + gate * branch, fused."""
        return torch.addcmul(x, self.gate, branch)


def layer_norm(x: Tensor) -> Tensor:
    """The affine-free LayerNorm (eps 1e-6) used everywhere in the transformer."""
    return F.layer_norm(x, (x.shape[-1],), eps=1e-6)


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


def split_heads(qkv: Tensor, num_heads: int, norm: QKNorm) -> tuple[Tensor, Tensor, Tensor]:
    """Fused projection (B, L, 3*D) -> QK-normed q, k and raw v, each (B, H, L, Dh).

    q, k, v are contiguous D-blocks of the features. The norm runs before the head axis moves forward,
    on rows that are still contiguous (after the move it would copy them first)."""
    q, k, v = rearrange(qkv, "b l (k h d) -> k b l h d", k=3, h=num_heads)
    q, k = norm(q, k, v)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    return rearrange(x, "b h l d -> b l (h d)")


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Unmasked scaled-dot-product attention, heads kept apart: (B, H, Lq, Dh)."""
    return F.scaled_dot_product_attention(q, k, v)


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


def mlp(dim: int, hidden: int) -> nn.Sequential:
    """Linear -> GELU(tanh) -> Linear; indices 0 and 2 are the official keys."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


# ----------------------------------------------------------------------------------------------
# ConceptAttention: concept tokens on their own residual stream (Helbling et al., ICML 2025)

ATTENTION_MODES = ("both", "cross", "self", "none")


@dataclass
class ConceptStream:
    """Concept tokens travelling beside the text stream through the text-stream weights of each block.

    They attend to image tokens (and to each other) but no other token attends to them, so the image
    and text outputs are exactly those of the plain forward. Concept ids are zero (like text ids), so
    RoPE leaves their queries and keys unrotated and is skipped for them."""

    tokens: Tensor  # (B, r, D) the concept residual stream
    vec: Tensor  # (B, D) its modulation vector: time [+ guidance] + vector_in(concept pooled input)
    attention: str = "both"  # keys/values of the concept queries: "both", "cross" (image only), "self", "none"
    cross_attention: bool = False  # also return the raw cross-attention baseline q_img . k_concept
    values: bool = False  # also return the value vectors (value-space ablation)

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {self.attention!r}")

    def advance(self, tokens: Tensor) -> ConceptStream:
        return replace(self, tokens=tokens)


@dataclass
class ConceptLayer:
    """What one block exposes about the concepts: attention outputs before the output projection
    (heads concatenated), the stream for the next block, and the optional baselines."""

    concept_out: Tensor  # (B, r, D)  o_c
    image_out: Tensor  # (B, N, D)  o_x, the image rows of the joint attention output
    stream: ConceptStream  # the concept stream after this block's residual updates
    cross_attention: Tensor | None = None  # (B, H, r, N) q_img . k_c after QK-norm, before RoPE, unscaled
    concept_values: Tensor | None = None  # (B, r, D)
    image_values: Tensor | None = None  # (B, N, D)


def concept_attention(q_c: Tensor, k_c: Tensor, v_c: Tensor, k_img: Tensor, v_img: Tensor, mode: str) -> Tensor:
    """Only the r concept query rows, (B, H, r, Dh), over [concept ; image] keys (or one of the two).

    The two key blocks share one softmax but are never concatenated: the image keys and values are
    read where they are, which halves the cost of this step for a few concepts over many image tokens."""
    if mode == "none":
        return v_c
    sources = {"both": ((k_c, v_c), (k_img, v_img)), "self": ((k_c, v_c),), "cross": ((k_img, v_img),)}[mode]
    scale = q_c.shape[-1] ** -0.5
    scores = torch.cat([q_c @ k.transpose(-1, -2) for k, _ in sources], dim=-1) * scale  # (B, H, r, keys)
    weights = scores.to(upcast(scores.dtype)).softmax(dim=-1).to(q_c.dtype)
    parts = weights.split([k.shape[2] for k, _ in sources], dim=-1)
    return sum(w @ v for w, (_, v) in zip(parts, sources))


def few_token_linear(layer: nn.Linear, x: Tensor) -> Tensor:
    """layer(x) for a handful of tokens (B, r, in) -> (B, r, out), as weight @ x^T.

    With r ~ 10 the product is bound by reading the weight; in this orientation CPU BLAS streams it once
    instead of packing it first, about 2x faster than F.linear. Used by the concept stream only."""
    columns = rearrange(x, "b r d -> d (b r)")
    if layer.bias is None:
        out = layer.weight @ columns
    else:
        out = torch.addmm(layer.bias[:, None], layer.weight, columns)
    return rearrange(out, "o (b r) -> b r o", b=x.shape[0])


def few_token_mlp(mlp: nn.Sequential, x: Tensor) -> Tensor:
    return few_token_linear(mlp[2], mlp[1](few_token_linear(mlp[0], x)))


def concept_layer(
    stream: ConceptStream, concept_out: Tensor, k_c: Tensor, v_c: Tensor, img_q: Tensor, img_v: Tensor, img_out: Tensor
) -> ConceptLayer:
    """Package one block's concept results with the baselines the stream asked for; img_q is pre-RoPE."""
    return ConceptLayer(
        concept_out=concept_out,
        image_out=img_out,
        stream=stream,
        cross_attention=torch.einsum("bhnd,bhrd->bhrn", img_q, k_c) if stream.cross_attention else None,
        concept_values=merge_heads(v_c) if stream.values else None,
        image_values=merge_heads(img_v) if stream.values else None,
    )


# ----------------------------------------------------------------------------------------------
# Blocks


class DoubleStreamBlock(nn.Module):
    """Image and text keep separate weights and meet only in one joint attention."""

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
        self, img: Tensor, txt: Tensor, vec: Tensor, pe: Tensor, concepts: ConceptStream | None = None
    ) -> tuple[Tensor, Tensor, ConceptLayer | None]:
        """img (B, L, D), txt (B, T, D), vec (B, D), pe over [txt ; img] -> (img, txt, concept layer or None)."""
        img_mod1, img_mod2 = self.img_mod(vec)
        txt_mod1, txt_mod2 = self.txt_mod(vec)
        img_q, img_k, img_v = self.img_attn.qkv_heads(img_mod1.modulate(img))
        txt_q, txt_k, txt_v = self.txt_attn.qkv_heads(txt_mod1.modulate(txt))

        q = apply_rope(torch.cat((txt_q, img_q), dim=2), pe)
        k = apply_rope(torch.cat((txt_k, img_k), dim=2), pe)
        v = torch.cat((txt_v, img_v), dim=2)
        out = merge_heads(attention(q, k, v))  # (B, T + L, D)
        txt_out, img_out = out[:, : txt.shape[1]], out[:, txt.shape[1] :]

        img = img_mod1.residual(img, self.img_attn.proj(img_out))
        img = img_mod2.residual(img, self.img_mlp(img_mod2.modulate(img)))
        txt = txt_mod1.residual(txt, self.txt_attn.proj(txt_out))
        txt = txt_mod2.residual(txt, self.txt_mlp(txt_mod2.modulate(txt)))
        if concepts is None:
            return img, txt, None
        return img, txt, self.concept_forward(concepts, img_q, k[:, :, txt.shape[1] :], img_v, img_out)

    def concept_forward(
        self, concepts: ConceptStream, img_q: Tensor, img_k: Tensor, img_v: Tensor, img_out: Tensor
    ) -> ConceptLayer:
        """The concept stream through this block's *text* weights; img_k is RoPE-rotated, img_q is not."""
        mod1, mod2 = self.txt_mod(concepts.vec)
        q_c, k_c, v_c = self.txt_attn.heads(few_token_linear(self.txt_attn.qkv, mod1.modulate(concepts.tokens)))
        o_c = merge_heads(concept_attention(q_c, k_c, v_c, img_k, img_v, concepts.attention))  # (B, r, D)
        c = mod1.residual(concepts.tokens, few_token_linear(self.txt_attn.proj, o_c))
        c = mod2.residual(c, few_token_mlp(self.txt_mlp, mod2.modulate(c)))
        return concept_layer(concepts.advance(c), o_c, k_c, v_c, img_q, img_v, img_out)


class SingleStreamBlock(nn.Module):
    """Text and image as one sequence; attention and MLP run in parallel from fused projections."""

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
        self, x: Tensor, vec: Tensor, pe: Tensor, concepts: ConceptStream | None = None, num_txt: int = 0
    ) -> tuple[Tensor, ConceptLayer | None]:
        """x (B, T + L, D), text first -> (x, concept layer or None); num_txt = T is needed with concepts."""
        (mod,) = self.modulation(vec)
        q, k, v, mlp_in = self.split(self.linear1(mod.modulate(x)))
        k_rot = apply_rope(k, pe)
        out = merge_heads(attention(apply_rope(q, pe), k_rot, v))
        x_next = mod.residual(x, self.output(out, F.gelu(mlp_in, approximate="tanh")))
        if concepts is None:
            return x_next, None
        img = slice(num_txt, None)
        return x_next, self.concept_forward(concepts, q[:, :, img], k_rot[:, :, img], v[:, :, img], out[:, img])

    def split(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """linear1's output -> normalised q, k, raw v (B, H, L, Dh) and the MLP input (B, L, M)."""
        qkv, mlp_in = h.split([3 * self.hidden_size, self.mlp_hidden_dim], dim=-1)
        return *split_heads(qkv, self.num_heads, self.norm), mlp_in

    def output(self, attn: Tensor, mlp_act: Tensor) -> Tensor:
        """linear2 of [attn ; mlp_act], as the sum of two products over the weight's column blocks:
        the same map without building the (T + L) x (D + M) concatenation."""
        weight, dim = self.linear2.weight, self.hidden_size
        return F.linear(attn, weight[:, :dim], self.linear2.bias) + F.linear(mlp_act, weight[:, dim:])

    def concept_forward(
        self, concepts: ConceptStream, img_q: Tensor, img_k: Tensor, img_v: Tensor, img_out: Tensor
    ) -> ConceptLayer:
        """Extension beyond the paper: concepts through this block's shared weights."""
        (mod,) = self.modulation(concepts.vec)
        q_c, k_c, v_c, mlp_c = self.split(few_token_linear(self.linear1, mod.modulate(concepts.tokens)))
        o_c = merge_heads(concept_attention(q_c, k_c, v_c, img_k, img_v, concepts.attention))  # (B, r, D)
        h = torch.cat((o_c, F.gelu(mlp_c, approximate="tanh")), dim=-1)
        c = mod.residual(concepts.tokens, few_token_linear(self.linear2, h))
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
    ) -> Iterator[LayerOutput]:
        """Run the blocks one by one, yielding after each; stop iterating to stop the model early.

        Layers are numbered 0..depth-1 (double blocks), then depth.. (single blocks). The concept stream,
        when given, runs through the double blocks, and through the single blocks too when asked."""
        if img.ndim != 3 or txt.ndim != 3:
            raise ValueError(f"img and txt must be (B, tokens, channels), got {tuple(img.shape)} and {tuple(txt.shape)}")
        vec = self.conditioning(timesteps, y, guidance)
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))
        img, txt = self.img_in(img), self.txt_in(txt)
        for index, block in enumerate(self.double_blocks):
            img, txt, concept = block(img, txt, vec, pe, concepts)
            concepts = concept.stream if concept is not None else None
            yield LayerOutput(index, img, vec, concept)
        concepts = concepts if concepts_in_single_blocks else None
        num_txt = txt.shape[1]
        x = torch.cat((txt, img), dim=1)
        for index, block in enumerate(self.single_blocks, start=self.config.depth):
            x, concept = block(x, vec, pe, concepts, num_txt)
            concepts = concept.stream if concept is not None else None
            yield LayerOutput(index, x[:, num_txt:], vec, concept)

    def forward(
        self,
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        timesteps: Tensor,
        y: Tensor,
        guidance: Tensor | None = None,
    ) -> Tensor:
        """img (B, L, in_channels), img_ids (B, L, 3), txt (B, T, context_in_dim), txt_ids (B, T, 3),
        timesteps (B,) in [0, 1], y (B, vec_in_dim), guidance (B,) -> velocity (B, L, out_channels)."""
        for layer in self.layers(img, img_ids, txt, txt_ids, timesteps, y, guidance):
            pass
        return self.final_layer(layer.img, layer.vec)


@dataclass
class LayerOutput:
    """The state after one block: its layer number, the image tokens (B, L, D), the modulation vector,
    and the concept results when a concept stream runs."""

    index: int
    img: Tensor
    vec: Tensor
    concepts: ConceptLayer | None
