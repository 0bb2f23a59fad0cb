"""The evaluation loop: scoring by hand, a perfect oracle, pass grouping, resume after an interruption,
configuration checks, the reference lines (predict-background, a baseline model), CLI overrides, and end-to-end
runs of the real pipeline on tiny random models (in one process and sharded over two torchrun processes)."""

import argparse
import hashlib
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from concept_attention.segmentation.datasets import IGNORE_LABEL, SegSample
from concept_attention.segmentation.evaluate import (
    DEFAULT_METHODS, METHODS, EvalConfig, EvalError, add_eval_arguments, evaluate, load_records, protocol_from_args,
    run_eval, score_maps,
)
from concept_attention.segmentation.protocols import PRESETS, SegProtocol, Vocabulary, get_preset

sklearn_metrics = pytest.importorskip("sklearn.metrics")
torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]


def protocol(**changes) -> SegProtocol:
    """A small multiclass protocol on 16x16 images fed as they are (no resize), 4x4 token maps."""
    base = SegProtocol(
        name="test", task="multiclass", background_concepts=("background", "sky"), class_first=False,
        threshold="argmax", eval_size=8, pipeline_size=None, input_size=None, input_resample="nearest",
        t=0.5, noise_timestep=2, num_steps=4, num_samples=1, seed=0, layers=(0, 1), normalize=None,
        softmax=True, blur=False, ap_minmax=False)
    return replace(base, **changes)


# ---- a fake map provider: reads the labels painted into the image --------------------------------------------

NAMES = ["background", "cat", "dog", "cow"]


def painted_sample(index: int, rng) -> SegSample:
    """16x16 labels on a 4x4 block grid (so 4x4 token maps can be exact); the red channel paints the label."""
    blocks = rng.integers(0, 4, (4, 4))
    mask = np.kron(blocks, np.ones((4, 4), np.int64))
    mask[1, :] = IGNORE_LABEL                       # a row the 16 -> 8 nearest resize samples
    pixels = np.zeros((16, 16, 3), np.uint8)
    pixels[..., 0] = np.where(mask == IGNORE_LABEL, 0, mask * 50)
    pixels[..., 1] = rng.integers(0, 256, (16, 16))
    return SegSample(Image.fromarray(pixels), mask, list(NAMES), f"img{index}")


def painted_dataset(n: int = 7, seed: int = 0) -> list[SegSample]:
    rng = np.random.default_rng(seed)
    return [painted_sample(i, rng) for i in range(n)]


class Interrupted(Exception):
    pass


