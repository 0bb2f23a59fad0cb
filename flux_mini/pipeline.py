"""Text-to-image with Flux.1: find the files, encode the prompt, denoise, decode (spec §5).

A model folder is either the official single-file layout

    flux1-*.safetensors   the transformer (BFL keys; flux_config.json beside it is optional)
    ae.safetensors        the autoencoder   (or identity-autoencoder.json for a pixel-space model)
    t5/  clip/            tokenizer + encoder folders (also: text_encoder_2/ + tokenizer_2/ for T5,
                          text_encoder/ + tokenizer/ for CLIP, as in the FLUX.1 Hugging Face repos)
    sampling.json         optional overrides of the variant's defaults, e.g. {"t5_max_length": 32, "width": 64,
                          "height": 64, "num_steps": 8} for a model made for another size (the only source of
                          defaults: both CLIs and both pipelines read them from here)

or a diffusers snapshot (transformer/, vae/, text_encoder/ = CLIP, text_encoder_2/ = T5, tokenizer/,
tokenizer_2/). A top-level flux1-*.safetensors wins over transformer/, ae.safetensors over vae/.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor, nn

from flux_mini.autoencoder import AutoEncoder, IdentityAutoEncoder, load_autoencoder
from flux_mini.convert import config_from_diffusers
from flux_mini.loading import load_flux
from flux_mini.flux1 import Flux, FluxConfig
from flux_mini.memory import RunSize, check_fits, estimate_bytes
from flux_mini.sampling import (
    check_seed,
    denoise,
    euler_step,
    get_noise,
    get_schedule,
    image_ids,
    latent_size,
    pack,
    text_ids,
    timestep_vector,
    unpack,
)
from flux_mini.text_encoders import CLIPEmbedder, MissingFilesError, T5Embedder


@dataclass(frozen=True)
class SamplingDefaults:
    """What a model family was distilled / trained for (reference CLIs, spec §5.7)."""

    t5_max_length: int
    num_steps: int
    shift: bool  # resolution-dependent schedule shift
    guidance: float  # used only by guidance-distilled (dev-family) models
    clip_max_length: int = 77
    width: int = 1024  # the image size the model was made for: generation, and the resize of encoded images
    height: int = 1024

    def __post_init__(self) -> None:
        for name in ("t5_max_length", "num_steps", "clip_max_length", "width", "height"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"sampling default {name} must be a positive integer, got {value!r}")
        if isinstance(self.guidance, bool) or not isinstance(self.guidance, (int, float)) or not math.isfinite(
            self.guidance
        ):
            raise ValueError(f"sampling default guidance must be a finite number, got {self.guidance!r}")


VARIANTS = {
    "schnell": SamplingDefaults(t5_max_length=256, num_steps=4, shift=False, guidance=3.5),
    "dev": SamplingDefaults(t5_max_length=512, num_steps=50, shift=True, guidance=3.5),
}


@dataclass(frozen=True)
class ModelFiles:
    """Where each component of a model folder lives."""

    transformer: Path  # a .safetensors file or a diffusers transformer/ folder
    flux_config: Path | None
    autoencoder: Path  # ae.safetensors, identity-autoencoder.json or a diffusers vae/ folder
    t5: Path
    t5_tokenizer: Path
    clip: Path
    clip_tokenizer: Path
    sampling: Path | None

    @classmethod
    def find(cls, folder: str | Path) -> ModelFiles:
        folder = Path(folder)
        if not folder.is_dir():
            raise MissingFilesError(f"model folder {folder} does not exist")
        transformer, autoencoder = _find_transformer(folder), _find_autoencoder(folder)
        t5, t5_tokenizer = _encoder_folders(folder, "t5", "text_encoder_2", "tokenizer_2", "T5 encoder")
        clip, clip_tokenizer = _encoder_folders(folder, "clip", "text_encoder", "tokenizer", "CLIP encoder")
        return cls(
            transformer=transformer,
            flux_config=_optional(folder / "flux_config.json"),
            autoencoder=autoencoder,
            t5=t5,
            t5_tokenizer=t5_tokenizer,
            clip=clip,
            clip_tokenizer=clip_tokenizer,
            sampling=_optional(folder / "sampling.json"),
        )


def _optional(path: Path) -> Path | None:
    return path if path.is_file() else None


def _encoder_folders(folder: Path, own: str, model: str, tokenizer: str, what: str) -> tuple[Path, Path]:
    """(encoder, tokenizer) folders: `own/` holding both, else the HF repos' `model/` + `tokenizer/`
    (or tokenizer files beside the model)."""
    if (folder / own).is_dir():
        return folder / own, folder / own
    if (folder / model).is_dir():
        return folder / model, folder / tokenizer if (folder / tokenizer).is_dir() else folder / model
    raise MissingFilesError(
        f"no {what} in {folder}: expected the folder {own}/ (tokenizer and encoder) or {model}/ + {tokenizer}/ "
        "(as in the black-forest-labs/FLUX.1-schnell repo)"
    )


def _find_transformer(folder: Path) -> Path:
    files = sorted(folder.glob("flux1-*.safetensors"))
    if len(files) > 1:
        raise ValueError(f"{folder} holds several transformer files ({', '.join(f.name for f in files)}); keep one")
    if files:
        return files[0]
    if (folder / "transformer").is_dir():
        return folder / "transformer"
    raise MissingFilesError(
        f"no transformer in {folder}: expected one flux1-*.safetensors file (e.g. flux1-schnell.safetensors) "
        "or a diffusers transformer/ folder"
    )


def _find_autoencoder(folder: Path) -> Path:
    for name in ("ae.safetensors", "identity-autoencoder.json", "vae"):
        if (folder / name).exists():
            return folder / name
    raise MissingFilesError(
        f"no autoencoder in {folder}: expected ae.safetensors (from the FLUX.1 repos), a diffusers vae/ folder, "
        "or identity-autoencoder.json for a pixel-space model"
    )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); fix or remove it") from None


def _sampling_defaults(variant: str, overrides: Path | None) -> SamplingDefaults:
    if overrides is None:
        return VARIANTS[variant]
    values = _read_json(overrides)
    if not isinstance(values, dict):
        raise ValueError(f"{overrides} must hold a JSON object such as {{\"num_steps\": 8}}, got {values!r}")
    known = {f.name for f in fields(SamplingDefaults)}
    if unknown := sorted(set(values) - known):
        raise ValueError(f"{overrides}: unknown keys {unknown}; allowed keys are {sorted(known)}")
    try:
        return replace(VARIANTS[variant], **values)
    except ValueError as e:
        raise ValueError(f"{overrides}: {e}") from None


def read_sampling_defaults(folder: str | Path, variant: str = "schnell") -> SamplingDefaults:
    """A model folder's defaults without loading it: its sampling.json over the variant's."""
    return _sampling_defaults(variant, _optional(Path(folder) / "sampling.json"))


def _flux_config(files: ModelFiles) -> FluxConfig | None:
    """flux_config.json if present, else a diffusers transformer/config.json (its RoPE split cannot be
    read from shapes for non-official head dims), else None: load_flux then reads the file's metadata or shapes."""
    if files.flux_config is not None:
        try:
            return FluxConfig(**_read_json(files.flux_config))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{files.flux_config} is not a valid FluxConfig ({e})") from None
    diffusers_config = files.transformer / "config.json"
    if not (files.transformer.is_dir() and diffusers_config.is_file()):
        return None
    c = _read_json(diffusers_config)
    try:
        return config_from_diffusers(c)
    except KeyError as e:
        raise ValueError(f"{diffusers_config} lacks {e}: it is not a diffusers FluxTransformer2DModel config") from None


