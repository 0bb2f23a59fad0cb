"""The procedural shapes dataset: exact masks, determinism, captions, areas.

The masks are checked against the pixels (an object's pixels, and only they, have its colour) and
against geometry (how much of its bounding box each shape fills), not against the generator's own
bookkeeping."""

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from concept_attention.shapes import (
    BACKGROUNDS,
    SHAPE_COLOURS,
    SHAPES,
    ShapesConfig,
    ShapesDataset,
    make_sample,
    vocabulary,
)

seeds = st.integers(min_value=0, max_value=2**31 - 1)
indices = st.integers(min_value=0, max_value=10**9)


@settings(max_examples=60, deadline=None)
@given(seeds, indices)
def test_masks_partition_the_image_and_match_the_pixels(seed, index):
    sample = make_sample(seed, index)
    pixels = np.asarray(sample.image, dtype=np.float64)
    assert sample.image.size == (32, 32) and sample.image.mode == "RGB"
    assert sample.mask.shape == (32, 32) and sample.mask.dtype == np.int64
    # every pixel carries exactly one label, and every class name owns some pixels
    assert set(np.unique(sample.mask)) == set(range(len(sample.class_names)))
    assert sample.class_names[0] in BACKGROUNDS
    assert all(name in SHAPES for name in sample.class_names[1:])
    assert len(set(sample.class_names)) == len(sample.class_names)
    for label, name in enumerate(sample.class_names[1:], start=1):
        distance = np.linalg.norm(pixels - np.array(SHAPE_COLOURS[name]), axis=-1)
        inside = sample.mask == label
        assert distance[inside].max() < 85, f"{name}: a masked pixel does not have the object's colour"
        assert distance[~inside].min() > 85, f"{name}: an unmasked pixel has the object's colour"


# Fraction of its bounding box a rasterised shape fills: 1 for a square, pi/4 for a disc, 1/2 for a triangle.
FILL = {"square": (0.99, 1.0), "circle": (0.68, 0.9), "triangle": (0.45, 0.62)}


@settings(max_examples=60, deadline=None)
@given(seeds, indices)
def test_shape_words_name_the_drawn_geometry(seed, index):
    sample = make_sample(seed, index)
    for label, name in enumerate(sample.class_names[1:], start=1):
        ys, xs = np.nonzero(sample.mask == label)
        fill = len(ys) / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
        low, high = FILL[name]
        assert low <= fill <= high, f"{name} fills {fill:.2f} of its bounding box"


@settings(max_examples=60, deadline=None)
@given(seeds, indices)
def test_objects_are_large_and_background_dominates(seed, index):
    sample = make_sample(seed, index)
    objects = (sample.mask > 0).mean()
    assert 0.15 <= objects <= 0.5  # intended 20-45%; pixel rounding and fitting two objects shift it slightly
    for label in range(1, len(sample.class_names)):
        assert (sample.mask == label).mean() >= 0.05
    assert sample.areas == pytest.approx({n: (sample.mask == i).mean() for i, n in enumerate(sample.class_names)})


def test_areas_cover_the_intended_range_over_many_samples():
    totals = np.array([(make_sample(7, i).mask > 0).mean() for i in range(400)])
    assert np.quantile(totals, 0.05) < 0.23 and np.quantile(totals, 0.95) > 0.38
    assert 0.2 <= np.median(totals) <= 0.4


@settings(max_examples=40, deadline=None)
@given(seeds, indices)
def test_captions_mention_exactly_the_concept_words(seed, index):
    sample = make_sample(seed, index)
    words = re.findall(r"[a-z]+", sample.caption)
    assert set(words) <= set(vocabulary())
    assert sample.class_names[0] in words
    assert {w for w in words if w in SHAPES} == set(sample.class_names[1:])
    assert not {w for w in words if w in BACKGROUNDS} - {sample.class_names[0]}


def test_deterministic_in_seed_and_index():
    a, b = make_sample(3, 17), make_sample(3, 17)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert np.array_equal(a.mask, b.mask) and a.caption == b.caption and a.class_names == b.class_names
    dataset = ShapesDataset(length=20, seed=3)
    assert np.array_equal(np.asarray(dataset[17].image), np.asarray(a.image))
    others = [make_sample(3, 18), make_sample(4, 17)]
    assert all(not np.array_equal(np.asarray(o.image), np.asarray(a.image)) for o in others)


def test_dataset_covers_the_vocabulary():
    samples = [make_sample(0, i) for i in range(300)]
    assert {s.class_names[0] for s in samples} == set(BACKGROUNDS)
    assert {n for s in samples for n in s.class_names[1:]} == set(SHAPES)
    assert {len(s.class_names) for s in samples} == {2, 3}
    assert any(s.caption.startswith("a ") for s in samples) and any(not s.caption.startswith("a ") for s in samples)


def test_bad_configuration_and_index_are_reported():
    with pytest.raises(ValueError, match="unknown shape"):
        ShapesConfig(shapes=("circle", "hexagon"))
    with pytest.raises(ValueError, match="area_range"):
        ShapesConfig(area_range=(0.3, 0.9))
    with pytest.raises(IndexError, match="out of range"):
        ShapesDataset(length=5)[5]
