"""From per-layer concept results to saliency maps: scores, normalisation, streaming aggregation.

A map is a (B, r, N) tensor: for each image token, one value per concept. Per layer and per timestep
the scores become a distribution over concepts (softmax), then a running mean over the chosen layers
and timesteps keeps memory at O(r x N) however many steps and layers are read.

Works for every generation through the interface they share: `model.concept_pass(img, img_ids, txt,
txt_ids, timesteps, concept_txt, ..., attention=, cross_attention=, values=, last_layer=)` (their `layers`
with a fresh concept stream), `model.velocity(last_layer_output)`, `config.concept_layers` (the default
layers) and `config.map_layers` (the layers that can give maps). Inputs only some generations have
(Flux.1's `y`, `guidance`, `concept_y`; FLUX.2's `guidance`, `concept_ids`; FLUX.3's `cond`, `cond_ids`,
`target_timesteps`) are passed on by name when given.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from flux_mini.layers import NO_SITES, LayerOutput, Sites

SPACES = ("output", "cross_attention", "value")
NORMALIZATIONS = (None, "linear")


def linear_normalize(x: Tensor, dim: int) -> Tensor:
    """Shift to a minimum of 0 along `dim`, then divide by the sum along `dim` (a zero sum counts as 1)."""
    shifted = x - x.amin(dim=dim, keepdim=True)
    total = shifted.sum(dim=dim, keepdim=True)
    return shifted / torch.where(total == 0, torch.ones_like(total), total)


def dot_scores(concept_vectors: Tensor, image_vectors: Tensor, normalize: str | None) -> Tensor:
    """(B, r, D) . (B, N, D) -> (B, r, N) in float32 at least, whatever the model's dtype: in float16 the
    products overflow 65504 and the softmax returns NaN. `linear` normalises each feature over the concepts first."""
    precise = torch.promote_types(concept_vectors.dtype, torch.float32)
    concept_vectors, image_vectors = concept_vectors.to(precise), image_vectors.to(precise)
    if normalize == "linear":
        concept_vectors = linear_normalize(concept_vectors, dim=1)
    return torch.einsum("brd,bnd->brn", concept_vectors, image_vectors)


def layer_maps(layer: LayerOutput, space: str, softmax: bool, normalize: str | None) -> Tensor:
    """One layer's map in `space`, (B, r, N): softmax over concepts (per head for cross-attention,
    then the mean over heads)."""
    concepts = layer.concepts
    if space == "cross_attention":
        scores = concepts.cross_attention  # (B, H, r, N)
        return (scores.softmax(dim=2) if softmax else scores).mean(dim=1)
    if space == "output":
        scores = dot_scores(concepts.concept_out, concepts.image_out, normalize)
    else:
        scores = dot_scores(concepts.concept_values, concepts.image_values, normalize)
    return scores.softmax(dim=1) if softmax else scores


@dataclass
class MapAccumulator:
    """Running means of concept maps over the layers and timesteps fed to it.

    Memory is O(spaces x B x r x N), plus O(layers x ...) when `per_layer` is on. Raw vectors are kept
    only for the layers in `vector_layers`, and only while `keep_vectors` is switched on by the caller
    (e.g. for chosen timesteps)."""

    spaces: tuple[str, ...] = ("output",)
    softmax: bool = True
    normalize: str | None = None
    per_layer: bool = False
    vector_layers: frozenset[int] = frozenset()
    keep_vectors: bool = False
    count: int = 0
    sums: dict[str, Tensor] = field(default_factory=dict)
    layer_sums: dict[str, dict[int, Tensor]] = field(default_factory=dict)
    layer_counts: dict[int, int] = field(default_factory=dict)
    vectors: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        unknown = [s for s in self.spaces if s not in SPACES]
        if unknown or not self.spaces:
            raise ValueError(f"spaces must be a non-empty subset of {SPACES}, got {list(self.spaces)}")
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {self.normalize!r}")

    def add(self, layer: LayerOutput, step: int | None = None) -> None:
        """Feed one layer's concept results (its maps in every space, its vectors when they are kept)."""
        maps = {space: layer_maps(layer, space, self.softmax, self.normalize) for space in self.spaces}
        vectors = (layer.concepts.concept_out, layer.concepts.image_out) if self.keeps_vectors(layer.index) else None
        self.add_maps(layer.index, maps, step, vectors)

    def keeps_vectors(self, index: int) -> bool:
        return self.keep_vectors and index in self.vector_layers

    def add_maps(
        self, index: int, maps: dict[str, Tensor], step: int | None = None, vectors: tuple[Tensor, Tensor] | None = None
    ) -> None:
        """Feed one layer's maps (space -> (B, r, N)) and, when kept, its (concept_out, image_out) vectors."""
        for space in self.spaces:
            layer_map = maps[space].to(torch.promote_types(maps[space].dtype, torch.float32))  # bf16 maps sum in fp32
            self.sums[space] = self.sums[space] + layer_map if space in self.sums else layer_map
            if self.per_layer:
                sums = self.layer_sums.setdefault(space, {})
                sums[index] = sums[index] + layer_map if index in sums else layer_map
        self.count += 1
        self.layer_counts[index] = self.layer_counts.get(index, 0) + 1
        if vectors is not None:
            concept_out, image_out = vectors
            self.vectors.append(
                {"layer": index, "step": step, "concept_out": concept_out.detach().cpu(),
                 "image_out": image_out.detach().cpu()}
            )  # fmt: skip

    def mean(self) -> dict[str, Tensor]:
        """space -> (B, r, N) mean over everything added."""
        if not self.count:
            raise RuntimeError("no concept layer was accumulated: check the requested layers and timesteps")
        return {space: total / self.count for space, total in self.sums.items()}

    def layer_means(self) -> dict[str, Tensor]:
        """space -> (layers, B, r, N), layers in increasing order."""
        order = sorted(self.layer_counts)
        return {
            space: torch.stack([sums[i] / self.layer_counts[i] for i in order]) for space, sums in self.layer_sums.items()
        }


