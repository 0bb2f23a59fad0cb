"""A procedural segmentation dataset with exact masks: large coloured shapes on textured backgrounds.

Why: ConceptAttention's maps can only be judged against ground truth. Every image is drawn pixel by pixel
from geometric inequalities (no anti-aliasing), so the mask of each concept word is exact and the masks
partition the image. Each object's colour is drawn independently of its shape from six named colours, so
colour says nothing about shape: a map that finds "circle" must have learned the outline, and a map of a
colour word ("red") has its own exact mask. Captions name the colours half of the time. Everything is a
pure function of (seed, index).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

# ----------------------------------------------------------------------------------------------
# Vocabulary


SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = ("grass", "sky", "sand", "night")

# Base RGB of each named colour (every object gets a small jitter of its colour): at least 88 apart from
# each other and from every background pixel, so the colour of a pixel names its object unambiguously.
COLOURS = {
    "red": (220, 35, 35), "orange": (250, 130, 20), "yellow": (240, 230, 50),
    "blue": (30, 70, 230), "purple": (145, 50, 205), "pink": (250, 125, 200),
}
# Base RGB of each background (what the colour rule compares the image border with).
BACKGROUND_COLOURS = {"grass": (64, 144, 50), "sky": (140, 197, 250), "sand": (212, 187, 137), "night": (19, 23, 60)}
# Area of each shape per squared half-size: circle pi r^2, square (2r)^2, triangle (2r)(2r)/2.
AREA_PER_RADIUS2 = {"circle": math.pi, "square": 4.0, "triangle": 2.0}
# How a caption places the object on each background ("a circle in the sky").
BACKGROUND_PHRASES = {"grass": "on grass", "sky": "in the sky", "sand": "on sand", "night": "at night"}


@dataclass(frozen=True)
class ShapesConfig:
    """What the generator draws. Areas are fractions of the image covered by all objects together."""

    size: int = 32
    shapes: tuple[str, ...] = SHAPES
    backgrounds: tuple[str, ...] = BACKGROUNDS
    colours: tuple[str, ...] = tuple(COLOURS)
    two_object_prob: float = 0.5  # otherwise one object
    area_range: tuple[float, float] = (0.20, 0.45)
    tag_caption_prob: float = 0.25  # "circle square grass" instead of a sentence
    colour_caption_prob: float = 0.5  # "a red circle and a blue square on grass" instead of "a circle and ..."

    def __post_init__(self) -> None:
        unknown = (
            [s for s in self.shapes if s not in AREA_PER_RADIUS2]
            + [b for b in self.backgrounds if b not in BACKGROUND_PHRASES]
            + [c for c in self.colours if c not in COLOURS]
        )
        if unknown:
            raise ValueError(
                f"unknown shape/background/colour words {unknown}; known: {SHAPES}, {BACKGROUNDS} and {tuple(COLOURS)}"
            )
        if self.size < 16:
            raise ValueError(f"size {self.size} is too small to draw recognisable shapes; use 16 or more")
        low, high = self.area_range
        if not 0.05 <= low <= high <= 0.5:
            raise ValueError(f"area_range {self.area_range} must satisfy 0.05 <= low <= high <= 0.5")

    @property
    def concept_words(self) -> tuple[str, ...]:
        """The words scored by the segmentation benchmark: the backgrounds, then the shapes (colour words
        have masks too: `ShapesSample.colour_mask`)."""
        return self.backgrounds + self.shapes


def vocabulary(config: ShapesConfig = ShapesConfig()) -> list[str]:
    """All words any caption can contain (for building the tiny tokenizers)."""
    words = {"a", "and"} | set(config.shapes) | set(config.backgrounds) | set(config.colours)
    for background in config.backgrounds:
        words |= set(BACKGROUND_PHRASES[background].split())
    return sorted(words)


# ----------------------------------------------------------------------------------------------
# Samples


@dataclass
class ShapesSample:
    """One image with its exact label map: mask[i, j] indexes `class_names`; 0 is the background word.
    The first four fields are those of `concept_attention.segmentation.datasets.SegSample`."""

    image: Image.Image  # RGB, size x size
    mask: np.ndarray  # (H, W) int64
    class_names: list[str]  # [background word, shape words in drawing order]
    image_id: str  # "shapes-{seed}-{index}"
    caption: str
    areas: dict[str, float] = field(default_factory=dict)  # fraction of pixels per class name
    colours: list[str] = field(default_factory=list)  # colour word of each object, in drawing order

    def colour_mask(self, colour: str) -> np.ndarray:
        """(H, W) bool: the pixels of the objects that have this colour (all False if none has)."""
        labels = [label for label, c in enumerate(self.colours, start=1) if c == colour]
        return np.isin(self.mask, labels)


class ShapesDataset:
    """Indexable, deterministic: sample i of seed s is always the same image, mask and caption."""

    def __init__(self, length: int = 1000, seed: int = 0, config: ShapesConfig = ShapesConfig()):
        if length <= 0:
            raise ValueError(f"length must be positive, got {length}")
        self.length, self.seed, self.config = length, seed, config

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> ShapesSample:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a ShapesDataset of length {self.length}")
        return make_sample(self.seed, index, self.config)


def make_sample(seed: int, index: int, config: ShapesConfig = ShapesConfig()) -> ShapesSample:
    """Draw sample `index` of stream `seed`."""
    rng = np.random.default_rng([seed, index])
    n = config.size
    background = config.backgrounds[rng.integers(len(config.backgrounds))]
    num_objects = 2 if (len(config.shapes) > 1 and rng.random() < config.two_object_prob) else 1
    shapes = [config.shapes[i] for i in rng.permutation(len(config.shapes))[:num_objects]]
    colours = [config.colours[i] for i in rng.integers(len(config.colours), size=num_objects)]  # independent

    pixels = background_texture(background, n, rng)  # (H, W, 3) float in [0, 255]
    mask = np.zeros((n, n), dtype=np.int64)
    for label, region in enumerate(place_objects(shapes, n, config.area_range, rng), start=1):
        pixels[region] = object_pixels(colours[label - 1], region, rng)[region]
        mask[region] = label

    class_names = [background, *shapes]
    areas = {name: float((mask == i).mean()) for i, name in enumerate(class_names)}
    image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="RGB")
    caption = make_caption(shapes, colours, background, config, rng)
    return ShapesSample(image, mask, class_names, f"shapes-{seed}-{index}", caption, areas, colours)


def make_caption(
    shapes: list[str], colours: list[str], background: str, config: ShapesConfig, rng: np.random.Generator
) -> str:
    """'a circle and a square on grass', with probability colour_caption_prob 'a red circle and a blue square
    on grass'; with probability tag_caption_prob as tags instead ('circle square grass', 'red circle ...')."""
    order = rng.permutation(len(shapes))
    named = rng.random() < config.colour_caption_prob
    objects = [f"{colours[i]} {shapes[i]}" if named else shapes[i] for i in order]
    if rng.random() < config.tag_caption_prob:
        return " ".join([*objects, background])
    return " and ".join(f"a {o}" for o in objects) + " " + BACKGROUND_PHRASES[background]


