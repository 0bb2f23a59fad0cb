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

from concept_attention.encoding import (
    authors_concept_position,
    check_concept_tokens,
    check_concepts,
    encode_concepts,
    encode_concepts_flux2,
)
from concept_attention.images import to_rgb
from concept_attention.maps import SPACES, MapAccumulator, check_layers, gaussian_blur3x3, run_concept_layers
from concept_attention.pictures import heatmaps
from flux_mini.flux2 import concept_position_ids
from flux_mini.flux2_pipeline import Flux2Pipeline, is_flux2_folder
from flux_mini.layers import NO_SITES
from flux_mini.pipeline import FluxPipeline, check_finite, prompt_list
from flux_mini.sampling import (
    check_seed,
    euler_step,
    flux2_latent_size,
    flux2_pack,
    latent_size,
    pack,
    timestep_vector,
)

CONCEPT_POOLED = ("zero", "clip")
CONCEPT_POSITIONS = ("zero", "authors")  # FLUX.2 concept RoPE ids: (0, 0, 0, 0), or the authors' (0, 0, 0, 510)


def no_grad_unless_asked(method):
    """Run `method` without autograd unless it is called with `grad=True` (gradient attribution)."""

    @functools.wraps(method)
    def run(*args, **kwargs):
        with torch.set_grad_enabled(kwargs.get("grad", False)):
            return method(*args, **kwargs)

    return run


