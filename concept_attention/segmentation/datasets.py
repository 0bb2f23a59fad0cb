"""Segmentation datasets read from local files (nothing is downloaded): ImageNet-Segmentation, PascalVOC 2012,
a plain folder, and a name -> factory registry the CLI uses.

Every dataset is a lazy sequence of `SegSample`s. Labels are int64; 0 is background and `IGNORE_LABEL` marks
pixels that no metric counts (VOC's object borders).
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from concept_attention.segmentation.resume import file_digest, listing_digest

IGNORE_LABEL = 255


class DatasetError(ValueError):
    """A dataset path or file that cannot be read; the message says what is wrong and how to fix it."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    pass


@dataclass
class SegSample:
    image: Image.Image          # RGB, original size
    mask: np.ndarray            # (H, W) int64 labels, 0 = background, IGNORE_LABEL = not scored
    class_names: list[str]      # label -> name; len(class_names) is the number of classes scored
    image_id: str
    caption: str | None = None  # the dataset's own caption, when it has one (caption template "{caption}")
    background_label: int = 0   # the label of this image's background (shapes: its own background word)

    def present_labels(self) -> list[int]:
        """Object labels present in the mask (background and ignore excluded), ascending."""
        labels = np.unique(self.mask)
        return [int(v) for v in labels if v != 0 and v != IGNORE_LABEL]


def _load_json(name: str) -> dict:
    return json.loads(resources.files("concept_attention.data").joinpath(name).read_text())


def _require(path: Path, what: str, fix: str) -> Path:
    if not path.exists():
        raise DatasetNotFoundError(f"{what} not found at {path}: {fix}")
    return path


def _open_image(path: Path, what: str) -> Image.Image:
    """Image.open with a clear error for a file PIL cannot read (decoding problems surface on first use)."""
    try:
        return Image.open(path)
    except (UnidentifiedImageError, OSError) as error:
        raise DatasetError(f"{what} {path} cannot be read as an image ({error}): replace or remove it") from None


def _rgb(path: Path, what: str) -> Image.Image:
    """The image at `path` decoded to RGB; a truncated or corrupt file is one clear error naming it."""
    with _open_image(path, what) as image:
        try:
            return image.convert("RGB")
        except OSError as error:
            raise DatasetError(f"{what} {path} is damaged ({error}): replace or remove it") from None


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour resize of a label mask to (size, size), as torchvision's Resize(NEAREST) does on PIL."""
    if mask.max(initial=0) > 255 or mask.min(initial=0) < 0:
        raise DatasetError(f"mask labels must be in 0..255 to resize, got {mask.min()}..{mask.max()}")
    image = Image.fromarray(mask.astype(np.uint8), mode="L")
    return np.asarray(image.resize((size, size), Image.Resampling.NEAREST), dtype=np.int64)


# ---------------------------------------------------------------------------------------------------------------
# ImageNet-Segmentation (Guillaumin et al. 2014): gtsegs_ijcv.mat, MATLAB v7.3 = HDF5 with object references


