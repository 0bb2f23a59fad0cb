"""Text-to-image and editing with reference images, FLUX.2 ([dev], [klein] 4B / 9B, distilled, Base and KV):
find the files, encode the prompt with the chat LLM and the references with the AE, denoise, decode
(flux2-format.md §6, §7, §9).

A model folder is the official Hugging Face repo, BFL file and/or diffusers folders:

    flux2-dev.safetensors | flux-2-klein-4b.safetensors | flux-2-klein-base-9b.safetensors | ...
                          the transformer, BFL keys (else transformer/, the diffusers layout)
    ae.safetensors        the FLUX.2 autoencoder (else vae/); klein repos may hold only vae/
    text_encoder/         Mistral3ForConditionalGeneration ([dev]) or Qwen3ForCausalLM ([klein]), save_pretrained
    tokenizer/            its tokenizer with the chat template (else the tokenizer files in text_encoder/)
    model_index.json      optional: diffusers' `is_distilled` tells klein from klein Base, its
                          `_class_name` Flux2KleinKVPipeline marks klein 9B KV
    sampling.json         optional overrides of the variant's defaults, e.g. {"max_length": 32, "num_steps": 8}

Variants: "dev" (guidance embedded, 50 steps, guidance 4), "klein" (step-distilled: 4 steps, no guidance),
"klein-base" (50 steps, real CFG 4 with the empty prompt as negative), "klein-kv" (klein 9B KV: as klein, with
the reference images' keys and values computed once and cached). Distilled, Base and KV checkpoints have the
same keys: the variant comes from `variant=`, else sampling.json; else a guidance embedder means dev; else
klein-kv when model_index.json's `_class_name` is Flux2KleinKVPipeline or "kv" is a word of the transformer's
file name (flux-2-klein-9b-kv.safetensors); else model_index.json's `is_distilled`; else klein-base when "base"
is a word of the file name; else klein.

References (§7.8, BFL's recipe): each is refused below 64 pixels a side or beyond an aspect ratio of 8,
downscaled (LANCZOS, sides truncated) to at most 2024^2 pixels when it is the only one, 1024^2 each when there
are several (diffusers caps every reference at 1024^2), center-cropped to multiples of 16 and AE-encoded;
reference i sits at t = 10 + 10 i. BFL's code sets no limit on their number, nor does this pipeline.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
from einops import rearrange, repeat
from PIL import Image
from torch import Tensor

from flux_mini.autoencoder_flux2 import Flux2AutoEncoder, load_flux2_autoencoder
from flux_mini.flux2 import Flux2, concept_position_ids
from flux_mini.loading import load_flux
from flux_mini.memory import RunSize, check_fits, estimate_with_references
from flux_mini.pipeline import FluxPipeline, _optional, _read_json, check_finite, compile_transformer, prompt_list
from flux_mini.sampling import (
    check_seed,
    denoise_flux2,
    euler_step,
    flux2_image_ids,
    flux2_latent_size,
    flux2_pack,
    flux2_text_ids,
    flux2_unpack,
    get_flux2_noise,
    get_flux2_schedule,
    timestep_vector,
)
from flux_mini.text_encoders import MissingFilesError, MistralEmbedder, Qwen3Embedder, StackedLayersEmbedder


@dataclass(frozen=True)
class Flux2SamplingDefaults:
    """What a FLUX.2 checkpoint was made for (spec §7.6). `guidance` is the embedded guidance of [dev] or the
    CFG scale of Base checkpoints; step-distilled klein uses neither."""

    num_steps: int
    guidance: float
    cfg: bool  # real classifier-free guidance with the empty prompt (Base checkpoints)
    max_length: int = 512  # text tokens, padding included
    width: int = 1024
    height: int = 1024
    reference_kv: bool = False  # klein 9B KV: run the references once and cache their keys and values


FLUX2_VARIANTS = {
    "dev": Flux2SamplingDefaults(num_steps=50, guidance=4.0, cfg=False),
    "klein": Flux2SamplingDefaults(num_steps=4, guidance=1.0, cfg=False),
    "klein-base": Flux2SamplingDefaults(num_steps=50, guidance=4.0, cfg=True),
    "klein-kv": Flux2SamplingDefaults(num_steps=4, guidance=1.0, cfg=False, reference_kv=True),
}
KV_PIPELINE = "Flux2KleinKVPipeline"  # diffusers' model_index.json `_class_name` of the klein 9B KV repo
ONE_REFERENCE_PIXELS = 2024**2  # a lone reference is downscaled to at most this many pixels
REFERENCE_PIXELS = 1024**2  # each of several references
MIN_REFERENCE_SIDE, MAX_REFERENCE_ASPECT = 64, 8
SAMPLING_KEYS = {"variant", *(f.name for f in fields(Flux2SamplingDefaults))}
TRANSFORMER_FILES = ("flux2-*.safetensors", "flux-2-*.safetensors")


@dataclass(frozen=True)
class Flux2Files:
    """Where each component of a FLUX.2 model folder lives."""

    transformer: Path  # a BFL .safetensors file or a diffusers transformer/ folder
    autoencoder: Path  # ae.safetensors or a diffusers vae/ folder
    text_encoder: Path
    tokenizer: Path
    sampling: Path | None
    model_index: Path | None

    @classmethod
    def find(cls, folder: str | Path) -> Flux2Files:
        folder = Path(folder)
        if not folder.is_dir():
            raise MissingFilesError(f"model folder {folder} does not exist")
        if not (folder / "text_encoder").is_dir():
            raise MissingFilesError(
                f"no text encoder in {folder}: expected text_encoder/ (+ tokenizer/) holding Qwen3 ([klein]) or "
                "Mistral-Small-3.2 ([dev]), as in the black-forest-labs/FLUX.2-* repos"
            )
        tokenizer = folder / "tokenizer" if (folder / "tokenizer").is_dir() else folder / "text_encoder"
        return cls(
            transformer=_find_transformer(folder),
            autoencoder=_find_autoencoder(folder),
            text_encoder=folder / "text_encoder",
            tokenizer=tokenizer,
            sampling=_optional(folder / "sampling.json"),
            model_index=_optional(folder / "model_index.json"),
        )


def _find_transformer(folder: Path) -> Path:
    files = sorted({f for pattern in TRANSFORMER_FILES for f in folder.glob(pattern)})
    if len(files) > 1:
        raise ValueError(f"{folder} holds several transformer files ({', '.join(f.name for f in files)}); keep one")
    if files:
        return files[0]
    if (folder / "transformer").is_dir():
        return folder / "transformer"
    raise MissingFilesError(
        f"no FLUX.2 transformer in {folder}: expected one flux2-*.safetensors / flux-2-*.safetensors file "
        "(e.g. flux-2-klein-4b.safetensors) or a diffusers transformer/ folder"
    )


def _find_autoencoder(folder: Path) -> Path:
    for name in ("ae.safetensors", "vae"):
        if (folder / name).exists():
            return folder / name
    raise MissingFilesError(
        f"no autoencoder in {folder}: expected the FLUX.2 ae.safetensors (from black-forest-labs/FLUX.2-dev) "
        "or a diffusers vae/ folder"
    )


def is_flux2_folder(folder: str | Path) -> bool:
    """Whether a model folder holds a FLUX.2 transformer: by the official file names, else by the class
    name in a diffusers transformer/config.json."""
    folder = Path(folder)
    if any(next(folder.glob(pattern), None) for pattern in TRANSFORMER_FILES):
        return True
    config = folder / "transformer" / "config.json"
    return config.is_file() and _read_json(config).get("_class_name") == "Flux2Transformer2DModel"


def _variant(model: Flux2, files: Flux2Files, overrides: dict, requested: str | None) -> str:
    """`variant=`, else sampling.json's, else what the files say; a choice must fit the transformer."""
    guided = model.config.use_guidance_embed
    chosen = requested if requested is not None else overrides.get("variant")
    if chosen is not None:
        if chosen not in FLUX2_VARIANTS:
            raise ValueError(f"unknown FLUX.2 variant {chosen!r}; choose one of {sorted(FLUX2_VARIANTS)}")
        if (chosen == "dev") != guided:
            has = "has a" if guided else "has no"
            raise ValueError(f"variant {chosen!r} does not fit the transformer, which {has} guidance embedder")
        return chosen
    if guided:
        return "dev"
    index = {} if files.model_index is None else _read_json(files.model_index)
    if index.get("_class_name") == KV_PIPELINE or _named(files.transformer, "kv"):
        return "klein-kv"
    if "is_distilled" in index:
        return "klein" if index["is_distilled"] else "klein-base"
    return "klein-base" if _named(files.transformer, "base") else "klein"