def given(**inputs) -> dict:
    """The generation-specific inputs that were given (not None), to pass on by name."""
    return {name: value for name, value in inputs.items() if value is not None}


def check_layers(model: nn.Module, layers: Iterable[int] | None) -> list[int]:
    """Validate layer numbers against `config.map_layers` (Flux.1, FLUX.2: double blocks 0..depth-1, single
    blocks after; FLUX.3: the joint blocks); None = the model's default, `config.concept_layers` (Flux.1: the
    double blocks; FLUX.2: every layer; FLUX.3: every joint block)."""
    config = model.config
    chosen = list(config.concept_layers) if layers is None else sorted(set(int(i) for i in layers))
    if not chosen:
        raise ValueError("no layers requested: pass layer numbers, or None for the model's default layers")
    valid = config.map_layers
    bad = [i for i in chosen if i not in valid]
    if bad:
        raise ValueError(
            f"layers {bad} do not exist or give no concept maps: this {type(model).__name__} maps layers "
            f"{valid.start}..{valid.stop - 1} (see `layers` in its module for the numbering)"
        )
    return chosen


def concept_pass_maps(
    model: nn.Module,
    img: Tensor,
    img_ids: Tensor,
    txt: Tensor,
    txt_ids: Tensor,
    timesteps: Tensor,
    y: Tensor | None,
    concept_txt: Tensor,
    layers: list[int],
    spaces: tuple[str, ...] = ("output",),
    softmax: bool = True,
    normalize: str | None = None,
    vector_layers: frozenset[int] = frozenset(),
    guidance: Tensor | None = None,
    concept_y: Tensor | None = None,
    attention: str = "both",
    need_output: bool = False,
    concept_ids: Tensor | None = None,
    sites: Sites = NO_SITES,
    **conditioning: Tensor | None,
) -> tuple[Tensor | None, dict[int, dict[str, Tensor]], dict[int, tuple[Tensor, Tensor]]]:
    """One model pass with the concept stream -> (the velocity with `need_output`, else None; layer -> space ->
    maps (B, r, N) for each of `layers`; layer -> (concept_out, image_out) for `vector_layers`).

    It changes no state and reads no tensor value on the host, so `torch.compile(concept_pass_maps,
    fullgraph=True)` captures the whole pass as one graph (the pipelines' `compile=` switch does). Inputs as
    in `run_concept_layers`, which feeds the results to a `MapAccumulator`."""
    wanted, last = set(layers), max(layers)
    passes = model.concept_pass(
        img, img_ids, txt, txt_ids, timesteps, concept_txt,
        **given(y=y, guidance=guidance, concept_y=concept_y, concept_ids=concept_ids, **conditioning),
        attention=attention, cross_attention="cross_attention" in spaces, values="value" in spaces,
        last_layer=None if need_output else last, sites=sites,
    )  # fmt: skip
    maps, vectors = {}, {}
    for layer in passes:
        if layer.index in wanted:
            maps[layer.index] = {space: layer_maps(layer, space, softmax, normalize) for space in spaces}
            if layer.index in vector_layers:
                vectors[layer.index] = (layer.concepts.concept_out, layer.concepts.image_out)
        if not need_output and layer.index >= last:
            return None, maps, vectors
    return model.velocity(layer), maps, vectors