class ImageNetSegmentation(Sequence[SegSample]):
    """The 4,276 images of `gtsegs_ijcv.mat`; binary masks; class name from the image's WordNet id.

    Name = first lemma of the synset (shipped table), "_" -> " ", then the shipped simplification map
    (e.g. "malinois" -> "dog"). class_names = ["background", name].
    """

    def __init__(self, path: str | Path):
        import h5py

        path = Path(path)
        if path.is_dir():
            path = path / "gtsegs_ijcv.mat"
        _require(path, "ImageNet-Segmentation file gtsegs_ijcv.mat", "pass --data /path/to/gtsegs_ijcv.mat")
        try:
            self._file = h5py.File(path, "r")
        except OSError as error:
            raise DatasetError(f"{path} is not a MATLAB v7.3 (HDF5) file ({error}); expected gtsegs_ijcv.mat") from None
        if "value" not in self._file or not {"id", "img", "gt"} <= set(self._file["value"]):
            raise DatasetError(f"{path} has no group value/{{id,img,gt}}; expected the ImageNet-Segmentation gtsegs_ijcv.mat")
        group = self._file["value"]
        self._ids, self._imgs, self._gts = (np.asarray(group[k]).reshape(-1) for k in ("id", "img", "gt"))
        if not len(self._ids) == len(self._imgs) == len(self._gts):
            raise DatasetError(f"{path}: id/img/gt have different lengths")
        self.path = path
        self._lemmas = _load_json("wnid_to_lemma.json")
        self._simplified = _load_json("imagenet_seg_class_map.json")["categories"]

    def __len__(self) -> int:
        return len(self._imgs)

    def identity(self) -> dict:
        """What fixes every image of this dataset (stored with results; a resume must match it)."""
        return {"file": file_digest(self.path)}

    def image_id(self, index: int) -> str:
        code_units = np.asarray(self._file[self._ids[index]]).reshape(-1)
        return "".join(chr(int(u)) for u in code_units)

    def class_name(self, image_id: str) -> str:
        wnid = image_id.split("_")[0]
        if wnid not in self._lemmas:
            raise DatasetError(
                f"WordNet id {wnid} (image {image_id}) is not in concept_attention/data/wnid_to_lemma.json; "
                "rebuild it with scripts/build_wnid_table.py")
        lemma = self._lemmas[wnid]
        return self._simplified.get(lemma, lemma)

    def __getitem__(self, index: int) -> SegSample:
        if not 0 <= index < len(self):
            raise IndexError(index)
        image = np.asarray(self._file[self._imgs[index]])          # (3, W, H) uint8: MATLAB column-major
        if image.ndim == 2:                                         # a grey image: (W, H)
            image = np.stack([image] * 3)
        gt_ref = np.asarray(self._file[self._gts[index]]).reshape(-1)[0]
        mask = np.asarray(self._file[gt_ref])                       # (W, H)
        image_id = self.image_id(index)
        return SegSample(
            image=Image.fromarray(np.ascontiguousarray(image.transpose(2, 1, 0)).astype(np.uint8), mode="RGB"),
            mask=(mask.T != 0).astype(np.int64),
            class_names=["background", self.class_name(image_id)],
            image_id=image_id,
        )


# ---------------------------------------------------------------------------------------------------------------
# PascalVOC 2012 (VOCdevkit/VOC2012)

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
VOC_SHORT_NAMES = (
    "background", "plane", "bike", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "table", "dog", "horse", "motorcycle", "person", "pot", "sheep", "sofa", "train", "monitor",
)


def _voc_root(path: str | Path) -> Path:
    path = Path(path)
    for candidate in (path, path / "VOC2012", path / "VOCdevkit" / "VOC2012"):
        if (candidate / "ImageSets" / "Segmentation").is_dir():
            return candidate
    raise DatasetNotFoundError(
        f"no VOC2012 tree under {path}: pass --data pointing at VOCdevkit/VOC2012 (with JPEGImages, "
        "SegmentationClass and ImageSets/Segmentation/val.txt)")


