"""The FLUX.2 autoencoder (flux2-format.md §5), in the official (BFL) parameter layout.

The convolutional trunk is the Flux.1 one (imported from flux_mini.autoencoder) with 32 latent channels and two
1x1 convs: `encoder.quant_conv` on the 64 moments, `decoder.post_quant_conv` first in the decoder. What the
transformer sees is not the latent itself: the posterior mean is cut into 2x2 patches (32 -> 128 channels) and
normalised with the running statistics of a BatchNorm (`bn`), replacing Flux.1's scale/shift factors.

Images are (B, 3, H, W) in [-1, 1]; latents are (B, 128, H/16, W/16) for the official config (in general
(B, 4z, H/2f, W/2f), f the trunk's downsample factor). Module names match `ae.safetensors`, so `state_dict()`
is the checkpoint layout; `load_flux2_autoencoder` also reads the diffusers `AutoencoderKLFlux2` layout.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from einops import rearrange
from torch import Tensor, nn

from flux_mini.autoencoder import (
    AutoEncoderConfig,
    Decoder,
    Encoder,
    _check_image,
    _prefix_of,
    _resolve,
    bfl_to_diffusers,
    diffusers_to_bfl,
    infer_config,
)
from flux_mini.checkpoint import CheckpointError, load_strict, read_safetensors, strip_prefix

PATCH = 2  # the 2x2 patchify is fixed in the reference (`patch_size (2, 2)`)


@dataclass(frozen=True)
class Flux2AutoEncoderConfig:
    """Hyperparameters with the official field names; the defaults are the FLUX.2 `ae.safetensors`."""

    resolution: int = 256  # stored by the official config; changes no shape or computation
    in_channels: int = 3
    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 32
    bn_eps: float = 1e-4  # hard-coded in the reference module; diffusers' `batch_norm_eps`

    def __post_init__(self) -> None:
        object.__setattr__(self, "ch_mult", self.trunk.ch_mult)  # validates the trunk fields, normalises ch_mult

    @property
    def trunk(self) -> AutoEncoderConfig:
        """The Flux.1-style encoder/decoder these fields describe (its scale/shift are unused here)."""
        return AutoEncoderConfig(
            resolution=self.resolution,
            in_channels=self.in_channels,
            ch=self.ch,
            out_ch=self.out_ch,
            ch_mult=self.ch_mult,
            num_res_blocks=self.num_res_blocks,
            z_channels=self.z_channels,
        )

    @property
    def latent_channels(self) -> int:
        return PATCH * PATCH * self.z_channels

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent pixel, patchify included: 16 for the official AE."""
        return PATCH * self.trunk.downsample_factor

    def to_dict(self) -> dict:
        return {**asdict(self), "ch_mult": list(self.ch_mult)}


class Flux2Encoder(Encoder):
    """The Flux.1 encoder followed by `quant_conv` (1x1, 2z -> 2z) on the moments."""

    def __init__(self, config: Flux2AutoEncoderConfig):
        super().__init__(config.trunk)
        self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.z_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.quant_conv(super().forward(x))


class Flux2Decoder(Decoder):
    """`post_quant_conv` (1x1, z -> z), then the Flux.1 decoder."""

    def __init__(self, config: Flux2AutoEncoderConfig):
        super().__init__(config.trunk)
        self.post_quant_conv = nn.Conv2d(config.z_channels, config.z_channels, 1)

    def forward(self, z: Tensor) -> Tensor:
        return super().forward(self.post_quant_conv(z))


class LatentNorm(nn.Module):
    """The `bn` of the reference: a BatchNorm2d without affine weights, only ever used with its running
    statistics. Only the two statistics are buffers, so the state dict is exactly the official key list
    (the BatchNorm's unused `num_batches_tracked` counter is dropped by the loader when a file has it)."""

    def __init__(self, channels: int, eps: float):
        super().__init__()
        self.eps = eps
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def _stats(self) -> tuple[Tensor, Tensor]:
        mean = rearrange(self.running_mean, "c -> 1 c 1 1")
        std = rearrange(torch.sqrt(self.running_var + self.eps), "c -> 1 c 1 1")
        return mean, std

    def normalize(self, z: Tensor) -> Tensor:
        mean, std = self._stats()
        return (z - mean) / std

    def denormalize(self, z: Tensor) -> Tensor:
        mean, std = self._stats()
        return z * std + mean