class PaintedProvider:
    """Maps = label fractions per 4x4 block (background words share label 0), plus deterministic noise keyed by
    everything a real pass depends on; counts calls and can fail after `fail_after` calls."""

    def __init__(self, noise: float = 0.0, fail_after: int | None = None):
        self.noise, self.fail_after, self.calls = noise, fail_after, []

    def encode_image(self, image, concepts, prompt="", noise_timestep=2, num_steps=4, t=None, num_samples=1,
                     seed=0, layer_indices=None, softmax=True, normalize=None, blur=False, attention="both",
                     width=None, height=None, per_layer=False, progress=False):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise Interrupted
        self.calls.append(dict(concepts=list(concepts), prompt=prompt, t=t, attention=attention, per_layer=per_layer))
        red = np.asarray(image)[..., 0].astype(np.int64)
        labels = np.where(red % 50 == 0, red // 50, -1)
        fractions = {label: (labels == label).reshape(4, 4, 4, 4).mean(axis=(1, 3)) for label in range(4)}
        maps = np.stack([fractions[0 if c in ("background", "sky") else NAMES.index(c)] for c in concepts])
        key = hashlib.sha256(np.asarray(image).tobytes() + repr((concepts, t, attention, seed)).encode()).digest()
        rng = np.random.default_rng(list(key[:8]))
        noisy = lambda: torch.from_numpy(maps + self.noise * rng.standard_normal(maps.shape))
        n_layers = len(layer_indices) if layer_indices else 1
        layer_maps = {s: torch.stack([noisy() for _ in range(n_layers)]) for s in ("output", "cross_attention", "value")}
        return SimpleNamespace(concept_maps=noisy(), cross_attention_maps=noisy(), value_maps=noisy(),
                               layer_maps=layer_maps if per_layer else None)


# ---- scoring one image by hand -------------------------------------------------------------------------------

def test_binary_mean_threshold_by_hand():
    proto = protocol(task="binary", threshold="mean", class_first=True, eval_size=4, ap_minmax=True,
                     background_concepts=("background",))
    vocab = Vocabulary(["cat", "background"], [1, 0], "a cat")
    obj = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    maps = torch.stack([obj, 3 - obj])                          # (2 concepts, 2, 2)
    target = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 1, 1], [255, 255, 0, 0]])
    score = score_maps(maps, vocab, target, proto, 2)
    # min-max -> [[0, 1/3], [2/3, 1]], mean 1/2 -> object in the bottom row of tokens
    expected_pred = np.kron(np.array([[0, 0], [1, 1]]), np.ones((2, 2), np.int64))
    assert np.array_equal(score.prediction, expected_pred)
    # scored pixels (14): truth 0 -> pred 0: 4, pred 1: 2 (bottom right); truth 1 -> pred 0: 4, pred 1: 4
    assert score.confusion.tolist() == [[4, 2], [4, 4]]
    soft = np.kron(np.array([[0, 1 / 3], [2 / 3, 1]]), np.ones((2, 2)))
    keep = target != 255
    expected_ap = sklearn_metrics.average_precision_score(
        np.concatenate([target[keep] == 0, target[keep] == 1]), np.concatenate([1 - soft[keep], soft[keep]]))
    assert score.ap_paper == pytest.approx(expected_ap)
    assert score.ap_foreground == pytest.approx(sklearn_metrics.average_precision_score(target[keep] == 1, soft[keep]))


def test_multiclass_argmax_by_hand():
    proto = protocol(eval_size=2)
    vocab = Vocabulary(["background", "sky", "cat", "cow"], [0, 0, 1, 3], "a cat,a cow")
    maps = torch.tensor([  # 4 concepts on a 2x2 grid
        [[0.5, 0.1], [0.1, 0.1]],
        [[0.1, 0.1], [0.1, 0.6]],
        [[0.2, 0.7], [0.3, 0.1]],
        [[0.2, 0.1], [0.5, 0.2]],
    ])
    target = np.array([[0, 1], [1, 0]])
    score = score_maps(maps, vocab, target, proto, 4)
    assert score.prediction.tolist() == [[0, 1], [3, 0]]        # "sky" predicts background
    assert score.confusion[0, 0] == 2 and score.confusion[1, 1] == 1 and score.confusion[1, 3] == 1
    channels = torch.stack([maps[0] + maps[1], maps[2], maps[3]]).reshape(3, -1).double().numpy()   # labels 0, 1, 3
    onehot = np.stack([target.ravel() == label for label in (0, 1, 3)])
    assert score.ap_paper == pytest.approx(sklearn_metrics.average_precision_score(onehot.ravel(), channels.ravel()))
    # foreground AP: mean over the object classes that occur (cat); cow has no pixel -> not averaged
    assert score.ap_foreground == pytest.approx(
        sklearn_metrics.average_precision_score(target.ravel() == 1, channels[1]))


# ---- whole runs with the fake provider -----------------------------------------------------------------------

