"""The FLUX.3 Image Klein transformer, module by module, in the official (BFL) parameter layout.

Shapes: B batch, T text tokens, L image tokens, R reference-image tokens, D hidden size, H heads, Dh head dim,
M MLP width, r concepts. The math follows `shared/spec/flux3-format.md` §3. There are no double-stream blocks:
each token mode (text, image, reference image) first runs through its own chain of *mode blocks*, attending only
within itself; then the sequence [txt ; img ; cond] runs through *joint blocks* whose weights are shared by all
tokens while the modulation is per mode (text and references sit at time 0). Every block, mode or joint, is the
same parallel block (attention and a SwiGLU MLP read one modulated input and share one gate), so one class serves
both. The distilled model is a flow map: it also embeds the time each step jumps to (`ref_time_in`).

Layer numbering (`Flux3.layers`, concept maps): layer i < depth is mode block i of every mode (the three chains
are independent, so they count as one layer, like Flux.1's double blocks count image and text as one); layer
depth + j is joint block j. The official model has layers 0..4 (mode) and 5..32 (joint).

ConceptAttention: concept tokens enter like text (`txt_in`, the text mode blocks, the text modulation at
t = 0), attending among themselves in the mode blocks; in the joint blocks they ride with the text tokens'
modulation and attend to [concepts ; image] while nothing attends to them, so the image is unchanged. Maps come
from the joint blocks only (the mode blocks never see the image). See the README for the reasons.

Named sites (`flux_mini.interp`), declared in the `SITES` of `Flux3` and `Block`: `vec` (the image tokens'
time vector, (B, D)), `vec0` (the text and reference tokens' vector, time 0), `txt_in`, `img_in`, `cond_in` (the
projected tokens); per block, under its official prefix (`txt_mode_blocks.N.`, `content_mode_blocks.image.N.`,
`content_mode_blocks.image_cond.N.`, `single_blocks.N.`), the names of Flux.1's single blocks: `q`, `k`, `v`
(after QK-norm and RoPE, (B, H, tokens, Dh)), `attn` (attention output before `attn_out`, (B, tokens, D)),
`mlp` (SwiGLU activations, (B, tokens, M)), `x` (the tokens after the block; [txt ; img ; cond] in a joint
block); with concepts, in text mode blocks and joint blocks, `concept_q`, `concept_k` (B, H, r, Dh),
`concept_attn` (the concepts' attention output before `attn_out`, (B, r, D)) and `concepts` (the stream after
the block). A forward visits them layer by layer: text, image, reference mode block i, then the joint blocks.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
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
    concept_layer,
    few_token_linear,
    layer_norm,
    merge_heads,
    timestep_embedding,
    upcast,
)

MODES = ("image", "image_cond", "txt")

# ----------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class Flux3Config:
    """Hyperparameters; `depth` counts the mode blocks of *one* mode (every mode has that many)."""

    in_channels: int = 128
    cond_in_channels: int = 128
    out_channels: int = 128
    context_in_dim: int = 20480
    hidden_size: int = 3072
    mlp_ratio: float = 3.0
    num_heads: int = 24
    depth: int = 5
    depth_single_blocks: int = 28
    axes_dim: tuple[int, ...] = (32, 32, 32, 32)
    theta: int = 10_000
    image_rope_scale: float = 0.5  # image h/w position ids are multiplied by this (pipeline side)
    flow_map: bool = True  # the distilled model; Base has no target-time embedder

    def __post_init__(self) -> None:
        object.__setattr__(self, "axes_dim", tuple(int(a) for a in self.axes_dim))
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if sum(self.axes_dim) != self.head_dim or any(a % 2 for a in self.axes_dim):
            raise ValueError(
                f"axes_dim {list(self.axes_dim)} must be even numbers summing to the head dim {self.head_dim}"
            )
        if min(self.depth, self.depth_single_blocks) < 0 or self.depth + self.depth_single_blocks == 0:
            raise ValueError(f"depth {self.depth} and depth_single_blocks {self.depth_single_blocks} must be >= 0")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def num_layers(self) -> int:
        """Mode layers plus joint blocks: the layer numbering of `Flux3.layers` and of concept maps."""
        return self.depth + self.depth_single_blocks

    @property
    def map_layers(self) -> range:
        """Every layer that can give concept maps: the joint blocks (the mode blocks never see the image)."""
        return range(self.depth, self.num_layers)

    @property
    def concept_layers(self) -> tuple[int, ...]:
        """Layers whose concept maps are averaged when none are named: every joint block. Klein has no
        double-stream blocks, and the joint blocks are where concepts and image meet."""
        return tuple(self.map_layers)

    @classmethod
    def from_preset(cls, name: str) -> Flux3Config:
        if name not in PRESETS:
            raise ValueError(f"unknown FLUX.3 preset {name!r}; choose one of {sorted(PRESETS)}")
        return PRESETS[name]

    def to_dict(self) -> dict:
        return {**asdict(self), "axes_dim": list(self.axes_dim)}


PRESETS: dict[str, Flux3Config] = {
    "flux3-klein": Flux3Config(),
    "flux3-klein-base": Flux3Config(flow_map=False),
}

# ----------------------------------------------------------------------------------------------
# Embeddings and modulation


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear without biases: a sinusoidal time embedding (256) lifted to D."""

    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim, bias=False)
        self.out_layer = nn.Linear(hidden_dim, hidden_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class Modulation(nn.Module):
    """A mode's time vector (B, D) -> one (shift, scale, gate) set, shared by all blocks of a kind."""

    def __init__(self, dim: int):
        super().__init__()
        self.lin = nn.Linear(dim, 3 * dim, bias=False)

    def forward(self, vec: Tensor) -> ModulationOut:
        return ModulationOut(*self.lin(F.silu(vec))[:, None, :].chunk(3, dim=-1))


def per_token(mods: list[ModulationOut], lengths: list[int]) -> ModulationOut:
    """Per-mode sets (B, 1, D) -> one set (B, tokens, D) over the joint sequence, each token carrying its mode's
    values. Built once per forward (the joint modulation is shared by every joint block), it lets a joint block
    modulate and gate the whole sequence in one operation each, with no splitting and re-joining."""

    def join(part: str) -> Tensor:
        return torch.cat([getattr(m, part).expand(-1, n, -1) for m, n in zip(mods, lengths)], dim=1)

    return ModulationOut(join("shift"), join("scale"), join("gate"))


# ----------------------------------------------------------------------------------------------
# The block


def swiglu(h: Tensor) -> Tensor:
    """[gate ; value] (.., 2M) -> SiLU(gate) * value (.., M)."""
    gate, value = h.chunk(2, dim=-1)
    return F.silu(gate) * value


class Block(nn.Module):
    """Parallel attention + SwiGLU MLP from one modulated input, one gate for their sum (spec §3.4-3.5).

    A mode block runs it on one mode's tokens with that mode's (B, 1, D) modulation; a joint block on
    [txt ; img ; cond] with the per-token modulation. The weights are the same kind either way."""

    SITES = ("q", "k", "v", "attn", "mlp", "x") + CONCEPT_SITES

    def __init__(self, config: Flux3Config):
        super().__init__()
        dim = config.hidden_size
        self.num_heads = config.num_heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.mlp_in = nn.Linear(dim, 2 * config.mlp_hidden_dim, bias=False)
        self.attn_out = nn.Linear(dim, dim, bias=False)
        self.mlp_out = nn.Linear(config.mlp_hidden_dim, dim, bias=False)
        self.norm = QKNorm(config.head_dim)

    def heads(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Projections (B, N, D) -> q, k QK-normed in float32 (kept there for RoPE), raw v; each (B, H, N, Dh)."""
        q, k, v = (rearrange(x, "b n (h d) -> b h n d", h=self.num_heads) for x in (q, k, v))
        precision = upcast(v.dtype)
        return self.norm.query_norm(q.to(precision)), self.norm.key_norm(k.to(precision)), v

    def concept_heads(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """`heads` for the concept stream's few tokens, q and k normalised together (fewer launches, the same
        values) and cast to v's dtype (concepts skip RoPE, so nothing needs them in float32)."""
        qk = rearrange(torch.stack((q, k)), "two b n (h d) -> two b h n d", h=self.num_heads)
        q, k = self.norm.stacked(qk.to(upcast(v.dtype)), v)
        return q, k, rearrange(v, "b n (h d) -> b h n d", h=self.num_heads)

    def forward(
        self,
        x: Tensor,
        mod: ModulationOut,
        pe: Tensor,
        sites: Sites = NO_SITES,
        concepts: ConceptStream | None = None,
        concept_mod: ModulationOut | None = None,
        image: slice | None = None,
    ) -> tuple[Tensor, ConceptLayer | None]:
        """x (B, N, D) -> (x after the block, concept layer or None).

        With `concepts` (joint blocks), `concept_mod` is the text tokens' modulation and `image` the image
        tokens' place in x. RoPE runs on the float32 normed q and k, then they are cast once (spec §3.6)."""
        a = mod.modulate(x)
        q_normed, k_normed, v = self.heads(self.q_proj(a), self.k_proj(a), self.v_proj(a))
        q = sites("q", apply_rope(q_normed, pe).to(v.dtype))
        k = sites("k", apply_rope(k_normed, pe).to(v.dtype))
        v = sites("v", v)
        attn = sites("attn", merge_heads(attention(q, k, v)))  # (B, N, D)
        mlp = sites("mlp", swiglu(self.mlp_in(a)))  # (B, N, M)
        x_next = sites("x", mod.residual(x, self.attn_out(attn) + self.mlp_out(mlp)))
        if concepts is None:
            return x_next, None
        img_q = q_normed[:, :, image].to(v.dtype)
        img_k, img_v = k[:, :, image], v[:, :, image]
        c, o_c, k_c, v_c = self.concept_forward(concepts, concept_mod, sites, img_k, img_v)
        return x_next, concept_layer(concepts.advance(c), o_c, k_c, v_c, img_q, img_v, attn[:, image])

    def concept_forward(
        self,
        concepts: ConceptStream,
        mod: ModulationOut,
        sites: Sites,
        img_k: Tensor | None = None,
        img_v: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The concept tokens through this block's weights with the text modulation -> (next tokens (B, r, D),
        attention output o_c (B, r, D), k_c, v_c (B, H, r, Dh)).

        Concept ids are zero, so RoPE is the identity and is skipped. Without image keys (a text mode block)
        the concepts attend among themselves, as a prompt made of them would; with them (a joint block) they
        attend as `concepts.attention` says, over [concepts ; image]."""
        c = concepts.tokens
        a = mod.modulate(c)
        q_c, k_c, v_c = self.concept_heads(*(few_token_linear(p, a) for p in (self.q_proj, self.k_proj, self.v_proj)))
        q_c, k_c = sites("concept_q", q_c), sites("concept_k", k_c)
        mode = "self" if img_k is None else concepts.attention
        o_c = sites("concept_attn", merge_heads(concept_attention(q_c, k_c, v_c, img_k, img_v, mode)))
        mlp_c = swiglu(few_token_linear(self.mlp_in, a))
        branch = few_token_linear(self.attn_out, o_c) + few_token_linear(self.mlp_out, mlp_c)
        return sites("concepts", mod.residual(c, branch)), o_c, k_c, v_c


class LastLayer(nn.Module):
    """Final adaLN (shift, scale; no gate) and the projection of the image tokens to output channels."""

    def __init__(self, dim: int, out_channels: int):
        super().__init__()
        self.linear = nn.Linear(dim, out_channels, bias=False)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim, bias=False))

    def forward(self, img: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)
        return self.linear(torch.addcmul(shift, 1 + scale, layer_norm(img)))


# ----------------------------------------------------------------------------------------------
# The model


class Flux3(nn.Module):
    """Flow-matching (flow-map when distilled) transformer: image tokens, Qwen3-VL text features and optional
    reference-image tokens -> the velocity of the image tokens."""

    SITES = ("vec", "vec0", "txt_in", "img_in", "cond_in")  # its blocks' sites follow, under their module names

    def __init__(self, config: Flux3Config):
        super().__init__()
        self.config = config
        dim = config.hidden_size
        self.pe_embedder = RoPE(config.axes_dim, config.theta)
        self.emb_in = nn.ModuleDict(
            {
                "image": nn.Linear(config.in_channels, dim, bias=False),
                "image_cond": nn.Linear(config.cond_in_channels, dim, bias=False),
            }
        )
        self.txt_in = nn.Linear(config.context_in_dim, dim, bias=False)
        self.time_in = MLPEmbedder(256, dim)
        self.ref_time_in = MLPEmbedder(256, dim) if config.flow_map else None
        self.early_stream_modulations = nn.ModuleDict({mode: Modulation(dim) for mode in MODES})
        self.single_stream_modulations = nn.ModuleDict({mode: Modulation(dim) for mode in MODES})
        self.content_mode_blocks = nn.ModuleDict(
            {mode: nn.ModuleList(Block(config) for _ in range(config.depth)) for mode in ("image", "image_cond")}
        )
        self.txt_mode_blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.single_blocks = nn.ModuleList(Block(config) for _ in range(config.depth_single_blocks))
        self.final_layer = nn.ModuleDict({"image": LastLayer(dim, config.out_channels)})

    def time_vectors(self, timesteps: Tensor, target_timesteps: Tensor | None) -> tuple[Tensor, Tensor]:
        """-> (vec for the image tokens at t, vec0 for text, references and concepts at t = 0); (B, D) each.
        The flow map adds the target time's embedding to both."""
        if (target_timesteps is not None) != self.config.flow_map:
            raise ValueError(
                "this FLUX.3 model is the distilled flow map: pass target_timesteps (the time each step jumps to)"
                if self.config.flow_map
                else "this FLUX.3 model is Base (no flow map): it takes no target_timesteps; sample it with CFG"
            )
        vec = self.time_in(timestep_embedding(timesteps))
        vec0 = self.time_in(timestep_embedding(torch.zeros_like(timesteps)))
        if target_timesteps is not None:
            target = self.ref_time_in(timestep_embedding(target_timesteps.to(timesteps.dtype)))
            vec, vec0 = vec + target, vec0 + target
        return vec, vec0

    def concept_stream(
        self,
        concept_txt: Tensor,
        timesteps: Tensor,
        target_timesteps: Tensor | None = None,
        attention: str = "both",
        cross_attention: bool = False,
        values: bool = False,
    ) -> ConceptStream:
        """Concept embeddings in text-feature space (B, r, context_in_dim) -> the initial concept stream, whose
        vector is the text tokens' (time 0, plus the target time for the flow map)."""
        _, vec0 = self.time_vectors(timesteps.to(concept_txt.dtype), target_timesteps)
        return ConceptStream(
            tokens=few_token_linear(self.txt_in, concept_txt),
            vec=vec0,
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
        cond: Tensor | None = None,
        cond_ids: Tensor | None = None,
        target_timesteps: Tensor | None = None,
        concepts: ConceptStream | None = None,
        sites: Sites = NO_SITES,
    ) -> Iterator[LayerOutput]:
        """Run the blocks one layer at a time, yielding after each (numbering: module docstring); stop
        iterating to stop the model early. The concept stream, when given, yields maps in the joint layers."""
        self.check_inputs(img, img_ids, txt, txt_ids, cond, cond_ids)
        timesteps = timesteps.to(img.dtype)  # rounded to the model dtype before the x1000, as the reference
        vec, vec0 = self.time_vectors(timesteps, target_timesteps)
        vec, vec0 = sites("vec", vec), sites("vec0", vec0)
        mode_vec = {"image": vec, "image_cond": vec0, "txt": vec0}
        early = {mode: self.early_stream_modulations[mode](mode_vec[mode]) for mode in MODES}
        joint = {mode: self.single_stream_modulations[mode](mode_vec[mode]) for mode in MODES}

        num_txt, num_img = txt.shape[1], img.shape[1]
        pe = self.pe_embedder(torch.cat([txt_ids, img_ids] + ([] if cond is None else [cond_ids]), dim=1))
        image = slice(num_txt, num_txt + num_img)
        pe_txt, pe_img, pe_cond = pe[:, :, :num_txt], pe[:, :, image], pe[:, :, image.stop :]
        txt = sites("txt_in", self.txt_in(txt))
        img = sites("img_in", self.emb_in["image"](img))
        if cond is not None:
            cond = sites("cond_in", self.emb_in["image_cond"](cond))

        concept_early = concept_joint = None
        if concepts is not None:  # the concepts' own vector gives them the text modulation (spec §3.3)
            concept_early = self.early_stream_modulations["txt"](concepts.vec)
            concept_joint = self.single_stream_modulations["txt"](concepts.vec)
        for index in range(self.config.depth):
            block, scope = self.txt_mode_blocks[index], sites.scoped(f"txt_mode_blocks.{index}")
            txt, _ = block(txt, early["txt"], pe_txt, scope)
            if concepts is not None:
                concepts = concepts.advance(block.concept_forward(concepts, concept_early, scope)[0])
            block, scope = self.content_mode_blocks["image"][index], sites.scoped(f"content_mode_blocks.image.{index}")
            img, _ = block(img, early["image"], pe_img, scope)
            if cond is not None:
                block = self.content_mode_blocks["image_cond"][index]
                scope = sites.scoped(f"content_mode_blocks.image_cond.{index}")
                cond, _ = block(cond, early["image_cond"], pe_cond, scope)
            yield LayerOutput(index, img, vec, None)

        segments = [txt, img] + ([] if cond is None else [cond])
        mods = [joint["txt"], joint["image"]] + ([] if cond is None else [joint["image_cond"]])
        x, mod = torch.cat(segments, dim=1), per_token(mods, [s.shape[1] for s in segments])
        for index, block in enumerate(self.single_blocks):
            scope = sites.scoped(f"single_blocks.{index}")
            x, concept = block(x, mod, pe, scope, concepts, concept_joint, image)
            concepts = concept.stream if concept is not None else None
            yield LayerOutput(self.config.depth + index, x[:, image], vec, concept)

    def concept_pass(
        self,
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        timesteps: Tensor,
        concept_txt: Tensor,
        cond: Tensor | None = None,
        cond_ids: Tensor | None = None,
        target_timesteps: Tensor | None = None,
        attention: str = "both",
        cross_attention: bool = False,
        values: bool = False,
        last_layer: int | None = None,
        sites: Sites = NO_SITES,
    ) -> Iterator[LayerOutput]:
        """`layers` with a fresh concept stream (the call `concept_attention.maps` makes for every generation).
        `last_layer` changes nothing here: the stream rides every joint block, and the caller stops iterating."""
        stream = self.concept_stream(concept_txt, timesteps, target_timesteps, attention, cross_attention, values)
        return self.layers(img, img_ids, txt, txt_ids, timesteps, cond, cond_ids, target_timesteps, stream, sites)

    def velocity(self, last: LayerOutput) -> Tensor:
        """The output of the final layer on the last LayerOutput of `layers`: (B, L, out_channels)."""
        return self.final_layer["image"](last.img, last.vec)

    def check_inputs(self, img, img_ids, txt, txt_ids, cond, cond_ids) -> None:
        if (cond is None) != (cond_ids is None):
            raise ValueError("reference tokens need their ids: pass both cond and cond_ids, or neither")
        n_axes = len(self.config.axes_dim)
        pairs = [("img", img, img_ids), ("txt", txt, txt_ids)] + ([] if cond is None else [("cond", cond, cond_ids)])
        for name, tokens, ids in pairs:
            if tokens.ndim != 3 or ids.ndim != 3 or ids.shape[:2] != tokens.shape[:2] or ids.shape[2] != n_axes:
                raise ValueError(
                    f"{name} must be (B, tokens, channels) with {name}_ids (B, tokens, {n_axes}), got "
                    f"{tuple(tokens.shape)} and {tuple(ids.shape)}"
                )

    def forward(
        self,
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        timesteps: Tensor,
        cond: Tensor | None = None,
        cond_ids: Tensor | None = None,
        target_timesteps: Tensor | None = None,
        sites: Sites = NO_SITES,
    ) -> Tensor:
        """img (B, L, in_channels), img_ids (B, L, 4), txt (B, T, context_in_dim), txt_ids (B, T, 4), timesteps
        (B,) in [0, 1], optional reference tokens cond (B, R, cond_in_channels) with cond_ids (B, R, 4), and for
        the flow map target_timesteps (B,) -> velocity (B, L, out_channels)."""
        for layer in self.layers(img, img_ids, txt, txt_ids, timesteps, cond, cond_ids, target_timesteps, sites=sites):
            pass
        return self.velocity(layer)
