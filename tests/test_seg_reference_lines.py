"""The demo benchmark's model-free reference lines (colour rule, object oracle + random word), its binding
accuracy and the empty-prompt preset, on hand-made images whose answers are known."""

import numpy as np
import pytest
from PIL import Image

from concept_attention.segmentation.datasets import SegSample, ShapesSegmentation
from concept_attention.segmentation.evaluate import (
    SHAPES_METHODS, EvalConfig, EvalError, default_methods, evaluate, oracle_random_word_maps,
    oracle_token_grid_maps, score_maps,
)
from concept_attention.segmentation.metrics import binding_accuracy
from concept_attention.segmentation.protocols import ProtocolError, Vocabulary, get_preset, vocabulary
from concept_attention.shapes import BACKGROUND_COLOURS, COLOURS

# The global label space of the shapes benchmark: background words, then shape words.
WORDS = ["grass", "sky", "sand", "night", "circle", "square", "triangle"]
SAND, CIRCLE, SQUARE, TRIANGLE = 2, 4, 5, 6


def no_model(device):
    raise AssertionError("a model-free reference line must not build the model")


def two_blocks(first: tuple[str, int], second: tuple[str, int], image_id: str = "hand-0") -> SegSample:
    """32x32 sand with a 12x12 block (144 pixels) at the top left and an 8x16 block (128 pixels) at the bottom
    right, each painted in a named colour and labelled with a shape word."""
    pixels = np.tile(np.array(BACKGROUND_COLOURS["sand"], dtype=np.uint8), (32, 32, 1))
    mask = np.full((32, 32), SAND, dtype=np.int64)
    for (colour, label), (ys, xs) in zip((first, second), ((slice(2, 14), slice(2, 14)), (slice(20, 28), slice(10, 26)))):
        pixels[ys, xs] = COLOURS[colour]
        mask[ys, xs] = label
    return SegSample(Image.fromarray(pixels), mask, list(WORDS), image_id, caption="", background_label=SAND)


def run(samples, methods, tmp_path, preset="shapes-binding"):
    config = EvalConfig("shapes", get_preset(preset), methods=methods)

    class Data(list):
        class_names = WORDS
        object_labels = [CIRCLE, SQUARE, TRIANGLE]

    return evaluate(Data(samples), no_model, config, tmp_path, progress=False, plots=False)


def test_binding_accuracy_by_hand():
    # rows = truth, columns = prediction over 7 labels; only rows of object labels matter
    both_right = np.zeros((7, 7), np.int64)
    both_right[SAND, SAND], both_right[CIRCLE, CIRCLE], both_right[SQUARE, SQUARE] = 50, 30, 20
    swapped = np.zeros((7, 7), np.int64)
    swapped[CIRCLE, SQUARE], swapped[SQUARE, CIRCLE], swapped[SQUARE, SAND] = 10, 5, 5   # background counts wrong
    one_object = np.zeros((7, 7), np.int64)
    one_object[TRIANGLE, SAND] = 40                                                       # not a two-object image
    accuracy, images = binding_accuracy([both_right, swapped, one_object], [CIRCLE, SQUARE, TRIANGLE])
    assert images == 2 and accuracy == pytest.approx(50 / 70)
    assert np.isnan(binding_accuracy([one_object], [CIRCLE, SQUARE, TRIANGLE])[0])