def patchify(latent: Tensor) -> Tensor:
    """(B, z, 2h, 2w) -> (B, 4z, h, w); channel c*4 + py*2 + px holds latent[c, 2i + py, 2j + px]."""
    return rearrange(latent, "b c (h py) (w px) -> b (c py px) h w", py=PATCH, px=PATCH)


def unpatchify(z: Tensor) -> Tensor:
    """The exact inverse of `patchify`."""
    return rearrange(z, "b (c py px) h w -> b c (h py) (w px)", py=PATCH, px=PATCH)


class Flux2AutoEncoder(nn.Module):
    """Images <-> normalised, patchified latents. Encoding is deterministic (the posterior mean)."""

    def __init__(self, config: Flux2AutoEncoderConfig):
        super().__init__()
        self.config = config
        self.z_channels = config.z_channels
        self.latent_channels = config.latent_channels
        self.downsample_factor = config.downsample_factor
        self.encoder = Flux2Encoder(config)
        self.decoder = Flux2Decoder(config)
        self.bn = LatentNorm(config.latent_channels, config.bn_eps)

    def check_size(self, height: int, width: int) -> None:
        """Sides must be positive multiples of the downsample factor (16): the patchify needs an even latent."""
        f = self.downsample_factor
        for name, value in (("height", height), ("width", width)):
            if value <= 0 or value % f:
                lower, upper = max(f, value // f * f), (value // f + 1) * f
                raise ValueError(
                    f"{name} {value} is not a positive multiple of {f} (the FLUX.2 autoencoder's {f // PATCH}x "
                    f"downsampling times its 2x2 patchify); resize or crop to e.g. {lower} or {upper}"
                )

    def encode(self, x: Tensor) -> Tensor:
        """x (B, in_channels, H, W) in [-1, 1] -> z (B, 4z, H/2f, W/2f), H and W multiples of 2f."""
        _check_image(x, self.config.in_channels, "x")
        self.check_size(*x.shape[-2:])
        mean = self.encoder(x)[:, : self.z_channels]  # the log-variance half is never used
        return self.bn.normalize(patchify(mean))

    def decode(self, z: Tensor) -> Tensor:
        """z (B, 4z, h, w) -> raw decoder output (B, out_ch, h*2f, w*2f), not clamped."""
        _check_image(z, self.latent_channels, "z")
        return self.decoder(unpatchify(self.bn.denormalize(z)))


# ----------------------------------------------------------------------------------------------
# The diffusers layout (spec §5.5): the Flux.1 AE mapping, with the two 1x1 convs at the top level


def flux2_bfl_to_diffusers(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """BFL FLUX.2 AE state dict -> diffusers `AutoencoderKLFlux2` state dict (without the BN counter)."""
    moved = {"encoder.quant_conv.": "quant_conv.", "decoder.post_quant_conv.": "post_quant_conv."}
    trunk = {n: t for n, t in tensors.items() if not n.startswith((*moved, "bn."))}
    converted = bfl_to_diffusers(trunk)
    for name, t in tensors.items():
        for bfl, diffusers in moved.items():
            if name.startswith(bfl):
                converted[diffusers + name[len(bfl) :]] = t
        if name.startswith("bn."):
            converted[name] = t
    return converted


def flux2_diffusers_to_bfl(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """diffusers `AutoencoderKLFlux2` state dict -> BFL FLUX.2 AE state dict (inverse of the above)."""
    moved = {"quant_conv.": "encoder.quant_conv.", "post_quant_conv.": "decoder.post_quant_conv."}
    trunk = {n: t for n, t in tensors.items() if not n.startswith((*moved, "bn."))}
    converted = diffusers_to_bfl(trunk)
    for name, t in tensors.items():
        for diffusers, bfl in moved.items():
            if name.startswith(diffusers):
                converted[bfl + name[len(diffusers) :]] = t
        if name.startswith("bn."):
            converted[name] = t
    return converted


# ----------------------------------------------------------------------------------------------
# Loading


def infer_flux2_config(tensors: dict[str, Tensor]) -> Flux2AutoEncoderConfig:
    """The config a BFL-layout FLUX.2 AE state dict was built with, from its shapes alone."""
    trunk = infer_config(tensors)
    config = Flux2AutoEncoderConfig(
        resolution=trunk.resolution,
        in_channels=trunk.in_channels,
        ch=trunk.ch,
        out_ch=trunk.out_ch,
        ch_mult=trunk.ch_mult,
        num_res_blocks=trunk.num_res_blocks,
        z_channels=trunk.z_channels,
    )
    bn = tensors.get("bn.running_mean")
    if bn is not None and tuple(bn.shape) != (config.latent_channels,):
        raise CheckpointError(
            f"bn.running_mean has shape {list(bn.shape)}, but {config.z_channels} latent channels in 2x2 patches "
            f"need [{config.latent_channels}]"
        )
    return config


_BFL_MARKER = "encoder.quant_conv.weight"  # with bn.running_mean (spec §9.3)
_DIFFUSERS_MARKER = "encoder.down_blocks.0.resnets.0.conv1.weight"  # with a top-level quant_conv and bn
_FLUX1_MARKER = "encoder.down.0.block.0.conv1.weight"
_COUNTER = "bn.num_batches_tracked"  # a BatchNorm's training counter, never used at inference


def load_flux2_autoencoder(
    path: str | Path,
    config: Flux2AutoEncoderConfig | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> Flux2AutoEncoder:
    """Load the FLUX.2 AE strictly, memory-mapped, from the BFL `ae.safetensors` layout (optionally under a
    prefix such as `vae.`) or the diffusers `vae/` layout (folder or file). config=None infers it from the
    shapes; dtype=None keeps the file's dtype (float32 for the official file)."""
    path = _resolve(Path(path))
    tensors = read_safetensors(path)
    prefix = _prefix_of(tensors, _BFL_MARKER)
    if prefix is not None and prefix + "bn.running_mean" in tensors:
        tensors, layout = strip_prefix(tensors, prefix), "BFL"
    elif (prefix := _prefix_of(tensors, _DIFFUSERS_MARKER)) is not None and prefix + "bn.running_mean" in tensors:
        tensors, layout = flux2_diffusers_to_bfl(strip_prefix(tensors, prefix)), "diffusers"
    elif _prefix_of(tensors, _FLUX1_MARKER) is not None or _prefix_of(tensors, _DIFFUSERS_MARKER) is not None:
        raise CheckpointError(
            f"{path} is a Flux.1-style autoencoder (no quant_conv / bn statistics): load it with load_autoencoder, "
            "or pass the FLUX.2 ae.safetensors (from the FLUX.2-dev repo)"
        )
    else:
        raise CheckpointError(
            f"{path} is not a FLUX.2 autoencoder: it has neither {_BFL_MARKER!r} + 'bn.running_mean' (BFL layout) "
            f"nor {_DIFFUSERS_MARKER!r} + 'bn.running_mean' (diffusers layout); its first tensors are "
            f"{sorted(tensors)[:3]}"
        )
    layout += f" FLUX.2 AE layout, prefix {prefix!r}" if prefix else " FLUX.2 AE layout"
    tensors.pop(_COUNTER, None)
    if config is None:
        config = infer_flux2_config(tensors)
    with torch.device("meta"):
        model = Flux2AutoEncoder(config)
    load_strict(model, tensors, dtype=dtype, device=device, description=f"{path} ({layout})")
    return model.eval()
