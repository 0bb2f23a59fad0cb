"""The shipped demo model: it loads strictly in the official key layout, and the README's first command
runs on it end to end and writes its pictures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from concept_attention.demo import DEMO_WEIGHTS, demo_model
from flux_mini.checkpoint import read_safetensors
from flux_mini.loading import load_flux
from flux_mini.flux1 import Flux, FluxConfig
from flux_mini.pipeline import FluxPipeline

ROOT = Path(__file__).resolve().parents[1]
UNTRAINED = ROOT / "weights" / "demo-untrained"


@pytest.mark.parametrize("folder", [DEMO_WEIGHTS, UNTRAINED], ids=["demo", "untrained"])
def test_shipped_weights_load_strictly_in_the_official_layout(folder):
    (path,) = folder.glob("flux1-*.safetensors")
    config = FluxConfig(**json.loads((folder / "flux_config.json").read_text()))
    model = load_flux(path, config=config)  # strict: raises on any missing, unexpected or mis-shaped key
    with torch.device("meta"):
        expected = Flux(config).state_dict()
    tensors = read_safetensors(path)
    assert set(tensors) == set(expected)  # BFL names, no prefix
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {k: tuple(v.shape) for k, v in expected.items()}
    assert all(torch.isfinite(p).all() for p in model.parameters())
    pipe = FluxPipeline.from_folder(folder)
    assert pipe.model.config == config and pipe.autoencoder.downsample_factor == 1


def test_demo_settings_describe_the_shipped_model():
    demo = demo_model(announce=False)
    assert demo.trained and demo.weights == DEMO_WEIGHTS
    assert (demo.image_size, demo.num_steps) == (32, 16)  # what it was trained for, from its sampling.json
    pipe = FluxPipeline.from_folder(DEMO_WEIGHTS)
    assert (pipe.defaults.width, pipe.defaults.height, pipe.defaults.num_steps) == (32, 32, 16)  # the same source
    assert demo.concepts and all(word in demo.prompt for word in demo.concepts[:2])


def test_the_demo_command_maps_the_layers_its_folder_names(tmp_path):
    """Without --weights, the maps average the layers of weights/demo/demo.json (those the benchmark's shapes
    presets read): the same maps as naming the folder and those layers, not those of the model's default."""
    from concept_attention.cli import main
    from concept_attention.segmentation.protocols import DEMO_LAYERS

    demo = demo_model(announce=False)
    assert demo.layers == list(DEMO_LAYERS)
    common = ["generate", "--prompt", "a red circle and a blue square on grass", "--concepts", "circle", "square",
              "grass", "--quiet", "--steps", "2"]
    runs = {"embedded": [], "named": ["--weights", str(DEMO_WEIGHTS), "--layers", *map(str, demo.layers)],
            "default": ["--weights", str(DEMO_WEIGHTS)]}
    maps = {}
    for name, extra in runs.items():
        assert main([*common, *extra, "--out", str(tmp_path / name)]) == 0
        maps[name] = torch.load(tmp_path / name / "maps.pt", weights_only=True)["concept_maps"]
    assert torch.equal(maps["embedded"], maps["named"])
    assert not torch.allclose(maps["embedded"], maps["default"], atol=1e-3)


def test_shipped_demo_model_binds_shape_words_by_shape():
    """Issue 14: on two-object images with two different shapes, offered only [background, shape 1, shape 2] with
    the empty prompt at the shapes presets' t and layers, most object pixels take their own shape word, and the
    same model's cross-attention maps do not bind them."""
    import torch.nn.functional as F

    from concept_attention.pipeline import ConceptAttentionPipeline
    from concept_attention.segmentation.protocols import DEMO_LAYERS, DEMO_T
    from concept_attention.shapes import make_sample

    pipe = ConceptAttentionPipeline.from_folder(DEMO_WEIGHTS)
    hits = {"concept": 0, "cross": 0}
    total, index, images = 0, 0, 0
    while images < 12:
        sample = make_sample(4, index)  # a stream no training run, probe or README table uses
        index += 1
        if len(sample.class_names) != 3 or sample.class_names[1] == sample.class_names[2]:
            continue
        images += 1
        out = pipe.encode_image(sample.image, sample.class_names, prompt="", t=DEMO_T, num_samples=2,
                                layer_indices=list(DEMO_LAYERS))
        objects = sample.mask > 0
        total += int(objects.sum())
        for name, maps in (("concept", out.concept_maps), ("cross", out.cross_attention_maps)):
            predicted = F.interpolate(maps[None].float(), size=sample.mask.shape, mode="bilinear")[0].argmax(0)
            hits[name] += int((predicted.numpy()[objects] == sample.mask[objects]).sum())
    assert hits["concept"] / total > 0.8, hits["concept"] / total  # measured: 0.886
    assert hits["cross"] / total < 0.5, hits["cross"] / total  # measured: 0.269


def test_readme_encode_command_finds_each_pink_object_by_its_shape(tmp_path):
    """The README's encode example: weights/demo/example.png is image 3 of stream 1 (a pink square and a pink
    triangle), and its maps give most of each object's pixels to that object's shape word."""
    from concept_attention.cli import main
    from concept_attention.shapes import make_sample

    readme = (ROOT / "README.md").read_text()
    command = next(line for line in readme.splitlines() if line.startswith("concept-attention encode --image weights"))
    argv = command.split("concept-attention ", 1)[1].replace("demo-encode", str(tmp_path / "out")).split()
    sample = make_sample(1, 3)
    example = ROOT / "weights" / "demo" / "example.png"
    assert np.array_equal(np.asarray(Image.open(example)), np.asarray(sample.image))
    assert sample.class_names == ["sky", "triangle", "square"] and sample.colours == ["pink", "pink"]
    assert main(["encode", *argv[1:], "--quiet"]) == 0 and argv[0] == "encode"
    concepts = argv[argv.index("--concepts") + 1: argv.index("--t")]
    maps = torch.load(tmp_path / "out" / "maps.pt", weights_only=True)["concept_maps"]  # (concepts, 16, 16)
    winner = torch.nn.functional.interpolate(maps[None].float(), size=(32, 32), mode="bilinear")[0].argmax(0).numpy()
    for label, shape in ((1, "triangle"), (2, "square")):
        assert (winner[sample.mask == label] == concepts.index(shape)).mean() > 0.8, shape


def test_readme_first_command_writes_its_pictures(tmp_path):
    """The demo command of the README, as a subprocess (it must also finish well within a minute)."""
    readme = (ROOT / "README.md").read_text()
    command = next(line for line in readme.splitlines() if line.startswith("concept-attention generate"))
    args = command.split("concept-attention ", 1)[1]
    prompt = args.split('--prompt "', 1)[1].split('"', 1)[0]
    concepts = args.split("--concepts ", 1)[1].split(" --", 1)[0].split()
    out = tmp_path / "demo-out"
    run = subprocess.run(
        [sys.executable, "-m", "concept_attention.cli", "generate", "--prompt", prompt, "--concepts", *concepts,
         "--out", str(out)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr
    assert "embedded demo model" in run.stdout
    heatmaps = [f"heatmap_{i:02d}_{c}.png" for i, c in enumerate(concepts)]
    for name in ("maps.pt", "concept_maps.npy", "image.png", "concept_maps.png", "cross_attention_maps.png", *heatmaps):
        assert (out / name).stat().st_size > 0, name
        assert name in run.stdout  # the output message names every file
