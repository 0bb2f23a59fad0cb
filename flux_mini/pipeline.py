"""Text-to-image with Flux.1: find the files, encode the prompt, denoise, decode (spec §5).

A model folder is either the official single-file layout

    flux1-*.safetensors   the transformer (BFL keys; flux_config.json beside it is optional)
    ae.safetensors        the autoencoder   (or identity-autoencoder.json for a pixel-space model)
    t5/  clip/            tokenizer + encoder folders (also: text_encoder_2/ + tokenizer_2/ for T5,
                          text_encoder/ + tokenizer/ for CLIP, as in the FLUX.1 Hugging Face repos)
    sampling.json         optional overrides of the variant's defaults, e.g. {"t5_max_length": 32}

or a diffusers snapshot (transformer/, vae/, text_encoder/ = CLIP, text_encoder_2/ = T5, tokenizer/,
tokenizer_2/). A top-level flux1-*.safetensors wins over transformer/, ae.safetensors over vae/.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor, nn

from flux_mini.autoencoder import AutoEncoder, IdentityAutoEncoder, load_autoencoder
from flux_mini.convert import config_from_diffusers
from flux_mini.loading import load_flux
from flux_mini.flux1 import Flux, FluxConfig
from flux_mini.sampling import denoise, get_noise, get_schedule, image_ids, latent_size, pack, text_ids, unpack
from flux_mini.text_encoders import CLIPEmbedder, MissingFilesError, T5Embedder


@dataclass(frozen=True)
class SamplingDefaults:
    """What a model family was distilled / trained for (reference CLIs, spec §5.7)."""

    t5_max_length: int
    num_steps: int
    shift: bool  # resolution-dependent schedule shift
    guidance: float  # used only by guidance-distilled (dev-family) models
    clip_max_length: int = 77


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
    known = {f.name for f in fields(SamplingDefaults)}
    if unknown := sorted(set(values) - known):
        raise ValueError(f"{overrides}: unknown keys {unknown}; allowed keys are {sorted(known)}")
    return replace(VARIANTS[variant], **values)


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
    ) -> FluxPipeline:
        """Load every component from a model folder (see the module docstring for the layouts).

        variant: "schnell" (T5 length 256, 4 steps, no shift) or "dev" (512, 50 steps, shifted, guidance
        3.5); by default "dev" exactly when the transformer has a guidance embedder. The autoencoder
        stays in float32 (its file's dtype); the transformer and the text encoders use `dtype`.
        offload=True keeps all but the running stage on the CPU."""
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
        t5 = T5Embedder(files.t5, defaults.t5_max_length, dtype, load_device, files.t5_tokenizer)
        clip = CLIPEmbedder(files.clip, defaults.clip_max_length, dtype, load_device, files.clip_tokenizer)
        return cls(model, autoencoder, t5, clip, defaults, variant, device, dtype, offload)

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

    def encode_prompt(self, prompts: str | list[str]) -> tuple[Tensor, Tensor, Tensor]:
        """Prompts -> txt (B, T, d_T5), txt_ids (B, T, 3), y (B, d_CLIP), in the pipeline dtype on the device."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        with self.on_device(self.t5, self.clip):
            txt = self.t5(prompts).to(self.device, self.dtype)
            y = self.clip(prompts).to(self.device, self.dtype)
        return txt, text_ids(len(prompts), txt.shape[1], self.device), y

    def prepare_latents(self, num_samples: int, height: int, width: int, seed: int) -> tuple[Tensor, Tensor]:
        """Seeded noise, packed: img (B, L, 4z) in the pipeline dtype and img_ids (B, L, 3), on the device."""
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

    def __call__(
        self,
        prompt: str | list[str],
        width: int = 1024,
        height: int = 1024,
        num_steps: int | None = None,
        guidance: float | None = None,
        seed: int = 0,
        progress: bool = True,
        interventions=None,
    ) -> Image.Image | list[Image.Image]:
        """Generate one image per prompt (a PIL image for a string, a list for a list).

        width and height must be multiples of 16 (of 2 x the AE downsample factor): ValueError otherwise.
        num_steps and guidance default to the variant's; schnell models ignore guidance. `interventions`
        (`flux_mini.interp.Interventions`) caches or patches named sites at every (or chosen) denoising
        steps; the cache stays on it (`interventions.cache[step][name]`). Runs without autograd."""
        self.check_size(height, width)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        with torch.no_grad():
            txt, txt_ids, y = self.encode_prompt(prompts)
            img, img_ids = self.prepare_latents(len(prompts), height, width, seed)
            timesteps = self.timesteps(num_steps or self.defaults.num_steps, img.shape[1])
            tokens = self.denoise(img, img_ids, txt, txt_ids, y, timesteps, guidance, progress, interventions)
            images = self.to_pil(self.decode_tokens(tokens, height, width))
        return images[0] if isinstance(prompt, str) else images