def run_concept_layers(
    model: nn.Module,
    img: Tensor,
    img_ids: Tensor,
    txt: Tensor,
    txt_ids: Tensor,
    timesteps: Tensor,
    y: Tensor | None,
    concept_txt: Tensor,
    accumulator: MapAccumulator,
    layers: list[int],
    guidance: Tensor | None = None,
    concept_y: Tensor | None = None,
    attention: str = "both",
    need_output: bool = False,
    step: int | None = None,
    concept_ids: Tensor | None = None,
    sites: Sites = NO_SITES,
    maps_pass: Callable = concept_pass_maps,
    **conditioning: Tensor | None,
) -> Tensor | None:
    """One model pass with the concept stream, feeding the requested layers to `accumulator`.

    `y`, `concept_y`: Flux.1's pooled inputs (None otherwise); `guidance`: Flux.1 dev and FLUX.2 dev;
    `concept_ids`: FLUX.2's concept RoPE ids; `conditioning`: any other generation's inputs by name (FLUX.3:
    `cond`, `cond_ids`, `target_timesteps`). Without `need_output` the pass stops after the last requested
    layer (maps cost no more than the blocks they read); with it, it runs to the end and returns the velocity
    (B, L, out_channels). `sites` caches or patches named values on the way (`flux_mini.interp`). `maps_pass`
    is `concept_pass_maps` or a compiled copy of it (the pipelines' `compile=`)."""
    vector_layers = accumulator.vector_layers if accumulator.keep_vectors else frozenset()
    velocity, maps, vectors = maps_pass(
        model, img, img_ids, txt, txt_ids, timesteps, y, concept_txt, layers, accumulator.spaces,
        accumulator.softmax, accumulator.normalize, vector_layers, guidance=guidance, concept_y=concept_y,
        attention=attention, need_output=need_output, concept_ids=concept_ids, sites=sites, **conditioning,
    )  # fmt: skip
    for index, by_space in maps.items():
        accumulator.add_maps(index, by_space, step, vectors.get(index))
    return velocity


def compute_concept_maps(
    model: nn.Module,
    img: Tensor,
    img_ids: Tensor,
    txt: Tensor,
    txt_ids: Tensor,
    timesteps: Tensor,
    y: Tensor | None = None,
    concept_txt: Tensor | None = None,
    guidance: Tensor | None = None,
    concept_y: Tensor | None = None,
    layers: Iterable[int] | None = None,
    space: str = "output",
    softmax: bool = True,
    attention: str = "both",
    concept_ids: Tensor | None = None,
    sites: Sites = NO_SITES,
    **conditioning: Tensor | None,
) -> Tensor:
    """Concept maps (B, r, N) for one model call: the mean over `layers` of each layer's map.

    `timesteps` is the diffusion time as in the model's forward; `concept_txt` the concept embeddings in
    the text-feature space (B, r, context_in_dim). Flux.1: `y` the pooled vector, `concept_y` the concept
    stream's pooled input (zeros when None). FLUX.2: no `y`; `concept_ids` (B, r, 4) the concepts' RoPE
    ids (zeros when None). FLUX.3: no `y`; `cond`, `cond_ids` (reference tokens) and `target_timesteps`
    (the flow map) as in its forward. `layers` None = `model.config.concept_layers`. Differentiable: wrap it in
    `torch.no_grad()` unless gradients are wanted (attribution). `sites` caches or patches named values
    (`flux_mini.interp`)."""
    check_concept_txt(model, concept_txt, img.shape[0])
    accumulator = MapAccumulator(spaces=(space,), softmax=softmax)
    run_concept_layers(
        model, img, img_ids, txt, txt_ids, timesteps, y, concept_txt, accumulator, check_layers(model, layers),
        guidance=guidance, concept_y=concept_y, attention=attention, concept_ids=concept_ids, sites=sites,
        **conditioning,
    )
    return accumulator.mean()[space]


def check_concept_txt(model: nn.Module, concept_txt: Tensor | None, batch: int) -> None:
    expected = (batch, "r >= 1", model.config.context_in_dim)
    if concept_txt is None:
        raise ValueError(f"pass concept_txt, the concept embeddings {expected}")
    if concept_txt.ndim != 3 or concept_txt.shape[0] != batch or concept_txt.shape[2] != model.config.context_in_dim:
        raise ValueError(f"concept_txt must be (B, r, context_in_dim) = {expected}, got {tuple(concept_txt.shape)}")
    if concept_txt.shape[1] == 0:
        raise ValueError("concept_txt holds no concepts: pass at least one concept")


def gaussian_blur3x3(maps: Tensor, sigma: float = 1.0) -> Tensor:
    """3x3 Gaussian blur of (..., h, w) maps with reflected borders (the authors' segmentation trick)."""
    offsets = torch.tensor([-1.0, 0.0, 1.0], dtype=maps.dtype, device=maps.device)
    kernel1d = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel1d = kernel1d / kernel1d.sum()
    kernel = (kernel1d[:, None] * kernel1d[None, :])[None, None]
    lead = maps.shape[:-2]
    flat = rearrange(maps, "... h w -> (...) 1 h w")
    pad = "reflect" if min(maps.shape[-2:]) > 1 else "replicate"
    blurred = F.conv2d(F.pad(flat, (1, 1, 1, 1), mode=pad), kernel)
    return blurred.reshape(*lead, *maps.shape[-2:])
