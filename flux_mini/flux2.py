"""The FLUX.2 transformer ([dev], [klein] 4B / 9B), module by module, in the official (BFL) parameter layout.

Shapes: B batch, T text tokens, L image tokens, R reference-image tokens, r concepts, D hidden size, H heads,
Dh = 128 head dim, M = 3 D the SwiGLU width. The math follows `shared/spec/flux2-format.md` §3; module names
are the keys of the official state dict, so `model.state_dict()` *is* the checkpoint layout. What FLUX.2 changes
from Flux.1 (`flux1.py`): no biases, no pooled-text vector, one modulation per kind shared by all
blocks (computed once per call), SwiGLU MLPs, 4 RoPE axes (t, h, w, l) with theta 2000.

ConceptAttention runs through every block: in the double blocks with the text stream's weights and
the shared text modulation, in the single blocks with the block's shared weights; concept queries
attend to [concepts ; image] and nothing attends to concepts, so the image and text are unchanged.
Concepts may carry RoPE position ids (the authors use (0, 0, 0, 510)); ours default to zero.

Reference images (editing, spec §7.8) enter in one of two ways. `cond` tokens are appended after the noise
tokens in the image stream at every step; the velocity keeps the noise rows. klein 9B KV instead runs the
references once, alone (they attend only to each other) at timestep 0 (`Flux2.reference_kv`), and every
step splices their keys and values between the text and image keys (`reference_kv=`). That is the same
arithmetic as BFL's first "extract" step, whose references sit in the sequence but see only themselves.

Named sites (`flux_mini.interp`), listed in the `SITES` of `Flux2` and of each block class in the order
a forward visits them, with the Flux.1 names where the architecture has the same thing: `vec`; the
shared modulations `double_stream_modulation_img`, `double_stream_modulation_txt` (B, 1, 6D: shift1,
scale1, gate1, shift2, scale2, gate2) and `single_stream_modulation` (B, 1, 3D: shift, scale, gate), each
the Linear output before it is cut into sets, so one patch reaches every block of its kind; `img_in`,
`txt_in`; per double block `double_blocks.N.` + `q`, `k`, `v` (joint [txt ; img] after QK-norm and RoPE,
(B, H, T + L, Dh)), `txt_attn`, `img_attn` (attention outputs before the projection), `img_mlp`,
`txt_mlp` (MLP outputs before the gate), `img`, `txt` (the streams after the block), and, when the concept
stream runs, `concept_q`, `concept_k` (B, H, r, Dh, after QK-norm and the concepts' RoPE), `concept_attn`
(B, r, D), `concepts` (the stream after the block); per single block `single_blocks.N.` + `q`, `k`, `v`,
`attn`, `mlp` (SwiGLU activations, (B, T + L, M)), `x` ([txt ; img] after the block), and the same four
concept sites.
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
    upcast,
)

# ----------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class Flux2Config:
    """Hyperparameters, with the field names of the official code (klein-era `Flux2Params`).

    The output width equals `in_channels`; the distilled and Base checkpoints of one size share a config."""

    in_channels: int = 128
    context_in_dim: int = 15360
    hidden_size: int = 6144
    num_heads: int = 48
    depth: int = 8
    depth_single_blocks: int = 48
    axes_dim: tuple[int, ...] = (32, 32, 32, 32)
    theta: int = 2000
    mlp_ratio: float = 3.0
    use_guidance_embed: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "axes_dim", tuple(int(a) for a in self.axes_dim))
        sizes = {n: getattr(self, n) for n in ("in_channels", "context_in_dim", "hidden_size", "num_heads", "theta")}
        bad = [f"{n} {v!r}" for n, v in sizes.items() if not (type(v) is int and v > 0)]
        if type(self.mlp_ratio) not in (int, float) or self.mlp_ratio <= 0:
            bad.append(f"mlp_ratio {self.mlp_ratio!r}")
        if bad:
            raise ValueError(f"{', '.join(bad)}: must be positive (sizes and head counts integers)")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if sum(self.axes_dim) != self.head_dim or any(a % 2 for a in self.axes_dim):
            raise ValueError(
                f"axes_dim {list(self.axes_dim)} must be even dims summing to the head dim {self.head_dim} "
                "(hidden_size / num_heads): RoPE covers the whole head"
            )
        if min(self.depth, self.depth_single_blocks) < 0 or self.depth + self.depth_single_blocks == 0:
            raise ValueError(
                f"depth {self.depth} and depth_single_blocks {self.depth_single_blocks} must be >= 0 with at least "
                "one block"
            )

    @property
    def out_channels(self) -> int:
        return self.in_channels

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
        """Layers whose concept maps are averaged when none are named: all of them. FLUX.2 keeps few
        double blocks (5 of 25 in klein 4B) and deeper layers segment better, so the single blocks count."""
        return tuple(range(self.num_layers))

    @property
    def map_layers(self) -> range:
        """Every layer that can give concept maps: all of them."""
        return range(self.num_layers)

    @classmethod
    def from_preset(cls, name: str) -> Flux2Config:
        if name not in PRESETS:
            raise ValueError(f"unknown FLUX.2 preset {name!r}; choose one of {sorted(PRESETS)}")
        return PRESETS[name]

    def to_dict(self) -> dict:
        return {**asdict(self), "axes_dim": list(self.axes_dim)}


_DEV = Flux2Config()
_KLEIN_4B = replace(_DEV, context_in_dim=7680, hidden_size=3072, num_heads=24, depth=5, depth_single_blocks=20,
                    use_guidance_embed=False)
_KLEIN_9B = replace(_DEV, context_in_dim=12288, hidden_size=4096, num_heads=32, depth=8, depth_single_blocks=24,
                    use_guidance_embed=False)
PRESETS: dict[str, Flux2Config] = {  # spec §1.1: distilled, Base and KV checkpoints of one size share the keys
    "flux2-dev": _DEV,
    "flux2-klein-4b": _KLEIN_4B,
    "flux2-klein-base-4b": _KLEIN_4B,
    "flux2-klein-9b": _KLEIN_9B,
    "flux2-klein-base-9b": _KLEIN_9B,
    "flux2-klein-9b-kv": _KLEIN_9B,
}

AUTHORS_CONCEPT_POSITION = 510  # the authors' FLUX.2 port: concept features and RoPE ids from text position 510


def concept_position_ids(batch: int, num_concepts: int, position: int = 0, device=None) -> Tensor:
    """RoPE ids (B, r, 4) = (0, 0, 0, position) for every concept, i.e. text position `position`.

    Our default 0 leaves concept queries and keys unrotated (as in Flux.1) and treats every concept
    alike whatever its encoding; `AUTHORS_CONCEPT_POSITION` reproduces the authors' port."""
    ids = torch.zeros(batch, num_concepts, 4, device=device)
    ids[..., 3] = position
    return ids