def test_oracle_maps_score_perfectly(tmp_path):
    data = painted_dataset(5)
    summary = evaluate(data, PaintedProvider(), EvalConfig("painted", protocol()), tmp_path, progress=False,
                       plots=False)
    for key in ("concept_attention", "cross_attention", "value_space"):
        row = summary[key]
        assert row["n_images"] == 5 and row["pixel_accuracy"] == 1.0 and row["miou"] == 1.0
        assert row["map_paper"] == pytest.approx(1.0) and row["map_foreground"] == pytest.approx(1.0)
    # pooled counts: every labelled pixel of the dataset, ignore rows excluded
    total = sum(int(np.sum(s.mask[1::2, 1::2] != IGNORE_LABEL)) for s in data)   # PIL samples pixel centres
    records = load_records(tmp_path)
    assert sum(np.trace(np.asarray(r["scores"]["concept_attention"]["confusion"])) for r in records.values()) == total


def test_one_pass_per_attention_and_t(tmp_path):
    data = painted_dataset(2)
    provider = PaintedProvider(noise=0.3)
    methods = tuple(m for m in METHODS if m != "colour_rule")       # the colour rule reads the shapes' words only
    config = EvalConfig("painted", protocol(), methods=methods, per_layer=True, sweep_t=(0.25, 0.75))
    summary = evaluate(data, provider, config, tmp_path, progress=False, plots=False)
    # attention both/cross/self/none x t in {0.5, 0.25, 0.75}; per-layer maps only from the main t
    assert len(provider.calls) == 2 * 4 * 3
    assert {(c["attention"], c["t"]) for c in provider.calls} == {
        (a, t) for a in ("both", "cross", "self", "none") for t in (0.5, 0.25, 0.75)}
    assert all(c["per_layer"] == (c["t"] == 0.5) for c in provider.calls)
    assert provider.calls[0]["concepts"][:2] == ["background", "sky"]
    assert set(summary) == set(config.keys())
    assert "concept_attention@layer=1" in summary and "ablation_self_only@t=0.75" in summary


def test_resume_after_interruption_is_identical(tmp_path):
    data = painted_dataset(7)
    config = EvalConfig("painted", protocol(), methods=("concept_attention", "ablation_cross_only"))
    clean = evaluate(data, PaintedProvider(noise=0.4), config, tmp_path / "clean", progress=False, plots=False)

    out = tmp_path / "resumed"
    with pytest.raises(Interrupted):                     # 2 passes per image: dies inside image 3
        evaluate(data, PaintedProvider(noise=0.4, fail_after=5), config, out, progress=False, plots=False)
    assert sorted(load_records(out)) == ["img0", "img1"]
    with open(out / "results.rank0.jsonl", "a") as file:  # a line cut short by a kill
        file.write('{"index": 2, "image_id": "img2", "sco')
    provider = PaintedProvider(noise=0.4)
    resumed = evaluate(data, provider, config, out, progress=False, plots=True)
    # images 2..6 only (2 passes each), then one pass for each of the 3 best and 3 worst images of the grid
    assert len(provider.calls) == 2 * 5 + 6
    assert resumed == clean
    assert (out / "plots" / "examples.png").exists() and (out / "summary.md").exists()

    again = evaluate(data, PaintedProvider(fail_after=0), config, out, progress=False, plots=True)
    assert again == clean                                # a finished run computes nothing


def test_other_configuration_is_refused(tmp_path):
    data = painted_dataset(2)
    evaluate(data, PaintedProvider(), EvalConfig("painted", protocol()), tmp_path, progress=False, plots=False)
    with pytest.raises(EvalError, match="differs in: seed"):
        evaluate(data, PaintedProvider(), EvalConfig("painted", protocol(seed=1)), tmp_path, progress=False,
                 plots=False)
    summary = evaluate(data, PaintedProvider(), EvalConfig("painted", protocol(seed=1)), tmp_path,
                       progress=False, plots=False, overwrite=True)
    assert summary["concept_attention"]["n_images"] == 2


def test_binary_protocol_refuses_multiclass_data(tmp_path):
    config = EvalConfig("painted", protocol(task="binary"))
    with pytest.raises(ValueError, match="binary dataset"):
        evaluate(painted_dataset(1), PaintedProvider(), config, tmp_path, progress=False, plots=False)


# ---- reference lines: predict-background and a baseline model ------------------------------------------------

