"""Evaluation protocols: every knob of a zero-shot segmentation run, with the paper's settings as named presets.

Values come from the paper and the authors' experiment scripts (see shared spec concept-attention.md §5);
every field can be overridden from the CLI.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch
from einops import rearrange
from PIL import Image

from concept_attention.segmentation.datasets import SegSample

MAP_RESAMPLE = ("nearest", "bilinear")
RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bicubic": Image.Resampling.BICUBIC,
            "bilinear": Image.Resampling.BILINEAR}


class ProtocolError(ValueError):
    pass


@dataclass(frozen=True)
class SegProtocol:
    name: str
    # task: "binary" = one object concept vs the background words, masks 0/1 (ImageNet-Seg, VOC single);
    #       "multiclass" = argmax over the background words + every class present (oracle vocabulary).
    task: str
    background_concepts: tuple[str, ...]
    class_first: bool                  # concept order [class, *background] (ImageNet) or [*background, *classes]
    threshold: str                     # "mean": object map > its mean (binary only); "argmax": over concepts
    eval_size: int                     # maps and masks are resized (nearest) to eval_size x eval_size
    pipeline_size: int | None          # image size fed to the pipeline (None = the pipeline's default resize)
    input_size: int | None             # first resize to input_size x input_size (None = straight to pipeline_size)
    input_resample: str                # resampling of that first resize; the step up to pipeline_size is nearest
    t: float | None                    # noise level of the encode pass (None = the num_steps grid at noise_timestep)
    noise_timestep: int
    num_steps: int
    num_samples: int                   # noise samples averaged, seeds seed .. seed + num_samples - 1
    seed: int
    layers: tuple[int, ...] | None     # None = the pipeline's default layers
    normalize: str | None              # None or "linear" (concept vectors, spec §4)
    softmax: bool                      # softmax over concepts per layer before averaging
    blur: bool                         # 3x3 Gaussian blur of the final map
    ap_minmax: bool                    # min-max normalise the object score before AP (ImageNet) or use it raw (VOC)
    caption_template: str = "a {class}"  # per class; "{caption}" = the dataset's own caption; "" = empty prompt
    caption_joiner: str = ","
    map_resample: str = "nearest"      # maps (one value per token) -> eval_size: "nearest" (paper) or "bilinear"

    def __post_init__(self):
        if self.task not in ("binary", "multiclass"):
            raise ProtocolError(f"task must be 'binary' or 'multiclass', got {self.task!r}")
        if self.threshold not in ("mean", "argmax"):
            raise ProtocolError(f"threshold must be 'mean' or 'argmax', got {self.threshold!r}")
        if self.threshold == "mean" and self.task != "binary":
            raise ProtocolError("threshold 'mean' needs a binary task (one object map); use --threshold argmax")
        if self.input_resample not in RESAMPLE:
            raise ProtocolError(f"input_resample must be one of {sorted(RESAMPLE)}, got {self.input_resample!r}")
        if self.map_resample not in MAP_RESAMPLE:
            raise ProtocolError(f"map_resample must be one of {MAP_RESAMPLE}, got {self.map_resample!r}")
        if self.normalize not in (None, "linear"):
            raise ProtocolError(f"normalize must be None or 'linear', got {self.normalize!r}")
        if "{class}" not in self.caption_template and self.caption_template not in ("{caption}", ""):
            raise ProtocolError(f"caption template {self.caption_template!r} needs a '{{class}}' placeholder "
                                "(or is exactly '{caption}': the dataset's own caption, or '': the empty prompt)")
        if self.num_samples < 1 or self.eval_size < 1:
            raise ProtocolError("num_samples and eval_size must be positive")
        if self.t is not None and not 0.0 <= self.t <= 1.0:          # also refuses NaN
            raise ProtocolError(f"--t must be a noise level in [0, 1] (0 = the clean image), got {self.t}")

    def override(self, **changes) -> "SegProtocol":
        """A copy with the non-None changes applied (CLI overrides)."""
        known = {f.name for f in fields(self)}
        unknown = set(changes) - known
        if unknown:
            raise ProtocolError(f"unknown protocol fields {sorted(unknown)}")
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> "SegProtocol":
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items()})


# The authors' VOC scripts use noise_timestep 3 of 4 on the resolution-shifted schedule:
# t = e^mu / (e^mu + (1/0.25 - 1)) with mu = 1.15 for 4096 image tokens.
VOC_T = math.exp(1.15) / (math.exp(1.15) + 3.0)

DEMO_T, DEMO_LAYERS = 0.1, (2, 3)  # the shapes presets' noise level and layers (the demo model's demo.json too)

PRESETS: dict[str, SegProtocol] = {
    "paper-imagenet": SegProtocol(
        name="paper-imagenet", task="binary",
        background_concepts=("background", "floor", "tree", "person", "grass", "face"), class_first=True,
        threshold="mean", eval_size=224, pipeline_size=1024, input_size=512, input_resample="bicubic",
        t=0.5, noise_timestep=2, num_steps=4, num_samples=5, seed=4, layers=(14, 15, 16, 17),
        normalize="linear", softmax=True, blur=True, ap_minmax=True),
    "paper-voc-single": SegProtocol(
        name="paper-voc-single", task="binary",
        background_concepts=("background", "floor", "grass", "tree", "sky"), class_first=False,
        threshold="argmax", eval_size=224, pipeline_size=1024, input_size=512, input_resample="nearest",
        t=VOC_T, noise_timestep=3, num_steps=4, num_samples=1, seed=0, layers=(14, 15, 16, 17, 18),
        normalize="linear", softmax=False, blur=False, ap_minmax=False),
    "paper-voc-multi": SegProtocol(
        name="paper-voc-multi", task="multiclass",
        background_concepts=("background", "floor", "grass", "tree", "sky"), class_first=False,
        threshold="argmax", eval_size=64, pipeline_size=1024, input_size=None, input_resample="nearest",
        t=VOC_T, noise_timestep=3, num_steps=4, num_samples=1, seed=0, layers=(14, 15, 16, 17),
        normalize="linear", softmax=False, blur=False, ap_minmax=False),
    # The synthetic shapes (concept_attention/shapes.py) for the demo model: the background word of each image
    # is a class of its own, images keep their size (32), t = 0.1, two noise samples, the last two of its four
    # double blocks (DEMO_LAYERS), softmax, argmax. The paper's t = 0.5 and late layers (14-18 of 19) are for
    # 1024-pixel latents; for the demo's 32-pixel images t and the layers were chosen on image stream 2
    # (scripts/probe_demo.py; the benchmark's default stream is 1). The 16x16 maps are upsampled bilinearly:
    # with nearest, even the exact label fractions of each token (oracle_token_grid) give only ~86% of object
    # pixels their label on two-object images, since a 2x2 token cannot follow an outline.
    "shapes": SegProtocol(
        name="shapes", task="multiclass", background_concepts=(), class_first=False,
        threshold="argmax", eval_size=32, pipeline_size=None, input_size=None, input_resample="nearest",
        t=DEMO_T, noise_timestep=2, num_steps=4, num_samples=2, seed=0, layers=DEMO_LAYERS,
        normalize=None, softmax=True, blur=False, ap_minmax=False, caption_template="{caption}",
        map_resample="bilinear"),
    # The same with the empty prompt (what encoding an unseen image gives): the words offered must be found
    # from the image alone. On two-object images its binding accuracy asks "is the circle's word on the circle?".
    "shapes-binding": SegProtocol(
        name="shapes-binding", task="multiclass", background_concepts=(), class_first=False,
        threshold="argmax", eval_size=32, pipeline_size=None, input_size=None, input_resample="nearest",
        t=DEMO_T, noise_timestep=2, num_steps=4, num_samples=2, seed=0, layers=DEMO_LAYERS,
        normalize=None, softmax=True, blur=False, ap_minmax=False, caption_template="",
        map_resample="bilinear"),
    # Your own folder on any model: every class present (label 0 under its classes.csv name, no extra background
    # words), the model's own image size and default layers, t = 0.5, softmax, argmax, scored at 224 x 224.
    "folder": SegProtocol(
        name="folder", task="multiclass", background_concepts=(), class_first=False,
        threshold="argmax", eval_size=224, pipeline_size=None, input_size=None, input_resample="nearest",
        t=0.5, noise_timestep=2, num_steps=4, num_samples=1, seed=0, layers=None,
        normalize=None, softmax=True, blur=False, ap_minmax=False),
}


def get_preset(name: str) -> SegProtocol:
    if name not in PRESETS:
        raise ProtocolError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


@dataclass(frozen=True)
class Vocabulary:
    """The concepts offered for one image and the label each one predicts (background words -> 0)."""

    concepts: list[str]
    labels: list[int]
    prompt: str

    @property
    def object_index(self) -> int:
        """Index of the single object concept of a binary task."""
        return self.labels.index(1)


def vocabulary(sample: SegSample, mask: np.ndarray, protocol: SegProtocol) -> Vocabulary:
    """The concepts for one image. Binary: the image's class and the background words. Multiclass: the
    background words (-> label 0) and every other class present in the scored `mask` (the paper's oracle
    vocabulary); with no background words, label 0 is offered under its own name like any other class."""
    num_classes = len(sample.class_names)
    if protocol.task == "binary":
        if num_classes != 2:
            raise ProtocolError(f"binary protocol {protocol.name} needs a binary dataset (background + one class); "
                                f"image {sample.image_id} has {num_classes} classes: pick a multiclass preset")
        classes = [1]
    else:
        skip_background = bool(protocol.background_concepts)
        classes = [int(v) for v in np.unique(mask) if v < num_classes and not (skip_background and v == 0)]
    names = [sample.class_names[c] for c in classes]
    background = list(protocol.background_concepts)
    concepts = names + background if protocol.class_first else background + names
    labels = classes + [0] * len(background) if protocol.class_first else [0] * len(background) + classes
    if protocol.caption_template == "":
        prompt = ""
    elif protocol.caption_template == "{caption}":
        if sample.caption is None:
            raise ProtocolError(f"caption template '{{caption}}' but image {sample.image_id} has no caption")
        prompt = sample.caption
    else:
        prompt = protocol.caption_joiner.join(protocol.caption_template.replace("{class}", n) for n in names)
    return Vocabulary(concepts, labels, prompt)


def prepare_image(image: Image.Image, protocol: SegProtocol) -> Image.Image | torch.Tensor:
    """The pipeline input: PIL when the pipeline resizes, else a (3, S, S) tensor in [-1, 1] after
    `input_size` (input_resample) and a nearest upsample to `pipeline_size` (the paper's 512 bicubic -> 1024)."""
    if protocol.pipeline_size is None:
        return image
    if protocol.input_size is not None:
        image = image.resize((protocol.input_size, protocol.input_size), RESAMPLE[protocol.input_resample])
    else:
        image = image.resize((protocol.pipeline_size, protocol.pipeline_size), RESAMPLE[protocol.input_resample])
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)          # (H, W, 3) in [-1, 1]
    pixels = rearrange(pixels, "h w c -> 1 c h w")
    if pixels.shape[-1] != protocol.pipeline_size:
        pixels = torch.nn.functional.interpolate(pixels, size=(protocol.pipeline_size,) * 2, mode="nearest")
    return pixels[0]