# ----------------------------------------------------------------------------------------------
# Embeddings and the shared modulation


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear without biases: lifts timesteps and guidance to D."""

    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim, bias=False)
        self.out_layer = nn.Linear(hidden_dim, hidden_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class Modulation(nn.Module):
    """vec (B, D) -> SiLU -> Linear -> (B, 1, sets * 3D): one module serves every block of its kind."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.lin = nn.Linear(dim, (6 if double else 3) * dim, bias=False)

    def forward(self, vec: Tensor) -> Tensor:
        return self.lin(F.silu(vec))[:, None, :]


def modulation_sets(m: Tensor, sets: int) -> list[ModulationOut]:
    """(B, 1, sets * 3D) -> `sets` ModulationOut sets in order (shift, scale, gate per set)."""
    chunks = m.chunk(3 * sets, dim=-1)
    return [ModulationOut(*chunks[i : i + 3]) for i in range(0, 3 * sets, 3)]


@dataclass
class SharedModulation:
    """The three shared modulations of one forward call, computed once from one vec."""

    img: list[ModulationOut]  # double blocks, image stream: attention set, MLP set
    txt: list[ModulationOut]  # double blocks, text stream (and the concept stream)
    single: ModulationOut  # every single block


@dataclass(frozen=True)
class BlockKV:
    """One block's reference-token keys (after QK-norm and RoPE) and values, (B, H, R, Dh) each; B may be 1
    for a batch that shares its references."""

    k: Tensor
    v: Tensor