def no_model(device):
    raise AssertionError("predict_background must not load a model")


def test_predict_background_by_hand(tmp_path):
    names = ["grass", "sky", "circle", "square"]
    mask = np.array([[1, 1, 1, 1],
                     [1, 2, 2, 1],
                     [1, 2, 2, 255],
                     [3, 3, 1, 1]])
    sample = SegSample(Image.new("RGB", (4, 4)), mask, names, "img0", caption="a circle", background_label=1)
    proto = protocol(eval_size=4, background_concepts=(), caption_template="{caption}")
    summary = evaluate([sample], no_model, EvalConfig("toy", proto, methods=("predict_background",)), tmp_path,
                       progress=False, plots=False)
    row = summary["predict_background"]
    # 15 scored pixels, all predicted "sky": 9 right, 4 circle and 2 square pixels wrong
    confusion = np.asarray(load_records(tmp_path)["img0"]["scores"]["predict_background"]["confusion"])
    expected = np.zeros((4, 4), np.int64)
    expected[1:, 1] = [9, 4, 2]
    assert np.array_equal(confusion, expected)
    assert row["pixel_accuracy"] == pytest.approx(9 / 15)
    assert row["miou"] == pytest.approx((9 / 15 + 0 + 0) / 3)        # grass neither labelled nor predicted
    # AP of the one-hot background score: offered classes sky, circle, square (K = 3), background fraction f
    keep = mask != 255
    onehot_truth = np.concatenate([mask[keep] == label for label in (1, 2, 3)])
    onehot_score = np.concatenate([np.full(15, float(label == 1)) for label in (1, 2, 3)])
    paper = sklearn_metrics.average_precision_score(onehot_truth, onehot_score)
    f = 9 / 15
    assert row["map_paper"] == pytest.approx(paper) and paper == pytest.approx(f * f + (1 - f) / 3)
    # per-class AP of a constant score is the class's pixel fraction: mean (9 + 4 + 2) / 15 / 3 = 1/3
    assert row["map_foreground"] == pytest.approx(1 / 3)


def test_predict_background_binary_mean_threshold():
    proto = protocol(task="binary", threshold="mean", class_first=True, eval_size=2, ap_minmax=True,
                     background_concepts=("background", "floor"))
    sample = SegSample(Image.new("RGB", (2, 2)), np.array([[0, 1], [1, 1]]), ["background", "cat"], "img0")
    from concept_attention.segmentation.evaluate import background_maps, evaluate_image

    config = EvalConfig("toy", proto, methods=("predict_background",))
    score = evaluate_image(lambda: no_model("cpu"), sample, config, 2)["predict_background"]
    assert score.prediction.tolist() == [[0, 0], [0, 0]] and score.confusion.tolist() == [[1, 0], [3, 0]]
    assert background_maps(Vocabulary(["cat", "background", "floor"], [1, 0, 0], ""), 0).ravel().tolist() == [
        0.0, 0.5, 0.5]
    with pytest.raises(EvalError, match="background label 0"):
        background_maps(Vocabulary(["cat"], [1], ""), 0)


def test_shapes_background_label_is_each_images_background_word(tmp_path):
    from concept_attention.segmentation.datasets import ShapesSegmentation
    from concept_attention.shapes import ShapesDataset

    data, raw = ShapesSegmentation("6:1"), ShapesDataset(6, seed=1)
    for sample, original in zip(data, raw):
        assert data.class_names[sample.background_label] == original.class_names[0]
    # pooled pixel accuracy of predict_background = the pooled background area of the generator's own record
    summary = evaluate(data, no_model, EvalConfig("shapes", get_preset("shapes"), methods=("predict_background",)),
                       tmp_path, progress=False, plots=False)
    background = np.mean([s.areas[s.class_names[0]] for s in raw])
    assert summary["predict_background"]["pixel_accuracy"] == pytest.approx(background)


