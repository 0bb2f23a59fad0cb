"""Pictures of concept maps: colormapped heatmaps, overlays, and a one-call grid figure."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch import Tensor

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DEFAULT_CMAP = "plasma"


def normalize_range(maps: Tensor, vmin: float | None = None, vmax: float | None = None) -> Tensor:
    """Scale to [0, 1] with one range for all maps (so concepts stay comparable); flat maps -> 0."""
    lo = maps.min() if vmin is None else torch.tensor(vmin)
    hi = maps.max() if vmax is None else torch.tensor(vmax)
    span = hi - lo
    return ((maps - lo) / span).clamp(0, 1) if span > 0 else torch.zeros_like(maps)


def heatmap(
    map2d: Tensor, size: tuple[int, int] | None = None, cmap: str = DEFAULT_CMAP, vmin=None, vmax=None
) -> Image.Image:
    """(h, w) map -> RGB picture, nearest-upsampled to `size` = (width, height) so every token stays a block."""
    import matplotlib  # imported on use: it adds most of a second to `import concept_attention`

    values = normalize_range(map2d.detach().float().cpu(), vmin, vmax).numpy()
    rgb = (matplotlib.colormaps[cmap](values)[..., :3] * 255).round().astype(np.uint8)
    picture = Image.fromarray(rgb)
    return picture.resize(size, Image.NEAREST) if size is not None else picture


def heatmaps(maps: Tensor, size: tuple[int, int] | None = None, cmap: str = DEFAULT_CMAP) -> list[Image.Image]:
    """(r, h, w) maps -> one picture per concept, on a shared colour range."""
    lo, hi = float(maps.detach().min()), float(maps.detach().max())
    return [heatmap(m, size, cmap, lo, hi) for m in maps]


def overlay(
    image: Image.Image, map2d: Tensor, alpha: float = 0.5, cmap: str = DEFAULT_CMAP, vmin=None, vmax=None
) -> Image.Image:
    """The heatmap blended over the image (same size as the image)."""
    colored = heatmap(map2d, image.size, cmap, vmin, vmax)
    return Image.blend(image.convert("RGB"), colored, alpha)


def concept_grid(
    image: Image.Image,
    maps: Tensor,
    concepts: Sequence[str],
    path: str | Path | None = None,
    title: str | None = None,
    cmap: str = DEFAULT_CMAP,
    overlay_alpha: float | None = None,
) -> Figure:
    """The image and one titled panel per concept in a row, with one colour bar for the shared range of
    all panels (or heatmaps blended over the image with `overlay_alpha`); saved as PNG when `path` is given.
    Titles go through matplotlib's text layout: escape `$` in them (`$` starts mathematics)."""
    import matplotlib
    import matplotlib.pyplot as plt

    if maps.shape[0] != len(concepts):
        raise ValueError(f"{maps.shape[0]} maps for {len(concepts)} concepts: they must match")
    lo, hi = float(maps.detach().min()), float(maps.detach().max())
    fig, axes = plt.subplots(
        1, len(concepts) + 1, figsize=(2.4 * (len(concepts) + 1) + 0.6, 2.6), squeeze=False, layout="constrained"
    )
    panels = [("image", image.convert("RGB"))]
    for concept, map2d in zip(concepts, maps):
        if overlay_alpha:
            picture = overlay(image, map2d, overlay_alpha, cmap, lo, hi)
        else:
            picture = heatmap(map2d, image.size, cmap, lo, hi)
        panels.append((concept, picture))
    for ax, (name, picture) in zip(axes[0], panels):
        ax.imshow(picture)
        ax.set_title(name)
        ax.axis("off")
    scale = matplotlib.cm.ScalarMappable(matplotlib.colors.Normalize(lo, hi if hi > lo else lo + 1), cmap)
    fig.colorbar(scale, ax=list(axes[0, 1:]), shrink=0.8, label="map value (shared range)")
    if title:
        fig.suptitle(title)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
        plt.close(fig)
    return fig
