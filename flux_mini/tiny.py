"""Tiny random models for tests, demos and benchmarks: every layer non-zero, so comparisons prove something."""

from __future__ import annotations

import torch
from torch import nn

from flux_mini.model import FluxConfig


def tiny_flux_config(guidance_embed: bool = False, **overrides) -> FluxConfig:
    """A few-hundred-thousand-parameter Flux with the official structure (head dim 16, 3 RoPE axes)."""
    fields = dict(
        in_channels=16,
        out_channels=16,
        vec_in_dim=32,
        context_in_dim=48,
        hidden_size=64,
        mlp_ratio=4.0,
        num_heads=4,
        depth=2,
        depth_single_blocks=2,
        axes_dim=(4, 6, 6),
        theta=10_000,
        qkv_bias=True,
        guidance_embed=guidance_embed,
    )
    return FluxConfig(**{**fields, **overrides})


@torch.no_grad()
def randomize_(module: nn.Module, seed: int = 0, std: float = 0.2) -> nn.Module:
    """Fill every parameter with N(0, std^2) noise; gains named `scale`/`weight` of norms get 1 + noise,
    so that no layer is zero or an identity and swapped q/k or shift/scale would show."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in module.named_parameters():
        noise = torch.randn(param.shape, generator=generator, dtype=torch.float32) * std
        is_gain = name.endswith(".scale") or (param.ndim == 1 and "norm" in name and name.endswith(".weight"))
        param.copy_((1.0 + noise) if is_gain else noise)
    return module