def _named(path: Path, word: str) -> bool:
    """Whether `word` is a whole word of the file name: flux-2-klein-9b-kv.safetensors is named "kv"."""
    return re.search(rf"\b{word}\b", path.stem.replace("-", " ")) is not None


def _sampling_overrides(path: Path | None) -> dict:
    if path is None:
        return {}
    values = _read_json(path)
    if not isinstance(values, dict) or set(values) - SAMPLING_KEYS:
        raise ValueError(f"{path}: expected a JSON object with keys among {sorted(SAMPLING_KEYS)}, got {values!r}")
    return values


def load_text_encoder(
    files: Flux2Files, max_length: int, dtype: torch.dtype, device: torch.device | str
) -> StackedLayersEmbedder:
    """Qwen3 or Mistral3, as text_encoder/config.json says."""
    config = files.text_encoder / "config.json"
    if not config.is_file():
        raise MissingFilesError(f"text encoder: {config} is missing; put the encoder's config.json there")
    model_type = _read_json(config).get("model_type")
    encoders = {"qwen3": Qwen3Embedder, "mistral3": MistralEmbedder}
    if model_type not in encoders:
        raise ValueError(
            f"{config}: model_type {model_type!r} is not a FLUX.2 text encoder; expected 'qwen3' ([klein]) or "
            "'mistral3' ([dev])"
        )
    return encoders[model_type](files.text_encoder, max_length, dtype, device, files.tokenizer)