# ----------------------------------------------------------------------------------------------
# Geometry: boolean regions from inequalities on pixel centres


def shape_region(shape: str, n: int, cy: float, cx: float, radius: float) -> np.ndarray:
    """(n, n) bool of a shape centred at (cy, cx) whose bounding box has half-size `radius`."""
    y, x = np.mgrid[0:n, 0:n] + 0.5
    if shape == "circle":
        return (y - cy) ** 2 + (x - cx) ** 2 <= radius**2
    if shape == "square":
        return (np.abs(y - cy) <= radius) & (np.abs(x - cx) <= radius)
    if shape == "triangle":  # apex up, base at the bottom of the box
        top, bottom = cy - radius, cy + radius
        half_width = radius * (y - top) / (bottom - top)
        return (y >= top) & (y <= bottom) & (np.abs(x - cx) <= half_width)
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def place_objects(
    shapes: list[str], n: int, area_range: tuple[float, float], rng: np.random.Generator
) -> list[np.ndarray]:
    """Non-overlapping regions, one per shape, covering a total area fraction drawn from area_range."""
    total = rng.uniform(*area_range)
    weights = rng.uniform(0.8, 1.2, size=len(shapes))
    fractions = total * weights / weights.sum()
    radii = [min(math.sqrt(f * n * n / AREA_PER_RADIUS2[s]), n / 2 - 1) for s, f in zip(shapes, fractions)]
    if len(shapes) == 1:
        r = radii[0]
        centres = [(rng.uniform(r + 0.5, n - r - 0.5), rng.uniform(r + 0.5, n - r - 0.5))]
    elif len(shapes) == 2:
        centres, radii = _two_apart(n, radii, rng)
    else:
        raise ValueError(f"at most two objects per image, got {len(shapes)}")
    return [shape_region(s, n, cy, cx, r) for s, (cy, cx), r in zip(shapes, centres, radii)]