def baseline_config(**changes) -> EvalConfig:
    return EvalConfig("painted", protocol(), methods=("concept_attention", "value_space", "predict_background"),
                      baseline="untrained", **changes)


def test_baseline_rows_come_from_the_baseline_model(tmp_path):
    data = painted_dataset(5)
    config = baseline_config(sweep_t=(0.25,))
    trained, untrained = PaintedProvider(), PaintedProvider(noise=0.8)
    summary = evaluate(data, trained, config, tmp_path / "both", progress=False, plots=False, baseline=untrained)
    alone = evaluate(data, PaintedProvider(noise=0.8), EvalConfig("painted", protocol(), sweep_t=(0.25,),
                     methods=("concept_attention", "value_space")), tmp_path / "alone", progress=False, plots=False)
    assert list(summary) == ["concept_attention", "value_space", "predict_background", "untrained: concept_attention",
                             "untrained: value_space", "concept_attention@t=0.25", "value_space@t=0.25",
                             "untrained: concept_attention@t=0.25", "untrained: value_space@t=0.25"]
    for key in ("concept_attention", "value_space", "concept_attention@t=0.25"):
        assert summary[f"untrained: {key}"] == alone[key]
    assert summary["concept_attention"]["miou"] == 1.0 and alone["concept_attention"]["miou"] < 0.9
    assert len(untrained.calls) == len(trained.calls) == 5 * 2          # t = 0.5 and 0.25, no background pass
    assert "| untrained: value_space | 5 |" in (tmp_path / "both" / "summary.md").read_text()


def test_resume_with_a_baseline_is_identical(tmp_path):
    data = painted_dataset(5)
    config = baseline_config()
    clean = evaluate(data, PaintedProvider(noise=0.3), config, tmp_path / "clean", progress=False, plots=False,
                     baseline=PaintedProvider(noise=0.6))
    out = tmp_path / "resumed"
    with pytest.raises(Interrupted):                     # the baseline dies on image 3, after the model's pass
        evaluate(data, PaintedProvider(noise=0.3), config, out, progress=False, plots=False,
                 baseline=PaintedProvider(noise=0.6, fail_after=3))
    assert sorted(load_records(out)) == ["img0", "img1", "img2"]
    trained, untrained = PaintedProvider(noise=0.3), PaintedProvider(noise=0.6)
    resumed = evaluate(data, trained, config, out, progress=False, plots=False, baseline=untrained)
    assert len(trained.calls) == len(untrained.calls) == 2
    assert resumed == clean
    with pytest.raises(EvalError, match="differs in: baseline"):
        evaluate(data, PaintedProvider(), replace(config, baseline="other"), out, progress=False, plots=False,
                 baseline=PaintedProvider())
    with pytest.raises(EvalError, match="baseline model exactly when"):
        evaluate(data, PaintedProvider(), config, out, progress=False, plots=False)


# ---- presets and CLI -----------------------------------------------------------------------------------------

def parse(*argv):
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    return parser.parse_args(list(argv))


def test_paper_presets_follow_the_spec():
    imagenet = get_preset("paper-imagenet")
    assert imagenet.background_concepts == ("background", "floor", "tree", "person", "grass", "face")
    assert (imagenet.t, imagenet.num_samples, imagenet.seed, imagenet.layers) == (0.5, 5, 4, (14, 15, 16, 17))
    assert (imagenet.normalize, imagenet.softmax, imagenet.blur, imagenet.threshold) == ("linear", True, True, "mean")
    assert (imagenet.input_size, imagenet.input_resample, imagenet.pipeline_size, imagenet.eval_size) == (
        512, "bicubic", 1024, 224)
    single = get_preset("paper-voc-single")
    assert single.background_concepts == ("background", "floor", "grass", "tree", "sky") and not single.class_first
    assert single.t == pytest.approx(0.513, abs=5e-4) and single.layers == (14, 15, 16, 17, 18)
    assert single.threshold == "argmax" and single.eval_size == 224
    assert get_preset("paper-voc-multi").eval_size == 64 and get_preset("paper-voc-multi").task == "multiclass"


