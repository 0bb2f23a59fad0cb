"""Text-to-image (and editing with reference images) with FLUX.3 Image Klein, distilled or Base: find the files,
encode the prompt with Qwen3-VL, encode the references with the FLUX.2 autoencoder, denoise, decode
(flux3-format.md §4-§6).

A model folder is the official Hugging Face repo, BFL files and/or diffusers folders:

    flux3-*.safetensors | flux-3-*.safetensors   the transformer, BFL keys (else transformer/, diffusers layout)
    ae.safetensors | flux2-vae.safetensors        the FLUX.2 autoencoder, which FLUX.3 shares (else vae/)
    text_encoder/         Qwen3VLForConditionalGeneration (Qwen3-VL-4B-Instruct), save_pretrained layout
    tokenizer/            its tokenizer and chat template (else processor/, else the files in text_encoder/)
    sampling.json         optional overrides, e.g. {"num_steps": 8, "guidance": 3.5, "max_length": 512}

The variant comes from the transformer itself: a flow map (`ref_time_in`) is the distilled model (16 steps, no
guidance), otherwise Base (50 steps, classifier-free guidance 4 with the empty prompt, BFL's README value;
diffusers uses 3.5). References (1 to 10, each at least 16 pixels a side): each is downscaled to at most 1024 x
1024 pixels (aspect kept, sides rounded) and center-cropped to multiples of 16; reference i sits at l = -(1 + i).
BFL's recipe pads a single reference onto a larger canvas and crops the output back; that step is not reproduced
here (the output size is yours).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
from einops import rearrange
from PIL import Image
from torch import Tensor

from flux_mini import flux3_sampling as s3
from flux_mini.autoencoder_flux2 import Flux2AutoEncoder, load_flux2_autoencoder
from flux_mini.flux2_pipeline import check_references as check_reference_list
from flux_mini.flux3 import Flux3
from flux_mini.loading import load_flux
from flux_mini.memory import RunSize, check_fits, estimate_with_references
from flux_mini.pipeline import FluxPipeline, _optional, _read_json, check_finite, compile_transformer
from flux_mini.text_encoders import MissingFilesError, Qwen3VLEmbedder

TRANSFORMER_FILES = ("flux3-*.safetensors", "flux-3-*.safetensors")
AUTOENCODER_FILES = ("ae.safetensors", "flux2-vae.safetensors", "vae")
REFERENCE_PIXELS = 1024 * 1024  # a reference is downscaled to at most this many pixels
MAX_REFERENCES, MIN_REFERENCE_SIDE = 10, 16


@dataclass(frozen=True)
class Flux3SamplingDefaults:
    num_steps: int
    guidance: float  # the CFG scale of Base; 1 (none) for the distilled flow map
    max_length: int = 8192  # the text window cap
    width: int = 1024
    height: int = 1024


FLUX3_VARIANTS = {
    "flux3-klein": Flux3SamplingDefaults(num_steps=s3.FLUX3_STEPS["flux3-klein"], guidance=1.0),
    "flux3-klein-base": Flux3SamplingDefaults(num_steps=s3.FLUX3_STEPS["flux3-klein-base"], guidance=s3.FLUX3_CFG),
}
SAMPLING_KEYS = {f.name for f in fields(Flux3SamplingDefaults)}


@dataclass(frozen=True)
class Flux3Files:
    """Where each component of a FLUX.3 model folder lives."""

    transformer: Path
    autoencoder: Path
    text_encoder: Path
    tokenizer: Path
    sampling: Path | None

    @classmethod
    def find(cls, folder: str | Path) -> Flux3Files:
        folder = Path(folder)
        if not folder.is_dir():
            raise MissingFilesError(f"model folder {folder} does not exist")
        if not (folder / "text_encoder").is_dir():
            raise MissingFilesError(
                f"no text encoder in {folder}: expected text_encoder/ holding Qwen3-VL-4B-Instruct "
                "(Qwen3VLForConditionalGeneration), as in the black-forest-labs/flux-3-image-klein repo"
            )
        tokenizer = next(
            (folder / name for name in ("tokenizer", "processor") if (folder / name).is_dir()), folder / "text_encoder"
        )
        autoencoder = next((folder / name for name in AUTOENCODER_FILES if (folder / name).exists()), None)
        if autoencoder is None:
            raise MissingFilesError(
                f"no autoencoder in {folder}: FLUX.3 uses the FLUX.2 autoencoder; put its ae.safetensors (from "
                "black-forest-labs/FLUX.2-dev, or flux2-vae.safetensors) or a diffusers vae/ folder there"
            )
        return cls(_find_transformer(folder), autoencoder, folder / "text_encoder", tokenizer,
                   _optional(folder / "sampling.json"))  # fmt: skip


def _find_transformer(folder: Path) -> Path:
    files = sorted({f for pattern in TRANSFORMER_FILES for f in folder.glob(pattern)})
    if len(files) > 1:
        raise ValueError(f"{folder} holds several transformer files ({', '.join(f.name for f in files)}); keep one")
    if files:
        return files[0]
    if (folder / "transformer").is_dir():
        return folder / "transformer"
    raise MissingFilesError(
        f"no FLUX.3 transformer in {folder}: expected one flux3-*.safetensors / flux-3-*.safetensors file or a "
        "diffusers transformer/ folder"
    )


def is_flux3_folder(folder: str | Path) -> bool:
    """Whether a model folder holds a FLUX.3 transformer: by file name, else by diffusers' class name."""
    folder = Path(folder)
    if any(next(folder.glob(pattern), None) for pattern in TRANSFORMER_FILES):
        return True
    config = folder / "transformer" / "config.json"
    return config.is_file() and _read_json(config).get("_class_name") == "Flux3Transformer2DModel"