def test_colour_rule_binds_by_colour_only(tmp_path):
    """Orange reads as circle and blue as square under the rule: right when the words agree with the colours,
    wrong on every object pixel when they are swapped; the background is sand everywhere else in both."""
    agree = two_blocks(("orange", CIRCLE), ("blue", SQUARE), "agree")
    swapped = two_blocks(("orange", SQUARE), ("blue", CIRCLE), "swapped")
    right = run([agree], ("colour_rule",), tmp_path / "agree")["colour_rule"]
    wrong = run([swapped], ("colour_rule",), tmp_path / "swapped")["colour_rule"]
    assert right["binding_accuracy"] == 1.0 and right["pixel_accuracy"] == 1.0
    assert wrong["binding_accuracy"] == 0.0 and wrong["n_binding_images"] == 1
    assert wrong["pixel_accuracy"] == pytest.approx(1 - (144 + 128) / 1024)
    assert wrong["iou_per_class"]["sand"] == 1.0 and wrong["iou_per_class"]["circle"] == 0.0
    both = run([agree, swapped], ("colour_rule",), tmp_path / "both")["colour_rule"]
    assert both["binding_accuracy"] == 0.5


def test_oracle_random_word_gives_each_object_one_offered_word(tmp_path):
    sample = two_blocks(("red", CIRCLE), ("red", TRIANGLE))
    target = sample.mask
    vocab = vocabulary(sample, target, get_preset("shapes-binding"))
    assert vocab.concepts == ["sand", "circle", "triangle"] and vocab.prompt == ""       # empty-prompt preset
    maps = oracle_random_word_maps(sample, vocab, target, seed=0).numpy()
    predicted = np.array(vocab.labels)[maps.argmax(0)]
    assert (predicted[target == SAND] == SAND).all()                                      # exact outlines
    for label in (CIRCLE, TRIANGLE):
        words = np.unique(predicted[target == label])
        assert len(words) == 1 and words[0] in (CIRCLE, TRIANGLE)                         # one word per object
    assert np.array_equal(maps, oracle_random_word_maps(sample, vocab, target, seed=0).numpy())   # reproducible
    # over many images each object gets its own word about half of the time
    samples = [two_blocks(("red", CIRCLE), ("blue", SQUARE), f"hand-{i}") for i in range(60)]
    row = run(samples, ("oracle_random_word", "predict_background"), tmp_path)
    assert 0.35 < row["oracle_random_word"]["binding_accuracy"] < 0.65
    assert row["predict_background"]["binding_accuracy"] == 0.0
    with pytest.raises(EvalError, match="background word"):
        oracle_random_word_maps(sample, Vocabulary(["circle"], [CIRCLE], ""), target, seed=0)


def test_shapes_presets_report_the_reference_lines_and_binding(tmp_path):
    """The real generator, no model: the colour rule is near chance on binding, the oracle's outlines are exact."""
    assert default_methods("shapes") == default_methods("shapes-binding") == SHAPES_METHODS
    data = ShapesSegmentation("40:9")
    config = EvalConfig("shapes", get_preset("shapes-binding"), ("predict_background", "colour_rule",
                                                                  "oracle_random_word"))
    summary = evaluate(data, no_model, config, tmp_path, progress=False, plots=False)
    images = summary["colour_rule"]["n_binding_images"]
    assert images == sum(len(set(s.mask.ravel().tolist())) == 3 for s in data) > 5
    assert summary["colour_rule"]["binding_accuracy"] < 0.8
    oracle = summary["oracle_random_word"]
    assert oracle["iou_per_class"][data.class_names[data[0].background_label]] == 1.0
    assert "binding acc." in (tmp_path / "summary.md").read_text()
    with pytest.raises(EvalError, match="colour_rule"):
        run([SegSample(Image.new("RGB", (32, 32)), np.zeros((32, 32), np.int64), ["background", "cat"], "x",
                       caption="", background_label=0)], ("colour_rule",), tmp_path / "other")


def offset_square() -> tuple[SegSample, np.ndarray]:
    """Sand with a 4x4 circle at rows/columns 3..6: on a 2x2 token grid it covers one token whole and eight
    tokens partly (a quarter or a half), so no token map can follow its outline exactly."""
    mask = np.full((32, 32), SAND, dtype=np.int64)
    mask[3:7, 3:7] = CIRCLE
    return SegSample(Image.new("RGB", (32, 32)), mask, list(WORDS), "offset", caption="", background_label=SAND), mask