@dataclass
class ConceptAttentionOutput:
    """Maps are (r, h, w) on the token grid (h = height / 16 for Flux.1 and FLUX.2); heatmaps are PIL pictures at
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
    """A FluxPipeline or Flux2Pipeline that also returns concept maps. Build it with `from_folder` (the
    generation is read from the folder) or around an existing pipeline.

    FLUX.2 differs in what it has: no pooled vector (`pooled`, `concept_pooled` stay "zero"), concept
    encodings "first_token" / "mean" / "authors" through the chat LLM, concept RoPE ids "zero" or "authors"
    (`concept_positions`), real CFG for Base checkpoints (maps from the conditional pass), and by default
    maps from every layer: FLUX.2 has few double blocks (5 of 25 in klein 4B) and deeper layers segment
    better, so the single blocks count too."""

    def __init__(self, flux: FluxPipeline | Flux2Pipeline):
        self.flux = flux
        self.is_flux2 = isinstance(flux, Flux2Pipeline)

    @classmethod
    def from_folder(cls, path: str | Path, **kwargs) -> ConceptAttentionPipeline:
        pipeline = Flux2Pipeline if is_flux2_folder(path) else FluxPipeline
        return cls(pipeline.from_folder(path, **kwargs))

    # -- the two entry points -------------------------------------------------------------------

    @no_grad_unless_asked
    def generate_image(
        self,
        prompt: str | list[str],
        concepts: Sequence[str],
        width: int | None = None,
        height: int | None = None,
        num_inference_steps: int | None = None,
        seed: int | torch.Generator = 0,
        guidance: float | None = None,
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
        concept_positions: str = "zero",
        interventions=None,
        grad: bool = False,
    ) -> ConceptAttentionOutput | list[ConceptAttentionOutput]:
        """Generate an image for `prompt` and the maps of `concepts` from the same model calls.

        Unset width, height, steps and guidance come from the model folder, as in FluxPipeline (FLUX.1
        [schnell]: 1024x1024, 4 steps; [dev]: 50 steps, guidance 3.5; the demo model: its own). A list of
        prompts gives a list of outputs, prompt i with seed + i (or the next draws of a Generator).
        `timesteps` are indices of the denoising steps whose maps are averaged (None = all);
        `layer_indices` None = the last four double blocks (15-18 on Flux.1), every layer on FLUX.2. With
        `return_vectors`, the raw concept/image attention outputs of `vector_layers` x `vector_steps`
        (default: the averaged ones) are kept on the CPU. FLUX.2 Base checkpoints use real CFG: the maps come
        from the conditional pass; interventions' patches reach both passes and the cache holds the conditional
        one's values (as in `denoise_flux2`). `interventions`
        (`flux_mini.interp.Interventions`) caches or patches named sites at every (or its chosen) steps:
        `out.cache[step][name]`. Autograd is off unless `grad=True`."""
        options = {k: v for k, v in locals().items() if k not in ("self", "prompt", "seed")}  # the parameters
        if not isinstance(prompt, str):
            prompts = prompt_list(prompt)
            check_seed(seed, len(prompts))
            offsets = [seed if isinstance(seed, torch.Generator) else seed + i for i in range(len(prompts))]
            return [self.generate_image(p, seed=s, **options) for p, s in zip(prompts, offsets)]
        flux, model = self.flux, self.flux.model
        concepts = check_concepts(concepts)
        width, height, num_inference_steps, guidance = flux.settings(width, height, num_inference_steps, guidance)
        check_seed(seed)
        layers = self._layers(layer_indices)
        steps = self._steps(timesteps, num_inference_steps)
        accumulator = self._accumulator(spaces, softmax, normalize, per_layer, return_vectors, vector_layers, layers)
        self._check_memory(height, width, len(concepts))
        txt, txt_ids, y = self._encode_prompt(prompt)
        concept_txt, concept_y, concept_ids = self._concept_inputs(
            concepts, concept_encoding, concept_pooled, softmax, concept_positions
        )
        img, ids = flux.prepare_latents(1, height, width, seed)  # (1, L, channels), (1, L, 3 or 4 axes)
        schedule = flux.timesteps(num_inference_steps, img.shape[1])
        guidance_vec, cfg_scale = self._guidance(guidance, img)
        negative = self._encode_prompt("")[0] if cfg_scale is not None else None  # FLUX.2 Base: real CFG
        with flux.on_device(model):
            for step, (t_curr, t_prev) in enumerate(self._progress(list(zip(schedule[:-1], schedule[1:])), progress)):
                t_vec = timestep_vector(t_curr, img)
                accumulator.keep_vectors = return_vectors and (vector_steps is None or step in vector_steps)
                sites = NO_SITES if interventions is None else interventions.sites(step)
                if negative is not None:  # first, so that the cache keeps the prompt's call (as denoise_flux2)
                    pred_negative = self._velocity(img, ids, negative, txt_ids, t_vec, y, guidance_vec, sites)
                if step in steps:  # the same call gives the velocity and this step's maps
                    pred = run_concept_layers(
                        model, img, ids, txt, txt_ids, t_vec, y, concept_txt, accumulator, layers,
                        guidance=guidance_vec, concept_y=concept_y, attention=attention, need_output=True, step=step,
                        concept_ids=concept_ids, sites=sites,
                    )
                else:
                    pred = self._velocity(img, ids, txt, txt_ids, t_vec, y, guidance_vec, sites)
                if negative is not None:
                    pred = pred_negative + cfg_scale * (pred - pred_negative)
                img = euler_step(img, pred, t_curr, t_prev)
        check_finite(img, "latents")
        image = flux.to_pil(check_finite(flux.decode_tokens(img, height, width), "decoded images"))[0]
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
        seed: int | torch.Generator = 0,
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
        guidance: float | None = None,
        spaces: Sequence[str] = SPACES,
        per_layer: bool = False,
        return_vectors: bool = False,
        vector_layers: Sequence[int] | None = None,
        progress: bool = False,
        concept_positions: str = "zero",
        interventions=None,
        grad: bool = False,
    ) -> ConceptAttentionOutput:
        """Maps of a real image: encode it, noise it to time t, one pass per noise sample (seed + i),
        stopping after the last requested layer; the maps are averaged over the samples.

        `t` defaults to the model's own schedule at index `noise_timestep` (unshifted for schnell:
        index 2 of 4 steps is t = 0.5). The pooled vector of the image/text streams is zero by default
        (`pooled="zero"`, the authors' protocol) or CLIP(prompt) (`pooled="clip"`). The image is resized
        to `width` x `height` (multiples of 16), by default the model folder's size (1024x1024 for FLUX.1,
        as the authors' encode_image; the demo model's 32x32); pass image.width and image.height to keep
        its own size. PIL images are taken the right way up (EXIF), 16-bit and float ones by value range.
        `guidance` (dev family only) defaults to the folder's. `interventions` (`flux_mini.interp.Interventions`)
        caches or patches named sites per noise sample (its steps are the sample numbers):
        `out.cache[sample][name]`; the passes stop after the last map layer. Autograd is off unless `grad=True`."""
        flux, model = self.flux, self.flux.model
        concepts = check_concepts(concepts)
        if pooled not in CONCEPT_POOLED:
            raise ValueError(f"pooled must be one of {CONCEPT_POOLED}, got {pooled!r}")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
        if t is not None and not (isinstance(t, (int, float)) and 0 <= t <= 1):  # NaN fails both comparisons
            raise ValueError(f"t must be a noise time in [0, 1] (0 = the clean image, 1 = pure noise), got {t!r}")
        check_seed(seed, num_samples)
        width, height, _, guidance = flux.settings(width, height, None, guidance)
        layers = self._layers(layer_indices)
        accumulator = self._accumulator(spaces, softmax, normalize, per_layer, return_vectors, vector_layers, layers)
        accumulator.keep_vectors = return_vectors
        self._check_memory(height, width, len(concepts))
        if self.is_flux2 and pooled != "zero":
            raise ValueError(f"pooled={pooled!r}: FLUX.2 has no pooled text vector; leave pooled='zero'")
        picture, pixels = self._image_tensor(image, width, height)
        pack_tokens = flux2_pack if self.is_flux2 else pack
        with flux.on_device(flux.autoencoder):
            clean = pack_tokens(flux.autoencoder.encode(pixels.to(flux.device)).to(flux.dtype))  # (1, L, channels)
        height, width = pixels.shape[-2:]
        txt, txt_ids, y = self._encode_prompt(prompt)
        if pooled == "zero" and y is not None:
            y = torch.zeros_like(y)
        concept_txt, concept_y, concept_ids = self._concept_inputs(
            concepts, concept_encoding, concept_pooled, softmax, concept_positions
        )
        if t is None:
            schedule = flux.timesteps(num_steps, clean.shape[1])
            if not 0 <= noise_timestep < len(schedule):
                raise ValueError(f"noise_timestep must index the {num_steps}-step schedule 0..{num_steps}, got {noise_timestep}")
            t = schedule[noise_timestep]
        with flux.on_device(model):
            for sample in self._progress(range(num_samples), progress):
                sample_seed = seed if isinstance(seed, torch.Generator) else seed + sample
                noise, ids = flux.prepare_latents(1, height, width, sample_seed)
                noisy = t * noise + (1.0 - t) * clean
                t_vec = timestep_vector(t, noisy)
                guidance_vec, _ = self._guidance(guidance, noisy)  # one conditional pass, no CFG
                run_concept_layers(
                    model, noisy, ids, txt, txt_ids, t_vec, y, concept_txt, accumulator, layers,
                    guidance=guidance_vec, concept_y=concept_y, attention=attention, step=sample,
                    concept_ids=concept_ids,
                    sites=NO_SITES if interventions is None else interventions.sites(sample),
                )
        return self._output(picture, concepts, accumulator, self._token_grid(height, width), blur, interventions)

    # -- pieces ---------------------------------------------------------------------------------

    def _layers(self, layer_indices: Sequence[int] | None) -> list[int]:
        if self.is_flux2 or layer_indices is not None:
            return check_layers(self.flux.model, layer_indices)  # None on FLUX.2: config.concept_layers, all
        depth = self.flux.model.config.depth
        return check_layers(self.flux.model, range(max(0, depth - 4), depth))

    def _check_memory(self, height: int, width: int, num_concepts: int) -> None:
        self.flux.check_memory(height, width, 1, num_concepts)

    def _encode_prompt(self, prompt: str) -> tuple[Tensor, Tensor, Tensor | None]:
        """(txt, txt_ids, y); FLUX.2 has no pooled vector y (None)."""
        if self.is_flux2:
            return (*self.flux.encode_prompt([prompt]), None)
        return self.flux.encode_prompt([prompt])

    def _guidance(self, guidance: float | None, like: Tensor) -> tuple[Tensor | None, float | None]:
        """(the embedded guidance vector, the CFG scale) for a `settings`-checked guidance value."""
        if self.is_flux2 and self.flux.defaults.cfg:
            return None, guidance
        return (None if guidance is None else timestep_vector(guidance, like)), None

    def _velocity(self, img, img_ids, txt, txt_ids, t_vec, y, guidance_vec, sites=NO_SITES) -> Tensor:
        """A plain model call (Flux.1 takes the pooled y, FLUX.2 has none)."""
        pooled = {} if y is None else {"y": y}
        return self.flux.model(
            img=img, img_ids=img_ids, txt=txt, txt_ids=txt_ids, timesteps=t_vec, guidance=guidance_vec, sites=sites,
            **pooled,
        )

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

    def _concept_inputs(
        self, concepts: list[str], encoding: str, pooled: str, softmax: bool, positions: str = "zero"
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """(1, r, context_in_dim) concept embeddings, the concept pooled input (Flux.1; None = zeros) and the
        concept RoPE ids (FLUX.2; None = zeros)."""
        if pooled not in CONCEPT_POOLED:
            raise ValueError(f"concept_pooled must be one of {CONCEPT_POOLED}, got {pooled!r}")
        if positions not in CONCEPT_POSITIONS:
            raise ValueError(f"concept_positions must be one of {CONCEPT_POSITIONS}, got {positions!r}")
        flux = self.flux
        if self.is_flux2:
            if pooled != "zero":
                raise ValueError(f"concept_pooled={pooled!r}: FLUX.2 has no pooled vector; leave it 'zero'")
            encoder = flux.text_encoder
            check_concept_tokens(encoder, concepts, softmax)
            with flux.on_device(encoder):
                concept_txt = encode_concepts_flux2(encoder, concepts, encoding)[None].to(flux.device, flux.dtype)
            position = authors_concept_position(encoder.max_length) if positions == "authors" else 0
            return concept_txt, None, concept_position_ids(1, len(concepts), position, device=flux.device)
        if positions != "zero":
            raise ValueError("concept_positions='authors' is a FLUX.2 convention; Flux.1 concepts have no positions")
        check_concept_tokens(flux.t5, concepts, softmax)
        with flux.on_device(flux.t5, flux.clip):
            concept_txt = encode_concepts(flux.t5, concepts, encoding)[None].to(flux.device, flux.dtype)
            concept_y = flux.clip([" ".join(concepts)]).to(flux.device, flux.dtype) if pooled == "clip" else None
        return concept_txt, concept_y, None

    def _token_grid(self, height: int, width: int) -> tuple[int, int]:
        if self.is_flux2:  # the FLUX.2 AE patchifies itself: its latent grid is the token grid
            return flux2_latent_size(height, width, self.flux.autoencoder.downsample_factor)
        h, w = latent_size(height, width, self.flux.autoencoder.downsample_factor)
        return h // 2, w // 2

    def _image_tensor(self, image: Image.Image | Tensor, width: int, height: int) -> tuple[Image.Image, Tensor]:
        """A PIL image or a (3, H, W) tensor in [-1, 1] -> (the picture, (1, 3, height, width) in [-1, 1])."""
        if isinstance(image, Tensor):
            if image.ndim != 3 or image.shape[0] != 3:
                raise ValueError(f"an image tensor must be (3, H, W) in [-1, 1], got {tuple(image.shape)}")
            check_finite(image, "image tensor's pixels")
            image = Image.fromarray(((image.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy())
        if not isinstance(image, Image.Image):
            raise ValueError(f"image must be a PIL image or a (3, H, W) tensor, got {type(image).__name__}")
        image = to_rgb(image)
        size = (width, height)
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

        means = {space: check_finite(grid(maps), f"{space} maps") for space, maps in accumulator.mean().items()}
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
