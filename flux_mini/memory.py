"""How much memory a run will need, estimated from its sizes before anything is allocated.

A too-large size (a 100000-pixel width, a 12000x12000 photo at native size, a T5 length of 100000)
would otherwise grow until the kernel kills the process. The estimate counts the largest live
activations of each stage (the weights are already loaded): noise and tokens, one transformer block
(attention runs fused, so O(tokens) memory), the concept-map buffers, the autoencoder at full
resolution, and T5's self-attention, which transformers materialises as (heads, T, T) scores.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

GiB = 2**30


class RunTooLargeError(ValueError):
    """A run would need more memory than the device has free; the message names the estimate and a size that fits."""


@dataclass(frozen=True)
class RunSize:
    """What the memory of one run depends on (counts, not tensors)."""

    batch: int
    image_tokens: int  # N: latent tokens (2x2 patches)
    text_tokens: int  # T: the T5 length
    hidden: int
    heads: int
    mlp_ratio: float
    token_channels: int  # in_channels of the transformer
    dtype_bytes: int
    concepts: int = 0
    pixels: int = 0  # H * W of the images the autoencoder encodes or decodes
    autoencoder_channels: int = 0  # widest full-resolution channel count (0: identity autoencoder)
    t5_heads: int = 0


def estimate_bytes(size: RunSize) -> dict[str, int]:
    """Peak bytes of each stage's live activations; the run needs the largest (stages run one after another)."""
    b, n, t, d = size.batch, size.image_tokens, size.text_tokens, size.hidden
    tokens = b * (n + t)
    float32 = 4
    latents = 3 * b * n * size.token_channels * float32  # noise, tokens, velocity
    # one block: residual, normed/modulated input, q/k/v, attention output, the MLP's hidden layer (twice)
    block = tokens * d * size.dtype_bytes * (7 + 2 * size.mlp_ratio)
    rope = tokens * (d // size.heads) * 2 * float32  # (B, 1, L, head_dim / 2, 2, 2) in float32
    concept_maps = b * size.concepts * n * float32 * (3 + 2 * size.heads)  # 3 spaces + per-head cross attention
    autoencoder = 3 * b * size.pixels * max(size.autoencoder_channels, 3) * float32
    text = b * (size.t5_heads * t * t + 8 * t * d) * float32
    return {
        "transformer": int(latents + block + rope + concept_maps),
        "autoencoder": int(autoencoder),
        "text encoder": int(text),
    }


def estimate_with_references(size: RunSize, reference_tokens: int, reference_pixels: int) -> dict[str, int]:
    """estimate_bytes of an edit (FLUX.2, FLUX.3): the references' tokens join the image tokens, and the autoencoder
    stage is the larger of decoding the outputs and encoding the largest reference (`reference_pixels`; they are
    encoded one at a time)."""
    estimate = estimate_bytes(replace(size, image_tokens=size.image_tokens + reference_tokens))
    encoding = estimate_bytes(replace(size, batch=1, pixels=reference_pixels))["autoencoder"]
    estimate["autoencoder"] = max(estimate["autoencoder"], encoding)
    return estimate


def available_bytes(device: torch.device | str = "cpu") -> int:
    """Free memory where the run allocates: the GPU's free memory, else MemAvailable of /proc/meminfo."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # no way to tell (e.g. Windows): do not refuse
        return 2**62


def gib(count: int) -> str:
    return f"{count / GiB:.1f} GiB"


def fitting_size(
    height: int, width: int, multiple: int, needed: Callable[[int, int], int], budget: int
) -> tuple[int, int] | None:
    """The largest (height, width) of the same aspect ratio, in multiples of `multiple`, with needed(h, w) <=
    budget; None when not even multiple x multiple fits (the text encoder, or the reference images, alone are
    too large)."""

    def snap(scale: float) -> tuple[int, int]:
        return tuple(max(multiple, int(side * scale) // multiple * multiple) for side in (height, width))

    if needed(*snap(0.0)) > budget:
        return None
    lo, hi = 0.0, 1.0  # needed() grows with the scale: bisect for the largest scale that fits
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if needed(*snap(mid)) <= budget else (lo, mid)
    return snap(lo)


def check_fits(
    estimate: Callable[[int, int], dict[str, int]],
    height: int,
    width: int,
    batch: int,
    multiple: int,
    device: torch.device,
    available: int | None,
    no_fit: str,
    reference_tokens: int = 0,
) -> None:
    """Refuse a run whose estimate(height, width) exceeds `available` bytes (None: the device's free memory),
    naming the estimate per stage and the largest size of the same aspect ratio that fits (else `no_fit`). With
    reference images (`reference_tokens` > 0) it names them too: fewer or smaller ones may fit where no output
    size can."""
    available = available_bytes(device) if available is None else available
    parts = estimate(height, width)
    if max(parts.values()) <= available:
        return
    detail = ", ".join(f"{name} {gib(count)}" for name, count in parts.items())
    what = f"a batch of {batch} at {width}x{height}" if batch > 1 else f"{width}x{height}"
    if reference_tokens:
        what += f" with {reference_tokens} reference-image tokens"
    fits = fitting_size(height, width, multiple, lambda h, w: max(estimate(h, w).values()), available)
    if fits:
        fix = f"use a size that fits, e.g. width {fits[1]} and height {fits[0]}"
        fix += ", or fewer or smaller reference images" if reference_tokens else ""
    elif reference_tokens and estimate(multiple, multiple)["text encoder"] <= available:
        fix = "the reference images alone do not fit, whatever the output size: use fewer or smaller ones"
    else:
        fix = no_fit
    raise RunTooLargeError(
        f"{what} needs about {gib(max(parts.values()))} ({detail}) but {device} has {gib(available)} free; {fix}"
    )