def test_oracle_token_grid_holds_each_tokens_exact_label_shares():
    sample, target = offset_square()
    vocab = Vocabulary(["sand", "circle"], [SAND, CIRCLE], "")
    maps = oracle_token_grid_maps(vocab, target, (16, 16)).numpy()                     # (2, 16, 16)
    assert maps.shape == (2, 16, 16) and np.allclose(maps.sum(0), 1.0)
    circle = np.zeros((16, 16))
    circle[1:4, 1:4] = np.outer([0.5, 1.0, 0.5], [0.5, 1.0, 0.5])   # tokens 1..3 hold pixels 3 | 4, 5 | 6 per axis
    assert np.array_equal(maps[1], circle)
    two_words = Vocabulary(["sand", "circle", "disc"], [SAND, CIRCLE, CIRCLE], "")  # words sharing a label split it
    assert np.array_equal(oracle_token_grid_maps(two_words, target, (16, 16)).numpy()[2], circle / 2)


def test_map_resample_decides_what_a_token_grid_can_show():
    """The exact shares of the offset square: nearest upsampling gives the circle only the token it fills (the
    half-filled ones tie, and ties go to the first concept, sand); bilinear finds all but its four corners."""
    sample, target = offset_square()
    vocab = Vocabulary(["sand", "circle"], [SAND, CIRCLE], "")
    maps = oracle_token_grid_maps(vocab, target, (16, 16))
    protocol = get_preset("shapes-binding")
    assert protocol.map_resample == "bilinear" and get_preset("paper-voc-multi").map_resample == "nearest"
    bilinear = score_maps(maps, vocab, target, protocol, len(WORDS)).confusion
    nearest = score_maps(maps, vocab, target, protocol.override(map_resample="nearest"), len(WORDS)).confusion
    assert bilinear[CIRCLE, CIRCLE] == 12 and bilinear[CIRCLE, SAND] == 4 and bilinear[SAND, CIRCLE] == 0
    assert nearest[CIRCLE, CIRCLE] == 4 and nearest[CIRCLE, SAND] == 12 and nearest[SAND, CIRCLE] == 0
    with pytest.raises(ProtocolError, match="map_resample"):
        protocol.override(map_resample="bicubic")


def test_oracle_token_grid_needs_a_model_for_its_grid(tmp_path):
    with pytest.raises(EvalError, match="token grid"):
        run([offset_square()[0]], ("oracle_token_grid",), tmp_path)


def test_colour_words_dataset_labels_objects_by_colour(tmp_path):
    """shapes-colours: the same images, each object labelled by its colour word. The colour rule reads colours,
    so there it binds nearly every object pixel; on shape words it stays near chance (the test above)."""
    from concept_attention.segmentation.datasets import load_dataset

    shapes, colours = load_dataset("shapes", "30:9"), load_dataset("shapes-colours", "30:9")
    assert colours.class_names == ["grass", "sky", "sand", "night", "red", "orange", "yellow", "blue", "purple", "pink"]
    assert shapes.identity() != colours.identity()
    for index in range(len(colours)):
        raw, by_shape, by_colour = colours._data[index], shapes[index], colours[index]
        assert np.array_equal(by_shape.mask == by_shape.background_label, by_colour.mask == by_colour.background_label)
        for label, colour in enumerate(raw.colours, start=1):
            assert (by_colour.mask[raw.mask == label] == colours.class_names.index(colour)).all()
    config = EvalConfig("shapes", get_preset("shapes-binding"), ("colour_rule", "oracle_random_word"))
    summary = evaluate(colours, no_model, config, tmp_path, progress=False, plots=False)
    assert summary["colour_rule"]["binding_accuracy"] > 0.95 and summary["colour_rule"]["n_binding_images"] > 5
    assert summary["oracle_random_word"]["binding_accuracy"] < 0.8