def test_cli_overrides():
    args = parse("--dataset", "voc-single", "--out", "x", "--t", "none", "--layers", "0", "1", "--no-softmax",
                 "--normalize", "none", "--background-concepts", "background,sky", "--methods",
                 "concept_attention,ablation_self_only")
    proto = protocol_from_args(args)
    assert proto.name == "paper-voc-single" and proto.t is None and proto.layers == (0, 1)
    assert proto.softmax is False and proto.normalize is None and proto.background_concepts == ("background", "sky")
    assert proto.eval_size == PRESETS["paper-voc-single"].eval_size           # untouched values stay
    assert args.methods == ("concept_attention", "ablation_self_only")
    assert protocol_from_args(parse("--dataset", "imagenet-seg", "--out", "x")).name == "paper-imagenet"
    with pytest.raises(SystemExit, match="unknown methods"):
        run_eval(parse("--dataset", "shapes", "--out", "x", "--methods", "daam"))
    with pytest.raises(SystemExit, match="non-empty --baseline-name"):
        run_eval(parse("--dataset", "shapes", "--out", "x", "--baseline-weights", "y", "--baseline-name", " "))


# ---- end to end: the real pipeline on a tiny random model ----------------------------------------------------

@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    tiny = pytest.importorskip("flux_mini.tiny")
    pytest.importorskip("concept_attention.pipeline")
    return tiny.build_tiny_weights(tmp_path_factory.mktemp("tiny"), seed=0)


def eval_argv(weights, out):
    return ["--dataset", "shapes", "--data", "2:3", "--weights", str(weights), "--out", str(out),
            "--layers", "0", "1", "2", "--per-layer", "--sweep-t", "0.3", "--no-progress"]


