"""Rectified-flow sampling for Flux.1 and FLUX.2: noise, token packing, position ids, the time schedule, Euler steps.

Flux.1 conventions follow `shared/spec/flux-format.md` §5 (FLUX.2: the last section, flux2-format.md §7): noise
from a CPU generator in the latent dtype (sample i of a batch from seed + i), latent grid 2*ceil(H / 2f) x
2*ceil(W / 2f), tokens in row-major patch order with features (c, py, px), schedule linspace(1, 0) optionally
shifted by a resolution-dependent mu, and
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
    h, w = latent_size(height, width, downsample_factor)
    return draw_noise(num_samples, (channels, h, w), dtype, seed, device)


def draw_noise(
    num_samples: int, shape: tuple[int, ...], dtype: torch.dtype, seed: int | torch.Generator, device
) -> Tensor:
    """(num_samples, *shape) standard normal: sample i from a CPU generator seeded with seed + i, or the
    whole batch from a given torch.Generator on its device."""
    check_seed(seed, num_samples)
    if isinstance(seed, torch.Generator):
        return torch.randn(num_samples, *shape, generator=seed, dtype=dtype, device=seed.device).to(device)
    samples = [
        torch.randn(1, *shape, generator=torch.Generator(device="cpu").manual_seed(seed + i), dtype=dtype)
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


# ----------------------------------------------------------------------------------------------
# FLUX.2 (flux2-format.md §7): noise already in the normalised 128-channel latent space, 4-axis ids
# (t, h, w, l), an empirical resolution-and-step-dependent mu, and real CFG for the Base checkpoints.

# mu lines fitted by BFL at 10 and 200 steps: mu = a * (image tokens) + b
FLUX2_MU_10_STEPS = (8.73809524e-05, 1.89833333)
FLUX2_MU_200_STEPS = (0.00016927, 0.45666666)
FLUX2_MU_MAX_TOKENS = 4300  # above this, the 200-step line whatever the step count (a jump, kept as is)


def flux2_latent_size(height: int, width: int, downsample_factor: int = 16) -> tuple[int, int]:
    """Pixel size -> (h, w) of the FLUX.2 latent = the token grid (floor division, as the reference)."""
    return height // downsample_factor, width // downsample_factor


def get_flux2_noise(
    num_samples: int,
    height: int,
    width: int,
    *,
    channels: int = 128,
    downsample_factor: int = 16,
    dtype: torch.dtype = torch.bfloat16,
    seed: int | torch.Generator,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Standard normal latent (B, 128, H/16, W/16) in `dtype`, seeded as `get_noise` (sample i from seed + i).

    The reference draws on the run device (so its CUDA images cannot be reproduced on a CPU); an integer
    seed draws on the CPU, as for Flux.1, so that an image depends only on its seed."""
    h, w = flux2_latent_size(height, width, downsample_factor)
    return draw_noise(num_samples, (channels, h, w), dtype, seed, device)


def flux2_pack(latent: Tensor) -> Tensor:
    """Latent (B, C, h, w) -> tokens (B, h*w, C), row-major; the 2x2 patches were made inside the AE."""
    return rearrange(latent, "b c h w -> b (h w) c")


def flux2_unpack(tokens: Tensor, height: int, width: int) -> Tensor:
    """Tokens (B, h*w, C) -> latent (B, C, h, w); `height`, `width` are the token grid."""
    return rearrange(tokens, "b (h w) c -> b c h w", h=height, w=width)


def flux2_image_ids(
    batch: int, h_tokens: int, w_tokens: int, t: int = 0, device: torch.device | str = "cpu"
) -> Tensor:
    """RoPE positions (t, row, col, 0) of an image's tokens, (B, h*w, 4) float32 (exact integers), row-major.

    t = 0 for the image being generated; reference image i gets t = 10 + 10 i."""
    rows = repeat(torch.arange(h_tokens, dtype=torch.float32), "h -> h w", w=w_tokens)
    cols = repeat(torch.arange(w_tokens, dtype=torch.float32), "w -> h w", h=h_tokens)
    ids = torch.stack((torch.full_like(rows, t), rows, cols, torch.zeros_like(rows)), dim=-1)
    return repeat(ids, "h w four -> b (h w) four", b=batch).to(device)


def flux2_text_ids(batch: int, num_tokens: int, device: torch.device | str = "cpu") -> Tensor:
    """RoPE positions (0, 0, 0, n) of text token n (padding included), (B, T, 4) float32."""
    ids = torch.zeros(num_tokens, 4, dtype=torch.float32)
    ids[:, 3] = torch.arange(num_tokens)
    return repeat(ids, "t four -> b t four", b=batch).to(device)


