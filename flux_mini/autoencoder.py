"""The Flux.1 autoencoder (spec §4 and Addendum A), in the official (BFL) parameter layout.

Images are (B, 3, H, W) in [-1, 1]; latents are (B, z, H/f, W/f) with f = 2^(len(ch_mult) - 1), already
scaled and shifted into the space the transformer works in. Module names match the keys of `ae.safetensors`,
so `state_dict()` *is* the checkpoint layout; `load_autoencoder` also reads the diffusers `vae/` layout.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from flux_mini.checkpoint import CheckpointError, load_strict, read_safetensors, strip_prefix

# ----------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class AutoEncoderConfig:
    """Hyperparameters, with the field names of the official code; the defaults are the Flux.1 AE."""

    resolution: int = 256  # stored by the official config; changes no shape or computation
    in_channels: int = 3
    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159

    def __post_init__(self) -> None:
        if not self.ch_mult or any(int(m) != m or m < 1 for m in self.ch_mult) or self.num_res_blocks < 1:
            raise ValueError(
                f"ch_mult must be positive integers (one per level) and num_res_blocks >= 1, got ch_mult "
                f"{list(self.ch_mult)}, num_res_blocks {self.num_res_blocks}"
            )
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        if self.ch % 32:  # then every level width ch * m is a multiple of 32 too
            raise ValueError(f"GroupNorm uses 32 groups, so ch must be a multiple of 32, got ch {self.ch}")

    @classmethod
    def official(cls) -> AutoEncoderConfig:
        """The `ae.safetensors` shared by every FLUX.1 variant."""
        return cls()

    @property
    def level_widths(self) -> tuple[int, ...]:
        return tuple(self.ch * m for m in self.ch_mult)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def to_dict(self) -> dict:
        return {**asdict(self), "ch_mult": list(self.ch_mult)}


# ----------------------------------------------------------------------------------------------
# Building blocks


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """Two (GroupNorm, swish, 3x3 conv) steps plus a shortcut, 1x1 `nin_shortcut` when widths differ."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all h*w positions, with 1x1-conv projections and a residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        hn = self.norm(x)
        q, k, v = (rearrange(proj(hn), "b c h w -> b 1 (h w) c") for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, 1 head, h*w, C)
        return x + self.proj_out(rearrange(out, "b 1 (h w) c -> b c h w", h=h, w=w))


class Downsample(nn.Module):
    """Pad right and bottom by one pixel, then a stride-2 3x3 conv: n -> floor(n / 2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def resnet_stack(in_channels: int, out_channels: int, num_blocks: int) -> nn.ModuleList:
    """`num_blocks` resnets; the first maps in_channels -> out_channels, the rest keep out_channels."""
    widths = [in_channels] + [out_channels] * num_blocks
    return nn.ModuleList(ResnetBlock(widths[j], widths[j + 1]) for j in range(num_blocks))


class DownLevel(nn.Module):
    """Encoder level `down.{i}`: resnets, then a downsample unless it is the last level."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, downsample: bool):
        super().__init__()
        self.block = resnet_stack(in_channels, out_channels, num_blocks)
        self.downsample = Downsample(out_channels) if downsample else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return self.downsample(x)