class Flux2Pipeline:
    """FLUX.2 text-to-image; every stage is a method, as in FluxPipeline, so other pipelines can reuse them."""

    def __init__(
        self,
        model: Flux2,
        autoencoder: Flux2AutoEncoder,
        text_encoder: StackedLayersEmbedder,
        defaults: Flux2SamplingDefaults,
        variant: str,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        offload: bool = False,
        compile: bool | dict = False,
    ):
        self.model, self.autoencoder, self.text_encoder = model, autoencoder, text_encoder
        self.defaults = defaults
        self.variant = variant
        self.device = torch.device(device)
        self.dtype = dtype
        self.offload = offload and self.device.type != "cpu"
        widths = {
            "in_channels (the AE's 4 x 32 patchified latent channels)": (
                model.config.in_channels,
                autoencoder.latent_channels,
            ),
            "context_in_dim (3 x the text encoder width)": (model.config.context_in_dim, text_encoder.output_dim),
        }
        for name, (wanted, given) in widths.items():
            if wanted != given:
                raise ValueError(
                    f"the components do not belong together: the transformer's {name} is {wanted}, but the "
                    f"component gives {given} (klein 4B needs Qwen3-4B, klein 9B Qwen3-8B, [dev] Mistral-Small)"
                )
        self.compile_options = compile_transformer(model, compile)

    @classmethod
    def from_folder(
        cls,
        path: str | Path,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        offload: bool = False,
        variant: str | None = None,
        compile: bool | dict = False,
    ) -> Flux2Pipeline:
        """Load every component of a FLUX.2 folder (module docstring). The autoencoder stays in float32;
        the transformer and the text encoder use `dtype`. offload=True keeps idle stages on the CPU.
        compile=True compiles the transformer's forward (as `FluxPipeline.from_folder`)."""
        files = Flux2Files.find(path)
        load_device = "cpu" if offload else device
        model = load_flux(files.transformer, dtype=dtype, device=load_device)
        if not isinstance(model, Flux2):
            raise ValueError(f"{files.transformer} is a Flux.1 transformer: use FluxPipeline for this folder")
        autoencoder = load_flux2_autoencoder(files.autoencoder, dtype=torch.float32, device=load_device)
        overrides = _sampling_overrides(files.sampling)
        variant = _variant(model, files, overrides, variant)
        values = {k: v for k, v in overrides.items() if k != "variant"}
        defaults = replace(FLUX2_VARIANTS[variant], **values)
        text_encoder = load_text_encoder(files, defaults.max_length, dtype, load_device)
        return cls(model, autoencoder, text_encoder, defaults, variant, device, dtype, offload, compile)

    # ------------------------------------------------------------------------------------------
    # Stages (on_device and to_pil are exactly Flux.1's)

    on_device = FluxPipeline.on_device
    to_pil = staticmethod(FluxPipeline.to_pil)

    def check_size(self, height: int, width: int) -> None:
        self.autoencoder.check_size(height, width)

    def memory_estimate(
        self, height: int, width: int, batch: int = 1, concepts: int = 0, reference_tokens: int = 0,
        reference_pixels: int = 0,
    ) -> dict[str, int]:  # fmt: skip
        """Bytes each stage of a run at this size needs beyond the weights (flux_mini/memory.py): one token
        per 16x16 pixels (the AE patchifies) plus the references' (`reference_tokens`, counted as image tokens;
        klein 9B KV also keeps their keys and values for every block, once for the batch), the padded text
        length, the AE's widest full-resolution layer, which encodes the largest prepared reference
        (`reference_pixels`, one at a time) as well as decoding the B outputs."""
        config, autoencoder = self.model.config, self.autoencoder
        h, w = flux2_latent_size(height, width, autoencoder.downsample_factor)
        llm = self.text_encoder.model.config
        size = RunSize(
            batch=batch,
            image_tokens=h * w,
            text_tokens=self.text_encoder.max_length,
            hidden=config.hidden_size,
            heads=config.num_heads,
            mlp_ratio=config.mlp_ratio,
            token_channels=config.in_channels,
            dtype_bytes=self.dtype.itemsize,
            concepts=concepts,
            pixels=height * width,
            autoencoder_channels=autoencoder.config.ch * autoencoder.config.ch_mult[0],
            t5_heads=getattr(llm, "text_config", llm).num_attention_heads,  # the LLM's (B, heads, T, T) scores
        )
        estimate = estimate_with_references(size, reference_tokens, reference_pixels)
        if self.defaults.reference_kv:  # a key and a value per reference token in every block, shared by the batch
            cache = 2 * config.num_layers * reference_tokens * config.hidden_size
            estimate["transformer"] += cache * self.dtype.itemsize
        return estimate

    def check_memory(
        self, height: int, width: int, batch: int = 1, concepts: int = 0, available: int | None = None,
        reference_tokens: int = 0, reference_pixels: int = 0,
    ):  # fmt: skip
        """Refuse up front a run whose estimate exceeds the free memory of the device, naming a size that fits
        (or, when the references are what does not fit, saying so)."""
        check_fits(
            lambda h, w: self.memory_estimate(h, w, batch, concepts, reference_tokens, reference_pixels), height,
            width, batch, self.autoencoder.downsample_factor, self.device, available,
            f"no image size fits: lower max_length ({self.text_encoder.max_length}) in the folder's sampling.json",
            reference_tokens,
        )

    def encode_prompt(self, prompts: str | list[str]) -> tuple[Tensor, Tensor]:
        """Prompts -> txt (B, T, context_in_dim) and txt_ids (B, T, 4), in the pipeline dtype on the device."""
        prompts = prompt_list(prompts)
        with self.on_device(self.text_encoder):
            txt = self.text_encoder(prompts).to(self.device, self.dtype)
        return txt, flux2_text_ids(len(prompts), txt.shape[1], self.device)

    def prepare_latents(
        self, num_samples: int, height: int, width: int, seed: int | torch.Generator
    ) -> tuple[Tensor, Tensor]:
        """Seeded noise tokens img (B, L, 128) in the pipeline dtype and img_ids (B, L, 4), on the device.
        An integer seed gives sample i the noise of seed + i; a torch.Generator draws on its own device."""
        self.check_size(height, width)
        noise = get_flux2_noise(
            num_samples,
            height,
            width,
            channels=self.autoencoder.latent_channels,
            downsample_factor=self.autoencoder.downsample_factor,
            dtype=self.dtype,
            seed=seed,
            device=self.device,
        )
        h, w = noise.shape[-2:]
        return flux2_pack(noise), flux2_image_ids(num_samples, h, w, device=self.device)

    def timesteps(self, num_steps: int, image_seq_len: int) -> list[float]:
        """The schedule for `image_seq_len` noise tokens (reference tokens do not count)."""
        return get_flux2_schedule(num_steps, image_seq_len)

    @torch.no_grad()
    def encode_references(self, images: list[Image.Image]) -> tuple[Tensor, Tensor]:
        """Reference images -> cond tokens (1, R, 128) in the pipeline dtype and cond_ids (1, R, 4) on the device,
        reference i at t = 10 + 10 i on its own grid (module docstring for the preparation). No autograd through
        the AE; no_grad rather than inference_mode, so that the tokens can enter `denoise(grad=True)`."""
        check_references(images)
        max_pixels = reference_pixel_cap(len(images))
        tokens, ids = [], []
        with self.on_device(self.autoencoder):
            for index, image in enumerate(images):
                pixels = reference_pixels(image, max_pixels, _reference_name(image, index)).to(self.device)
                latent = self.autoencoder.encode(pixels)  # (1, 128, h, w): the mean, patchified and normalised
                tokens.append(flux2_pack(latent).to(self.dtype))
                ids.append(flux2_image_ids(1, *latent.shape[-2:], t=10 + 10 * index, device=self.device))
        return torch.cat(tokens, dim=1), torch.cat(ids, dim=1)

    def reference_tokens(self, images: list[Image.Image]) -> int:
        """R, the number of tokens `encode_references` makes of these images, from their sizes alone."""
        factor = self.autoencoder.downsample_factor
        return sum((width // factor) * (height // factor) for width, height in prepared_sizes(images))

    # -- what ConceptAttention asks of every generation's pipeline (concept_attention/pipeline.py) ------------

    def concept_map_layers(self) -> None:
        """None: the model's default, every layer (FLUX.2 has few double blocks, and deeper layers segment better)."""
        return None

    def prompt_inputs(self, prompt: str, pooled: str | None = None) -> dict[str, Tensor]:
        """One prompt -> the model's text inputs txt, txt_ids (FLUX.2 has no pooled vector)."""
        if pooled not in (None, "zero"):
            raise ValueError(f"pooled={pooled!r}: FLUX.2 has no pooled text vector; leave pooled='zero'")
        txt, txt_ids = self.encode_prompt([prompt])
        return {"txt": txt, "txt_ids": txt_ids}

    def concept_inputs(
        self, concepts: list[str], encoding: str, pooled: str, softmax: bool, positions: str
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Concept words -> (1, r, context_in_dim) features through the chat LLM and the concepts' RoPE ids:
        (0, 0, 0, 0), or the authors' (0, 0, 0, max_length - 2) with positions="authors"."""
        from concept_attention.encoding import authors_concept_position, check_concept_tokens, encode_concepts_flux2

        if pooled != "zero":
            raise ValueError(f"concept_pooled={pooled!r}: FLUX.2 has no pooled vector; leave it 'zero'")
        if positions not in ("zero", "authors"):
            raise ValueError(f"concept_positions must be one of ('zero', 'authors'), got {positions!r}")
        encoder = self.text_encoder
        check_concept_tokens(encoder, concepts, softmax)
        with self.on_device(encoder):
            concept_txt = encode_concepts_flux2(encoder, concepts, encoding)[None].to(self.device, self.dtype)
        position = authors_concept_position(encoder.max_length) if positions == "authors" else 0
        return concept_txt, {"concept_ids": concept_position_ids(1, len(concepts), position, device=self.device)}

    def step_inputs(
        self, t_curr: float, t_next: float, guidance: float | None, like: Tensor
    ) -> tuple[dict[str, Tensor | None], float | None]:
        """(the model's time inputs for a step from t_curr to t_next, the CFG scale): [dev] embeds guidance,
        Base checkpoints use real CFG with it."""
        if self.defaults.cfg:
            return {"timesteps": timestep_vector(t_curr, like), "guidance": None}, guidance
        return {"timesteps": timestep_vector(t_curr, like),
                "guidance": None if guidance is None else timestep_vector(guidance, like)}, None  # fmt: skip

    euler_step = staticmethod(euler_step)

    def pack_latent(self, latent: Tensor) -> Tensor:
        """An autoencoder latent (1, 128, h, w), already patchified by the AE -> tokens (1, h*w, 128)."""
        return flux2_pack(latent)

    def token_grid(self, height: int, width: int) -> tuple[int, int]:
        """The (h, w) grid of image tokens: the FLUX.2 AE patchifies itself, so its latent grid."""
        return flux2_latent_size(height, width, self.autoencoder.downsample_factor)

    def settings(
        self, width: int | None, height: int | None, num_steps: int | None, guidance: float | None
    ) -> tuple[int, int, int, float | None]:
        """Fill unset settings from the folder's defaults and check them: (width, height, num_steps, guidance);
        guidance is the embedded guidance of [dev], the CFG scale of Base, None for step-distilled klein."""
        width = self.defaults.width if width is None else width
        height = self.defaults.height if height is None else height
        self.check_size(height, width)
        num_steps = self.defaults.num_steps if num_steps is None else num_steps
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be an integer >= 1 (None for the default {self.defaults.num_steps}), "
                             f"got {num_steps!r}")
        if not (self.model.config.use_guidance_embed or self.defaults.cfg):
            return width, height, num_steps, None
        guidance = self.defaults.guidance if guidance is None else guidance
        if not math.isfinite(guidance):
            raise ValueError(f"guidance must be a finite number, got {guidance!r}")
        return width, height, num_steps, guidance

    def denoise(
        self,
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        timesteps: list[float],
        guidance: float | None = None,
        negative_txt: Tensor | None = None,
        progress: bool = True,
        interventions=None,
        grad: bool = False,
        cond: Tensor | None = None,
        cond_ids: Tensor | None = None,
    ) -> Tensor:
        """The Euler loop: `guidance` is embedded for [dev], the CFG scale with `negative_txt` for Base, and
        unused by step-distilled klein (see `settings`). `interventions` (`flux_mini.interp.Interventions`)
        caches or patches named sites per step (with CFG: see `denoise_flux2`); autograd only with `grad`.
        Reference tokens `cond`, `cond_ids` (`encode_references`, batch B) are appended at every step, or
        cached once for klein 9B KV (there batch 1 serves all B images)."""
        guidance = self.defaults.guidance if guidance is None else guidance
        embedded = guidance if self.model.config.use_guidance_embed else None
        if self.defaults.cfg and negative_txt is None:
            raise ValueError(f"the {self.variant} variant uses classifier-free guidance: pass negative_txt")
        cfg = (negative_txt, guidance) if self.defaults.cfg else (None, None)
        with self.on_device(self.model):
            return denoise_flux2(
                self.model, img, img_ids, txt, txt_ids, timesteps, embedded, *cfg, progress, interventions, grad,
                cond, cond_ids, cache_references=cond is not None and self.defaults.reference_kv,
            )

    def decode_tokens(self, tokens: Tensor, height: int, width: int) -> Tensor:
        """Final tokens (B, L, 128) -> images (B, 3, height, width) in float32, clamped to [-1, 1]."""
        self.check_size(height, width)
        h, w = flux2_latent_size(height, width, self.autoencoder.downsample_factor)
        latent = flux2_unpack(tokens.float(), h, w)
        with self.on_device(self.autoencoder):
            images = self.autoencoder.decode(latent.to(self.device))
        return images.float().clamp(-1, 1)

    # ------------------------------------------------------------------------------------------

    def __call__(
        self,
        prompt: str | list[str],
        width: int | None = None,
        height: int | None = None,
        num_steps: int | None = None,
        guidance: float | None = None,
        seed: int | torch.Generator = 0,
        progress: bool = True,
        interventions=None,
        references: list[Image.Image] | None = None,
    ) -> Image.Image | list[Image.Image]:
        """Generate one image per prompt (a PIL image for a string, a list for a list; prompt i uses seed + i,
        so a list gives the images of a loop). Sizes must be multiples of 16; steps, guidance and size
        default to the variant's (and sampling.json's). A run the device cannot hold is refused before
        anything is allocated. `interventions` (`flux_mini.interp.Interventions`) caches or patches named
        sites at every (or chosen) denoising steps, as in FluxPipeline: `interventions.cache[step][name]`
        (with CFG, patches reach both passes and the cache holds the prompt's pass: see `denoise_flux2`).
        `references` (PIL images) make it an edit of them, every prompt with the same references (module
        docstring); appended references also fill rows of the sites (klein 9B KV's cached ones do not). Runs
        without autograd."""
        prompts = prompt_list(prompt)
        width, height, num_steps, guidance = self.settings(width, height, num_steps, guidance)
        check_seed(seed, len(prompts))
        if references is not None:
            check_references(references)
        reference_tokens = 0 if references is None else self.reference_tokens(references)
        reference_pixels = 0 if references is None else max(w * h for w, h in prepared_sizes(references))
        self.check_memory(height, width, len(prompts), reference_tokens=reference_tokens,
                          reference_pixels=reference_pixels)  # fmt: skip
        with torch.no_grad():
            txt, txt_ids = self.encode_prompt(prompts)
            negative_txt = self.encode_prompt([""] * len(prompts))[0] if self.defaults.cfg else None
            cond, cond_ids = self.encode_references(references) if references is not None else (None, None)
            if cond is not None and not self.defaults.reference_kv:  # (1, R, ..) -> (B, R, ..): the same references
                cond, cond_ids = (repeat(t, "1 r c -> b r c", b=len(prompts)) for t in (cond, cond_ids))
            img, img_ids = self.prepare_latents(len(prompts), height, width, seed)
            timesteps = self.timesteps(num_steps, img.shape[1])
            tokens = self.denoise(
                img, img_ids, txt, txt_ids, timesteps, guidance, negative_txt, progress, interventions,
                cond=cond, cond_ids=cond_ids,
            )
            tokens = check_finite(tokens, "latents")
            images = self.to_pil(check_finite(self.decode_tokens(tokens, height, width), "decoded images"))
        return images[0] if isinstance(prompt, str) else images


def _reference_name(image: Image.Image, index: int) -> str:
    """How an error names a reference: its position and, when PIL knows it, its file."""
    file = getattr(image, "filename", "")
    return f"reference {index + 1}" + (f" ({file})" if file else "")


def check_reference_size(image: Image.Image, name: str = "reference image") -> None:
    """BFL refuses a reference below 64 pixels a side or beyond an aspect ratio of 8."""
    width, height = image.size
    if min(width, height) < MIN_REFERENCE_SIDE:
        raise ValueError(f"{name} is {width} x {height} pixels; FLUX.2 needs at least {MIN_REFERENCE_SIDE} pixels "
                         "a side: use a larger image")  # fmt: skip
    if max(width, height) > MAX_REFERENCE_ASPECT * min(width, height):
        raise ValueError(f"{name} is {width} x {height} pixels, an aspect ratio above {MAX_REFERENCE_ASPECT}; "
                         f"crop it to at most {MAX_REFERENCE_ASPECT}:1")  # fmt: skip


def check_references(images, check_size=check_reference_size) -> None:
    """A non-empty list of PIL images, each of a size the preparation accepts (`check_size(image, name)`: BFL's
    `check_reference_size` here; FLUX.3 passes its own)."""
    if isinstance(images, Image.Image) or not isinstance(images, (list, tuple)) or not images:
        raise ValueError(f"references must be a non-empty list of PIL images, got {type(images).__name__}; "
                         "pass references=[image] (or None for text-to-image)")  # fmt: skip
    for index, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise ValueError(f"references[{index}] is a {type(image).__name__}, not a PIL image; open it with "
                             "PIL.Image.open")  # fmt: skip
        check_size(image, _reference_name(image, index))


def reference_pixel_cap(count: int) -> int:
    """The most pixels each of `count` references keeps: 2024^2 for a lone one, 1024^2 each for several."""
    return ONE_REFERENCE_PIXELS if count == 1 else REFERENCE_PIXELS


def downscaled_size(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """BFL's cap: above `max_pixels`, both sides times sqrt(max_pixels / pixels), truncated (the count stays
    <= max_pixels, the aspect ratio about the same)."""
    if width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    return int(width * scale), int(height * scale)


def reference_size(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """The (width, height) of a prepared reference: downscaled, then cropped to multiples of 16."""
    width, height = downscaled_size(width, height, max_pixels)
    return width // 16 * 16, height // 16 * 16


def prepared_sizes(images: list[Image.Image]) -> list[tuple[int, int]]:
    """The (width, height) of each reference as `encode_references` prepares it, under the cap for their count."""
    return [reference_size(*image.size, reference_pixel_cap(len(images))) for image in images]


def reference_pixels(image: Image.Image, max_pixels: int, name: str = "reference image") -> Tensor:
    """BFL's preparation of a reference -> (1, 3, H, W) in [-1, 1]: RGB; refused below 64 pixels a side or beyond
    an aspect ratio of 8; downscaled with LANCZOS to at most `max_pixels` (`downscaled_size`); center-cropped to
    multiples of 16."""
    check_reference_size(image, name)
    image = image.convert("RGB")
    if (size := downscaled_size(*image.size, max_pixels)) != image.size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    width, height = image.width // 16 * 16, image.height // 16 * 16
    left, top = (image.width - width) // 2, (image.height - height) // 2
    image = image.crop((left, top, left + width, top + height))
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)  # RGB rows, (H * W * 3,)
    return rearrange(pixels, "(h w c) -> 1 c h w", h=height, w=width).float() / 127.5 - 1.0