def flux2_mu(image_seq_len: int, num_steps: int) -> float:
    """The schedule shift: linear in the image token count, and (up to 4300 tokens) linear in the step
    count through BFL's fits at 10 and 200 steps, so that few-step sampling shifts harder."""
    (a10, b10), (a200, b200) = FLUX2_MU_10_STEPS, FLUX2_MU_200_STEPS
    mu_200 = a200 * image_seq_len + b200
    if image_seq_len > FLUX2_MU_MAX_TOKENS:
        return mu_200
    mu_10 = a10 * image_seq_len + b10
    return mu_200 + (num_steps - 200) * (mu_200 - mu_10) / 190


def get_flux2_schedule(num_steps: int, image_seq_len: int) -> list[float]:
    """num_steps + 1 times from 1 to 0 for FLUX.2: linspace(1, 0) through time_shift(flux2_mu, 1), float32.

    `image_seq_len` counts the noise tokens only (not reference-image tokens)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    timesteps = torch.linspace(1, 0, num_steps + 1, dtype=torch.float32)
    return time_shift(flux2_mu(image_seq_len, num_steps), 1.0, timesteps).tolist()


def denoise_flux2(
    model: torch.nn.Module,
    img: Tensor,
    img_ids: Tensor,
    txt: Tensor,
    txt_ids: Tensor,
    timesteps: list[float],
    guidance: float | None = None,
    negative_txt: Tensor | None = None,
    cfg_scale: float | None = None,
    progress: bool = True,
    interventions=None,
    grad: bool = False,
    cond: Tensor | None = None,
    cond_ids: Tensor | None = None,
    cache_references: bool = False,
) -> Tensor:
    """Integrate FLUX.2 noise tokens img (B, L, 128) along `timesteps`.

    Reference images `cond` (B, R, 128) with `cond_ids` (B, R, 4) are appended after the noise tokens at every
    step, or, with `cache_references` (klein 9B KV), run once and attended to through their cached keys and
    values (`Flux2.reference_kv`); there a batch of 1 serves every image, one reference pass instead of B.

    Guidance-distilled models ([dev]) take `guidance` through their embedder (None for klein). Base models
    use real classifier-free guidance: with `negative_txt` (the empty prompt's features) and `cfg_scale`,
    each step is pred_neg + cfg_scale * (pred - pred_neg), two model calls. `interventions`
    (`flux_mini.interp.Interventions`) caches or patches named sites at every step, or at its chosen steps,
    as in `denoise`. With CFG both calls of a step get the same sites: a patch is part of the model at that
    step, so it reaches both passes; the empty-prompt call runs first, so `cache[step]` ends up holding the
    prompt's (conditional) values. Autograd is off unless `grad`."""
    if (negative_txt is None) != (cfg_scale is None):
        raise ValueError("classifier-free guidance needs both negative_txt and cfg_scale (or neither)")
    if cache_references and (cond is None or cond_ids is None):
        raise ValueError("cache_references=True caches reference images: pass both cond and cond_ids")
    guidance_vec = None if guidance is None else timestep_vector(guidance, img)
    steps = list(zip(timesteps[:-1], timesteps[1:]))
    with torch.set_grad_enabled(grad):
        references = {} if cond is None else dict(cond=cond, cond_ids=cond_ids)
        if cache_references:
            guidance_refs = None if guidance_vec is None else guidance_vec[: len(cond)]  # cond: batch 1 or B
            references = dict(reference_kv=model.reference_kv(cond, cond_ids, guidance_refs))
        for step, (t_curr, t_prev) in enumerate(tqdm(steps, desc="denoising", disable=not progress)):
            sites = {} if interventions is None else {"sites": interventions.sites(step)}
            inputs = dict(img=img, img_ids=img_ids, txt_ids=txt_ids, timesteps=timestep_vector(t_curr, img),
                          **references)  # fmt: skip
            if negative_txt is not None:  # first, so that the prompt's call is the one the cache keeps
                pred_neg = model(**inputs, txt=negative_txt, guidance=guidance_vec, **sites)
            pred = model(**inputs, txt=txt, guidance=guidance_vec, **sites)
            if negative_txt is not None:
                pred = pred_neg + cfg_scale * (pred - pred_neg)
            img = euler_step(img, pred, t_curr, t_prev)
    if interventions is not None:
        interventions.check_visited("the denoising loop")
    return img