def _two_apart(n: int, radii: list[float], rng: np.random.Generator) -> tuple[list[tuple[float, float]], list[float]]:
    """Centres of two boxes separated by at least one pixel along a random axis (shrunk if they cannot be)."""
    fit = (n - 2) / 2  # two boxes side by side with a one-pixel gap need r0 + r1 <= (n - 2) / 2
    if radii[0] + radii[1] > fit:
        radii = [r * fit / (radii[0] + radii[1]) for r in radii]
    first, second = (0, 1) if rng.random() < 0.5 else (1, 0)
    gap = radii[0] + radii[1] + 1.0
    low, high = radii[first] + 0.5, n - radii[second] - 0.5
    slack = max(high - low - gap, 0.0)
    start = low + rng.uniform(0, slack)
    along = {first: start, second: start + gap + rng.uniform(0, low + slack - start)}
    across = [rng.uniform(r + 0.5, n - r - 0.5) for r in radii]
    if rng.random() < 0.5:  # separate vertically or horizontally
        return [(along[i], across[i]) for i in range(2)], radii
    return [(across[i], along[i]) for i in range(2)], radii


# ----------------------------------------------------------------------------------------------
# Appearance


def smooth_noise(n: int, cells: int, rng: np.random.Generator) -> np.ndarray:
    """Value noise in about [-1, 1]: a (cells+1)^2 random grid, bilinearly interpolated to (n, n)."""
    grid = rng.uniform(-1, 1, size=(cells + 1, cells + 1))
    coords = (np.arange(n) + 0.5) / n * cells
    i0 = np.clip(np.floor(coords).astype(int), 0, cells - 1)
    f = coords - i0
    rows = grid[i0] * (1 - f)[:, None] + grid[i0 + 1] * f[:, None]  # (n, cells+1)
    return rows[:, i0] * (1 - f)[None] + rows[:, i0 + 1] * f[None]