@pytest.fixture(scope="module")
def tiny_run(tiny_weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("run1")
    torch.manual_seed(0)
    assert run_eval(parse(*eval_argv(tiny_weights, out))) == 0
    return out


def test_tiny_model_end_to_end(tiny_run):
    summary = json.loads((tiny_run / "summary.json").read_text())["results"]
    assert summary["concept_attention"]["n_images"] == 2
    assert {"concept_attention@layer=2", "value_space@t=0.3"} <= set(summary)
    for row in summary.values():
        assert 0 <= row["pixel_accuracy"] <= 1 and 0 <= row["miou"] <= 1
    assert all((tiny_run / "plots" / name).exists() for name in ("per_layer.png", "per_timestep.png", "examples.png"))


def test_demo_model_run_equals_an_independent_recomputation(tmp_path):
    """The trained demo model (whose maps find several classes, so a wrong label mapping shows), four images:
    shapes labels, the caption, the preset's t, samples and layers, argmax over concepts by hand."""
    from concept_attention.pipeline import ConceptAttentionPipeline
    from concept_attention.shapes import ShapesConfig, ShapesDataset

    demo = REPO / "weights" / "demo"
    preset = get_preset("shapes")
    assert run_eval(parse("--dataset", "shapes", "--data", "4:1", "--weights", str(demo), "--out", str(tmp_path),
                          "--methods", "concept_attention", "--no-progress", "--no-plots")) == 0
    records = load_records(tmp_path)
    words = list(ShapesConfig().concept_words)
    pipe = ConceptAttentionPipeline.from_folder(demo)
    assert preset.map_resample == "bilinear" and preset.num_samples > 1

    def confusion(sample, num_samples: int) -> np.ndarray:
        truth = np.array([words.index(n) for n in sample.class_names])[sample.mask]
        concepts = [words[label] for label in np.unique(truth)]   # the classes present, in label order
        out = pipe.encode_image(sample.image, concepts, prompt=sample.caption, t=preset.t, num_samples=num_samples,
                                seed=preset.seed, layer_indices=preset.layers)
        maps = torch.nn.functional.interpolate(out.concept_maps[None].double(), size=(32, 32), mode="bilinear",
                                               align_corners=False)[0]
        predicted = np.array([words.index(c) for c in concepts])[maps.argmax(0).numpy()]
        matrix = np.zeros((len(words), len(words)), np.int64)
        np.add.at(matrix, (truth.ravel(), predicted.ravel()), 1)
        return matrix

    sample_count_matters = False
    for sample in ShapesDataset(4, seed=1):
        expected = confusion(sample, preset.num_samples)
        assert np.count_nonzero(expected.sum(0)) >= 2                 # more than one label predicted
        record = records[sample.image_id]
        assert np.array_equal(np.asarray(record["scores"]["concept_attention"]["confusion"]), expected)
        sample_count_matters |= not np.array_equal(expected, confusion(sample, 1))
    assert sample_count_matters  # on some image one noise sample gives other pixels than the preset's two


def test_tiny_model_two_torchrun_processes_merge_exactly(tiny_weights, tiny_run, tmp_path):
    script = tmp_path / "eval_main.py"
    script.write_text(
        "import argparse, sys\n"
        "from concept_attention.segmentation.evaluate import add_eval_arguments, run_eval\n"
        "parser = argparse.ArgumentParser()\nadd_eval_arguments(parser)\nsys.exit(run_eval(parser.parse_args()))\n")
    out = tmp_path / "sharded"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
               *eval_argv(tiny_weights, out), "--device", "cpu"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [len(load_records_file(out / f"results.rank{r}.jsonl")) for r in (0, 1)] == [1, 1]
    single, sharded = load_records(tiny_run), load_records(out)
    assert sorted(single) == sorted(sharded) == ["shapes-3-0", "shapes-3-1"]
    for index in single:
        for key, scores in single[index]["scores"].items():
            assert scores["confusion"] == sharded[index]["scores"][key]["confusion"]
            assert scores["ap_paper"] == pytest.approx(sharded[index]["scores"][key]["ap_paper"], abs=1e-9)
    merged = json.loads((out / "summary.json").read_text())["results"]
    reference = json.loads((tiny_run / "summary.json").read_text())["results"]
    assert merged["concept_attention"]["pixel_accuracy"] == reference["concept_attention"]["pixel_accuracy"]
    assert merged["cross_attention@layer=1"]["miou"] == reference["cross_attention@layer=1"]["miou"]


def load_records_file(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def pixel_space_pair(tmp_path_factory):
    """Two tiny random pixel-space models of one architecture (as the demo model: 32x32 RGB in 2x2 patches)."""
    tiny = pytest.importorskip("flux_mini.tiny")
    folder = tmp_path_factory.mktemp("pixel")
    return [tiny.build_tiny_weights(folder / f"seed{seed}", seed=seed, pixel_space=True) for seed in (0, 1)]


def test_cli_baseline_rows_equal_the_baseline_model_alone(pixel_space_pair, tmp_path):
    trained, untrained = pixel_space_pair
    common = ["--dataset", "shapes", "--data", "2:1", "--no-progress", "--no-plots", "--num-samples", "1"]
    assert run_eval(parse(*common, "--weights", str(trained), "--baseline-weights", str(untrained),
                          "--out", str(tmp_path / "both"))) == 0
    assert run_eval(parse(*common, "--weights", str(untrained), "--out", str(tmp_path / "alone"))) == 0
    both = json.loads((tmp_path / "both" / "summary.json").read_text())
    alone = json.loads((tmp_path / "alone" / "summary.json").read_text())["results"]
    assert both["config"]["methods"] == [*DEFAULT_METHODS, "predict_background", "colour_rule", "oracle_random_word",
                                         "oracle_token_grid"]
    for method in DEFAULT_METHODS:
        assert both["results"][f"untrained: {method}"] == alone[method]
    assert both["results"]["predict_background"] == alone["predict_background"]
    assert "untrained: predict_background" not in both["results"]
    assert both["results"]["concept_attention"] != alone["concept_attention"]      # two different models
