"""What is mathematically the same in every Flux generation: embeddings, RoPE, norms, attention, the
concept-attention step, and the named sites that interventions use.

Shapes: B batch, T text tokens, L image tokens, D hidden size, H heads, Dh head dim, r concepts.
Each generation's transformer (`flux1.py`, ...) builds its blocks from these pieces; anything that differs
between generations lives in the generation's own file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


def upcast(dtype: torch.dtype) -> torch.dtype:
    """The precision for norms and rotations: float32, or float64 when the model runs in float64."""
    return torch.promote_types(dtype, torch.float32)


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


def apply_rope(x: Tensor, pe: Tensor) -> Tensor:
    """Rotate each pair (x0, x1) -> (cos x0 - sin x1, sin x0 + cos x1), i.e. multiply x0 + i x1 by
    e^(i angle), in float32 (or higher); x: (B, H, L, Dh)."""
    pairs = torch.view_as_complex(rearrange(x.to(upcast(x.dtype)), "... (p two) -> ... p two", two=2))
    return rearrange(torch.view_as_real(pairs * pe), "... p two -> ... (p two)").to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Normalisation


class RMSNorm(nn.Module):
    """RMS norm over the head dim with a learned gain, statistics in float32."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_normalize(x) * self.scale


def rms_normalize(x: Tensor) -> Tensor:
    """x / rms(x) over the last dim (eps 1e-6), statistics in float32 at least, in x's dtype; no gain."""
    return F.rms_norm(x.to(upcast(x.dtype)), (x.shape[-1],), eps=1e-6).to(x.dtype)


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q).to(v), self.key_norm(k).to(v)

    def stacked(self, qk: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """q and k stacked on a leading axis (2, ...) -> normalised q and k, the values of `forward`.

        One normalisation instead of two: for the concept stream's few tokens each operation costs a
        kernel launch on a GPU, not arithmetic."""
        q, k = rms_normalize(qk)
        return (q * self.query_norm.scale).to(v), (k * self.key_norm.scale).to(v)


@dataclass
class ModulationOut:
    """One adaLN set: x -> (1 + scale) * LN(x) + shift, and the residual gate of the branch."""

    shift: Tensor  # (B, 1, D)
    scale: Tensor
    gate: Tensor

    def __post_init__(self) -> None:
        self.gain = 1 + self.scale  # once per set: FLUX.2 and FLUX.3 share one set across all blocks of a kind

    def modulate(self, x: Tensor) -> Tensor:
        return torch.addcmul(self.shift, self.gain, layer_norm(x))

    def residual(self, x: Tensor, branch: Tensor) -> Tensor:
        """x + gate * branch, fused."""
        return torch.addcmul(x, self.gate, branch)


def layer_norm(x: Tensor) -> Tensor:
    """The affine-free LayerNorm (eps 1e-6) used everywhere in the transformer."""
    return F.layer_norm(x, (x.shape[-1],), eps=1e-6)


# ----------------------------------------------------------------------------------------------
# Attention


def split_heads(qkv: Tensor, num_heads: int, norm: QKNorm) -> tuple[Tensor, Tensor, Tensor]:
    """Fused projection (B, L, 3*D) -> QK-normed q, k and raw v, each (B, H, L, Dh).

    q, k, v are contiguous D-blocks of the features. The norm runs before the head axis moves forward,
    on rows that are still contiguous (after the move it would copy them first)."""
    q, k, v = rearrange(qkv, "b l (k h d) -> k b l h d", k=3, h=num_heads)
    q, k = norm(q, k, v)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def concept_heads(qkv: Tensor, num_heads: int, norm: QKNorm) -> tuple[Tensor, Tensor, Tensor]:
    """`split_heads` for the concept stream's few tokens: the same values, q and k normalised together."""
    qkv = rearrange(qkv, "b l (k h d) -> k b l h d", k=3, h=num_heads)
    q, k = norm.stacked(qkv[:2], qkv[2])
    return q.transpose(1, 2), k.transpose(1, 2), qkv[2].transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    return rearrange(x, "b h l d -> b l (h d)")


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Unmasked scaled-dot-product attention, heads kept apart: (B, H, Lq, Dh)."""
    return F.scaled_dot_product_attention(q, k, v)


# ----------------------------------------------------------------------------------------------
# ConceptAttention: concept tokens on their own residual stream (Helbling et al., ICML 2025)

ATTENTION_MODES = ("both", "cross", "self", "none")


@dataclass
class ConceptStream:
    """Concept tokens travelling beside the text stream through the text-stream weights of each block.

    They attend to image tokens (and to each other) but no other token attends to them, so the image
    and text outputs are exactly those of the plain forward. In Flux.1 concept ids are zero (like text
    ids), so RoPE leaves their queries and keys unrotated and is skipped for them (`pe` None); FLUX.2
    gives concepts position ids, whose rotations ride in `pe`."""

    tokens: Tensor  # (B, r, D) the concept residual stream
    vec: Tensor  # (B, D) its modulation vector: time [+ guidance] [+ vector_in(concept pooled input)]
    attention: str = "both"  # keys/values of the concept queries: "both", "cross" (image only), "self", "none"
    cross_attention: bool = False  # also return the raw cross-attention baseline q_img . k_concept
    values: bool = False  # also return the value vectors (value-space ablation)
    pe: Tensor | None = None  # (B, 1, r, Dh/2) RoPE rotations of the concept tokens; None: unrotated

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

    One SDPA call: on a GPU a few concept queries cost kernel launches, not arithmetic, so the image keys and
    values are copied behind the concept keys once per block (one copy of the image's k and v) instead of
    scoring the two key blocks apart and merging them (four products, a concatenation, a softmax, a sum)."""
    if mode == "none":
        return v_c
    if mode == "self":  # few_token_linear's outputs are transposed; fused SDPA kernels need a unit last stride
        return attention(q_c, k_c, v_c.contiguous())
    if mode == "cross":
        return attention(q_c, k_img, v_img)
    return attention(q_c, torch.cat((k_c, k_img), dim=2), torch.cat((v_c, v_img), dim=2))


def linear_weight(layer: nn.Module) -> Tensor:
    """The (out, in) matrix a Linear multiplies by: its own weight, or the upcast copy of a weight stored
    in fp8 (`flux_mini.lowmem.Float8Linear`). For code that uses a Linear's weight directly."""
    dequantized = getattr(layer, "dequantized_weight", None)
    return layer.weight if dequantized is None else dequantized()


def few_token_linear(layer: nn.Linear, x: Tensor) -> Tensor:
    """layer(x) for a handful of tokens (B, r, in) -> (B, r, out), as weight @ x^T.

    With r ~ 10 the product is bound by reading the weight; in this orientation CPU BLAS streams it once
    instead of packing it first, about 2x faster than F.linear. Used by the concept stream only."""
    columns = rearrange(x, "b r d -> d (b r)")
    weight = linear_weight(layer).to(x.dtype)
    if layer.bias is None:
        out = weight @ columns
    else:
        out = torch.addmm(layer.bias[:, None].to(x.dtype), weight, columns)
    return rearrange(out, "o (b r) -> b r o", b=x.shape[0])


def few_token_mlp(mlp: nn.Sequential, x: Tensor) -> Tensor:
    """An MLP Linear -> activation -> Linear (official indices 0, 1, 2) for the concept stream's few tokens."""
    return few_token_linear(mlp[2], mlp[1](few_token_linear(mlp[0], x)))


def concept_layer(
    stream: ConceptStream, concept_out: Tensor, k_c: Tensor, v_c: Tensor, img_q: Tensor, img_v: Tensor, img_out: Tensor
) -> ConceptLayer:
    """Package one block's concept results with the baselines the stream asked for; img_q is pre-RoPE.
    The cross-attention scores are computed in float32 at least: in float16 these products overflow 65504."""
    precise = upcast(img_q.dtype)
    return ConceptLayer(
        concept_out=concept_out,
        image_out=img_out,
        stream=stream,
        cross_attention=torch.einsum("bhnd,bhrd->bhrn", img_q.to(precise), k_c.to(precise))
        if stream.cross_attention
        else None,
        concept_values=merge_heads(v_c) if stream.values else None,
        image_values=merge_heads(img_v) if stream.values else None,
    )


@dataclass
class LayerOutput:
    """The state after one block: its layer number, the image tokens (B, L, D), the modulation vector,
    and the concept results when a concept stream runs."""

    index: int
    img: Tensor
    vec: Tensor
    concepts: ConceptLayer | None


# ----------------------------------------------------------------------------------------------
# Named sites: where interventions read or replace values (see flux_mini/interp.py)


class Sites:
    """Named points of a forward pass, passed in explicitly like the concept stream (no hooks).

    A block calls `sites(name, value)` at each of its sites and continues with what comes back. This base
    class is the identity, so the plain forward passes `NO_SITES` and every value goes through unchanged;
    `flux_mini.interp` subclasses it to cache or patch. `scoped(prefix)` gives a block its names
    (`double_blocks.3` + `img_attn` -> `double_blocks.3.img_attn`); the prefix is the block's module name.
    Each module that calls sites lists them, in visiting order, in a class attribute `SITES`, so that a
    request for a site that does not exist is refused before the model runs."""

    def __call__(self, name: str, value: Tensor) -> Tensor:
        return value

    def scoped(self, prefix: str) -> Sites:
        return self


NO_SITES = Sites()
CONCEPT_SITES = ("concept_q", "concept_k", "concept_attn", "concepts")  # visited only when a concept stream runs