def background_texture(background: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, n, 3) float: a distinct base colour with a light, recognisable texture."""
    y = (np.arange(n)[:, None] + 0.5) / n * np.ones((1, n))
    if background == "grass":  # green with vertical blades
        blades = np.repeat(rng.uniform(-1, 1, size=(1, n)), n, axis=0) * (0.5 + 0.5 * rng.random((n, n)))
        base = np.array([62, 140, 48]) * (1 + 0.18 * blades[..., None])
    elif background == "sky":  # light blue, brighter towards the horizon, soft clouds
        base = np.array([110, 170, 230]) + 40 * y[..., None]
        clouds = np.clip(smooth_noise(n, 4, rng), 0.2, 1.0) - 0.2
        base = base + clouds[..., None] * (np.array([250, 250, 255]) - base)
    elif background == "sand":  # tan with fine grain and horizontal ripples
        phase, freq = rng.uniform(0, 2 * np.pi), rng.uniform(4, 7)
        ripples = np.sin(2 * np.pi * freq * y + phase + 0.6 * smooth_noise(n, 3, rng))
        grain = rng.normal(0, 1, size=(n, n))
        base = np.array([212, 186, 136]) * (1 + 0.05 * ripples[..., None] + 0.04 * grain[..., None])
    elif background == "night":  # dark navy with a few stars
        base = np.array([18, 22, 58]) * (1 + 0.3 * smooth_noise(n, 2, rng)[..., None])
        stars = rng.random((n, n)) < 0.02
        base = np.where(stars[..., None], np.array([235, 235, 210]), base)
    else:
        raise ValueError(f"unknown background {background!r}; known: {BACKGROUNDS}")
    return np.clip(base, 0, 255).astype(np.float64)


def outline_distance(region: np.ndarray) -> np.ndarray:
    """(n, n) float: each pixel's distance (pixel centres) to the nearest pixel outside `region`, 0 outside.
    Pixels on the outline are at distance 1. A pure function of the outline."""
    grown = region.copy()  # the nearest outside pixel always touches the region: search only that rim
    grown[1:] |= region[:-1]
    grown[:-1] |= region[1:]
    grown[:, 1:] |= region[:, :-1]
    grown[:, :-1] |= region[:, 1:]
    inside, outside = np.argwhere(region), np.argwhere(grown & ~region)
    distance = np.zeros(region.shape)
    if len(inside) and len(outside):
        distance[region] = np.sqrt(((inside[:, None, :] - outside[None, :, :]) ** 2).sum(-1)).min(axis=1)
    return distance


BAND_PERIOD = 3.0  # pixels from one dark contour band to the next


def contour_light(region: np.ndarray) -> np.ndarray:
    """(n, n) brightness factor in [0.88, 1.1]: dark at the outline, then alternating light and dark bands
    every BAND_PERIOD pixels inwards, like the contour lines of a map (1 outside the region)."""
    phase = 2 * np.pi * (outline_distance(region) - 1) / BAND_PERIOD
    return np.where(region, 0.99 - 0.11 * np.cos(phase), 1.0)


def object_pixels(colour: str, region: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(n, n, 3) float: the named colour, jittered per object, shaded in contour bands that follow the
    outline (`contour_light`). Why: with flat or smoothly shaded objects only the pixels at the edge show the
    shape, and a tiny model never learns it; bands follow the outline everywhere inside (round in a circle,
    straight with corners in a square or triangle), so each patch shows which shape it belongs to, while
    its colour still names its colour (a dark yellow band stays nearer yellow than orange; the colour jitter
    and pixel noise tip about one object pixel in a million over to a neighbouring named colour)."""
    n = region.shape[0]
    colour = np.array(COLOURS[colour], dtype=np.float64) + rng.normal(0, 6, size=3)
    pixels = colour * contour_light(region)[..., None] + rng.normal(0, 4, size=(n, n, 3))
    return np.clip(pixels, 0, 255)


# ----------------------------------------------------------------------------------------------
# The colour rule: a model-free reference line that reads colours only


# The shape word the colour rule answers for each colour: the old world's pairing (red circle, purple square,
# yellow triangle) extended to the new colours. In this world it is right by chance only.
COLOUR_RULE_SHAPES = {"red": "circle", "orange": "circle", "purple": "square", "blue": "square",
                      "yellow": "triangle", "pink": "triangle"}


def border_colour(pixels: np.ndarray) -> np.ndarray:
    """(3,) median colour of the outermost ring of pixels of an (H, W, 3) image: the background's colour."""
    ring = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    return np.median(ring, axis=0)


def colour_rule_scores(image: Image.Image, concepts: list[str]) -> np.ndarray:
    """(len(concepts), H, W) scores = minus the colour distance of each pixel to what a concept looks like.

    A colour word looks like its colour; a shape word like the colours COLOUR_RULE_SHAPES pairs with it; the
    background word nearest to the border colour looks like the border colour, the others like their base
    colour. Argmax over the offered concepts labels each pixel by its nearest colour; no geometry is used."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    border = border_colour(pixels)
    nearest_background = min(BACKGROUND_COLOURS, key=lambda b: np.linalg.norm(border - BACKGROUND_COLOURS[b]))
    scores = []
    for concept in concepts:
        if concept in COLOURS:
            looks = [COLOURS[concept]]
        elif concept in COLOUR_RULE_SHAPES.values():
            looks = [COLOURS[c] for c, shape in COLOUR_RULE_SHAPES.items() if shape == concept]
        elif concept in BACKGROUND_COLOURS:
            looks = [border if concept == nearest_background else BACKGROUND_COLOURS[concept]]
        else:
            raise ValueError(f"the colour rule knows no colour for {concept!r}; it reads the words of shapes.py")
        distances = [np.linalg.norm(pixels - np.asarray(look, dtype=np.float64), axis=-1) for look in looks]
        scores.append(-np.min(distances, axis=0))
    return np.stack(scores)
