"""The zero-shot segmentation benchmark: maps -> predictions -> pooled metrics, resumable and shardable.

One `encode_image` per image and concept-stream configuration (ConceptAttention, the cross-attention baseline
and the value-space ablation come from the same pass; the self/cross-only ablations and each swept t need their
own). Two reference lines put the numbers in context: `predict_background` (no model: the image's background label
everywhere) and an optional baseline model (e.g. the same architecture untrained) scored with the same methods on
the same images, as rows "NAME: method". Per-image integer counts and AP values of every row are appended as one
JSON line, so an interrupted run resumes where it stopped (for both models), a finished run is never recomputed,
and shards merge exactly. A resume proves it is the same experiment (see resume.py): the configuration, the
model's fingerprint and dtype and the dataset's identity must match, records are matched by image id, and one run
at a time holds the folder.

Output folder: config.json (what produced the numbers), results.rank{R}.jsonl, summary.json, summary.md,
plots/*.png, .lock.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from concept_attention.segmentation.datasets import (
    DATASETS, IGNORE_LABEL, DatasetError, SegSample, load_dataset, resize_mask,
)
from concept_attention.segmentation.distributed import DistContext, init_distributed
from concept_attention.segmentation.metrics import (
    PooledScores, binary_paper_ap, binding_accuracy, confusion_matrix, foreground_ap, mean_iou,
    onehot_average_precision,
)
from concept_attention.segmentation.protocols import (
    MAP_RESAMPLE, PRESETS, RESAMPLE, SegProtocol, Vocabulary, get_preset, prepare_image, vocabulary,
)
from concept_attention.segmentation.resume import (
    RECORD_FILES, EvalError, FolderLock, ResultsFile, compact_records, describe, differences, load_records,
    read_config, weights_fingerprint, write_config,
)


# ---------------------------------------------------------------------------------------------------------------
# What the benchmark needs from a model


class MapOutput(Protocol):
    concept_maps: torch.Tensor                    # (r, h, w) output space
    cross_attention_maps: torch.Tensor | None     # (r, h, w)
    value_maps: torch.Tensor | None               # (r, h, w)
    layer_maps: dict[str, torch.Tensor] | None    # space -> (layers, r, h, w) when per_layer


class MapProvider(Protocol):
    """Anything with ConceptAttentionPipeline.encode_image's signature (the real pipeline, or a test fake)."""

    def encode_image(self, image, concepts: list[str], prompt: str = "", noise_timestep: int = 2,
                     num_steps: int = 4, t: float | None = None, num_samples: int = 1, seed: int = 0,
                     layer_indices: list[int] | None = None, softmax: bool = True, normalize: str | None = None,
                     blur: bool = False, attention: str = "both", width: int | None = None,
                     height: int | None = None, per_layer: bool = False, progress: bool = False) -> MapOutput: ...


@dataclass(frozen=True)
class Method:
    attention: str | None   # concept-stream attention of the pass: "both" | "cross" | "self" | "none"; None = no pass
    space: str              # which maps: "output" | "cross_attention" | "value" | "background" (no model)


METHODS: dict[str, Method] = {
    "concept_attention": Method("both", "output"),
    "cross_attention": Method("both", "cross_attention"),
    "value_space": Method("both", "value"),
    "ablation_cross_only": Method("cross", "output"),     # concepts attend to the image only
    "ablation_self_only": Method("self", "output"),       # concepts attend to each other only
    "ablation_no_attention": Method("none", "output"),    # o_c = v_c
    "predict_background": Method(None, "background"),      # reference line: the image's background label everywhere
    "colour_rule": Method(None, "colour_rule"),            # reference line (shapes): each pixel's nearest colour
    "oracle_random_word": Method(None, "oracle_random_word"),  # reference line: exact objects, random words
    "oracle_token_grid": Method(None, "oracle_token_grid"),    # ceiling: exact labels averaged per model token
}
MAP_FIELDS = {"output": "concept_maps", "cross_attention": "cross_attention_maps", "value": "value_maps"}
DEFAULT_METHODS = ("concept_attention", "cross_attention", "value_space")
# The demo benchmark has its model-free reference lines.
SHAPES_METHODS = (*DEFAULT_METHODS, "predict_background", "colour_rule", "oracle_random_word", "oracle_token_grid")
PRESET_METHODS = {"shapes": SHAPES_METHODS, "shapes-binding": SHAPES_METHODS}


def default_methods(preset: str) -> tuple[str, ...]:
    return PRESET_METHODS.get(preset, DEFAULT_METHODS)