@contextlib.contextmanager
def quiet_transformers(logging: bool = False):
    """transformers' weight-loading bars off for the block (they print once per encoder, ignore `progress`
    and warn about IProgress in notebooks without widgets); with `logging` its log lines below errors too.
    Its previous state comes back after the block."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    if logging:
        hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


class NonFiniteError(ValueError):
    """A result holds NaN or Inf values; raised instead of writing a black image or empty maps."""


def check_finite(tensor: Tensor, what: str) -> Tensor:
    """Refuse NaN/Inf in `tensor`, naming the likely causes."""
    if not torch.isfinite(tensor).all():
        bad = (~torch.isfinite(tensor)).sum().item()
        raise NonFiniteError(
            f"the {what} hold {bad} NaN/Inf values of {tensor.numel()}: the weights may hold non-finite values "
            "(load_flux(..., check_finite=True) names them), t or guidance may be NaN or out of range, or float16 "
            "overflowed (use bfloat16 or float32)"
        )
    return tensor


def prompt_list(prompt: str | list[str]) -> list[str]:
    """One prompt or a list of prompts -> a non-empty list of strings (never a tokenizer's sentence pair)."""
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
    return list(prompts)


def compile_options(compile: bool | dict) -> dict | None:
    """A pipeline's `compile=` -> the keyword arguments of `torch.compile`, or None to run eagerly.

    True: torch.compile's defaults (inductor); a dict: its options, e.g. {"mode": "max-autotune"} or
    {"backend": "eager", "fullgraph": True}."""
    if compile is False:
        return None
    if compile is True:
        return {}
    if isinstance(compile, dict):
        return dict(compile)
    raise ValueError(f"compile must be True, False or a dict of torch.compile options, got {compile!r}")


def compile_transformer(model: nn.Module, compile: bool | dict) -> dict | None:
    """Compile `model`'s forward in place when asked (`nn.Module.compile`: the module, its state_dict keys and
    its other methods stay as they are) and return the options used, for the concept-map pass to reuse."""
    options = compile_options(compile)
    if options is not None:
        model.compile(**options)
    return options


class FluxPipeline:
    """Flux text-to-image. Every stage is a method, so other pipelines can reuse and rearrange them."""

    def __init__(
        self,
        model: Flux,
        autoencoder: AutoEncoder | IdentityAutoEncoder,
        t5: T5Embedder,
        clip: CLIPEmbedder,
        defaults: SamplingDefaults,
        variant: str,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        offload: bool = False,
        compile: bool | dict = False,
    ):
        self.model, self.autoencoder, self.t5, self.clip = model, autoencoder, t5, clip
        self.defaults = defaults
        self.variant = variant
        self.device = torch.device(device)
        self.dtype = dtype
        self.offload = offload and self.device.type != "cpu"
        widths = {
            "in_channels (4 x the AE latent channels)": (model.config.in_channels, 4 * autoencoder.z_channels),
            "context_in_dim (the T5 width)": (model.config.context_in_dim, t5.model.config.d_model),
            "vec_in_dim (the CLIP width)": (model.config.vec_in_dim, clip.model.config.hidden_size),
        }
        for name, (wanted, given) in widths.items():
            if wanted != given:
                raise ValueError(
                    f"the components do not belong together: the transformer's {name} is {wanted}, but the "
                    f"component gives {given}. (Fill/Canny/Depth transformers take extra image inputs and "
                    "are not text-to-image models.)"
                )
        self.compile_options = compile_transformer(model, compile)

    @property
    def is_schnell(self) -> bool:
        return self.variant == "schnell"

    @classmethod
    def from_folder(
        cls,
        path: str | Path,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        offload: bool = False,
        variant: str | None = None,
        compile: bool | dict = False,
    ) -> FluxPipeline:
        """Load every component from a model folder (see the module docstring for the layouts).

        variant: "schnell" (T5 length 256, 4 steps, no shift) or "dev" (512, 50 steps, shifted, guidance
        3.5); by default "dev" exactly when the transformer has a guidance embedder. The autoencoder
        stays in float32 (its file's dtype); the transformer and the text encoders use `dtype`.
        offload=True keeps all but the running stage on the CPU. compile=True compiles the transformer's
        forward with `torch.compile` (a dict: its options; see `compile_options`); the first call compiles."""
        if variant not in (None, *VARIANTS):
            raise ValueError(f"unknown variant {variant!r}; choose one of {sorted(VARIANTS)} or None (auto)")
        files = ModelFiles.find(path)
        load_device = "cpu" if offload else device
        model = load_flux(files.transformer, config=_flux_config(files), dtype=dtype, device=load_device)
        if files.autoencoder.suffix == ".json":
            autoencoder = IdentityAutoEncoder.from_json(files.autoencoder)
        else:
            autoencoder = load_autoencoder(files.autoencoder, dtype=torch.float32, device=load_device)
        variant = variant or ("dev" if model.config.guidance_embed else "schnell")
        defaults = _sampling_defaults(variant, files.sampling)
        with quiet_transformers():
            t5 = T5Embedder(files.t5, defaults.t5_max_length, dtype, load_device, files.t5_tokenizer)
            clip = CLIPEmbedder(files.clip, defaults.clip_max_length, dtype, load_device, files.clip_tokenizer)
        return cls(model, autoencoder, t5, clip, defaults, variant, device, dtype, offload, compile)

    # ------------------------------------------------------------------------------------------
    # Stages

    @contextlib.contextmanager
    def on_device(self, *modules: nn.Module):
        """With offload, move `modules` to the device for the duration of a stage, then back to the CPU."""
        if self.offload:
            for module in modules:
                module.to(self.device)
        try:
            yield
        finally:
            if self.offload:
                for module in modules:
                    module.to("cpu")

    def check_size(self, height: int, width: int) -> None:
        """Pixel sizes must be positive multiples of 2 * the AE's downsample factor (16 for Flux.1)."""
        multiple = 2 * self.autoencoder.downsample_factor
        for name, value in (("height", height), ("width", width)):
            if value <= 0 or value % multiple:
                lower, upper = max(multiple, value // multiple * multiple), (value // multiple + 1) * multiple
                raise ValueError(
                    f"{name} {value} is not a positive multiple of {multiple} (2 x the autoencoder's downsample "
                    f"factor {self.autoencoder.downsample_factor}); use e.g. {lower} or {upper}"
                )

    def memory_estimate(self, height: int, width: int, batch: int = 1, concepts: int = 0) -> dict[str, int]:
        """Bytes each stage of a run at this size needs beyond the weights (see flux_mini/memory.py)."""
        config, autoencoder = self.model.config, self.autoencoder
        h, w = latent_size(height, width, autoencoder.downsample_factor)
        size = RunSize(
            batch=batch,
            image_tokens=(h // 2) * (w // 2),
            text_tokens=self.t5.max_length,
            hidden=config.hidden_size,
            heads=config.num_heads,
            mlp_ratio=config.mlp_ratio,
            token_channels=config.in_channels,
            dtype_bytes=self.dtype.itemsize,
            concepts=concepts,
            pixels=height * width,
            autoencoder_channels=autoencoder.config.ch * autoencoder.config.ch_mult[0]
            if isinstance(autoencoder, AutoEncoder)
            else 0,
            t5_heads=self.t5.model.config.num_heads,
        )
        return estimate_bytes(size)

    def check_memory(self, height: int, width: int, batch: int = 1, concepts: int = 0, available: int | None = None):
        """Refuse up front a run whose estimate exceeds the free memory of the device, naming a size that fits."""
        check_fits(
            lambda h, w: self.memory_estimate(h, w, batch, concepts), height, width, batch,
            2 * self.autoencoder.downsample_factor, self.device, available,
            f"no image size fits: lower t5_max_length ({self.t5.max_length}) in the folder's sampling.json",
        )

    def encode_prompt(self, prompts: str | list[str]) -> tuple[Tensor, Tensor, Tensor]:
        """Prompts -> txt (B, T, d_T5), txt_ids (B, T, 3), y (B, d_CLIP), in the pipeline dtype on the device."""
        prompts = prompt_list(prompts)
        with self.on_device(self.t5, self.clip):
            txt = self.t5(prompts).to(self.device, self.dtype)
            y = self.clip(prompts).to(self.device, self.dtype)
        return txt, text_ids(len(prompts), txt.shape[1], self.device), y

    def prepare_latents(
        self, num_samples: int, height: int, width: int, seed: int | torch.Generator
    ) -> tuple[Tensor, Tensor]:
        """Seeded noise, packed: img (B, L, 4z) in the pipeline dtype and img_ids (B, L, 3), on the device.
        An integer seed gives sample i the noise of seed + i; a torch.Generator draws on its own device."""
        self.check_size(height, width)
        noise = get_noise(
            num_samples,
            height,
            width,
            channels=self.autoencoder.z_channels,
            downsample_factor=self.autoencoder.downsample_factor,
            dtype=self.dtype,
            seed=seed,
            device=self.device,
        )
        h, w = noise.shape[-2:]
        return pack(noise), image_ids(num_samples, h // 2, w // 2, self.device)

    def timesteps(self, num_steps: int, image_seq_len: int) -> list[float]:
        return get_schedule(num_steps, image_seq_len, shift=self.defaults.shift)

    # -- what ConceptAttention asks of every generation's pipeline (concept_attention/pipeline.py) ------------

    def concept_map_layers(self) -> list[int]:
        """The layers whose maps are averaged by default: the last four double blocks (15-18 on Flux.1)."""
        depth = self.model.config.depth
        return list(range(max(0, depth - 4), depth))

    def prompt_inputs(self, prompt: str, pooled: str | None = None) -> dict[str, Tensor]:
        """One prompt -> the model's text inputs: txt, txt_ids and the pooled CLIP vector y, zeroed with
        pooled="zero" (the authors' encode_image protocol); None keeps CLIP(prompt)."""
        if pooled not in (None, "zero", "clip"):
            raise ValueError(f"pooled must be one of ('zero', 'clip'), got {pooled!r}")
        txt, txt_ids, y = self.encode_prompt([prompt])
        return {"txt": txt, "txt_ids": txt_ids, "y": torch.zeros_like(y) if pooled == "zero" else y}

    def concept_inputs(
        self, concepts: list[str], encoding: str, pooled: str, softmax: bool, positions: str
    ) -> tuple[Tensor, dict[str, Tensor | None]]:
        """Concept words -> (1, r, d_T5) T5 embeddings and the concept stream's pooled input concept_y:
        CLIP of the joined concepts (pooled="clip") or zeros (None)."""
        from concept_attention.encoding import check_concept_tokens, encode_concepts

        if pooled not in ("zero", "clip"):
            raise ValueError(f"concept_pooled must be one of ('zero', 'clip'), got {pooled!r}")
        if positions != "zero":
            raise ValueError("concept_positions='authors' is a FLUX.2 convention; Flux.1 concepts have no positions")
        check_concept_tokens(self.t5, concepts, softmax)
        with self.on_device(self.t5, self.clip):
            concept_txt = encode_concepts(self.t5, concepts, encoding)[None].to(self.device, self.dtype)
            concept_y = self.clip([" ".join(concepts)]).to(self.device, self.dtype) if pooled == "clip" else None
        return concept_txt, {"concept_y": concept_y}

    def step_inputs(
        self, t_curr: float, t_next: float, guidance: float | None, like: Tensor
    ) -> tuple[dict[str, Tensor | None], float | None]:
        """(the model's time inputs for a step from t_curr to t_next, the CFG scale): the embedded guidance of
        the dev family; Flux.1 has no CFG."""
        return {"timesteps": timestep_vector(t_curr, like),
                "guidance": None if guidance is None else timestep_vector(guidance, like)}, None  # fmt: skip

    euler_step = staticmethod(euler_step)

    def pack_latent(self, latent: Tensor) -> Tensor:
        """An autoencoder latent (1, z, h, w) -> tokens (1, h/2 * w/2, 4z)."""
        return pack(latent)

    def token_grid(self, height: int, width: int) -> tuple[int, int]:
        """The (h, w) grid of image tokens for an image size: one token per 2x2 latent patch."""
        h, w = latent_size(height, width, self.autoencoder.downsample_factor)
        return h // 2, w // 2

    def denoise(
        self,
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        y: Tensor,
        timesteps: list[float],
        guidance: float | None = None,
        progress: bool = True,
        interventions=None,
        grad: bool = False,
    ) -> Tensor:
        """The Euler loop on the transformer; guidance only reaches dev-family models. `interventions`
        (`flux_mini.interp.Interventions`) caches or patches named sites per step; autograd only with `grad`."""
        if not self.model.config.guidance_embed:
            guidance = None
        elif guidance is None:
            guidance = self.defaults.guidance
        with self.on_device(self.model):
            return denoise(
                self.model, img, img_ids, txt, txt_ids, y, timesteps, guidance, progress, interventions, grad
            )

    def decode_tokens(self, tokens: Tensor, height: int, width: int) -> Tensor:
        """Final tokens (B, L, 4z) -> images (B, C, height, width) in float32, clamped to [-1, 1]."""
        self.check_size(height, width)
        h, w = latent_size(height, width, self.autoencoder.downsample_factor)
        latent = unpack(tokens.float(), h, w)
        with self.on_device(self.autoencoder):
            images = self.autoencoder.decode(latent.to(self.device))
        return images.float().clamp(-1, 1)

    @staticmethod
    def to_pil(images: Tensor) -> list[Image.Image]:
        """Images (B, 3, H, W) in [-1, 1] -> RGB PIL images: clamp, then uint8 = trunc(127.5 * (x + 1)),
        truncating as the reference does (diffusers rounds instead)."""
        pixels = (127.5 * (images.detach().float().clamp(-1, 1) + 1)).to(torch.uint8).cpu()
        return [Image.fromarray(p.permute(1, 2, 0).numpy()) for p in pixels]

    # ------------------------------------------------------------------------------------------

    def settings(
        self, width: int | None, height: int | None, num_steps: int | None, guidance: float | None
    ) -> tuple[int, int, int, float | None]:
        """Fill unset settings from the folder's defaults (one source for every entry point) and check them:
        (width, height, num_steps, guidance); guidance is None for models without a guidance embedder."""
        width = self.defaults.width if width is None else width
        height = self.defaults.height if height is None else height
        self.check_size(height, width)
        num_steps = self.defaults.num_steps if num_steps is None else num_steps
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be an integer >= 1 (None for the default {self.defaults.num_steps}), "
                             f"got {num_steps!r}")
        if not self.model.config.guidance_embed:
            guidance = None
        elif guidance is None:
            guidance = self.defaults.guidance
        elif not math.isfinite(guidance):
            raise ValueError(f"guidance must be a finite number, got {guidance!r}")
        return width, height, num_steps, guidance

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
    ) -> Image.Image | list[Image.Image]:
        """Generate one image per prompt (a PIL image for a string, a list for a list).

        Unset width, height, num_steps and guidance come from the model folder (sampling.json, else the
        variant's: 1024x1024, 4 steps for schnell, 50 steps and guidance 3.5 for dev); schnell models ignore
        guidance. Sizes must be multiples of 16 (of 2 x the AE downsample factor). Prompt i of a list uses
        seed + i, so a list gives the images of a loop; a torch.Generator draws the whole batch from it.
        `interventions` (`flux_mini.interp.Interventions`) caches or patches named sites at every (or chosen)
        denoising steps; the cache stays on it (`interventions.cache[step][name]`). Runs without autograd."""
        prompts = prompt_list(prompt)
        width, height, num_steps, guidance = self.settings(width, height, num_steps, guidance)
        check_seed(seed, len(prompts))
        self.check_memory(height, width, len(prompts))
        with torch.no_grad():
            txt, txt_ids, y = self.encode_prompt(prompts)
            img, img_ids = self.prepare_latents(len(prompts), height, width, seed)
            timesteps = self.timesteps(num_steps, img.shape[1])
            tokens = self.denoise(img, img_ids, txt, txt_ids, y, timesteps, guidance, progress, interventions)
            tokens = check_finite(tokens, "latents")
            images = self.to_pil(check_finite(self.decode_tokens(tokens, height, width), "decoded images"))
        return images[0] if isinstance(prompt, str) else images
