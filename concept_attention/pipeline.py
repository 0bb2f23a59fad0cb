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

from concept_attention.encoding import check_concepts
from concept_attention.images import to_rgb
from concept_attention.maps import (
    SPACES,
    MapAccumulator,
    check_layers,
    concept_pass_maps,
    gaussian_blur3x3,
    run_concept_layers,
)
from concept_attention.pictures import heatmaps
from flux_mini.flux2_pipeline import Flux2Pipeline, is_flux2_folder
from flux_mini.flux3_pipeline import Flux3Pipeline, is_flux3_folder
from flux_mini.layers import NO_SITES
from flux_mini.pipeline import FluxPipeline, check_finite, prompt_list
from flux_mini.sampling import check_seed

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
    """Maps are (r, h, w) on the token grid (h = height / 16 for every generation); heatmaps are PIL pictures at
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
    """A FluxPipeline, Flux2Pipeline or Flux3Pipeline that also returns concept maps. Build it with `from_folder`
    (the generation is read from the folder) or around an existing pipeline. What differs between generations
    (text and concept inputs, per-step time inputs, CFG, packing, the token grid, default layers) is asked of the
    generation's own pipeline, through the same few methods (`prompt_inputs`, `concept_inputs`, `step_inputs`,
    `euler_step`, `pack_latent`, `token_grid`, `concept_map_layers`), so this class reads the same for all.

    FLUX.2 differs in what it has: no pooled vector (`pooled`, `concept_pooled` stay "zero"), concept
    encodings "first_token" / "mean" / "authors" through the chat LLM, concept RoPE ids "zero" or "authors"
    (`concept_positions`), real CFG for Base checkpoints (maps from the conditional pass), and by default
    maps from every layer: FLUX.2 has few double blocks (5 of 25 in klein 4B) and deeper layers segment
    better, so the single blocks count too. FLUX.3 is like FLUX.2 (no pooled vector, CFG for Base, every joint
    block by default); its distilled flow map also gets each step's target time; concept encodings
    "first_token" / "mean" through the Qwen3-VL tower."""

    def __init__(self, flux: FluxPipeline | Flux2Pipeline | Flux3Pipeline):
        self.flux = flux
        options = flux.compile_options  # the generation's pipeline compiled its forward; the maps pass follows
        self.maps_pass = concept_pass_maps if options is None else torch.compile(concept_pass_maps, **options)

    @classmethod
    def from_folder(cls, path: str | Path, **kwargs) -> ConceptAttentionPipeline:
        """The generation's pipeline from `path` (keyword arguments go to its `from_folder`: device, dtype,
        offload, variant, compile), wrapped. With compile=True the passes with maps (`concept_pass_maps`) are
        compiled too, each as one graph."""
        if is_flux3_folder(path):
            pipeline = Flux3Pipeline
        else:
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
        text = flux.prompt_inputs(prompt)
        concept_txt, concept_extra = self._concept_inputs(
            concepts, concept_encoding, concept_pooled, softmax, concept_positions
        )
        img, ids = flux.prepare_latents(1, height, width, seed)  # (1, L, channels), (1, L, 3 or 4 axes)
        schedule = flux.timesteps(num_inference_steps, img.shape[1])
        cfg_scale = flux.step_inputs(schedule[0], schedule[1], guidance, img)[1]  # real CFG: FLUX.2 / FLUX.3 Base
        negative = flux.prompt_inputs("") if cfg_scale is not None else None  # the empty prompt's inputs
        with flux.on_device(model):
            for step, (t_curr, t_next) in enumerate(self._progress(list(zip(schedule[:-1], schedule[1:])), progress)):
                times, cfg_scale = flux.step_inputs(t_curr, t_next, guidance, img)
                accumulator.keep_vectors = return_vectors and (vector_steps is None or step in vector_steps)
                sites = NO_SITES if interventions is None else interventions.sites(step)
                if cfg_scale is not None:  # first, so that the cache keeps the prompt's call (as denoise_flux2)
                    pred_negative = model(img=img, img_ids=ids, **negative, **times, sites=sites)
                if step in steps:  # the same call gives the velocity and this step's maps
                    pred = self._concept_pass(
                        img, ids, {**text, **times}, concept_txt, concept_extra, accumulator, layers,
                        attention=attention, need_output=True, step=step, sites=sites,
                    )
                else:
                    pred = model(img=img, img_ids=ids, **text, **times, sites=sites)
                if cfg_scale is not None:
                    pred = pred_negative + cfg_scale * (pred - pred_negative)
                img = flux.euler_step(img, pred, t_curr, t_next)
        check_finite(img, "latents")
        image = flux.to_pil(check_finite(flux.decode_tokens(img, height, width), "decoded images"))[0]
        return self._output(image, concepts, accumulator, flux.token_grid(height, width), blur, interventions)

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
        index 2 of 4 steps is t = 0.5). The FLUX.3 flow map is asked for the jump from t to the clean image
        (target time 0). The pooled vector of the image/text streams is zero by default
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
        picture, pixels = self._image_tensor(image, width, height)
        text = flux.prompt_inputs(prompt, pooled)
        with flux.on_device(flux.autoencoder):
            clean = flux.pack_latent(flux.autoencoder.encode(pixels.to(flux.device)).to(flux.dtype))  # (1, L, ch.)
        height, width = pixels.shape[-2:]
        concept_txt, concept_extra = self._concept_inputs(
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
                times, _ = flux.step_inputs(t, 0.0, guidance, noisy)  # one conditional pass, no CFG
                self._concept_pass(
                    noisy, ids, {**text, **times}, concept_txt, concept_extra, accumulator, layers,
                    attention=attention, step=sample,
                    sites=NO_SITES if interventions is None else interventions.sites(sample),
                )
        return self._output(picture, concepts, accumulator, flux.token_grid(height, width), blur, interventions)

    # -- pieces ---------------------------------------------------------------------------------

    def _layers(self, layer_indices: Sequence[int] | None) -> list[int]:
        """The layers to average: the given ones, else the generation's default (None = config.concept_layers)."""
        chosen = self.flux.concept_map_layers() if layer_indices is None else layer_indices
        return check_layers(self.flux.model, chosen)

    def _check_memory(self, height: int, width: int, num_concepts: int) -> None:
        self.flux.check_memory(height, width, 1, num_concepts)

    def _concept_pass(
        self, img, img_ids, inputs: dict, concept_txt, concept_extra: dict, accumulator, layers, **options
    ) -> Tensor | None:
        """One concept pass with the model inputs of `prompt_inputs` and `step_inputs` (all by name). Passes with
        interventions run eagerly: their Python sites objects would break the compiled graph at every site."""
        inputs = dict(inputs)
        txt, txt_ids, timesteps = inputs.pop("txt"), inputs.pop("txt_ids"), inputs.pop("timesteps")
        y = inputs.pop("y", None)  # run_concept_layers names Flux.1's pooled vector positionally
        maps_pass = self.maps_pass if options["sites"] is NO_SITES else concept_pass_maps
        return run_concept_layers(
            self.flux.model, img, img_ids, txt, txt_ids, timesteps, y, concept_txt, accumulator, layers,
            **inputs, **concept_extra, **options, maps_pass=maps_pass,
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
    ) -> tuple[Tensor, dict[str, Tensor | None]]:
        """(1, r, context_in_dim) concept embeddings and the concept stream's other inputs by name (Flux.1:
        concept_y; FLUX.2: concept_ids; FLUX.3: none), from the generation's own pipeline."""
        if pooled not in CONCEPT_POOLED:
            raise ValueError(f"concept_pooled must be one of {CONCEPT_POOLED}, got {pooled!r}")
        if positions not in CONCEPT_POSITIONS:
            raise ValueError(f"concept_positions must be one of {CONCEPT_POSITIONS}, got {positions!r}")
        return self.flux.concept_inputs(concepts, encoding, pooled, softmax, positions)

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
