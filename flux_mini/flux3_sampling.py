"""Sampling for FLUX.3 Klein (flux3-format.md §6): noise, token ids, the constant-shift schedule, and the two
denoising loops (the distilled flow map, and Base with classifier-free guidance).

Conventions: noise (B, 128, H/16, W/16) drawn in float32 from a seeded CPU generator, then cast to the model
dtype; tokens in row-major order; image ids (0, 0.5 row, 0.5 col, 0), reference i at l = -(1 + i), text token n
at (0, 0, 0, n); schedule sigma_i = a s_i / (1 + (a - 1) s_i), s = linspace(1, 1/N, N), a = 6.93, then 0; the Euler
update x <- x + (sigma_next - sigma) v in float32, stored back in the latent dtype (as diffusers' scheduler).
"""

from __future__ import annotations

import torch
from einops import rearrange, repeat
from torch import Tensor
from tqdm import tqdm

from flux_mini.sampling import check_seed

FLUX3_SHIFT = 6.93  # the constant schedule shift ("alpha") of the FLUX.3 recipe
FLUX3_STEPS = {"flux3-klein": 16, "flux3-klein-base": 50}  # default step counts
FLUX3_CFG = 4.0  # BFL's README for Base ("CFG 4"); diffusers defaults to 3.5
IMAGE_ROPE_SCALE = 0.5
PATCH = 16  # pixels per token side: the AE downsamples 8x and packs 2x2


def check_size(height: int, width: int, patch: int = PATCH) -> tuple[int, int]:
    """Pixel size -> the token grid (h, w); both sides must be positive multiples of `patch` (16; a tiny
    autoencoder's own factor otherwise)."""
    if height <= 0 or width <= 0 or height % patch or width % patch:
        raise ValueError(f"FLUX.3 image sides must be positive multiples of {patch}, got {width}x{height}")
    return height // patch, width // patch


def get_noise(
    num_samples: int, height: int, width: int, *, seed: int | torch.Generator, dtype: torch.dtype,
    channels: int = 128, patch: int = PATCH,
) -> Tensor:  # fmt: skip
    """(B, 128, H/16, W/16) standard normal, drawn in float32 (seed-compatible everywhere), then cast: one batch
    from a CPU generator seeded with `seed`, or from a given torch.Generator on its own device."""
    h, w = check_size(height, width, patch)
    check_seed(seed)
    generator = seed if isinstance(seed, torch.Generator) else torch.Generator(device="cpu").manual_seed(seed)
    shape = (num_samples, channels, h, w)
    return torch.randn(shape, generator=generator, dtype=torch.float32, device=generator.device).to(dtype)


def pack(latent: Tensor) -> Tensor:
    """(B, C, h, w) -> tokens (B, h*w, C), row-major."""
    return rearrange(latent, "b c h w -> b (h w) c")


def unpack(tokens: Tensor, h: int, w: int) -> Tensor:
    """Tokens (B, h*w, C) -> (B, C, h, w) on the token grid (h, w)."""
    return rearrange(tokens, "b (h w) c -> b c h w", h=h, w=w)


def image_ids(batch: int, h: int, w: int, reference: int | None = None) -> Tensor:
    """(B, h*w, 4) float32 ids (t, h, w, l) = (0, 0.5 row, 0.5 col, l): l = 0 for the generated image, -(1 + i)
    for reference image i (references are told apart on the l axis)."""
    rows = repeat(torch.arange(h, dtype=torch.float32), "h -> h w", w=w) * IMAGE_ROPE_SCALE
    cols = repeat(torch.arange(w, dtype=torch.float32), "w -> h w", h=h) * IMAGE_ROPE_SCALE
    l = torch.full_like(rows, 0.0 if reference is None else -(1.0 + reference))
    ids = torch.stack((torch.zeros_like(rows), rows, cols, l), dim=-1)
    return repeat(ids, "h w four -> b (h w) four", b=batch)


def text_ids(batch: int, num_tokens: int) -> Tensor:
    """(B, T, 4) float32 ids (0, 0, 0, n) of text token n, padding included."""
    ids = torch.zeros(num_tokens, 4)
    ids[:, 3] = torch.arange(num_tokens)
    return repeat(ids, "t four -> b t four", b=batch)


def get_schedule(num_steps: int, shift: float = FLUX3_SHIFT) -> list[float]:
    """num_steps + 1 sigmas from 1 down to 0: the constant shift, no resolution dependence (spec §6.2).
    Computed in float64 and rounded to float32, as diffusers' scheduler does."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    s = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64)
    sigmas = shift * s / (1 + (shift - 1) * s)
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)]).to(torch.float32).tolist()


def euler_step(img: Tensor, pred: Tensor, sigma: float, sigma_next: float) -> Tensor:
    """x + (sigma_next - sigma) v in float32, back in the latent dtype."""
    return (img.float() + (sigma_next - sigma) * pred.float()).to(img.dtype)


def time_vector(value: float, like: Tensor) -> Tensor:
    """(B,) filled with `value`, in float32: the model rounds it to its own dtype."""
    return torch.full((like.shape[0],), value, dtype=torch.float32, device=like.device)


@torch.no_grad()
def denoise(
    model: torch.nn.Module,
    img: Tensor,
    img_ids: Tensor,
    txt: Tensor,
    txt_ids: Tensor,
    sigmas: list[float],
    cond: Tensor | None = None,
    cond_ids: Tensor | None = None,
    negative_txt: Tensor | None = None,
    negative_txt_ids: Tensor | None = None,
    cfg_scale: float = 1.0,
    progress: bool = True,
) -> Tensor:
    """Integrate noise tokens img (B, L, 128) along `sigmas` with a FLUX.3 model.

    The flow map (`model.config.flow_map`) also gets each step's target, the next sigma (0 after the last), and
    takes no guidance. Base uses classifier-free guidance, v = v_neg + cfg_scale (v - v_neg), with the negative
    prompt's own text window (`negative_txt`, `negative_txt_ids`; its length may differ); cfg_scale 1 skips it."""
    flow_map = model.config.flow_map
    guided = cfg_scale != 1.0
    if flow_map and guided:
        raise ValueError("the distilled FLUX.3 (a flow map) takes no classifier-free guidance: leave cfg_scale at 1")
    if guided and (negative_txt is None or negative_txt_ids is None):
        raise ValueError("classifier-free guidance needs the negative prompt's features and ids (the empty prompt)")
    steps = list(zip(sigmas[:-1], sigmas[1:]))
    for sigma, sigma_next in tqdm(steps, desc="denoising", disable=not progress):
        t = time_vector(sigma, img)
        target = time_vector(sigma_next, img) if flow_map else None
        pred = model(img, img_ids, txt, txt_ids, t, cond, cond_ids, target)
        if guided:
            pred_neg = model(img, img_ids, negative_txt, negative_txt_ids, t, cond, cond_ids)
            pred = pred_neg + cfg_scale * (pred - pred_neg)
        img = euler_step(img, pred, sigma, sigma_next)
    return img
