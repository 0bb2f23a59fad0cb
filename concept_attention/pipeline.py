"""ConceptAttention pipelines: maps while generating an image, and maps of a real image.

Both run the model's own forward with a concept stream; maps stream into running means, so memory
does not grow with steps x layers. API names follow the authors' `ConceptAttentionFluxPipeline`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from PIL import Image
from torch import Tensor

from concept_attention.encoding import check_concepts, encode_concepts
from concept_attention.maps import SPACES, MapAccumulator, check_layers, gaussian_blur3x3, run_concept_layers
from concept_attention.pictures import heatmaps
from flux_mini.layers import NO_SITES
from flux_mini.pipeline import FluxPipeline
from flux_mini.sampling import euler_step, latent_size, pack, timestep_vector

CONCEPT_POOLED = ("zero", "clip")


def no_grad_unless_asked(method):
    """Run `method` without autograd unless it is called with `grad=True` (gradient attribution)."""

    @functools.wraps(method)
    def run(*args, **kwargs):
        with torch.set_grad_enabled(kwargs.get("grad", False)):
            return method(*args, **kwargs)

    return run


@dataclass
class ConceptAttentionOutput:
    """Maps are (r, h, w) on the token grid (h = height / 16 for Flux.1); heatmaps are PIL pictures at
    the image size, one per concept, on a shared colour range."""

    image: Image.Image
    concepts: list[str]
    concept_maps: Tensor  # output space: ConceptAttention
    cross_attention_maps: Tensor | None  # the raw cross-attention baseline
    value_maps: Tensor | None  # the value-space ablation
    concept_heatmaps: list[Image.Image]
    cross_attention_heatmaps: list[Image.Image] | None
    layer_maps: dict[str, Tensor] | None = None  # space -> (layers, r, h, w) when per_layer
    vectors: list[dict] | None = None  # raw o_c / o_x per (step, layer) when asked
    cache: dict[int, dict[str, Tensor]] | None = None  # step (or sample) -> site -> value, with `interventions`


class ConceptAttentionPipeline:
    """A FluxPipeline that also returns concept maps. Build it with `from_folder` (same folders as
    FluxPipeline) or around an existing FluxPipeline."""

    def __init__(self, flux: FluxPipeline):
        self.flux = flux

    @classmethod
    def from_folder(cls, path: str | Path, **kwargs) -> ConceptAttentionPipeline:
        return cls(FluxPipeline.from_folder(path, **kwargs))

    # -- the two entry points -------------------------------------------------------------------

    @no_grad_unless_asked
    def generate_image(
        self,
        prompt: str,
        concepts: Sequence[str],
        width: int = 1024,
        height: int = 1024,
        num_inference_steps: int = 4,
        seed: int = 0,
        guidance: float = 0.0,
        layer_indices: Sequence[int] | None = None,
        timesteps: Sequence[int] | None = None,
        softmax: bool = True,
        normalize: str | None = None,
        blur: bool = False,
        attention: str = "both",
        concept_encoding: str = "first_token",
        concept_pooled: str = "zero",
        spaces: Sequence[str] = SPACES,
        per_layer: bool = False,
        return_vectors: bool = False,
        vector_layers: Sequence[int] | None = None,
        vector_steps: Sequence[int] | None = None,
        progress: bool = True,
        interventions=None,
        grad: bool = False,
    ) -> ConceptAttentionOutput:
        """Generate an image for `prompt` and the maps of `concepts` from the same model calls.

        `timesteps` are indices of the denoising steps whose maps are averaged (None = all);
        `layer_indices` None = the last four double blocks (15-18 on Flux.1). With `return_vectors`,
        the raw concept/image attention outputs of `vector_layers` x `vector_steps` (default: the
        averaged ones) are kept on the CPU. `interventions` (`flux_mini.interp.Interventions`) caches or
        patches named sites at every (or its chosen) steps: `out.cache[step][name]`. Autograd is off unless
        `grad=True`."""
        flux, model = self.flux, self.flux.model
        concepts = check_concepts(concepts)
        layers = self._layers(layer_indices)
        steps = self._steps(timesteps, num_inference_steps)
        accumulator = self._accumulator(spaces, softmax, normalize, per_layer, return_vectors, vector_layers, layers)
        txt, txt_ids, y = flux.encode_prompt([prompt])
        concept_txt, concept_y = self._concept_inputs(concepts, concept_encoding, concept_pooled)
        img, ids = flux.prepare_latents(1, height, width, seed)  # (1, L, 4z), (1, L, 3)
        schedule = flux.timesteps(num_inference_steps, img.shape[1])
        guidance_vec = timestep_vector(guidance, img) if model.config.guidance_embed else None
        with flux.on_device(model):
            for step, (t_curr, t_prev) in enumerate(self._progress(list(zip(schedule[:-1], schedule[1:])), progress)):
                t_vec = timestep_vector(t_curr, img)
                accumulator.keep_vectors = return_vectors and (vector_steps is None or step in vector_steps)
                sites = NO_SITES if interventions is None else interventions.sites(step)
                if step in steps:  # the same call gives the velocity and this step's maps
                    pred = run_concept_layers(
                        model, img, ids, txt, txt_ids, t_vec, y, concept_txt, accumulator, layers,
                        guidance=guidance_vec, concept_y=concept_y, attention=attention, need_output=True, step=step,
                        sites=sites,
                    )
                else:
                    pred = model(img, ids, txt, txt_ids, t_vec, y, guidance_vec, sites=sites)
                img = euler_step(img, pred, t_curr, t_prev)
        image = flux.to_pil(flux.decode_tokens(img, height, width))[0]
        return self._output(image, concepts, accumulator, self._token_grid(height, width), blur, interventions)

    @no_grad_unless_asked
    def encode_image(
        self,
        image: Image.Image | Tensor,
        concepts: Sequence[str],
        prompt: str = "",
        noise_timestep: int = 2,
        num_steps: int = 4,
        t: float | None = None,
        num_samples: int = 1,
        seed: int = 0,
        layer_indices: Sequence[int] | None = None,
        softmax: bool = True,
        normalize: str | None = None,
        blur: bool = False,
        attention: str = "both",
        width: int | None = None,
        height: int | None = None,
        concept_encoding: str = "first_token",
        concept_pooled: str = "zero",
        pooled: str = "zero",
        guidance: float = 0.0,
        spaces: Sequence[str] = SPACES,
        per_layer: bool = False,
        return_vectors: bool = False,
        vector_layers: Sequence[int] | None = None,
        progress: bool = False,
        interventions=None,
        grad: bool = False,
    ) -> ConceptAttentionOutput:
        """Maps of a real image: encode it, noise it to time t, one pass per noise sample (seed + i),
        stopping after the last requested layer; the maps are averaged over the samples.

        `t` defaults to the model's own schedule at index `noise_timestep` (unshifted for schnell:
        index 2 of 4 steps is t = 0.5). The pooled vector of the image/text streams is zero by default
        (`pooled="zero"`, the authors' protocol) or CLIP(prompt) (`pooled="clip"`). `width`/`height`
        (multiples of 16) resize the image; by default the image keeps its size. `interventions`
        (`flux_mini.interp.Interventions`) caches or patches named sites per noise sample (its steps are the
        sample numbers): `out.cache[sample][name]`; the passes stop after the last map layer. Autograd is
        off unless `grad=True`."""
        flux, model = self.flux, self.flux.model
        concepts = check_concepts(concepts)
        if pooled not in CONCEPT_POOLED:
            raise ValueError(f"pooled must be one of {CONCEPT_POOLED}, got {pooled!r}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        layers = self._layers(layer_indices)
        accumulator = self._accumulator(spaces, softmax, normalize, per_layer, return_vectors, vector_layers, layers)
        accumulator.keep_vectors = return_vectors
        picture, pixels = self._image_tensor(image, width, height)
        with flux.on_device(flux.autoencoder):
            clean = pack(flux.autoencoder.encode(pixels.to(flux.device)).to(flux.dtype))  # (1, L, 4z)
        height, width = pixels.shape[-2:]
        txt, txt_ids, y = flux.encode_prompt([prompt])
        if pooled == "zero":
            y = torch.zeros_like(y)
        concept_txt, concept_y = self._concept_inputs(concepts, concept_encoding, concept_pooled)
        if t is None:
            schedule = flux.timesteps(num_steps, clean.shape[1])
            if not 0 <= noise_timestep < len(schedule):
                raise ValueError(f"noise_timestep must index the {num_steps}-step schedule 0..{num_steps}, got {noise_timestep}")
            t = schedule[noise_timestep]
        with flux.on_device(model):
            for sample in self._progress(range(num_samples), progress):
                noise, ids = flux.prepare_latents(1, height, width, seed + sample)
                noisy = t * noise + (1.0 - t) * clean
                t_vec = timestep_vector(t, noisy)
                guidance_vec = timestep_vector(guidance, noisy) if model.config.guidance_embed else None
                run_concept_layers(
                    model, noisy, ids, txt, txt_ids, t_vec, y, concept_txt, accumulator, layers,
                    guidance=guidance_vec, concept_y=concept_y, attention=attention, step=sample,
                    sites=NO_SITES if interventions is None else interventions.sites(sample),
                )
        return self._output(picture, concepts, accumulator, self._token_grid(height, width), blur, interventions)

    # -- pieces ---------------------------------------------------------------------------------

    def _layers(self, layer_indices: Sequence[int] | None) -> list[int]:
        depth = self.flux.model.config.depth
        return check_layers(self.flux.model, range(max(0, depth - 4), depth) if layer_indices is None else layer_indices)

    @staticmethod
    def _steps(timesteps: Sequence[int] | None, num_steps: int) -> set[int]:
        if timesteps is None:
            return set(range(num_steps))
        bad = [s for s in timesteps if not 0 <= s < num_steps]
        if bad or not timesteps:
            raise ValueError(f"timesteps must be step indices in 0..{num_steps - 1}, got {list(timesteps)}")
        return set(timesteps)

    @staticmethod
    def _accumulator(spaces, softmax, normalize, per_layer, return_vectors, vector_layers, layers) -> MapAccumulator:
        return MapAccumulator(
            spaces=tuple(spaces),
            softmax=softmax,
            normalize=normalize,
            per_layer=per_layer,
            vector_layers=frozenset(layers if vector_layers is None else vector_layers) if return_vectors else frozenset(),
        )

    def _concept_inputs(self, concepts: list[str], encoding: str, pooled: str) -> tuple[Tensor, Tensor | None]:
        """(1, r, context_in_dim) concept embeddings and the concept pooled input (None = zeros)."""
        if pooled not in CONCEPT_POOLED:
            raise ValueError(f"concept_pooled must be one of {CONCEPT_POOLED}, got {pooled!r}")
        flux = self.flux
        with flux.on_device(flux.t5, flux.clip):
            concept_txt = encode_concepts(flux.t5, concepts, encoding)[None].to(flux.device, flux.dtype)
            concept_y = flux.clip([" ".join(concepts)]).to(flux.device, flux.dtype) if pooled == "clip" else None
        return concept_txt, concept_y

    def _token_grid(self, height: int, width: int) -> tuple[int, int]:
        h, w = latent_size(height, width, self.flux.autoencoder.downsample_factor)
        return h // 2, w // 2

    def _image_tensor(self, image: Image.Image | Tensor, width: int | None, height: int | None) -> tuple[Image.Image, Tensor]:
        """A PIL image or a (3, H, W) tensor in [-1, 1] -> (the picture, (1, 3, H, W) in [-1, 1])."""
        if isinstance(image, Tensor):
            if image.ndim != 3 or image.shape[0] != 3:
                raise ValueError(f"an image tensor must be (3, H, W) in [-1, 1], got {tuple(image.shape)}")
            image = Image.fromarray(((image.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy())
        image = image.convert("RGB")
        size = (width or image.width, height or image.height)
        multiple = 2 * self.flux.autoencoder.downsample_factor
        if size[0] % multiple or size[1] % multiple:
            raise ValueError(
                f"image size {size[0]}x{size[1]} is not a multiple of {multiple}: pass width= and height= "
                f"(multiples of {multiple}) to resize it"
            )
        if size != image.size:
            image = image.resize(size, Image.BICUBIC)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
        return image, pixels

    @staticmethod
    def _progress(items, enabled: bool):
        if not enabled:
            return items
        from tqdm.auto import tqdm

        return tqdm(items, desc="concept attention")

    @staticmethod
    def _output(
        image: Image.Image, concepts, accumulator: MapAccumulator, grid_hw, blur: bool, interventions
    ) -> ConceptAttentionOutput:
        if interventions is not None:
            interventions.check_visited("this pipeline call")
        h, w = grid_hw

        def grid(maps: Tensor) -> Tensor:  # (..., 1, r, N) -> (..., r, h, w)
            maps = rearrange(maps, "... 1 r (h w) -> ... r h w", h=h, w=w)
            return gaussian_blur3x3(maps) if blur else maps

        means = {space: grid(maps) for space, maps in accumulator.mean().items()}
        layer_maps = {s: grid(m) for s, m in accumulator.layer_means().items()} if accumulator.per_layer else None
        concept_maps = means.get("output")
        cross = means.get("cross_attention")
        return ConceptAttentionOutput(
            image=image,
            concepts=list(concepts),
            concept_maps=concept_maps,
            cross_attention_maps=cross,
            value_maps=means.get("value"),
            concept_heatmaps=heatmaps(concept_maps, image.size) if concept_maps is not None else [],
            cross_attention_heatmaps=heatmaps(cross, image.size) if cross is not None else None,
            layer_maps=layer_maps,
            vectors=accumulator.vectors if accumulator.vectors else None,
            cache=interventions.cache if interventions is not None else None,
        )


ConceptAttentionFluxPipeline = ConceptAttentionPipeline  # the name users of the authors' code know