class UpLevel(nn.Module):
    """Decoder level `up.{i}`: resnets, then an upsample unless it is level 0."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, upsample: bool):
        super().__init__()
        self.block = resnet_stack(in_channels, out_channels, num_blocks)
        self.upsample = Upsample(out_channels) if upsample else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return self.upsample(x)


class MidBlock(nn.Module):
    """Resnet, attention, resnet at the lowest resolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """(B, in_channels, H, W) -> moments (B, 2z, H/f, W/f): mean channels first, then log-variance."""

    def __init__(self, config: AutoEncoderConfig):
        super().__init__()
        widths, last = config.level_widths, len(config.ch_mult) - 1
        self.conv_in = nn.Conv2d(config.in_channels, config.ch, 3, padding=1)
        self.down = nn.ModuleList(
            DownLevel((config.ch, *widths)[i], widths[i], config.num_res_blocks, downsample=i < last)
            for i in range(last + 1)
        )
        self.mid = MidBlock(widths[-1])
        self.norm_out = group_norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 2 * config.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    """(B, z, h, w) unscaled latent -> (B, out_ch, h*f, w*f). `up.{i}` is level i; the highest runs first."""

    def __init__(self, config: AutoEncoderConfig):
        super().__init__()
        widths, last = config.level_widths, len(config.ch_mult) - 1
        self.conv_in = nn.Conv2d(config.z_channels, widths[-1], 3, padding=1)
        self.mid = MidBlock(widths[-1])
        self.up = nn.ModuleList(
            UpLevel(widths[min(i + 1, last)], widths[i], config.num_res_blocks + 1, upsample=i > 0)
            for i in range(last + 1)
        )
        self.norm_out = group_norm(widths[0])
        self.conv_out = nn.Conv2d(widths[0], config.out_ch, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ----------------------------------------------------------------------------------------------
# The autoencoders


class AutoEncoder(nn.Module):
    """KL autoencoder: images <-> latents in the scaled space `scale_factor * (mean - shift_factor)`."""

    def __init__(self, config: AutoEncoderConfig):
        super().__init__()
        self.config = config
        self.z_channels = config.z_channels
        self.downsample_factor = config.downsample_factor
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """x (B, in_channels, H, W) in [-1, 1] -> z (B, z_channels, H/f, W/f) (sizes floored).

        Without a generator this is the posterior mean (what the reference pipeline uses); with one it is
        a sample mean + exp(logvar / 2) * eps, eps drawn in float32 from that generator, so reproducible."""
        _check_image(x, self.config.in_channels, "x")
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        if generator is not None:
            eps = torch.randn(mean.shape, generator=generator, device=generator.device, dtype=torch.float32)
            mean = mean + torch.exp(0.5 * logvar) * eps.to(mean)
        return self.config.scale_factor * (mean - self.config.shift_factor)

    def decode(self, z: Tensor) -> Tensor:
        """z (B, z_channels, h, w) -> raw decoder output (B, out_ch, h*f, w*f), not clamped."""
        _check_image(z, self.z_channels, "z")
        return self.decoder(z / self.config.scale_factor + self.config.shift_factor)


class IdentityAutoEncoder(nn.Module):
    """The autoencoder of pixel-space models: latents are the pixels, with the same interface.

    `downsample` > 1 folds each f x f block of pixels into channels (space to depth, lossless): the
    transformer's 2x2 patches then cover 2f x 2f pixels, so each token sees more of an object."""

    def __init__(self, channels: int = 3, downsample: int = 1):
        super().__init__()
        if downsample < 1:
            raise ValueError(f"downsample must be a positive integer, got {downsample}")
        self.image_channels = channels
        self.downsample_factor = downsample
        self.z_channels = channels * downsample * downsample

    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """x (B, C, H, W) -> z (B, C*f*f, H/f, W/f)."""
        _check_image(x, self.image_channels, "x")
        f = self.downsample_factor
        if f == 1:
            return x
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"image size {tuple(x.shape[2:])} is not a multiple of the downsample factor {f}")
        return rearrange(x, "b c (h p) (w q) -> b (c p q) h w", p=f, q=f)

    def decode(self, z: Tensor) -> Tensor:
        """z (B, C*f*f, h, w) -> x (B, C, h*f, w*f)."""
        _check_image(z, self.z_channels, "z")
        f = self.downsample_factor
        if f == 1:
            return z
        return rearrange(z, "b (c p q) h w -> b c (h p) (w q)", p=f, q=f)

    def save_json(self, path: str | Path) -> None:
        config = {"channels": self.image_channels}
        if self.downsample_factor != 1:
            config["downsample"] = self.downsample_factor
        Path(path).write_text(json.dumps(config) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> IdentityAutoEncoder:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist; write it with IdentityAutoEncoder(channels).save_json()")
        try:
            config = json.loads(path.read_text())
            unknown = set(config) - {"channels", "downsample"}
            channels, downsample = int(config["channels"]), int(config.get("downsample", 1))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            unknown = None
        if unknown is None or unknown or downsample < 1:
            message = (f'{path} is not an identity-autoencoder config; expected JSON like {{"channels": 3}} '
                       f'or {{"channels": 3, "downsample": 2}}')
            raise ValueError(message) from None
        return cls(channels, downsample)


def _check_image(x: Tensor, channels: int, name: str) -> None:
    if x.ndim != 4 or x.shape[1] != channels:
        raise ValueError(f"{name} must be (B, {channels}, H, W), got shape {tuple(x.shape)}")


# ----------------------------------------------------------------------------------------------
# The diffusers layout (spec §6.2): renames, the reversed decoder level index, and 1x1-conv <-> linear


def _num_levels(names, level_key: str) -> int:
    levels = {int(m[1]) for name in names if (m := re.match(rf"encoder\.{level_key}\.(\d+)\.", name))}
    if not levels:
        raise CheckpointError(f"no `encoder.{level_key}.N.` tensors: this is not an autoencoder in that layout")
    return max(levels) + 1


def _flip_level(num_levels: int):
    """BFL numbers decoder levels by resolution (up.0 runs last), diffusers by execution order."""
    return lambda level: str(num_levels - 1 - int(level))


_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def bfl_to_diffusers_name(name: str, num_levels: int) -> str:
    up = _flip_level(num_levels)
    name = re.sub(r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets.", name)
    name = re.sub(r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.", name)
    name = re.sub(r"^decoder\.up\.(\d+)\.block\.", lambda m: f"decoder.up_blocks.{up(m[1])}.resnets.", name)
    name = re.sub(r"^decoder\.up\.(\d+)\.upsample\.", lambda m: f"decoder.up_blocks.{up(m[1])}.upsamplers.0.", name)
    name = re.sub(r"\.mid\.block_([12])\.", lambda m: f".mid_block.resnets.{int(m[1]) - 1}.", name)
    name = re.sub(r"\.mid\.attn_1\.(\w+)\.", lambda m: f".mid_block.attentions.0.{_ATTENTION.get(m[1], m[1])}.", name)
    return name.replace(".nin_shortcut.", ".conv_shortcut.").replace(".norm_out.", ".conv_norm_out.")


def diffusers_to_bfl_name(name: str, num_levels: int) -> str:
    up = _flip_level(num_levels)
    attention = {d: b for b, d in _ATTENTION.items()}
    name = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", name)
    name = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", name)
    name = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{up(m[1])}.block.", name)
    name = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{up(m[1])}.upsample.", name)
    name = re.sub(r"\.mid_block\.resnets\.([01])\.", lambda m: f".mid.block_{int(m[1]) + 1}.", name)
    name = re.sub(
        r"\.mid_block\.attentions\.0\.(to_out\.0|\w+)\.", lambda m: f".mid.attn_1.{attention.get(m[1], m[1])}.", name
    )
    return name.replace(".conv_shortcut.", ".nin_shortcut.").replace(".conv_norm_out.", ".norm_out.")


def _is_attention_weight(bfl_name: str) -> bool:
    return re.search(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$", bfl_name) is not None


def bfl_to_diffusers(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """BFL AE state dict -> diffusers `AutoencoderKL` state dict (attention weights [c,c,1,1] -> [c,c])."""
    levels = _num_levels(tensors, "down")
    return {
        bfl_to_diffusers_name(name, levels): t[:, :, 0, 0] if _is_attention_weight(name) and t.ndim == 4 else t
        for name, t in tensors.items()
    }


def diffusers_to_bfl(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """diffusers `AutoencoderKL` state dict -> BFL AE state dict (attention weights [c,c] -> [c,c,1,1])."""
    levels = _num_levels(tensors, "down_blocks")
    converted = {}
    for name, t in tensors.items():
        bfl = diffusers_to_bfl_name(name, levels)
        converted[bfl] = t[:, :, None, None] if _is_attention_weight(bfl) and t.ndim == 2 else t
    return converted


# ----------------------------------------------------------------------------------------------
# Loading


def infer_config(
    tensors: dict[str, Tensor],
    scale_factor: float = AutoEncoderConfig.scale_factor,
    shift_factor: float = AutoEncoderConfig.shift_factor,
) -> AutoEncoderConfig:
    """The config a BFL-layout AE state dict was built with, from its shapes alone."""
    try:
        conv_in = tensors["encoder.conv_in.weight"].shape  # (ch, in_channels, 3, 3)
        levels = _num_levels(tensors, "down")
        ch_mult = []
        for i in range(levels):
            width = tensors[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]
            if width % conv_in[0]:
                raise CheckpointError(f"level {i} width {width} is not a multiple of ch = {conv_in[0]}")
            ch_mult.append(width // conv_in[0])
        blocks = {int(m[1]) for n in tensors if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", n))}
        return AutoEncoderConfig(
            in_channels=conv_in[1],
            ch=conv_in[0],
            out_ch=tensors["decoder.conv_out.weight"].shape[0],
            ch_mult=tuple(ch_mult),
            num_res_blocks=max(blocks) + 1,
            z_channels=tensors["decoder.conv_in.weight"].shape[1],
            scale_factor=scale_factor,
            shift_factor=shift_factor,
        )
    except KeyError as e:
        raise CheckpointError(f"cannot infer the autoencoder config: tensor {e} is missing; pass `config=`") from None
    except ValueError as e:  # an inconsistent shape set that AutoEncoderConfig rejects
        raise CheckpointError(f"cannot infer the autoencoder config from the tensor shapes: {e}") from None


_BFL_MARKER = "encoder.down.0.block.0.conv1.weight"
_DIFFUSERS_MARKER = "encoder.down_blocks.0.resnets.0.conv1.weight"
_TRANSFORMER_MARKERS = (  # BFL and diffusers layouts (spec §6.4)
    "double_blocks.0.img_attn.norm.key_norm.scale",
    "transformer_blocks.0.attn.to_q.weight",
    "x_embedder.weight",
)


def _prefix_of(tensors: dict[str, Tensor], marker: str) -> str | None:
    """The prefix under which `marker` is stored ("" at top level, e.g. "vae." in all-in-one files)."""
    return next((name[: -len(marker)] for name in tensors if name.endswith(marker)), None)


def _resolve(path: Path) -> Path:
    """A BFL repo folder -> its ae.safetensors; a diffusers repo folder -> its vae/ folder."""
    if path.is_dir() and (path / "ae.safetensors").is_file():
        return path / "ae.safetensors"
    if path.is_dir() and not any(path.glob("*.safetensors")) and (path / "vae").is_dir():
        return path / "vae"
    return path


def _diffusers_factors(path: Path) -> dict[str, float]:
    """scale/shift from the config.json of a diffusers vae/ folder, when it has them."""
    config_file = path / "config.json"
    if not path.is_dir() or not config_file.is_file():
        return {}
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{config_file} is not valid JSON; fix or remove it") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_file} is not a JSON object; fix or remove it")
    names = {"scaling_factor": "scale_factor", "shift_factor": "shift_factor"}
    factors = {ours: config[theirs] for theirs, ours in names.items() if config.get(theirs) is not None}
    bad = {name: value for name, value in factors.items() if not _is_finite_number(value)}
    if bad:
        raise CheckpointError(f"{config_file}: {bad} must be finite numbers; fix the file or pass config=")
    return {name: float(value) for name, value in factors.items()}


def _is_finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load_autoencoder(
    path: str | Path,
    config: AutoEncoderConfig | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    check_finite: bool = False,
) -> AutoEncoder:
    """Load a Flux AE strictly from the BFL `ae.safetensors` layout (optionally under a `vae.` or other
    prefix, e.g. in an all-in-one file) or the diffusers `vae/` layout (folder or file).

    config=None infers the architecture from the shapes; scale/shift are then the official ones, or
    those of a diffusers config.json. dtype=None keeps the file's dtype. check_finite=True refuses a NaN
    or Inf weight, naming it (one read of every weight)."""
    path = _resolve(Path(path))
    tensors = read_safetensors(path)
    factors: dict[str, float] = {}
    if (prefix := _prefix_of(tensors, _BFL_MARKER)) is not None:
        tensors, layout = strip_prefix(tensors, prefix), "BFL"
    elif (prefix := _prefix_of(tensors, _DIFFUSERS_MARKER)) is not None:
        tensors, layout = diffusers_to_bfl(strip_prefix(tensors, prefix)), "diffusers"
        factors = _diffusers_factors(path)
    elif any(_prefix_of(tensors, marker) is not None for marker in _TRANSFORMER_MARKERS):
        raise CheckpointError(
            f"{path} is a Flux transformer checkpoint, not an autoencoder; pass the AE file "
            "(ae.safetensors, or the vae/ folder of a diffusers repo)"
        )
    else:
        raise CheckpointError(
            f"{path} is not a Flux autoencoder: it has neither {_BFL_MARKER!r} (BFL layout) nor "
            f"{_DIFFUSERS_MARKER!r} (diffusers layout); its first tensors are {sorted(tensors)[:3]}"
        )
    layout += f" AE layout, prefix {prefix!r}" if prefix else " AE layout"
    if "bn.running_mean" in tensors:
        raise CheckpointError(
            f"{path} is the FLUX.2 autoencoder (it has bn.running_mean): load it with "
            "flux_mini.autoencoder_flux2.load_flux2_autoencoder"
        )
    if any(n.startswith(("quant_conv.", "post_quant_conv.")) for n in tensors):
        raise CheckpointError(
            f"{path} has quant_conv/post_quant_conv tensors: it is a Stable Diffusion-style VAE, not the Flux AE"
        )
    if config is None:
        config = infer_config(tensors, **factors)
    with torch.device("meta"):
        model = AutoEncoder(config)
    load_strict(model, tensors, dtype=dtype, device=device, description=f"{path} ({layout})", check_finite=check_finite)
    return model.eval()