@dataclass(frozen=True)
class ReferenceKV:
    """klein 9B KV: the reference tokens' keys and values in every block, computed once per generation."""

    double: tuple[BlockKV, ...]  # one per double block
    single: tuple[BlockKV, ...]  # one per single block


def with_references(k: Tensor, v: Tensor, num_txt: int, references: BlockKV | None) -> tuple[Tensor, Tensor]:
    """Keys and values over [txt ; img] (B, H, T + L, Dh) -> over [txt ; references ; img] (B, H, T + R + L, Dh),
    so that every query also attends to the cached reference tokens."""
    if references is None:
        return k, v
    text, image = slice(None, num_txt), slice(num_txt, None)
    ref_k, ref_v = (t.expand(k.shape[0], -1, -1, -1) for t in (references.k, references.v))  # a batch-1 cache: views
    return (torch.cat((k[:, :, text], ref_k, k[:, :, image]), dim=2),
            torch.cat((v[:, :, text], ref_v, v[:, :, image]), dim=2))  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Attention and MLP


class SelfAttention(nn.Module):
    """The per-stream attention parameters of a double block: fused qkv, QK-norm, output projection."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim, bias=False)

    def heads(self, qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Fused projection (B, L, 3D) -> normalised q, k and raw v, each (B, H, L, Dh)."""
        return split_heads(qkv, self.num_heads, self.norm)

    def concept_heads(self, qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """`heads` for the concept stream's few tokens (the same values in fewer launches)."""
        return concept_heads(qkv, self.num_heads, self.norm)


class SwiGLU(nn.Module):
    """(.., 2M) = [gate ; value] -> SiLU(gate) * value (.., M)."""

    def forward(self, x: Tensor) -> Tensor:
        gate, value = x.chunk(2, dim=-1)
        return F.silu(gate).mul_(value)


def mlp(dim: int, hidden: int) -> nn.Sequential:
    """Fused gate/value Linear -> SwiGLU -> Linear; indices 0 and 2 are the official keys."""
    return nn.Sequential(nn.Linear(dim, 2 * hidden, bias=False), SwiGLU(), nn.Linear(hidden, dim, bias=False))


# ----------------------------------------------------------------------------------------------
# Blocks


class DoubleStreamBlock(nn.Module):
    """Image and text keep separate weights and meet only in one joint attention; no own modulation."""

    SITES = ("q", "k", "v", "txt_attn", "img_attn", "img_mlp", "img", "txt_mlp", "txt") + CONCEPT_SITES

    def __init__(self, config: Flux2Config):
        super().__init__()
        dim, heads = config.hidden_size, config.num_heads
        self.img_attn = SelfAttention(dim, heads)
        self.img_mlp = mlp(dim, config.mlp_hidden_dim)
        self.txt_attn = SelfAttention(dim, heads)
        self.txt_mlp = mlp(dim, config.mlp_hidden_dim)

    def forward(
        self,
        img: Tensor,
        txt: Tensor,
        pe: Tensor,
        mod: SharedModulation,
        concepts: ConceptStream | None = None,
        concept_mod: SharedModulation | None = None,
        sites: Sites = NO_SITES,
        references: BlockKV | None = None,
    ) -> tuple[Tensor, Tensor, ConceptLayer | None]:
        """img (B, L, D), txt (B, T, D), pe over [txt ; img] -> (img, txt, concept layer or None); cached
        `references` are attended to as well."""
        (img_mod1, img_mod2), (txt_mod1, txt_mod2) = mod.img, mod.txt
        img_q, img_k, img_v = self.img_attn.heads(self.img_attn.qkv(img_mod1.modulate(img)))
        txt_q, txt_k, txt_v = self.txt_attn.heads(self.txt_attn.qkv(txt_mod1.modulate(txt)))

        num_txt = txt.shape[1]
        q = sites("q", apply_rope(torch.cat((txt_q, img_q), dim=2), pe))
        k = sites("k", apply_rope(torch.cat((txt_k, img_k), dim=2), pe))
        v = sites("v", torch.cat((txt_v, img_v), dim=2))
        out = merge_heads(attention(q, *with_references(k, v, num_txt, references)))  # (B, T + L, D)
        txt_out, img_out = sites("txt_attn", out[:, :num_txt]), sites("img_attn", out[:, num_txt:])

        img = img_mod1.residual(img, self.img_attn.proj(img_out))
        img = sites("img", img_mod2.residual(img, sites("img_mlp", self.img_mlp(img_mod2.modulate(img)))))
        txt = txt_mod1.residual(txt, self.txt_attn.proj(txt_out))
        txt = sites("txt", txt_mod2.residual(txt, sites("txt_mlp", self.txt_mlp(txt_mod2.modulate(txt)))))
        if concepts is None:
            return img, txt, None
        image = slice(num_txt, None)
        concept = self.concept_forward(concepts, concept_mod, img_q, k[:, :, image], v[:, :, image], img_out, sites)
        return img, txt, concept

    def concept_forward(
        self,
        concepts: ConceptStream,
        mod: SharedModulation,
        img_q: Tensor,
        img_k: Tensor,
        img_v: Tensor,
        img_out: Tensor,
        sites: Sites,
    ) -> ConceptLayer:
        """The concept stream through the text weights and text modulation; img_k is rotated, img_q is not."""
        mod1, mod2 = mod.txt
        qkv = few_token_linear(self.txt_attn.qkv, mod1.modulate(concepts.tokens))
        q_c, k_c, v_c = self.txt_attn.concept_heads(qkv)
        rotated_q = sites("concept_q", apply_rope(q_c, concepts.pe))
        rotated_k = sites("concept_k", apply_rope(k_c, concepts.pe))
        o_c = concept_attention(rotated_q, rotated_k, v_c, img_k, img_v, concepts.attention)
        o_c = sites("concept_attn", merge_heads(o_c))  # (B, r, D)
        c = mod1.residual(concepts.tokens, few_token_linear(self.txt_attn.proj, o_c))
        c = sites("concepts", mod2.residual(c, few_token_mlp(self.txt_mlp, mod2.modulate(c))))
        return concept_layer(concepts.advance(c), o_c, k_c, v_c, img_q, img_v, img_out)

    def reference_forward(self, ref: Tensor, pe: Tensor, mod: SharedModulation) -> tuple[Tensor, BlockKV]:
        """klein 9B KV: reference tokens ref (B, R, D) alone through the image stream, attending only to each
        other, with their own modulation -> (ref after the block, their keys and values)."""
        mod1, mod2 = mod.img
        q, k, v = self.img_attn.heads(self.img_attn.qkv(mod1.modulate(ref)))
        q, k = apply_rope(q, pe), apply_rope(k, pe)
        ref = mod1.residual(ref, self.img_attn.proj(merge_heads(attention(q, k, v))))
        ref = mod2.residual(ref, self.img_mlp(mod2.modulate(ref)))
        return ref, BlockKV(k, v)


class SingleStreamBlock(nn.Module):
    """Text and image as one sequence; attention and SwiGLU MLP in parallel from fused projections."""

    SITES = ("q", "k", "v", "attn", "mlp", "x") + CONCEPT_SITES

    def __init__(self, config: Flux2Config):
        super().__init__()
        dim = config.hidden_size
        self.num_heads = config.num_heads
        self.hidden_size = dim
        self.mlp_hidden_dim = config.mlp_hidden_dim
        self.linear1 = nn.Linear(dim, 3 * dim + 2 * self.mlp_hidden_dim, bias=False)
        self.linear2 = nn.Linear(dim + self.mlp_hidden_dim, dim, bias=False)
        self.norm = QKNorm(config.head_dim)
        self.mlp_act = SwiGLU()

    def forward(
        self,
        x: Tensor,
        pe: Tensor,
        mod: SharedModulation,
        concepts: ConceptStream | None = None,
        concept_mod: SharedModulation | None = None,
        num_txt: int = 0,
        sites: Sites = NO_SITES,
        references: BlockKV | None = None,
    ) -> tuple[Tensor, ConceptLayer | None]:
        """x (B, T + L, D), text first -> (x, concept layer or None); num_txt = T is needed with concepts and
        with cached `references`, which are attended to as well."""
        q_raw, k, v, mlp_in = self.split(self.linear1(mod.single.modulate(x)))
        q, k, v = sites("q", apply_rope(q_raw, pe)), sites("k", apply_rope(k, pe)), sites("v", v)
        out = sites("attn", merge_heads(attention(q, *with_references(k, v, num_txt, references))))
        mlp_act = sites("mlp", self.mlp_act(mlp_in))
        x_next = sites("x", mod.single.residual(x, self.output(out, mlp_act)))
        if concepts is None:
            return x_next, None
        image = slice(num_txt, None)
        concept = self.concept_forward(
            concepts, concept_mod, q_raw[:, :, image], k[:, :, image], v[:, :, image], out[:, image], sites
        )
        return x_next, concept

    def split(self, h: Tensor, heads=split_heads) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """linear1's output -> normalised q, k, raw v (B, H, L, Dh) and the SwiGLU input (B, L, 2M)."""
        qkv, mlp_in = h.split([3 * self.hidden_size, 2 * self.mlp_hidden_dim], dim=-1)
        return *heads(qkv, self.num_heads, self.norm), mlp_in

    def output(self, attn: Tensor, mlp_act: Tensor) -> Tensor:
        """linear2 of [attn ; mlp_act] as the sum of two products over the weight's column blocks,
        without building the (T + L) x (D + M) concatenation."""
        weight, dim = linear_weight(self.linear2).to(attn.dtype), self.hidden_size
        return F.linear(attn, weight[:, :dim]) + F.linear(mlp_act, weight[:, dim:])

    def concept_forward(
        self,
        concepts: ConceptStream,
        mod: SharedModulation,
        img_q: Tensor,
        img_k: Tensor,
        img_v: Tensor,
        img_out: Tensor,
        sites: Sites,
    ) -> ConceptLayer:
        """Concepts through this block's weights and the shared single modulation; img_k rotated, img_q not."""
        projected = few_token_linear(self.linear1, mod.single.modulate(concepts.tokens))
        q_c, k_c, v_c, mlp_c = self.split(projected, concept_heads)
        rotated_q = sites("concept_q", apply_rope(q_c, concepts.pe))
        rotated_k = sites("concept_k", apply_rope(k_c, concepts.pe))
        o_c = concept_attention(rotated_q, rotated_k, v_c, img_k, img_v, concepts.attention)
        o_c = sites("concept_attn", merge_heads(o_c))  # (B, r, D)
        h = torch.cat((o_c, self.mlp_act(mlp_c)), dim=-1)
        c = sites("concepts", mod.single.residual(concepts.tokens, few_token_linear(self.linear2, h)))
        return concept_layer(concepts.advance(c), o_c, k_c, v_c, img_q, img_v, img_out)

    def reference_forward(self, ref: Tensor, pe: Tensor, mod: SharedModulation) -> tuple[Tensor, BlockKV]:
        """klein 9B KV: reference tokens ref (B, R, D) alone through this block with their own modulation
        -> (ref after the block, their keys and values)."""
        q, k, v, mlp_in = self.split(self.linear1(mod.single.modulate(ref)))
        q, k = apply_rope(q, pe), apply_rope(k, pe)
        out = merge_heads(attention(q, k, v))  # (B, R, D)
        return mod.single.residual(ref, self.output(out, self.mlp_act(mlp_in))), BlockKV(k, v)


class LastLayer(nn.Module):
    """Final adaLN (shift, scale; no gate) and the projection to output channels, without biases."""

    def __init__(self, dim: int, out_channels: int):
        super().__init__()
        self.linear = nn.Linear(dim, out_channels, bias=False)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim, bias=False))

    def forward(self, img: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)
        return self.linear(torch.addcmul(shift, 1 + scale, layer_norm(img)))