@dataclass(frozen=True)
class EvalConfig:
    """Everything that changes the numbers (stored in config.json; a resume must match it)."""

    dataset: str
    protocol: SegProtocol
    methods: tuple[str, ...] = DEFAULT_METHODS
    per_layer: bool = False                 # also score every layer alone (keys "method@layer=L")
    sweep_t: tuple[float, ...] = ()         # also score these noise levels (keys "method@t=T")
    baseline: str | None = None             # name of a second model scored alike (keys "NAME: method...")
    sources: dict = field(default_factory=dict)   # what made the maps: model fingerprints, dtype (from the CLI)

    def __post_init__(self):
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise EvalError(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
        if self.per_layer and self.protocol.layers is None:
            raise EvalError("--per-layer needs explicit --layers (the layer numbers label the curve)")
        if any(not 0.0 <= t <= 1.0 for t in self.sweep_t):          # also refuses NaN
            raise EvalError(f"--sweep-t values must be in [0, 1], got {list(self.sweep_t)}")
        if self.baseline is not None and (not self.baseline.strip() or not self.model_methods):
            raise EvalError("a baseline model needs a non-empty --baseline-name and at least one model-based method "
                            f"(--methods: {', '.join(m for m in METHODS if METHODS[m].attention is not None)})")

    @property
    def model_methods(self) -> tuple[str, ...]:
        """The methods that read maps from a model pass (all but the model-free reference line)."""
        return tuple(m for m in self.methods if METHODS[m].attention is not None)

    def baseline_key(self, key: str) -> str:
        return f"{self.baseline}: {key}"

    def baseline_config(self) -> "EvalConfig":
        """What the baseline model computes: the model-based methods, sweeps and layers, no baseline of its own."""
        return replace(self, methods=self.model_methods, baseline=None)

    def curves(self) -> list[str]:
        """The lines of the per-layer and per-t plots: each model method, then the baseline's."""
        return [*self.model_methods, *(self.baseline_key(m) for m in self.model_methods if self.baseline)]

    def to_dict(self) -> dict:
        return {"dataset": self.dataset, "protocol": self.protocol.to_dict(), "methods": list(self.methods),
                "per_layer": self.per_layer, "sweep_t": list(self.sweep_t), "baseline": self.baseline,
                "sources": dict(self.sources)}

    def keys(self) -> list[str]:
        """Result keys in table order: each method, the baseline's methods, then the timestep sweeps, then the
        layers (the model's, then the baseline's)."""
        models = self.model_methods
        extra = [t_key(m, t) for m in models for t in self.sweep_t]
        if self.per_layer:
            extra += [layer_key(m, layer) for m in models for layer in self.protocol.layers]
        if not self.baseline:
            return [*self.methods, *extra]
        return [*self.methods, *map(self.baseline_key, models), *extra, *map(self.baseline_key, extra)]


def t_key(method: str, t: float) -> str:
    return f"{method}@t={t:g}"


def layer_key(method: str, layer: int) -> str:
    return f"{method}@layer={layer}"


# ---------------------------------------------------------------------------------------------------------------
# Scoring one image


@dataclass
class ImageScore:
    confusion: np.ndarray      # (C, C) int64
    ap_paper: float
    ap_foreground: float
    prediction: np.ndarray     # (S, S) labels
    soft: np.ndarray           # (S, S) object score (binary) or (K, S, S) channel scores (multiclass)

    def record(self) -> dict:
        as_json = lambda x: None if math.isnan(x) else x
        return {"confusion": self.confusion.tolist(), "ap_paper": as_json(self.ap_paper),
                "ap_foreground": as_json(self.ap_foreground)}


def minmax(x: np.ndarray) -> np.ndarray:
    low, high = x.min(), x.max()
    return (x - low) / (high - low) if high > low else np.zeros_like(x)


def resize_maps(maps: torch.Tensor, size: int, mode: str = "nearest") -> np.ndarray:
    """(r, h, w) -> (r, size, size) float64. "nearest" is torch's F.interpolate convention, as the paper;
    "bilinear" (half-pixel centres) lets a coarse token grid follow an outline between token centres."""
    maps = maps.detach().to("cpu", torch.float64)
    options = {} if mode == "nearest" else {"align_corners": False}
    return F.interpolate(maps[None], size=(size, size), mode=mode, **options)[0].numpy()


def score_maps(maps: torch.Tensor, vocab: Vocabulary, target: np.ndarray, protocol: SegProtocol,
               num_classes: int) -> ImageScore:
    """Predict labels from one image's concept maps and score them against `target` (eval size)."""
    if maps.shape[0] != len(vocab.concepts):
        raise EvalError(f"{maps.shape[0]} maps for {len(vocab.concepts)} concepts")
    scores = resize_maps(maps, protocol.eval_size, protocol.map_resample)        # (r, S, S)
    labels = np.asarray(vocab.labels)
    if protocol.threshold == "mean":                                            # binary: object map > its mean
        obj = minmax(scores[vocab.object_index])
        prediction = (obj > obj.mean()).astype(np.int64)
        channels, channel_labels = None, [1]
        soft = obj if protocol.ap_minmax else scores[vocab.object_index]
    else:
        prediction = labels[scores.argmax(0)]
        channel_labels = sorted(set(vocab.labels))
        channels = np.stack([scores[labels == label].sum(0) for label in channel_labels])   # (K, S, S)
        soft = channels
    confusion = confusion_matrix(prediction, target, num_classes)
    if protocol.task == "binary":
        if channels is not None:
            soft = channels[channel_labels.index(1)]
            soft = minmax(soft) if protocol.ap_minmax else soft
        return ImageScore(confusion, binary_paper_ap(soft, target), foreground_ap(soft, target), prediction, soft)
    # multiclass: one-hot AP over the offered labels' channels; foreground AP = mean over the object classes
    channel_of = np.full(max(256, num_classes + 1), 255, dtype=np.int64)
    channel_of[channel_labels] = np.arange(len(channel_labels))
    ap_paper = onehot_average_precision(channels, channel_of[target])
    objects = [k for k, label in enumerate(channel_labels) if label != 0 or not protocol.background_concepts]
    per_class = [foreground_ap(channels[k], target, label=channel_labels[k]) for k in objects]
    per_class = [ap for ap in per_class if not math.isnan(ap)]
    return ImageScore(confusion, ap_paper, float(np.mean(per_class)) if per_class else float("nan"),
                      prediction, channels)


def background_maps(vocab: Vocabulary, background_label: int) -> torch.Tensor:
    """The predict-background reference line as (r, 1, 1) maps: an equal share on the concepts of the image's
    background label, zero elsewhere. Argmax (and the binary mean threshold) then predicts the background
    everywhere, and every AP is that of a constant score: chance, i.e. the pixel fraction of the class."""
    on = torch.tensor([label == background_label for label in vocab.labels], dtype=torch.float64)
    if not on.any():
        raise EvalError(f"predict_background: no offered concept has the image's background label {background_label} "
                        "(give background words with --background-concepts, or drop the method)")
    return (on / on.sum())[:, None, None]


def colour_rule_maps(sample: SegSample, vocab: Vocabulary, protocol: SegProtocol) -> torch.Tensor:
    """The colour-rule reference line (synthetic shapes only) as (r, S, S) maps: minus each pixel's colour distance
    to what each offered word looks like (concept_attention.shapes.colour_rule_scores). No geometry, no model."""
    from PIL import Image

    from concept_attention.shapes import colour_rule_scores

    image = sample.image.convert("RGB").resize((protocol.eval_size,) * 2, Image.Resampling.NEAREST)
    try:
        return torch.from_numpy(colour_rule_scores(image, vocab.concepts))
    except ValueError as error:
        raise EvalError(f"colour_rule reads the synthetic shapes' words only ({error}); drop the method") from None


def oracle_random_word_maps(sample: SegSample, vocab: Vocabulary, target: np.ndarray, seed: int) -> torch.Tensor:
    """The object-oracle reference line as (r, S, S) maps: the exact object masks (each non-background label of
    the target is one object), each given one of the offered object words at random (seeded by the protocol's seed
    and the image id, so a rerun draws the same). It shows what perfect outlines with unbound words score."""
    background = [i for i, label in enumerate(vocab.labels) if label == sample.background_label]
    words = [i for i, label in enumerate(vocab.labels) if label != sample.background_label]
    if not background or not words:
        raise EvalError("oracle_random_word needs the image's background word and at least one object word offered")
    rng = np.random.default_rng([seed, zlib.crc32(sample.image_id.encode())])
    maps = np.zeros((len(vocab.concepts), *target.shape))
    maps[background[0]] = 1.0
    for label in np.unique(target):
        if label not in (sample.background_label, IGNORE_LABEL):
            region = target == label
            maps[background[0]][region] = 0.0
            maps[words[rng.integers(len(words))]][region] = 1.0
    return torch.from_numpy(maps)


def oracle_token_grid_maps(vocab: Vocabulary, target: np.ndarray, grid: tuple[int, int]) -> torch.Tensor:
    """The token-grid ceiling as (r, h, w) maps: each offered word's share of each token's pixels in the exact
    target (the best any map with one value per token can be), then scored like a model's maps, i.e. upsampled
    by the protocol's map_resample. It separates what the method misses from what the grid cannot show."""
    labels = torch.from_numpy(np.asarray(vocab.labels))
    onehot = (torch.from_numpy(target)[None] == labels[:, None, None]).to(torch.float64)  # (r, S, S)
    shares = F.adaptive_avg_pool2d(onehot[None], grid)[0]                                  # (r, h, w)
    per_word = (labels[:, None] == labels[None, :]).sum(1).to(torch.float64)              # words sharing a label
    return shares / per_word[:, None, None]


def reference_maps(method: str, sample: SegSample, vocab: Vocabulary, target: np.ndarray,
                   protocol: SegProtocol) -> torch.Tensor:
    """The maps of a model-free reference line (METHODS[method].attention is None)."""
    space = METHODS[method].space
    if space == "background":
        return background_maps(vocab, sample.background_label)
    if space == "colour_rule":
        return colour_rule_maps(sample, vocab, protocol)
    if space == "oracle_random_word":
        return oracle_random_word_maps(sample, vocab, target, protocol.seed)
    raise EvalError(f"no reference maps for {method!r}")


def finite_maps(maps: torch.Tensor, image_id: str, what: str) -> torch.Tensor:
    """`maps` when every value is finite; NaN or Inf would be scored as a plain prediction (argmax of NaN is 0,
    i.e. predict-background numbers under the method's name), so they stop the run instead."""
    if not torch.isfinite(maps).all():
        raise EvalError(f"image {image_id}: the {what} maps hold NaN or Inf, so they cannot be scored; likely cause: "
                        "non-finite model weights (check the checkpoint) or an overflow in reduced precision "
                        "(try --dtype float32)")
    return maps


def evaluate_image(get_provider: Callable[[], MapProvider], sample: SegSample, config: EvalConfig,
                   num_classes: int) -> dict[str, ImageScore]:
    """The result keys of one model (all of `config`'s but the baseline's) for one image, with one encode pass
    per (attention, t) configuration; `get_provider` is called only when a pass is needed."""
    protocol = config.protocol
    target = resize_mask(sample.mask, protocol.eval_size)
    vocab = vocabulary(sample, target, protocol)
    image = prepare_image(sample.image, protocol)
    results = {}
    wanted: dict[tuple[str, float | None], list[tuple[str, str, bool]]] = {}   # pass -> (key, method, per layer)
    for method in config.methods:
        if method == "oracle_token_grid":
            continue                                # needs the model's token grid: after its passes
        if METHODS[method].attention is None:
            results[method] = score_maps(reference_maps(method, sample, vocab, target, protocol), vocab, target,
                                         protocol, num_classes)
            continue
        wanted.setdefault((METHODS[method].attention, protocol.t), []).append((method, method, config.per_layer))
        for t in config.sweep_t:
            wanted.setdefault((METHODS[method].attention, t), []).append((t_key(method, t), method, False))
    for (attention, t), jobs in wanted.items():
        per_layer = any(job[2] for job in jobs)
        provider = get_provider()                   # a model that cannot load says so itself
        try:
            out = provider.encode_image(
                image, vocab.concepts, prompt=vocab.prompt, noise_timestep=protocol.noise_timestep,
                num_steps=protocol.num_steps, t=t, num_samples=protocol.num_samples, seed=protocol.seed,
                layer_indices=list(protocol.layers) if protocol.layers is not None else None,
                softmax=protocol.softmax, normalize=protocol.normalize, blur=protocol.blur, attention=attention,
                width=protocol.pipeline_size, height=protocol.pipeline_size, per_layer=per_layer,
            )
        except ValueError as error:                 # the model refused this input: say which image
            raise EvalError(f"image {sample.image_id}: {error}") from None
        for key, method, with_layers in jobs:
            space = METHODS[method].space
            maps = getattr(out, MAP_FIELDS[space])
            if maps is None:
                raise EvalError(f"the map provider returned no {MAP_FIELDS[space]} (needed for {method})")
            results[key] = score_maps(finite_maps(maps, sample.image_id, key), vocab, target, protocol, num_classes)
            if with_layers:
                stack = finite_maps(out.layer_maps[space], sample.image_id, f"per-layer {method}")  # (L, r, h, w)
                for layer, layer_maps in zip(protocol.layers, stack):
                    results[layer_key(method, layer)] = score_maps(layer_maps, vocab, target, protocol, num_classes)
            grid = tuple(maps.shape[-2:])
    if "oracle_token_grid" in config.methods:
        if not wanted:
            raise EvalError("oracle_token_grid takes its token grid from a model's maps: add a model-based method")
        results["oracle_token_grid"] = score_maps(oracle_token_grid_maps(vocab, target, grid), vocab, target,
                                                  protocol, num_classes)
    return results


# ---------------------------------------------------------------------------------------------------------------
# Results files, resume and merge


def summarize(records: dict[int, dict], config: EvalConfig, num_classes: int,
              class_names: list[str], object_labels: list[int] | None = None) -> dict[str, dict]:
    """Pooled metrics per key over the given records (exact: integer counts summed in index order). With
    `object_labels` (the shapes dataset's shape words), also the binding accuracy over two-object images."""
    summary = {}
    for key in config.keys():
        pooled = PooledScores(num_classes)
        for index in sorted(records):
            scores = records[index]["scores"][key]
            nan = lambda x: float("nan") if x is None else x
            pooled.add(np.asarray(scores["confusion"]), nan(scores["ap_paper"]), nan(scores["ap_foreground"]))
        summary[key] = pooled.summary(class_names)
        if object_labels is not None:
            confusions = [records[index]["scores"][key]["confusion"] for index in sorted(records)]
            accuracy, images = binding_accuracy(confusions, object_labels)
            summary[key].update(binding_accuracy=accuracy, n_binding_images=images)
    return summary


def binding_table(summary: dict[str, dict], class_names: list[str]) -> str:
    """Markdown: pixel accuracy, mIoU, binding accuracy (two-object images) and the IoU of every word."""
    pct = lambda x: "" if x is None or math.isnan(x) else f"{100 * x:.2f}"
    head = "| method | pixel acc. | mIoU | binding acc. | " + " | ".join(class_names) + " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for key, row in summary.items():
        cells = [key, pct(row["pixel_accuracy"]), pct(row["miou"]), pct(row.get("binding_accuracy", math.nan))]
        cells += [pct(row["iou_per_class"].get(name, math.nan)) for name in class_names]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown_table(summary: dict[str, dict], binary: bool) -> str:
    pct = lambda x: "" if x is None or math.isnan(x) else f"{100 * x:.2f}"
    head = "| method | images | pixel acc. | mIoU (true) |"
    head += " mIoU paper-compatible A/(2-A) |" if binary else ""
    head += " mAP (paper: one-hot [1-s, s]) | mAP (foreground) |" if binary else " mAP (one-hot) | mAP (per class) |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for key, row in summary.items():
        cells = [key, str(row["n_images"]), pct(row["pixel_accuracy"]), pct(row["miou"])]
        cells += [pct(row["miou_paper_compatible"])] if binary else []
        cells += [pct(row["map_paper"]), pct(row["map_foreground"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# The run


def eval_memory_bytes(eval_size: int, num_concepts: int, num_channels: int) -> int:
    """Peak bytes of scoring one image at eval_size (an upper bound read off score_maps and the metrics): the
    concept maps resized to (r, S, S) float64, masks, predictions and confusion temporaries (about 8 arrays of S^2
    int64), and the one-hot AP's flattened ranking of the K channels (sort keys, order, sorted copies, cumulative
    sums: about 8 arrays of K S^2)."""
    return 8 * eval_size ** 2 * (num_concepts + 8 * num_channels + 8)


def available_memory_bytes() -> int | None:
    """Memory the kernel can give now (MemAvailable), else free physical pages; None where neither is known."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_eval_memory(protocol: SegProtocol, num_classes: int, available: int | None = None) -> None:
    """Refuse sizes whose work would not fit in half the available memory (the rest is the model's), naming the
    estimate and the largest size that fits: the eval size's scoring, and the input image prepare_image makes
    (float32 RGB at pipeline_size, twice: the array and its nearest upsample; the model's own need is the
    pipeline's to check)."""
    available = available_memory_bytes() if available is None else available
    if available is None:
        return
    for flag, size in (("--pipeline-size", protocol.pipeline_size), ("--input-size", protocol.input_size)):
        if size is not None and 2 * 12 * size ** 2 > available // 2:
            raise EvalError(f"{flag} {size} needs about {24 * size ** 2 / 2**30:.1f} GiB for the input image alone, "
                            f"more than half of the {available / 2**30:.1f} GiB available: use {flag} "
                            f"{math.isqrt(available // 2 // 24)} or less")
    background = len(protocol.background_concepts)
    concepts, channels = (1 + background, 2) if protocol.task == "binary" else (background + num_classes, num_classes)
    need = eval_memory_bytes(protocol.eval_size, concepts, channels)
    if need <= available // 2:
        return
    fits = math.isqrt(available // 2 // eval_memory_bytes(1, concepts, channels))
    raise EvalError(f"--eval-size {protocol.eval_size} needs about {need / 2**30:.1f} GiB to score one image "
                    f"({concepts} maps, {channels} class channels at {protocol.eval_size}x{protocol.eval_size}), more "
                    f"than half of the {available / 2**30:.1f} GiB available: use --eval-size {fits} or less")


def image_ids(dataset: Sequence[SegSample], count: int) -> list[str]:
    """The ids of the first `count` images (cheaply where the dataset knows them without decoding); records are
    matched by these, so they must be unique."""
    of = getattr(dataset, "image_id", None)
    ids = [of(i) if of is not None else dataset[i].image_id for i in range(count)]
    repeated = [image_id for image_id, n in Counter(ids).items() if n > 1]
    if repeated:
        raise EvalError(f"the dataset has several images with one id ({', '.join(map(repr, repeated[:5]))}): results "
                        "are matched by image id, so ids must be unique")
    return ids


def dataset_identity(dataset: Sequence[SegSample]) -> dict:
    """What fixes every image (the dataset's own `identity()`; else only its length is knowable)."""
    identity = getattr(dataset, "identity", None)
    return identity() if identity is not None else {"length": len(dataset)}


def _start(out_dir: Path, wanted: dict, ids: list[str], dataset: Sequence[SegSample], overwrite: bool,
           lock: FolderLock, ctx: DistContext) -> dict[str, dict]:
    """Lock the folder (rank 0, for the whole group), clear it on --overwrite, prove that what it holds is this
    experiment, and return its records by image id. Nothing is written here but the lock."""
    failure: Exception | None = None
    if ctx.is_main:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            lock.acquire()
            if overwrite:
                for stale in [*out_dir.glob(RECORD_FILES), *(out_dir / n for n in ("summary.json", "summary.md",
                                                                                    "config.json"))]:
                    stale.unlink(missing_ok=True)
            compact_records(out_dir)
        except (EvalError, OSError) as error:
            failure = error
    if not ctx.all_agree(failure is None):
        raise failure or EvalError(f"rank 0 could not start on {out_dir} (see its message)")
    stored, records = read_config(out_dir), load_records(out_dir)
    fix = "use another --out, or --overwrite to start again"
    if stored is None:
        if records:
            raise EvalError(f"{out_dir} holds {len(records)} results but no config.json, so what produced them is "
                            f"unknown; {fix}")
        return {}
    legacy = "data" not in stored            # written before runs recorded their model, dtype and data
    stored = {"baseline": None, **stored}     # folders written before baselines existed
    if "protocol" in stored:                  # before map_resample existed, maps were upsampled by nearest
        stored["protocol"] = {"map_resample": "nearest", **stored["protocol"]}
    if legacy:
        stored = {**stored, "sources": wanted["sources"], "data": wanted["data"]}
    changed = differences(stored, wanted)
    if changed:
        raise EvalError(f"{out_dir} holds results of another experiment (differs in: {describe(changed)}); {fix}")
    selected = set(ids)
    strangers = [i for i in records if i not in selected]
    if strangers and len(dataset) > len(ids):
        known = set(image_ids(dataset, len(dataset)))
        strangers = [i for i in strangers if i not in known]
    if strangers:
        raise EvalError(f"{out_dir} holds results for images that are not in this dataset ({', '.join(strangers[:3])}"
                        f"{', ...' if len(strangers) > 3 else ''}): they are another dataset's; {fix}")
    if legacy and ctx.is_main:
        print(f"note: {out_dir} was written before runs recorded their model, dtype and data; its configuration and "
              "image ids match, so it is resumed as the same experiment (use --overwrite if it is not)")
        write_config(out_dir, wanted)
    return records


def _num_classes(dataset: Sequence[SegSample], protocol: SegProtocol) -> tuple[int, list[str]]:
    if protocol.task == "binary":
        return 2, ["background", "object"]
    names = getattr(dataset, "class_names", None) or dataset[0].class_names
    return len(names), list(names)


def evaluate(
    dataset: Sequence[SegSample],
    provider: MapProvider | Callable[[str], MapProvider],
    config: EvalConfig,
    out_dir: str | Path,
    limit: int | None = None,
    progress: bool = True,
    plots: bool = True,
    overwrite: bool = False,
    device: str | None = None,
    num_examples: int = 3,
    baseline: MapProvider | Callable[[str], MapProvider] | None = None,
    results_file: Callable[[Path, int, dict], ResultsFile] = ResultsFile,
) -> dict[str, dict]:
    """Run (or resume) the benchmark into `out_dir` and return the summary {key: metrics}.

    `provider` (and `baseline`, the model of `config.baseline`) is a map provider or a factory device -> provider,
    called only when there is work left. Under torchrun, each rank takes every world_size-th image and rank 0
    writes the summary and plots. `results_file` opens a rank's results file (tests pass a failing one)."""
    if (baseline is None) != (config.baseline is None):
        raise EvalError("pass a baseline model exactly when the configuration names one (--baseline-weights)")
    total = len(dataset) if limit is None else min(limit, len(dataset))
    if total <= 0:
        raise EvalError(f"nothing to evaluate: --limit {limit} selects no images" if limit is not None and len(dataset)
                        else "nothing to evaluate: the dataset has no images")
    num_classes, class_names = _num_classes(dataset, config.protocol)
    check_eval_memory(config.protocol, num_classes)
    ids = image_ids(dataset, total)
    wanted = json.loads(json.dumps({**config.to_dict(), "data": dataset_identity(dataset)}))   # as stored
    out_dir = Path(out_dir)
    ctx = init_distributed(device)
    lock = FolderLock(out_dir)
    try:
        done = _start(out_dir, wanted, ids, dataset, overwrite, lock, ctx)
        was_complete = all(i in done for i in ids)
        todo = ctx.shard([index for index, image_id in enumerate(ids) if image_id not in done])
        main_key = config.methods[0]
        get_provider = _lazy(provider, ctx.device)
        get_baseline = _lazy(baseline, ctx.device)

        def score_image(sample: SegSample) -> dict[str, ImageScore]:
            scores = evaluate_image(get_provider, sample, config, num_classes)
            if config.baseline:
                of_baseline = evaluate_image(get_baseline, sample, config.baseline_config(), num_classes)
                scores.update((config.baseline_key(key), score) for key, score in of_baseline.items())
            return scores

        if todo:
            running = PooledScores(num_classes)
            for image_id in ids:
                if image_id in done:
                    running.confusion += np.asarray(done[image_id]["scores"][main_key]["confusion"])
            from tqdm.auto import tqdm

            bar = tqdm(todo, unit="img", disable=not (progress and ctx.is_main), dynamic_ncols=True,
                       desc=f"{config.protocol.name} rank {ctx.rank}/{ctx.world_size}")
            resume_hint = "the images finished so far are kept: fix it and run the same command again to resume"
            results = results_file(out_dir, ctx.rank, wanted)
            try:
                for index in bar:
                    try:
                        sample = dataset[index]
                    except DatasetError as error:
                        raise DatasetError(f"{error} ({resume_hint})") from None
                    scores = score_image(sample)
                    record = {"index": index, "image_id": sample.image_id,
                              "scores": {key: scores[key].record() for key in config.keys()}}
                    try:
                        results.append(record)
                    except OSError as error:
                        cause = "the disk is full" if error.errno == errno.ENOSPC else error.strerror or str(error)
                        raise EvalError(f"could not write the result of image {sample.image_id} to {out_dir}: "
                                        f"{cause}; {resume_hint}") from None
                    running.confusion += scores[main_key].confusion
                    bar.set_postfix(mIoU=f"{100 * mean_iou(running.confusion):.2f}")
            finally:
                try:
                    results.close()
                except OSError:            # every record was flushed when written: a close after a full disk
                    pass                   # adds nothing, and the error that stopped the run is the one to see
        ctx.barrier()
        if not ctx.is_main:
            return {}
        by_id = load_records(out_dir)
        records = {index: by_id[image_id] for index, image_id in enumerate(ids) if image_id in by_id}
        missing = [image_id for image_id in ids if image_id not in by_id]
        if missing:
            raise EvalError(f"{len(missing)} images have no results (first {missing[:5]}); run again to finish them")
        object_labels = getattr(dataset, "object_labels", None) if config.protocol.task == "multiclass" else None
        summary = summarize(records, config, num_classes, class_names, object_labels)
        _write_summary(out_dir, summary, config, total)
        if plots:
            from concept_attention.segmentation import plots as plotting

            plotting.make_plots(out_dir, summary, config, records, dataset, get_provider, num_classes,
                                num_examples, redo_examples=not was_complete)
        return summary
    finally:
        lock.release()
        ctx.close()


def _lazy(provider, device: str) -> Callable[[], MapProvider | None]:
    """The provider, built on first use when a factory was given (a finished run never loads the model)."""
    if provider is None or hasattr(provider, "encode_image"):
        return lambda: provider
    built: list[MapProvider] = []

    def get() -> MapProvider:
        if not built:
            built.append(provider(device))
        return built[0]

    return get


def _write_summary(out_dir: Path, summary: dict, config: EvalConfig, total: int) -> None:
    binary = config.protocol.task == "binary"
    (out_dir / "summary.json").write_text(json.dumps(
        {"config": config.to_dict(), "images": total, "results": summary}, indent=2) + "\n")
    note = ("mIoU (true) is the mean IoU of background and object. The paper's ImageNet mIoU equals the "
            "paper-compatible column A/(2-A) of pooled pixel accuracy A (not a true IoU).\n") if binary else ""
    binding = ""
    if any("binding_accuracy" in row for row in summary.values()):
        images = next(iter(summary.values()))["n_binding_images"]
        names = list(next(iter(summary.values()))["iou_per_class"])
        binding = (f"\nBinding accuracy: the fraction of object pixels given their own word, on the {images} images "
                   f"with two different objects; then the IoU of every word.\n\n{binding_table(summary, names)}")
    (out_dir / "summary.md").write_text(
        f"# {config.protocol.name} on {config.dataset} ({total} images)\n\n{markdown_table(summary, binary)}\n{note}"
        f"{binding}")


# ---------------------------------------------------------------------------------------------------------------
# Command line: `concept-attention eval ...`

_NONE = "none"


def _optional(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    """A type for overrides that can also be set to None by writing 'none'."""
    def parse(text: str):
        return _NONE if text.lower() == _NONE else kind(text)
    parse.__name__ = kind.__name__
    return parse


def _words(text: str) -> tuple[str, ...]:
    return tuple(w.strip() for w in text.split(",") if w.strip())


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(",") if v.strip())


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Zero-shot segmentation benchmark (ImageNet-Segmentation, PascalVOC 2012, a folder, synthetic shapes). "
        "Resumable: run the same command again to continue; results go to --out, which is locked while a run "
        "writes and resumed only by the same experiment (model, dtype, data, options). Folder datasets: "
        "DIR/images/<id>.jpg|png, DIR/masks/<id>.png (pixel = label, 255 = ignore), DIR/classes.csv "
        "('label,name', 0 = background). Launch with torchrun --nproc_per_node N to shard over processes.")
    parser.add_argument("--dataset", required=True, choices=sorted(DATASETS))
    parser.add_argument("--data", default=None,
                        help="gtsegs_ijcv.mat | VOCdevkit/VOC2012 | a folder (all three required) | shapes: "
                             "LENGTH[:SEED] (default 200:1, the demo model's held-out images)")
    parser.add_argument("--weights", type=Path, default=None, help="model folder (Flux.1 schnell for the paper)")
    parser.add_argument("--baseline-weights", type=Path, default=None,
                        help="a second model folder (e.g. the same model untrained) scored with the same methods "
                             "on the same images, as rows 'NAME: method'")
    parser.add_argument("--baseline-name", default="untrained", help="NAME of those rows (default: untrained)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="protocol preset (default: the dataset's: imagenet-seg -> paper-imagenet, ...)")
    parser.add_argument("--out", type=Path, required=True, help="results folder (resumed when it exists)")
    parser.add_argument("--methods", type=_words, default=None,
                        help=f"comma list from {', '.join(METHODS)} (default: {','.join(DEFAULT_METHODS)}; "
                             "the shapes presets add predict_background, colour_rule, oracle_random_word)")
    parser.add_argument("--per-layer", action="store_true", help="also score each layer alone (per-layer curve)")
    parser.add_argument("--sweep-t", type=_floats, default=(), help="also score these t values, e.g. 0.25,0.5,0.75")
    parser.add_argument("--limit", type=int, default=None, help="only the first N images")
    parser.add_argument("--device", default="auto",
                        help="auto (cuda if available, under torchrun cuda:LOCAL_RANK), cpu, cuda, cuda:N, mps")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="float32 on every device, so numbers compare across machines")
    parser.add_argument("--overwrite", action="store_true", help="discard earlier results in --out")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--quiet", "--no-progress", dest="no_progress", action="store_true",
                        help="no progress bars and no library logging")
    group = parser.add_argument_group("protocol overrides (default: the preset's values; 'none' clears a value)")
    group.add_argument("--background-concepts", type=_words, default=None, help="comma list ('' = none)")
    group.add_argument("--class-first", action=argparse.BooleanOptionalAction, default=None)
    group.add_argument("--threshold", choices=["mean", "argmax"], default=None)
    group.add_argument("--eval-size", type=int, default=None)
    group.add_argument("--pipeline-size", type=_optional(int), default=None)
    group.add_argument("--input-size", type=_optional(int), default=None)
    group.add_argument("--input-resample", choices=sorted(RESAMPLE), default=None)
    group.add_argument("--map-resample", choices=MAP_RESAMPLE, default=None,
                       help="how token maps reach the eval size (shapes presets: bilinear; paper presets: nearest)")
    group.add_argument("--t", type=_optional(float), default=None)
    group.add_argument("--noise-timestep", type=int, default=None)
    group.add_argument("--num-steps", type=int, default=None)
    group.add_argument("--num-samples", type=int, default=None)
    group.add_argument("--seed", type=int, default=None)
    group.add_argument("--layers", type=_optional(int), nargs="+", default=None)
    group.add_argument("--normalize", type=_optional(str), choices=["linear", _NONE], default=None)
    group.add_argument("--softmax", action=argparse.BooleanOptionalAction, default=None)
    group.add_argument("--blur", action=argparse.BooleanOptionalAction, default=None)
    group.add_argument("--ap-minmax", action=argparse.BooleanOptionalAction, default=None)
    group.add_argument("--caption-template", default=None, help="e.g. 'a {class}', or '{caption}'")
    group.add_argument("--caption-joiner", default=None)


OVERRIDES = ("background_concepts", "class_first", "threshold", "eval_size", "pipeline_size", "input_size",
             "input_resample", "t", "noise_timestep", "num_steps", "num_samples", "seed", "layers", "normalize",
             "softmax", "blur", "ap_minmax", "caption_template", "caption_joiner", "map_resample")


def protocol_from_args(args: argparse.Namespace) -> SegProtocol:
    preset = get_preset(args.preset or DATASETS[args.dataset].preset)
    changes = {}
    for name in OVERRIDES:
        value = getattr(args, name)
        if value is None:
            continue
        if name == "layers":
            value = None if _NONE in value else tuple(value)
        changes[name] = None if value == _NONE else value
    return replace(preset, **changes)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def run_eval(args: argparse.Namespace) -> int:
    """`concept-attention eval`: returns the exit code; bad input exits with one readable line."""
    from flux_mini.cli import resolve_device

    try:
        protocol = protocol_from_args(args)
        methods = tuple(args.methods or default_methods(protocol.name))
        baseline = args.baseline_name if args.baseline_weights is not None else None
        config = EvalConfig(args.dataset, protocol, methods, args.per_layer, tuple(args.sweep_t), baseline)
        if config.model_methods:
            if args.weights is None:
                raise EvalError(f"--methods {','.join(config.model_methods)} read maps from a model: "
                                "pass --weights DIR")
            sources = {"weights": weights_fingerprint(args.weights), "dtype": args.dtype}
            if baseline:
                sources["baseline_weights"] = weights_fingerprint(args.baseline_weights)
            config = replace(config, sources=sources)
        dataset = load_dataset(args.dataset, args.data)

        device = None if args.device == "auto" else str(resolve_device(args.device))

        def pipeline(folder: Path) -> Callable[[str], MapProvider]:
            def build(device: str) -> MapProvider:
                from concept_attention.pipeline import ConceptAttentionPipeline
                from flux_mini.pipeline import quiet_transformers

                with quiet_transformers(logging=args.no_progress):
                    return ConceptAttentionPipeline.from_folder(folder, device=device, dtype=DTYPES[args.dtype])
            return build

        start = time.perf_counter()
        summary = evaluate(dataset, pipeline(args.weights), config, args.out, limit=args.limit,
                           progress=not args.no_progress, plots=not args.no_plots, overwrite=args.overwrite,
                           device=device, baseline=pipeline(args.baseline_weights) if baseline else None)
    except ValueError as error:          # EvalError, ProtocolError, DatasetError and the pipeline's input checks
        raise SystemExit(f"error: {error}") from None
    except OSError as error:
        raise SystemExit(f"error: {error}; the images finished so far are kept in {args.out}: fix it and run the "
                         "same command again to resume") from None
    if summary:
        print((Path(args.out) / "summary.md").read_text())
        print(f"wrote {args.out}/summary.md, summary.json in {time.perf_counter() - start:.0f} s")
    return 0
