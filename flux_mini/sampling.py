"""Rectified-flow sampling for Flux: noise, 2x2 token packing, position ids, the time schedule, Euler steps.

Conventions follow `shared/spec/flux-format.md` §5: noise from a CPU generator in the latent dtype (sample i
of a batch from seed + i), latent grid 2*ceil(H / 2f) x 2*ceil(W / 2f), tokens in row-major patch order with
features (c, py, px), schedule linspace(1, 0) optionally shifted by a resolution-dependent mu, and
`x <- x + (t_prev - t_curr) * v`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from einops import rearrange, repeat
from torch import Tensor
from tqdm.auto import tqdm

# ----------------------------------------------------------------------------------------------
# Latent grid, noise and packing


def latent_size(height: int, width: int, downsample_factor: int = 8) -> tuple[int, int]:
    """Pixel size -> (h, w) of the latent, rounded up to even so that 2x2 patches tile it."""
    patch = 2 * downsample_factor
    return 2 * math.ceil(height / patch), 2 * math.ceil(width / patch)


SEED_LIMIT = 2**32  # torch's CPU generator (mt19937) keeps a seed's low 32 bits: s and s + 2**32 draw the same


def check_seed(seed, num_samples: int = 1) -> None:
    """A seed is an int with 0 <= seed and seed + num_samples - 1 < 2**32 (sample i uses seed + i), or a
    torch.Generator. Anything else (a float, a bool, a seed that wraps around) is refused."""
    if isinstance(seed, torch.Generator):
        return
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(
            f"seed must be an integer in [0, 2**32) or a torch.Generator, got {seed!r} ({type(seed).__name__})"
        )
    if not 0 <= seed or seed + num_samples - 1 >= SEED_LIMIT:
        last = f" (and seed + {num_samples - 1} for the last of {num_samples} samples)" if num_samples > 1 else ""
        raise ValueError(
            f"seed {seed} is outside [0, 2**32){last}: torch keeps only its low 32 bits (seed - 2**32 would give "
            "the same image); pick a smaller seed"
        )


def get_noise(
    num_samples: int,
    height: int,
    width: int,
    *,
    channels: int = 16,
    downsample_factor: int = 8,
    dtype: torch.dtype = torch.bfloat16,
    seed: int | torch.Generator,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Standard normal latent (B, C, h, w) in `dtype` on `device`.

    An integer seed draws sample i from a CPU generator seeded with seed + i, so an image depends only
    on its seed (not on the device, nor on the batch it is part of: a batch equals a loop). A
    torch.Generator draws the whole batch from that generator, on its device, as diffusers does."""
    check_seed(seed, num_samples)
    h, w = latent_size(height, width, downsample_factor)
    if isinstance(seed, torch.Generator):
        noise = torch.randn(num_samples, channels, h, w, generator=seed, dtype=dtype, device=seed.device)
        return noise.to(device)
    samples = [
        torch.randn(1, channels, h, w, generator=torch.Generator(device="cpu").manual_seed(seed + i), dtype=dtype)
        for i in range(num_samples)
    ]
    return torch.cat(samples).to(device)


def pack(latent: Tensor) -> Tensor:
    """Latent (B, C, h, w), h and w even -> tokens (B, h/2 * w/2, C*4), one token per 2x2 patch."""
    return rearrange(latent, "b c (h py) (w px) -> b (h w) (c py px)", py=2, px=2)


def unpack(tokens: Tensor, height: int, width: int) -> Tensor:
    """Tokens (B, h/2 * w/2, C*4) -> latent (B, C, h, w); `height`, `width` are the (even) latent size."""
    return rearrange(tokens, "b (h w) (c py px) -> b c (h py) (w px)", h=height // 2, w=width // 2, py=2, px=2)


def image_ids(batch: int, h_tokens: int, w_tokens: int, device: torch.device | str = "cpu") -> Tensor:
    """RoPE positions of the image tokens: (B, h_tokens * w_tokens, 3) = (0, row, col), float32, row-major."""
    rows = repeat(torch.arange(h_tokens, dtype=torch.float32), "h -> h w", w=w_tokens)
    cols = repeat(torch.arange(w_tokens, dtype=torch.float32), "w -> h w", h=h_tokens)
    ids = torch.stack((torch.zeros_like(rows), rows, cols), dim=-1)
    return repeat(ids, "h w three -> b (h w) three", b=batch).to(device)


def text_ids(batch: int, num_tokens: int, device: torch.device | str = "cpu") -> Tensor:
    """RoPE positions of the text tokens: all zero (no positional rotation), (B, T, 3) float32."""
    return torch.zeros(batch, num_tokens, 3, dtype=torch.float32, device=device)


# ----------------------------------------------------------------------------------------------
# Time schedule


def time_shift(mu: float, sigma: float, t: Tensor) -> Tensor:
    """t -> e^mu / (e^mu + (1/t - 1)^sigma): spends more steps at high noise; keeps 0 and 1 fixed."""
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


def get_lin_function(x1: float = 256, y1: float = 0.5, x2: float = 4096, y2: float = 1.15) -> Callable[[float], float]:
    """The straight line through (x1, y1) and (x2, y2): image token count -> shift mu."""
    m = (y2 - y1) / (x2 - x1)
    b = y1 - m * x1
    return lambda x: m * x + b


def get_schedule(
    num_steps: int,
    image_seq_len: int,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
    shift: bool = True,
) -> list[float]:
    """num_steps + 1 times from 1 (noise) to 0 (data), computed in float32.

    `shift` (every model but schnell) bends the schedule towards high noise, more so for larger images,
    because more tokens carry more redundant signal at the same noise level."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    timesteps = torch.linspace(1, 0, num_steps + 1, dtype=torch.float32)
    if shift:
        mu = get_lin_function(y1=base_shift, y2=max_shift)(image_seq_len)
        timesteps = time_shift(mu, 1.0, timesteps)
    return timesteps.tolist()


# ----------------------------------------------------------------------------------------------
# Euler integration


def timestep_vector(value: float, like: Tensor) -> Tensor:
    """(B,) filled with `value` in the latent's dtype: the reference rounds t (and guidance) to bf16 here."""
    return torch.full((like.shape[0],), value, dtype=like.dtype, device=like.device)


def euler_step(img: Tensor, pred: Tensor, t_curr: float, t_prev: float) -> Tensor:
    """One Euler step of the flow ODE from t_curr to t_prev (< t_curr), in the latent's dtype."""
    return img + (t_prev - t_curr) * pred


def denoise(
    model: torch.nn.Module,
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
    """Integrate packed noise tokens img (B, L, C*4) along `timesteps`; one model call per step.

    `guidance` is the distilled guidance strength of dev-family models; schnell ignores it.
    `interventions` (`flux_mini.interp.Interventions`) caches or patches named sites at every step, or at
    its chosen steps. Autograd is off unless `grad` (e.g. for gradients through patches or cached values)."""
    guidance_vec = None if guidance is None else timestep_vector(guidance, img)
    steps = list(zip(timesteps[:-1], timesteps[1:]))
    with torch.set_grad_enabled(grad):
        for step, (t_curr, t_prev) in enumerate(tqdm(steps, desc="denoising", disable=not progress)):
            sites = {} if interventions is None else {"sites": interventions.sites(step)}
            pred = model(
                img=img,
                img_ids=img_ids,
                txt=txt,
                txt_ids=txt_ids,
                timesteps=timestep_vector(t_curr, img),
                y=y,
                guidance=guidance_vec,
                **sites,
            )
            img = euler_step(img, pred, t_curr, t_prev)
    if interventions is not None:
        interventions.check_visited("the denoising loop")
    return img