class PascalVOC(Sequence[SegSample]):
    """PascalVOC 2012 segmentation, 21 classes with short names (plane, bike, ..., monitor); 255 = border.

    `split="val"` is the full 1,449-image val set. `single_class=True` keeps the paper's single-class images and
    makes their masks binary (object -> 1): an image is kept when its labels, resized to `single_class_size`
    with nearest, show background plus at most one object class (255 excluded).
    """

    def __init__(self, path: str | Path, split: str = "val", single_class: bool = False,
                 single_class_size: int = 224):
        self.root = _voc_root(path)
        split_file = _require(self.root / "ImageSets" / "Segmentation" / f"{split}.txt", f"VOC split {split}",
                              "check --data (VOCdevkit/VOC2012) and the split name")
        self.ids = [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
        self.single_class = single_class
        self.single_class_size = single_class_size
        self.class_names = ["background", "object"] if single_class else list(VOC_SHORT_NAMES)
        if single_class:
            self.ids = [i for i in self.ids if len(self._present(resize_mask(self._mask(i), single_class_size))) <= 1]

    def _mask(self, image_id: str) -> np.ndarray:
        path = _require(self.root / "SegmentationClass" / f"{image_id}.png", "VOC mask",
                        "the VOC2012 SegmentationClass folder is incomplete")
        with Image.open(path) as image:
            if image.mode not in ("P", "L"):
                raise DatasetError(f"{path}: mode {image.mode}, expected a palette (P) label PNG")
            return np.asarray(image, dtype=np.int64)

    @staticmethod
    def _present(mask: np.ndarray) -> set[int]:
        return {int(v) for v in np.unique(mask)} - {0, IGNORE_LABEL}

    def __len__(self) -> int:
        return len(self.ids)

    def image_id(self, index: int) -> str:
        return self.ids[index]

    def identity(self) -> dict:
        """The split's ids, every mask's content and every image's size (cheap: masks are small)."""
        masks = (file_digest(self.root / "SegmentationClass" / f"{i}.png") for i in self.ids)
        images = ((self.root / "JPEGImages" / f"{i}.jpg") for i in self.ids)
        return {"ids": listing_digest(self.ids), "single_class": self.single_class, "masks": listing_digest(masks),
                "image_sizes": listing_digest(p.stat().st_size if p.exists() else None for p in images)}

    def __getitem__(self, index: int) -> SegSample:
        image_id = self.ids[index]
        path = _require(self.root / "JPEGImages" / f"{image_id}.jpg", "VOC image", "the JPEGImages folder is incomplete")
        rgb = _rgb(path, "VOC image")
        mask = self._mask(image_id)
        if not self.single_class:
            return SegSample(rgb, mask, list(VOC_SHORT_NAMES), image_id)
        # The object is the class the split rule saw at its size (a sliver of a second class that vanished there
        # becomes background, exactly as in the resized labels the paper scores).
        candidates = sorted(self._present(resize_mask(mask, self.single_class_size))) or sorted(self._present(mask))
        if not candidates:
            raise DatasetError(f"VOC image {image_id} has no object class in SegmentationClass")
        binary = np.where(mask == IGNORE_LABEL, IGNORE_LABEL, (mask == candidates[0]).astype(np.int64))
        name = VOC_SHORT_NAMES[candidates[0]]
        return SegSample(rgb, binary, ["background", name], image_id)


# ---------------------------------------------------------------------------------------------------------------
# A plain folder


class FolderDataset(Sequence[SegSample]):
    """A folder in the plain layout:

        DIR/images/<id>.jpg|.jpeg|.png   RGB (any mode is converted)
        DIR/masks/<id>.png               single-channel (L or P) labels: pixel value = class label, 255 = ignore
        DIR/classes.csv                  header "label,name", one row per class; label 0 must be the background

    Images are sorted by id; every image needs a mask, and one id has one image. Every file's header is read
    up front, so an unreadable file stops the run before it starts.
    """

    IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

    def __init__(self, path: str | Path):
        self.root = Path(path)
        layout = "see the folder layout in `concept-attention eval --help`"
        _require(self.root / "images", "images/ folder", layout)
        _require(self.root / "masks", "masks/ folder", layout)
        self.class_names = self._read_classes(_require(self.root / "classes.csv", "classes.csv", layout))
        self.images = sorted(p for p in (self.root / "images").iterdir() if p.suffix.lower() in self.IMAGE_SUFFIXES)
        if not self.images:
            raise DatasetError(f"{self.root / 'images'} has no .jpg/.jpeg/.png images")
        by_id: dict[str, list[str]] = {}
        for image in self.images:
            by_id.setdefault(image.stem, []).append(image.name)
        clashes = [names for names in by_id.values() if len(names) > 1]
        if clashes:
            listed = "; ".join(", ".join(names) for names in clashes)
            raise DatasetError(f"{self.root / 'images'}: one id has several images ({listed}): each mask belongs to "
                               "one image, keep one of them")
        for image in self.images:
            mask = _require(self.mask_path(image), f"mask for image {image.name}", "add masks/<id>.png")
            for file, what in ((image, "image"), (mask, "mask")):
                _open_image(file, what).close()

    def mask_path(self, image: Path) -> Path:
        return self.root / "masks" / f"{image.stem}.png"

    @staticmethod
    def _read_classes(path: Path) -> list[str]:
        """label -> name from classes.csv (a byte-order mark is fine); every bad row is named by its line."""
        try:
            with open(path, newline="", encoding="utf-8-sig") as file:
                reader = csv.DictReader(file)
                rows = [(reader.line_num, row) for row in reader]
        except UnicodeDecodeError as error:
            raise DatasetError(f"{path} is not UTF-8 text ({error}): save it as UTF-8") from None
        if not rows or set(reader.fieldnames or ()) != {"label", "name"}:
            raise DatasetError(f"{path}: expected a header 'label,name' and one row per class")
        names: dict[int, str] = {}
        line_of_label: dict[int, int] = {}
        line_of_name: dict[str, int] = {}
        for line, row in rows:
            text, name = (row["label"] or "").strip(), (row["name"] or "").strip()
            if not (text.isascii() and text.isdigit()):
                raise DatasetError(f"{path} line {line}: label {text!r} is not a non-negative integer")
            label = int(text)
            if not name:
                raise DatasetError(f"{path} line {line}: label {label} has no name")
            if label in names:
                raise DatasetError(f"{path} lines {line_of_label[label]} and {line}: label {label} is listed twice "
                                   f"({names[label]!r}, {name!r}); give each label one row")
            if name in line_of_name:
                raise DatasetError(f"{path} lines {line_of_name[name]} and {line}: two labels are named {name!r}; "
                                   "merge them into one label or rename one")
            names[label], line_of_label[label], line_of_name[name] = name, line, line
        if sorted(names) != list(range(len(names))) or len(names) < 2:
            raise DatasetError(f"{path}: labels must be 0..K-1 (K >= 2, 0 = background), got {sorted(names)}")
        return [names[label] for label in range(len(names))]

    def __len__(self) -> int:
        return len(self.images)

    def image_id(self, index: int) -> str:
        return self.images[index].stem

    def identity(self) -> dict:
        """The classes, every mask's content and every image's name and size."""
        return {"classes": list(self.class_names),
                "images": listing_digest(f"{p.name} {p.stat().st_size}" for p in self.images),
                "masks": listing_digest(file_digest(self.mask_path(p)) for p in self.images)}

    def __getitem__(self, index: int) -> SegSample:
        path = self.images[index]
        rgb = _rgb(path, "image")
        mask_path = self.mask_path(path)
        with _open_image(mask_path, "mask") as image:
            if image.mode not in ("P", "L"):
                raise DatasetError(f"mask {path.stem}.png has mode {image.mode}; save labels as a single-channel PNG")
            try:
                mask = np.asarray(image, dtype=np.int64)
            except OSError as error:
                raise DatasetError(f"mask {mask_path} is damaged ({error}): replace or remove it") from None
        if mask.shape != (rgb.height, rgb.width):
            raise DatasetError(f"mask {path.stem}.png is {mask.shape[::-1]} but the image is {rgb.size}")
        bad = set(np.unique(mask).tolist()) - set(range(len(self.class_names))) - {IGNORE_LABEL}
        if bad:
            raise DatasetError(f"mask {path.stem}.png has labels {sorted(bad)} not in classes.csv")
        return SegSample(rgb, mask, list(self.class_names), path.stem)


# ---------------------------------------------------------------------------------------------------------------
# The synthetic shapes (concept_attention/shapes.py), relabelled into one label space for pooled metrics


class ShapesSegmentation(Sequence[SegSample]):
    """`--data LENGTH[:SEED]` images of concept_attention.shapes; each image's local labels (0 = its background
    word, 1.. = its objects) become indices into one shared list: the background words, then the object words,
    i.e. the shape words, or with `words="colours"` (dataset shapes-colours) the colour words, each object
    labelled by its colour (two objects of one colour share a label). Seed 1 (the default) is the demo
    model's held-out stream (scripts/train_demo.py trains on seed 0)."""

    def __init__(self, spec: str | Path | None, words: str = "shapes"):
        from concept_attention.shapes import ShapesConfig, ShapesDataset

        text = str(spec or "200:1")
        try:
            length, _, seed = text.partition(":")
            self._data = ShapesDataset(int(length), seed=int(seed or 1), config=ShapesConfig())
        except ValueError:
            raise DatasetError(f"--data for shapes is LENGTH[:SEED] (e.g. 200:1), got {text!r}") from None
        if words not in ("shapes", "colours"):
            raise DatasetError(f"the shapes dataset labels objects by 'shapes' or 'colours', got {words!r}")
        self.words = words
        config = self._data.config
        objects = config.shapes if words == "shapes" else config.colours
        self.class_names = [*config.backgrounds, *objects]
        self.object_labels = [self.class_names.index(word) for word in objects]  # binding accuracy

    def __len__(self) -> int:
        return len(self._data)

    def image_id(self, index: int) -> str:
        return f"shapes-{self._data.seed}-{index}"

    def identity(self) -> dict:
        """What makes the images and labels: a change of the generator changes the first image's digest."""
        first = self._data[0]
        digest = hashlib.sha256(np.asarray(first.image).tobytes() + first.mask.tobytes()).hexdigest()
        return {"length": len(self._data), "seed": self._data.seed, "config": asdict(self._data.config),
                "words": self.words, "first_image_sha256": digest}

    def __getitem__(self, index: int) -> SegSample:
        sample = self._data[index]
        local = sample.class_names[1:] if self.words == "shapes" else sample.colours
        to_global = np.array([self.class_names.index(name) for name in [sample.class_names[0], *local]])
        return SegSample(sample.image, to_global[sample.mask], list(self.class_names), sample.image_id, sample.caption,
                         background_label=int(to_global[0]))


# ---------------------------------------------------------------------------------------------------------------
# Registry: name -> (factory(path), default preset). Adding a dataset is one line.


@dataclass(frozen=True)
class DatasetEntry:
    factory: Callable[[str | Path], Sequence[SegSample]]
    preset: str
    data: str | None     # what --data must name; None: optional


DATASETS: dict[str, DatasetEntry] = {
    "imagenet-seg": DatasetEntry(ImageNetSegmentation, "paper-imagenet", "the file gtsegs_ijcv.mat"),
    "voc-single": DatasetEntry(lambda path: PascalVOC(path, single_class=True), "paper-voc-single",
                               "the VOCdevkit/VOC2012 folder"),
    "voc-multi": DatasetEntry(lambda path: PascalVOC(path), "paper-voc-multi", "the VOCdevkit/VOC2012 folder"),
    "folder": DatasetEntry(FolderDataset, "folder", "the folder holding images/, masks/ and classes.csv"),
    "shapes": DatasetEntry(ShapesSegmentation, "shapes", None),
    "shapes-colours": DatasetEntry(lambda spec: ShapesSegmentation(spec, words="colours"), "shapes", None),
}


def load_dataset(name: str, path: str | Path | None) -> Sequence[SegSample]:
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    entry = DATASETS[name]
    if path is None and entry.data is not None:
        raise DatasetError(f"--dataset {name} needs --data: pass {entry.data}")
    return entry.factory(path)
