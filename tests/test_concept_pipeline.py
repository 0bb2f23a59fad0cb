"""The ConceptAttention pipelines end to end on a tiny random model folder, and the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from concept_attention import ConceptAttentionFluxPipeline, ConceptAttentionPipeline, encode_concepts
from concept_attention.cli import main
from flux_mini import FluxPipeline
from flux_mini.tiny import build_tiny_weights

torch.set_num_threads(1)
CONCEPTS = ["circle", "grass", "sky"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return build_tiny_weights(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="module")
def pipe(weights):
    return ConceptAttentionPipeline.from_folder(weights)


def test_generation_image_is_the_plain_pipelines_image(pipe, weights):
    out = pipe.generate_image("a red circle on grass", CONCEPTS, width=32, height=48, seed=3, progress=False)
    plain = FluxPipeline.from_folder(weights)("a red circle on grass", width=32, height=48, num_steps=4, seed=3, progress=False)
    assert np.array_equal(np.asarray(out.image), np.asarray(plain))  # concepts never change the image
    h, w = 48 // 4, 32 // 4  # tiny AE: factor 2, then 2x2 patches
    for maps in (out.concept_maps, out.cross_attention_maps, out.value_maps):
        assert maps.shape == (3, h, w)
        torch.testing.assert_close(maps.sum(0), torch.ones(h, w))
    assert len(out.concept_heatmaps) == 3 and out.concept_heatmaps[0].size == (32, 48)
    assert ConceptAttentionFluxPipeline is ConceptAttentionPipeline


def test_generation_averages_the_chosen_steps(pipe):
    kwargs = dict(width=32, height=32, seed=1, progress=False, layer_indices=[1])
    per_step = [pipe.generate_image("a circle", CONCEPTS, timesteps=[s], **kwargs).concept_maps for s in range(4)]
    steps_13 = pipe.generate_image("a circle", CONCEPTS, timesteps=[1, 3], **kwargs).concept_maps
    torch.testing.assert_close(steps_13, (per_step[1] + per_step[3]) / 2)
    assert not torch.allclose(per_step[0], per_step[3])


def test_encode_averages_noise_samples_and_respects_t(pipe):
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    kwargs = dict(layer_indices=[0, 1], progress=False)
    one = [pipe.encode_image(image, CONCEPTS, seed=s, **kwargs).concept_maps for s in (4, 5)]
    two = pipe.encode_image(image, CONCEPTS, seed=4, num_samples=2, **kwargs).concept_maps
    torch.testing.assert_close(two, (one[0] + one[1]) / 2)
    at_half = pipe.encode_image(image, CONCEPTS, t=0.5, seed=4, **kwargs).concept_maps
    torch.testing.assert_close(at_half, one[0])  # schnell-like schedule: index 2 of 4 steps is t = 0.5
    assert not torch.allclose(pipe.encode_image(image, CONCEPTS, t=0.9, seed=4, **kwargs).concept_maps, one[0])


def test_raw_vectors_only_for_chosen_layers_and_steps(pipe):
    out = pipe.generate_image("a circle", CONCEPTS, width=32, height=32, progress=False, layer_indices=[0, 1, 3],
                              return_vectors=True, vector_layers=[1, 3], vector_steps=[2])
    assert [(v["layer"], v["step"]) for v in out.vectors] == [(1, 2), (3, 2)]
    assert out.vectors[0]["concept_out"].shape == (1, 3, 64) and out.vectors[0]["image_out"].shape == (1, 64, 64)


def test_encode_options(pipe):
    image = Image.new("RGB", (48, 32), (20, 160, 30))
    out = pipe.encode_image(image, CONCEPTS, per_layer=True, layer_indices=[0, 2, 3], blur=True, normalize="linear",
                            return_vectors=True, vector_layers=[2], width=48, height=32)
    assert out.concept_maps.shape == (3, 8, 12)
    assert out.layer_maps["output"].shape == (3, 3, 8, 12)
    assert [v["layer"] for v in out.vectors] == [2]
    raw = pipe.encode_image(image, CONCEPTS, softmax=False, spaces=["output"], width=48, height=32)
    assert raw.cross_attention_maps is None and not torch.allclose(raw.concept_maps.sum(0), torch.ones(8, 12))


def test_mean_concept_encoding_uses_the_concepts_own_tokens(pipe):
    t5 = pipe.flux.t5
    first = encode_concepts(t5, ["grass", "sky"], "first_token")
    mean = encode_concepts(t5, ["grass", "sky"], "mean")
    ids, mask = t5.tokenize(["grass"])
    hidden = t5.model(input_ids=ids, attention_mask=mask).last_hidden_state[0]
    own = [i for i in range(ids.shape[1]) if mask[0, i] and ids[0, i] != t5.tokenizer.eos_token_id]
    torch.testing.assert_close(mean[0], hidden[own].mean(0))
    assert first.shape == mean.shape == (2, t5.model.config.d_model)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda p: p.generate_image("x", ["a", "a"], width=32, height=32), "duplicate"),
        (lambda p: p.generate_image("x", [], width=32, height=32), "no concepts"),
        (lambda p: p.generate_image("x", ["a"], width=30, height=32), "multiple of"),
        (lambda p: p.generate_image("x", ["a"], width=32, height=32, layer_indices=[99]), "do not exist"),
        (lambda p: p.generate_image("x", ["a"], width=32, height=32, timesteps=[7]), "step indices"),
        (lambda p: p.encode_image(Image.new("RGB", (30, 30)), ["a"], width=30, height=32), "multiple of"),
        (lambda p: p.encode_image(Image.new("RGB", (32, 32)), ["a"], num_samples=0), "num_samples"),
        (lambda p: p.encode_image(Image.new("RGB", (32, 32)), ["a"], concept_encoding="last"), "concept encoding"),
    ],
)
def test_bad_input_is_named(pipe, call, message):
    with pytest.raises(ValueError, match=message):
        call(pipe)


def test_cli_generate_and_encode_write_pictures(weights, tmp_path, capsys):
    assert main(["generate", "--weights", str(weights), "--prompt", "a circle", "--concepts", *CONCEPTS,
                 "--out", str(tmp_path / "gen"), "--width", "32", "--height", "32"]) == 0
    for name in ("image.png", "concept_maps.png", "cross_attention_maps.png", "heatmap_02_sky.png", "maps.pt"):
        assert (tmp_path / "gen" / name).stat().st_size > 0
    assert main(["encode", "--weights", str(weights), "--image", str(tmp_path / "gen" / "image.png"),
                 "--concepts", *CONCEPTS, "--out", str(tmp_path / "enc")]) == 0
    assert Image.open(tmp_path / "enc" / "concept_maps.png").size[0] > 0
    assert main(["generate", "--weights", str(weights), "--prompt", "x", "--concepts", "a", "a",
                 "--out", str(tmp_path / "bad"), "--width", "32", "--height", "32"]) == 2
    assert "duplicate" in capsys.readouterr().err