def _defaults(variant: str, path: Path | None) -> Flux3SamplingDefaults:
    overrides = {} if path is None else _read_json(path)
    if not isinstance(overrides, dict) or set(overrides) - SAMPLING_KEYS:
        raise ValueError(f"{path}: expected a JSON object with keys among {sorted(SAMPLING_KEYS)}, got {overrides!r}")
    return replace(FLUX3_VARIANTS[variant], **overrides)


class Flux3Pipeline:
    """FLUX.3 generation; every stage is a method, as in FluxPipeline, so other pipelines can reuse them."""

    def __init__(
        self,
        model: Flux3,
        autoencoder: Flux2AutoEncoder,
        text_encoder: Qwen3VLEmbedder,
        defaults: Flux3SamplingDefaults | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        offload: bool = False,
        compile: bool | dict = False,
    ):
        self.model, self.autoencoder, self.text_encoder = model, autoencoder, text_encoder
        self.variant = "flux3-klein" if model.config.flow_map else "flux3-klein-base"
        self.defaults = defaults or FLUX3_VARIANTS[self.variant]
        self.device = torch.device(device)
        self.dtype = dtype
        self.offload = offload and self.device.type != "cpu"
        widths = {
            "in_channels (the AE's 4 x 32 patchified latent channels)": (
                model.config.in_channels, autoencoder.latent_channels),
            "context_in_dim (8 x the Qwen3-VL width)": (model.config.context_in_dim, text_encoder.output_dim),
        }  # fmt: skip
        for name, (wanted, given) in widths.items():
            if wanted != given:
                raise ValueError(
                    f"the components do not belong together: the transformer's {name} is {wanted}, but the "
                    f"component gives {given} (FLUX.3 Klein needs the FLUX.2 AE and Qwen3-VL-4B-Instruct)"
                )
        self.compile_options = compile_transformer(model, compile)

    @classmethod
    def from_folder(
        cls, path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
        offload: bool = False, variant: str | None = None, compile: bool | dict = False,
    ) -> Flux3Pipeline:  # fmt: skip
        """Load every component of a FLUX.3 folder (module docstring). The autoencoder stays in float32; the
        transformer and the text encoder use `dtype`. offload=True keeps idle stages on the CPU. `variant` is
        read from the transformer; when given it must match (a check, not a switch). compile=True compiles the
        transformer's forward (as `FluxPipeline.from_folder`)."""
        files = Flux3Files.find(path)
        load_device = "cpu" if offload else device
        model = load_flux(files.transformer, dtype=dtype, device=load_device)
        if not isinstance(model, Flux3):
            raise ValueError(f"{files.transformer} is a {type(model).__name__} transformer, not FLUX.3")
        autoencoder = load_flux2_autoencoder(files.autoencoder, dtype=torch.float32, device=load_device)
        found = "flux3-klein" if model.config.flow_map else "flux3-klein-base"
        if variant is not None and variant != found:
            raise ValueError(f"variant {variant!r} does not fit {files.transformer}, which is {found}")
        defaults = _defaults(found, files.sampling)
        text_encoder = Qwen3VLEmbedder(files.text_encoder, defaults.max_length, dtype, load_device, files.tokenizer)
        return cls(model, autoencoder, text_encoder, defaults, device, dtype, offload, compile)

    # ------------------------------------------------------------------------------------------
    # Stages

    on_device = FluxPipeline.on_device
    to_pil = staticmethod(FluxPipeline.to_pil)

    @torch.inference_mode()
    def encode_prompt(self, prompt: str) -> tuple[Tensor, Tensor]:
        """One prompt -> txt (1, T, context_in_dim) and txt_ids (1, T, 4); T is its own window (a multiple of 80)."""
        with self.on_device(self.text_encoder):
            txt = self.text_encoder(prompt).to(self.device, self.dtype)
        return txt, s3.text_ids(1, txt.shape[1]).to(self.device)

    @torch.inference_mode()
    def encode_references(self, images: list[Image.Image]) -> tuple[Tensor, Tensor]:
        """Reference images -> cond tokens (1, R, 128) and cond_ids (1, R, 4), reference i at l = -(1 + i). The AE
        moves to the device once for all of them (with offload, each move copies its weights)."""
        check_references(images)
        tokens, ids = [], []
        with self.on_device(self.autoencoder):
            for index, image in enumerate(images):
                latent = self.autoencoder.encode(reference_pixels(image).to(self.device))  # (1, 128, h, w), normalised
                tokens.append(s3.pack(latent).to(self.dtype))
                ids.append(s3.image_ids(1, *latent.shape[-2:], reference=index).to(self.device))
        return torch.cat(tokens, dim=1), torch.cat(ids, dim=1)

    def reference_tokens(self, images: list[Image.Image]) -> int:
        """R, the number of tokens `encode_references` makes of these images, from their sizes alone."""
        factor = self.autoencoder.downsample_factor
        return sum((width // factor) * (height // factor) for width, height in map(reference_size, images))

    def check_size(self, height: int, width: int) -> tuple[int, int]:
        """-> the token grid (h, w): sides must be multiples of the autoencoder's factor (16)."""
        return s3.check_size(height, width, self.autoencoder.downsample_factor)

    def prepare_latents(
        self, num_samples: int, height: int, width: int, seed: int | torch.Generator
    ) -> tuple[Tensor, Tensor]:
        """Seeded noise tokens img (B, L, 128) in the pipeline dtype and img_ids (B, L, 4) (the signature of the
        other generations' pipelines): drawn on the CPU from an integer seed, or on a torch.Generator's device."""
        h, w = self.check_size(height, width)
        noise = s3.get_noise(num_samples, height, width, seed=seed, dtype=self.dtype,
                             channels=self.autoencoder.latent_channels, patch=self.autoencoder.downsample_factor)
        return s3.pack(noise).to(self.device), s3.image_ids(num_samples, h, w).to(self.device)  # fmt: skip

    def timesteps(self, num_steps: int, image_seq_len: int) -> list[float]:
        """The constant-shift sigmas: FLUX.3 does not shift by resolution (`image_seq_len` is unused)."""
        return s3.get_schedule(num_steps)

    def settings(
        self, width: int | None, height: int | None, num_steps: int | None, guidance: float | None
    ) -> tuple[int, int, int, float]:
        """Fill unset settings from the folder's defaults and check them: (width, height, num_steps, guidance);
        guidance is Base's CFG scale (1 = none), always 1 for the distilled flow map."""
        width = self.defaults.width if width is None else width
        height = self.defaults.height if height is None else height
        self.check_size(height, width)
        num_steps = self.defaults.num_steps if num_steps is None else num_steps
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be an integer >= 1 (None for the default {self.defaults.num_steps}), "
                             f"got {num_steps!r}")
        guidance = self.defaults.guidance if guidance is None else guidance
        if not math.isfinite(guidance):
            raise ValueError(f"guidance must be a finite number, got {guidance!r}")
        if self.model.config.flow_map and guidance != 1.0:
            raise ValueError("the distilled FLUX.3 Klein takes no guidance (it is a flow map); use the Base model")
        return width, height, num_steps, guidance

    def memory_estimate(
        self, height: int, width: int, batch: int = 1, concepts: int = 0, text_tokens: int | None = None,
        reference_tokens: int = 0, reference_pixels: int = 0,
    ) -> dict[str, int]:  # fmt: skip
        """Bytes each stage of a run at this size needs beyond the weights (flux_mini/memory.py): one token per
        16x16 pixels plus the references' (`reference_tokens`, counted as image tokens), the prompt's text window
        (`text_tokens`; unknown: 512, a long prompt's, not the cap `max_length`, which would refuse runs that
        fit), the AE's widest full-resolution layer, which encodes the largest prepared reference
        (`reference_pixels`, one at a time) as well as decoding the output."""
        config, autoencoder = self.model.config, self.autoencoder
        text_tokens = min(512, self.text_encoder.max_length) if text_tokens is None else text_tokens
        h, w = self.check_size(height, width)
        llm = self.text_encoder.decoder.config
        size = RunSize(
            batch=batch,
            image_tokens=h * w,
            text_tokens=text_tokens,
            hidden=config.hidden_size,
            heads=config.num_heads,
            mlp_ratio=config.mlp_ratio,
            token_channels=config.in_channels,
            dtype_bytes=self.dtype.itemsize,
            concepts=concepts,
            pixels=height * width,
            autoencoder_channels=autoencoder.config.ch * autoencoder.config.ch_mult[0],
            t5_heads=llm.num_attention_heads,  # the LLM's (B, heads, T, T) scores
        )
        return estimate_with_references(size, reference_tokens, reference_pixels)

    def check_memory(
        self, height: int, width: int, batch: int = 1, concepts: int = 0, available: int | None = None,
        text_tokens: int | None = None, reference_tokens: int = 0, reference_pixels: int = 0,
    ):  # fmt: skip
        """Refuse up front a run whose estimate exceeds the free memory of the device, naming a size that fits
        (or, when the references are what does not fit, saying so)."""
        check_fits(
            lambda h, w: self.memory_estimate(h, w, batch, concepts, text_tokens, reference_tokens, reference_pixels),
            height, width, batch, self.autoencoder.downsample_factor, self.device, available,
            f"no image size fits: lower max_length ({self.text_encoder.max_length}) in the folder's sampling.json",
            reference_tokens,
        )

    # -- what ConceptAttention asks of every generation's pipeline (concept_attention/pipeline.py) ------------

    def concept_map_layers(self) -> None:
        """None: the model's default, every joint block (the concept stream rides them all)."""
        return None

    def prompt_inputs(self, prompt: str, pooled: str | None = None) -> dict[str, Tensor]:
        """One prompt -> the model's text inputs txt, txt_ids in its own window (FLUX.3 has no pooled vector)."""
        if pooled not in (None, "zero"):
            raise ValueError(f"pooled={pooled!r}: FLUX.3 has no pooled text vector; leave pooled='zero'")
        txt, txt_ids = self.encode_prompt(prompt)
        return {"txt": txt, "txt_ids": txt_ids}

    def concept_inputs(
        self, concepts: list[str], encoding: str, pooled: str, softmax: bool, positions: str
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Concept words -> (1, r, context_in_dim) Qwen3-VL features, each concept's own tokens (first, or the
        mean); the concepts need nothing else (their time vector is the text tokens', built by the model)."""
        from concept_attention.encoding import check_concept_tokens, encode_concepts_flux3

        if pooled != "zero":
            raise ValueError(f"concept_pooled={pooled!r}: FLUX.3 has no pooled vector; leave it 'zero'")
        if positions != "zero":
            raise ValueError("concept_positions='authors' is a FLUX.2 convention; FLUX.3 concepts have no positions")
        check_concept_tokens(self.text_encoder, concepts, softmax)
        with self.on_device(self.text_encoder):
            concept_txt = encode_concepts_flux3(self.text_encoder, concepts, encoding)
        return concept_txt[None].to(self.device, self.dtype), {}

    def step_inputs(
        self, t_curr: float, t_next: float, guidance: float, like: Tensor
    ) -> tuple[dict[str, Tensor], float | None]:
        """(the model's time inputs for a step from t_curr to t_next, the CFG scale): the flow map also takes the
        time it jumps to; Base uses CFG unless guidance is 1 (as `flux3_sampling.denoise`)."""
        inputs = {"timesteps": s3.time_vector(t_curr, like)}
        if self.model.config.flow_map:
            inputs["target_timesteps"] = s3.time_vector(t_next, like)
        return inputs, (None if guidance == 1.0 else guidance)

    euler_step = staticmethod(s3.euler_step)
    pack_latent = staticmethod(s3.pack)

    def token_grid(self, height: int, width: int) -> tuple[int, int]:
        """The (h, w) grid of image tokens: one per 16x16 pixels (the FLUX.2 AE patchifies itself)."""
        return self.check_size(height, width)

    @torch.inference_mode()
    def decode_tokens(self, tokens: Tensor, height: int, width: int) -> Tensor:
        """Final tokens (1, L, 128) -> images (1, 3, height, width) in float32, clamped to [-1, 1]."""
        latent = s3.unpack(tokens.float(), *self.check_size(height, width))
        with self.on_device(self.autoencoder):
            images = self.autoencoder.decode(latent.to(self.device))
        return images.float().clamp(-1, 1)

    # ------------------------------------------------------------------------------------------

    def __call__(
        self,
        prompt: str,
        width: int | None = None,
        height: int | None = None,
        num_steps: int | None = None,
        guidance: float | None = None,
        seed: int | torch.Generator = 0,
        references: list[Image.Image] | None = None,
        negative_prompt: str = "",
        progress: bool = True,
    ) -> Image.Image:
        """One image for one prompt (each prompt has its own text window). `guidance` is Base's CFG scale (1 turns
        CFG off); the distilled model takes none. Up to 10 `references` make it an edit (module docstring)."""
        width = self.defaults.width if width is None else width
        height = self.defaults.height if height is None else height
        num_steps = self.defaults.num_steps if num_steps is None else num_steps
        guidance = self.defaults.guidance if guidance is None else guidance
        if self.model.config.flow_map and guidance != 1.0:
            raise ValueError("the distilled FLUX.3 Klein takes no guidance (it is a flow map); use the Base model")
        if not math.isfinite(guidance):
            raise ValueError(f"guidance must be a finite number, got {guidance!r}")
        if references is not None:
            check_references(references)
        self.check_size(height, width)
        reference_tokens = 0 if references is None else self.reference_tokens(references)
        reference_pixels = 0 if references is None else max(w * h for w, h in map(reference_size, references))
        self.check_memory(height, width, text_tokens=self.text_encoder.window(prompt),
                          reference_tokens=reference_tokens, reference_pixels=reference_pixels)  # fmt: skip
        txt, txt_ids = self.encode_prompt(prompt)
        negative_txt, negative_ids = self.encode_prompt(negative_prompt) if guidance != 1.0 else (None, None)
        cond, cond_ids = self.encode_references(references) if references is not None else (None, None)
        img, img_ids = self.prepare_latents(1, height, width, seed)
        with self.on_device(self.model):
            tokens = s3.denoise(
                self.model, img, img_ids, txt, txt_ids, s3.get_schedule(num_steps), cond, cond_ids,
                negative_txt, negative_ids, guidance, progress,
            )  # fmt: skip
        images = self.decode_tokens(check_finite(tokens, "latents"), height, width)
        return self.to_pil(check_finite(images, "decoded images"))[0]


def check_reference_size(image: Image.Image, name: str = "reference image") -> None:
    """A reference must keep at least one 16 x 16 patch after the crop to multiples of 16."""
    if min(image.size) < MIN_REFERENCE_SIDE:
        raise ValueError(f"{name} is {image.width} x {image.height} pixels; FLUX.3 needs at least "
                         f"{MIN_REFERENCE_SIDE} pixels a side: use a larger image")  # fmt: skip


def check_references(images) -> None:
    """1 to 10 PIL images, each at least 16 pixels a side (the list checks are FLUX.2's)."""
    check_reference_list(images, check_reference_size)
    if len(images) > MAX_REFERENCES:
        raise ValueError(f"FLUX.3 takes 1 to {MAX_REFERENCES} reference images, got {len(images)}; use fewer")


def downscaled_size(width: int, height: int) -> tuple[int, int]:
    """Above 1024 x 1024 pixels, both sides times sqrt(REFERENCE_PIXELS / pixels), rounded (at least 16)."""
    scale = math.sqrt(REFERENCE_PIXELS / (width * height))
    if scale >= 1.0:
        return width, height
    return max(16, round(width * scale)), max(16, round(height * scale))


def reference_size(image: Image.Image) -> tuple[int, int]:
    """The (width, height) of a prepared reference: downscaled, then cropped to multiples of 16."""
    width, height = downscaled_size(*image.size)
    return width // 16 * 16, height // 16 * 16


def reference_pixels(image: Image.Image, name: str = "reference image") -> Tensor:
    """A PIL image -> (1, 3, H, W) in [-1, 1]: refused below 16 pixels a side, downscaled with LANCZOS to at most
    1024 x 1024 pixels (`downscaled_size`), then center-cropped to multiples of 16 (`reference_size`)."""
    check_reference_size(image, name)
    width, height = reference_size(image)
    image = image.convert("RGB")
    if (size := downscaled_size(*image.size)) != image.size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    left, top = (image.width - width) // 2, (image.height - height) // 2
    image = image.crop((left, top, left + width, top + height))
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)  # RGB rows, (H * W * 3,)
    return rearrange(pixels, "(h w c) -> 1 c h w", h=height, w=width).float() / 127.5 - 1.0