# ----------------------------------------------------------------------------------------------
# The model


def check_tokens(name: str, tokens: Tensor, ids: Tensor) -> None:
    """Refuse tokens that are not (B, N, channels) with ids (B, N, 4)."""
    if tokens.ndim != 3 or ids.ndim != 3 or ids.shape[:2] != tokens.shape[:2] or ids.shape[2] != 4:
        raise ValueError(
            f"{name} must be (B, tokens, channels) with {name}_ids (B, tokens, 4) (FLUX.2 ids have 4 axes t, h, w, "
            f"l), got {tuple(tokens.shape)} and {tuple(ids.shape)}"
        )


class Flux2(nn.Module):
    """Flow-matching transformer: 128-wide latent tokens + stacked LLM text features -> velocity."""

    SITES = ("vec", "double_stream_modulation_img", "double_stream_modulation_txt", "single_stream_modulation",
             "img_in", "txt_in")  # its blocks' sites follow, under their module names  # fmt: skip

    def __init__(self, config: Flux2Config):
        super().__init__()
        self.config = config
        dim = config.hidden_size
        self.pe_embedder = RoPE(config.axes_dim, config.theta)
        self.img_in = nn.Linear(config.in_channels, dim, bias=False)
        self.time_in = MLPEmbedder(256, dim)
        self.guidance_in = MLPEmbedder(256, dim) if config.use_guidance_embed else nn.Identity()
        self.txt_in = nn.Linear(config.context_in_dim, dim, bias=False)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(config) for _ in range(config.depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(config) for _ in range(config.depth_single_blocks))
        self.double_stream_modulation_img = Modulation(dim, double=True)
        self.double_stream_modulation_txt = Modulation(dim, double=True)
        self.single_stream_modulation = Modulation(dim, double=False)
        self.final_layer = LastLayer(dim, config.out_channels)

    def conditioning(self, timesteps: Tensor, guidance: Tensor | None = None) -> Tensor:
        """The modulation vector (B, D): time, plus guidance for [dev]. klein has no guidance input and
        ignores `guidance`, as the reference does."""
        vec = self.time_in(timestep_embedding(timesteps))
        if self.config.use_guidance_embed:
            if guidance is None:
                raise ValueError("FLUX.2 [dev] is guidance-distilled: pass `guidance` (B,), e.g. 4.0")
            vec = vec + self.guidance_in(timestep_embedding(guidance))
        return vec

    def modulations(self, vec: Tensor, sites: Sites = NO_SITES) -> SharedModulation:
        """The three shared modulations of every block, from one vec (B, D)."""
        img = sites("double_stream_modulation_img", self.double_stream_modulation_img(vec))
        txt = sites("double_stream_modulation_txt", self.double_stream_modulation_txt(vec))
        single = sites("single_stream_modulation", self.single_stream_modulation(vec))
        return SharedModulation(modulation_sets(img, 2), modulation_sets(txt, 2), *modulation_sets(single, 1))

    def rope(self, ids: Tensor, dtype: torch.dtype) -> Tensor:
        """Rotations for ids (B, N, 4) of any dtype (the reference uses int64): complex64, or complex128
        when the model runs in float64."""
        return self.pe_embedder(ids.to(upcast(dtype)))

    def concept_stream(
        self,
        concept_txt: Tensor,
        timesteps: Tensor,
        concept_ids: Tensor | None = None,
        guidance: Tensor | None = None,
        attention: str = "both",
        cross_attention: bool = False,
        values: bool = False,
    ) -> ConceptStream:
        """Concept features in text-feature space (B, r, context_in_dim) -> the initial concept stream.

        `concept_ids` (B, r, 4) are their RoPE positions, zero when None (see `concept_position_ids`).
        Their modulation vector is the image's: FLUX.2 has no pooled input to vary."""
        if concept_ids is None:
            concept_ids = concept_position_ids(*concept_txt.shape[:2], device=concept_txt.device)
        return ConceptStream(
            tokens=few_token_linear(self.txt_in, concept_txt),
            vec=self.conditioning(timesteps, guidance),
            attention=attention,
            cross_attention=cross_attention,
            values=values,
            pe=self.rope(concept_ids, concept_txt.dtype),
        )

    def layers(
        self,
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        timesteps: Tensor,
        guidance: Tensor | None = None,
        concepts: ConceptStream | None = None,
        concepts_in_single_blocks: bool = True,
        sites: Sites = NO_SITES,
        cond: Tensor | None = None,
        cond_ids: Tensor | None = None,
        reference_kv: ReferenceKV | None = None,
    ) -> Iterator[LayerOutput]:
        """Run the blocks one by one, yielding after each; stop iterating to stop the model early.

        Layers are numbered 0..depth-1 (double blocks), then depth.. (single blocks). The concept stream,
        when given, runs through the double blocks and (unless switched off) the single blocks.
        `sites` reads or replaces named values on the way (`flux_mini.interp`). Reference images: `cond`
        (B, R, in_channels) with `cond_ids` (B, R, 4), appended after the noise tokens, or klein 9B KV's
        `reference_kv`; either way each LayerOutput holds the L noise tokens only."""
        self.check_inputs(img, img_ids, txt, txt_ids, cond, cond_ids, reference_kv)
        if concepts is not None and (cond is not None or reference_kv is not None):
            raise ValueError(
                "ConceptAttention does not take reference images here: its maps are defined over the generated "
                "image's tokens; compute concept maps in a run without references (cond / reference_kv)"
            )
        num_noise = img.shape[1]
        if cond is not None:  # [noise ; references] in the image stream
            img, img_ids = torch.cat((img, cond), dim=1), torch.cat((img_ids, cond_ids), dim=1)
        vec = sites("vec", self.conditioning(timesteps, guidance))
        mod = self.modulations(vec, sites)
        concept_mod = self.modulations(concepts.vec) if concepts is not None else None
        pe = self.rope(torch.cat((txt_ids, img_ids), dim=1), img.dtype)
        img, txt = sites("img_in", self.img_in(img)), sites("txt_in", self.txt_in(txt))
        double_kv = reference_kv.double if reference_kv is not None else (None,) * self.config.depth
        single_kv = reference_kv.single if reference_kv is not None else (None,) * self.config.depth_single_blocks
        for index, block in enumerate(self.double_blocks):
            scope = sites.scoped(f"double_blocks.{index}")
            img, txt, concept = block(img, txt, pe, mod, concepts, concept_mod, scope, double_kv[index])
            concepts = concept.stream if concept is not None else None
            yield LayerOutput(index, img[:, :num_noise], vec, concept)
        concepts = concepts if concepts_in_single_blocks else None
        num_txt = txt.shape[1]
        noise = slice(num_txt, num_txt + num_noise)
        x = torch.cat((txt, img), dim=1)  # (B, T + L (+ R), D)
        for index, block in enumerate(self.single_blocks):
            scope = sites.scoped(f"single_blocks.{index}")
            x, concept = block(x, pe, mod, concepts, concept_mod, num_txt, scope, single_kv[index])
            concepts = concept.stream if concept is not None else None
            yield LayerOutput(self.config.depth + index, x[:, noise], vec, concept)

    def check_inputs(
        self,
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        cond: Tensor | None,
        cond_ids: Tensor | None,
        reference_kv: ReferenceKV | None,
    ) -> None:
        """Refuse inputs of the wrong shapes, and references that do not fit the image tokens or the model."""
        if (cond is None) != (cond_ids is None):
            raise ValueError("reference tokens need their ids: pass both cond and cond_ids, or neither")
        if cond is not None and reference_kv is not None:
            raise ValueError("pass the references once: as cond tokens or as reference_kv (klein 9B KV), not both")
        pairs = [("img", img, img_ids), ("txt", txt, txt_ids)] + ([] if cond is None else [("cond", cond, cond_ids)])
        for name, tokens, ids in pairs:
            check_tokens(name, tokens, ids)
        if cond is not None:
            if cond.shape[0] != img.shape[0]:
                raise ValueError(f"cond has batch {cond.shape[0]} but img has {img.shape[0]}: repeat the references")
            if cond.dtype != img.dtype or cond.shape[2] != img.shape[2]:
                raise ValueError(
                    f"cond is {cond.dtype} with {cond.shape[2]} channels but img is {img.dtype} with {img.shape[2]}: "
                    "encode the references as the noise tokens (same dtype, the AE's latent channels)"
                )
        if reference_kv is not None:
            blocks = (len(reference_kv.double), len(reference_kv.single))
            depths = (self.config.depth, self.config.depth_single_blocks)
            if blocks != depths:
                raise ValueError(f"reference_kv holds {blocks} (double, single) blocks, this model {depths}: build "
                                 "it with this model's reference_kv")  # fmt: skip
            batch = (reference_kv.double + reference_kv.single)[0].k.shape[0]
            if batch not in (1, img.shape[0]):
                raise ValueError(f"reference_kv has batch {batch} but img has {img.shape[0]}: build it for this batch "
                                 "(or at batch 1, shared by every image)")  # fmt: skip

    def reference_kv(self, cond: Tensor, cond_ids: Tensor, guidance: Tensor | None = None) -> ReferenceKV:
        """klein 9B KV: reference tokens cond (B, R, in_channels) with cond_ids (B, R, 4) -> their keys and
        values in every block, to pass as `reference_kv` at every step. They run alone (they attend only to
        each other) with the modulation of timestep 0, so one pass serves all steps. A batch-1 cache serves a
        batch of any size that shares its references."""
        if cond is None or cond_ids is None:
            raise ValueError("reference tokens need their ids: pass both cond and cond_ids")
        check_tokens("cond", cond, cond_ids)
        vec = self.conditioning(cond.new_zeros(cond.shape[0]), guidance)
        mod = self.modulations(vec)
        pe = self.rope(cond_ids, cond.dtype)
        ref = self.img_in(cond)  # (B, R, D)
        double, single = [], []
        for block in self.double_blocks:
            ref, kv = block.reference_forward(ref, pe, mod)
            double.append(kv)
        for block in self.single_blocks:
            ref, kv = block.reference_forward(ref, pe, mod)
            single.append(kv)
        return ReferenceKV(tuple(double), tuple(single))

    def concept_pass(
        self,
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        timesteps: Tensor,
        concept_txt: Tensor,
        guidance: Tensor | None = None,
        concept_ids: Tensor | None = None,
        attention: str = "both",
        cross_attention: bool = False,
        values: bool = False,
        last_layer: int | None = None,
        sites: Sites = NO_SITES,
        **references: Tensor | ReferenceKV | None,
    ) -> Iterator[LayerOutput]:
        """`layers` with a fresh concept stream (the call `concept_attention.maps` makes for every generation);
        the stream enters the single blocks only when `last_layer` (None: the last) is one of them.
        `references` (cond, cond_ids, reference_kv) reach `layers`, which refuses them with concepts."""
        stream = self.concept_stream(concept_txt, timesteps, concept_ids, guidance, attention, cross_attention, values)
        through_single = last_layer is None or last_layer >= self.config.depth
        return self.layers(img, img_ids, txt, txt_ids, timesteps, guidance, stream, through_single, sites, **references)

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
        guidance: Tensor | None = None,
        sites: Sites = NO_SITES,
        cond: Tensor | None = None,
        cond_ids: Tensor | None = None,
        reference_kv: ReferenceKV | None = None,
    ) -> Tensor:
        """img (B, L, in_channels), img_ids (B, L, 4), txt (B, T, context_in_dim), txt_ids (B, T, 4),
        timesteps (B,) in [0, 1], guidance (B,) for [dev] -> velocity (B, L, in_channels) of the noise tokens.
        Reference images: appended `cond` (B, R, in_channels) with `cond_ids` (B, R, 4), or klein 9B KV's
        `reference_kv` (see `reference_kv`)."""
        references = dict(cond=cond, cond_ids=cond_ids, reference_kv=reference_kv)
        for layer in self.layers(img, img_ids, txt, txt_ids, timesteps, guidance, sites=sites, **references):
            pass
        return self.final_layer(layer.img, layer.vec)
