"""ConceptAttentionPipeline and the concept-attention CLI on tiny random FLUX.3 folders: the image is the plain
pipeline's, the maps are distributions over the concepts, concepts are the Qwen3-VL features of their own tokens."""

import numpy as np
import pytest
import torch

from concept_attention.cli import main as concept_main
from concept_attention.encoding import encode_concepts_flux3
from concept_attention.pipeline import ConceptAttentionPipeline
from flux_mini.flux3_pipeline import Flux3Pipeline
from flux_mini.tiny import build_tiny_flux3_weights

CONCEPTS = ["cat", "sky", "grass"]
PROMPT = "a red cat on the grass"
GRID = (16, 16)  # 64 x 64 pixels, one token per 4 x 4 (the tiny FLUX.2 AE's factor)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def klein(tmp_path_factory):
    return build_tiny_flux3_weights(tmp_path_factory.mktemp("flux3") / "klein", seed=2)


@pytest.fixture(scope="module")
def pipe(klein):
    return ConceptAttentionPipeline.from_folder(klein)


def assert_distributions(maps, grid=GRID):
    assert maps.shape == (len(CONCEPTS), *grid) and torch.isfinite(maps).all() and (maps >= 0).all()
    torch.testing.assert_close(maps.sum(dim=0), torch.ones(grid), rtol=0, atol=1e-5)
    assert maps.std() > 1e-3  # not uniform


def test_generate_image_is_the_plain_pipeline_image_and_maps_cover_the_joint_blocks(pipe, klein):
    assert isinstance(pipe.flux, Flux3Pipeline) and pipe.flux.model.config.flow_map
    out = pipe.generate_image(PROMPT, CONCEPTS, seed=3, per_layer=True, progress=False)
    plain = Flux3Pipeline.from_folder(klein)(PROMPT, seed=3, progress=False)
    assert np.array_equal(np.asarray(out.image), np.asarray(plain))
    assert_distributions(out.concept_maps)
    assert_distributions(out.cross_attention_maps)
    assert out.layer_maps["output"].shape == (2, 3, *GRID)  # default: both joint blocks (layers 2, 3)
    torch.testing.assert_close(out.layer_maps["output"].mean(dim=0), out.concept_maps)
    assert len(out.concept_heatmaps) == 3 and out.concept_heatmaps[0].size == (64, 64)
    with pytest.raises(ValueError, match="FLUX.3 has no pooled"):
        pipe.generate_image(PROMPT, CONCEPTS, concept_pooled="clip", progress=False)
    with pytest.raises(ValueError, match="do not exist or give no concept maps"):
        pipe.generate_image(PROMPT, CONCEPTS, layer_indices=[0], progress=False)  # a text-mode layer


def test_encode_image_maps(pipe):
    image = pipe.flux(PROMPT, seed=1, num_steps=2, progress=False)
    out = pipe.encode_image(image, CONCEPTS, num_samples=2, layer_indices=[3])
    assert_distributions(out.concept_maps)
    again = pipe.encode_image(image, CONCEPTS, num_samples=2, layer_indices=[3])
    assert torch.equal(out.concept_maps, again.concept_maps)
    other = pipe.encode_image(image, CONCEPTS, num_samples=2, layer_indices=[3], t=0.9)
    assert (other.concept_maps - out.concept_maps).abs().max() > 1e-4  # the noise time reaches the model
    with pytest.raises(ValueError, match="FLUX.3 has no pooled text vector"):
        pipe.encode_image(image, CONCEPTS, pooled="clip")


def test_concept_encodings_pick_the_concept_s_own_tokens(pipe):
    """Found independently: the concept's own token ids inside its templated, tokenised prompt."""
    encoder = pipe.flux.text_encoder
    for concept in ["cat", "red sky"]:
        features = encoder(concept)[0]  # (T, C)
        ids = encoder.tokenize(concept)[0][0].tolist()
        own = encoder.tokenizer(concept, add_special_tokens=False)["input_ids"]
        start = next(i for i in range(len(ids)) if ids[i : i + len(own)] == own)
        first, mean = (encode_concepts_flux3(encoder, [concept], e)[0] for e in ("first_token", "mean"))
        torch.testing.assert_close(first, features[start])
        torch.testing.assert_close(mean, features[start : start + len(own)].mean(dim=0))
    assert len(encoder.tokenizer("red sky", add_special_tokens=False)["input_ids"]) == 2  # mean != first here
    with pytest.raises(ValueError, match="FLUX.3 concept encoding must be one of"):
        encode_concepts_flux3(encoder, ["cat"], "authors")


def test_concepts_never_change_the_image_and_mean_encoding_changes_the_maps(pipe):
    plain = np.asarray(pipe.flux(PROMPT, seed=7, num_steps=2, progress=False))
    concepts = ["red sky", "cat", "grass"]  # "red sky" is two tokens: first and mean differ
    first, mean = (pipe.generate_image(PROMPT, concepts, seed=7, num_inference_steps=2, layer_indices=[2],
                                       concept_encoding=encoding, progress=False) for encoding in ("first_token", "mean"))
    assert np.array_equal(np.asarray(first.image), plain) and np.array_equal(np.asarray(mean.image), plain)
    assert (first.concept_maps - mean.concept_maps).abs().max() > 1e-4


def test_base_checkpoint_uses_cfg_and_keeps_the_image(tmp_path):
    folder = build_tiny_flux3_weights(tmp_path / "base", seed=2, base=True)
    pipe = ConceptAttentionPipeline.from_folder(folder)
    assert not pipe.flux.model.config.flow_map and pipe.flux.defaults.guidance != 1.0
    out = pipe.generate_image(PROMPT, CONCEPTS, seed=3, num_inference_steps=2, layer_indices=[3], progress=False)
    plain = pipe.flux(PROMPT, seed=3, num_steps=2, progress=False)
    assert np.array_equal(np.asarray(out.image), np.asarray(plain))
    assert_distributions(out.concept_maps)


def test_cli_generate_encode_and_eval_on_a_flux3_folder(klein, tmp_path):
    common = ["--weights", str(klein), "--concepts", *CONCEPTS, "--quiet", "--device", "cpu"]
    assert concept_main(["generate", "--prompt", PROMPT, "--out", str(tmp_path / "gen"), "--layers", "3",
                         *common]) == 0
    maps = np.load(tmp_path / "gen" / "concept_maps.npy")
    assert maps.shape == (3, *GRID)
    np.testing.assert_allclose(maps.sum(axis=0), 1.0, atol=1e-5)
    assert concept_main(["encode", "--image", str(tmp_path / "gen" / "image.png"), "--out", str(tmp_path / "enc"),
                         "--concept-encoding", "mean", *common]) == 0
    assert np.load(tmp_path / "enc" / "concept_maps.npy").shape == (3, *GRID)


def test_cli_eval_on_a_flux3_folder(klein, tmp_path):
    code = concept_main(["eval", "--dataset", "shapes", "--data", "2:1", "--weights", str(klein), "--out",
                         str(tmp_path / "eval"), "--no-plots", "--no-progress", "--device", "cpu",
                         "--methods", "concept_attention,cross_attention"])
    assert code == 0
    assert any((tmp_path / "eval").iterdir())
