"""Benchmark figures: mIoU per layer, mIoU per noise level t, and the best and worst images.

Figures are drawn with matplotlib's object API on an Agg canvas (no pyplot state, no display needed).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from concept_attention.segmentation.datasets import IGNORE_LABEL, SegSample, resize_mask
from concept_attention.segmentation.metrics import mean_iou


def _save(figure: Figure, path: Path) -> None:
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=110, bbox_inches="tight")


def _curve(summary: dict, methods: Sequence[str], keys_of: Callable[[str], list[tuple[float, str]]],
           xlabel: str, title: str, path: Path) -> None:
    figure = Figure(figsize=(9, 3.6))
    axes = figure.subplots(1, 2)
    for method in methods:
        points = keys_of(method)
        xs = [x for x, _ in points]
        for ax, metric in zip(axes, ("miou", "pixel_accuracy")):
            ax.plot(xs, [100 * summary[key][metric] for _, key in points], marker="o", label=method)
    for ax, name in zip(axes, ("mIoU (true, %)", "pixel accuracy (%)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle(title)
    _save(figure, path)


def layer_curve(summary: dict, config, path: Path) -> None:
    layers = list(config.protocol.layers)
    _curve(summary, config.curves(), lambda m: [(layer, f"{m}@layer={layer}") for layer in layers],
           "layer (double blocks 0.., single blocks after)", f"{config.protocol.name}: one layer at a time", path)


def timestep_curve(summary: dict, config, path: Path) -> None:
    points = {t: "{m}@t=%g" % t for t in config.sweep_t}
    if config.protocol.t is not None:
        points[config.protocol.t] = "{m}"                        # the main run is the point at the protocol's t
    _curve(summary, config.curves(), lambda m: [(t, points[t].format(m=m)) for t in sorted(points)],
           "noise level t", f"{config.protocol.name}: encode at noise level t", path)


def example_grid(rows: list[tuple[str, SegSample, object]], eval_size: int, num_classes: int, path: Path) -> None:
    """One row per image: the image, the ground truth, the prediction and the score map."""
    figure = Figure(figsize=(10, 2.6 * len(rows)))
    axes = figure.subplots(len(rows), 4, squeeze=False)
    for (title, sample, score), ax in zip(rows, axes):
        target = resize_mask(sample.mask, eval_size)
        soft = score.soft if score.soft.ndim == 2 else score.soft.max(0)
        labels = lambda m: np.ma.masked_where(m == IGNORE_LABEL, m)
        ax[0].imshow(sample.image.resize((eval_size, eval_size)))
        ax[1].imshow(labels(target), cmap="tab20", vmin=0, vmax=max(19, num_classes - 1), interpolation="nearest")
        ax[2].imshow(score.prediction, cmap="tab20", vmin=0, vmax=max(19, num_classes - 1), interpolation="nearest")
        ax[3].imshow(soft, cmap="inferno", interpolation="nearest")
        for a, name in zip(ax, (title, "ground truth", "prediction", "score")):
            a.set_title(name, fontsize=8)
            a.axis("off")
    _save(figure, path)


def make_plots(out_dir: Path, summary: dict, config, records: dict[int, dict], dataset: Sequence[SegSample],
               get_provider: Callable, num_classes: int, num_examples: int, redo_examples: bool) -> None:
    from concept_attention.segmentation.evaluate import evaluate_image

    folder = out_dir / "plots"
    folder.mkdir(exist_ok=True)
    if config.per_layer:
        layer_curve(summary, config, folder / "per_layer.png")
    if config.sweep_t:
        timestep_curve(summary, config, folder / "per_timestep.png")
    grid = folder / "examples.png"
    if num_examples <= 0 or (grid.exists() and not redo_examples):
        return
    # Best and worst images of the first method by per-image mIoU, re-encoded for their maps.
    main = config.methods[0]
    ranked = sorted(records, key=lambda i: (mean_iou(np.asarray(records[i]["scores"][main]["confusion"])), i))
    best = ranked[::-1][:num_examples]
    chosen = best + [i for i in ranked[:num_examples] if i not in best]
    only_main = replace(config, methods=(main,), per_layer=False, sweep_t=(), baseline=None)
    rows = []
    for index in chosen:
        sample = dataset[index]
        score = evaluate_image(get_provider, sample, only_main, num_classes)[main]
        rows.append((f"{sample.image_id}: mIoU {100 * mean_iou(score.confusion):.1f}", sample, score))
    example_grid(rows, config.protocol.eval_size, num_classes, grid)
