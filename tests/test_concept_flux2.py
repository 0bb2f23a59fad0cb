"""ConceptAttention on FLUX.2 end to end on a tiny random klein folder: the pipeline's generate and encode,
concept encodings through the chat LLM, the `concept-attention` CLI and `concept-attention eval`."""

import shutil

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from concept_attention.cli import main as concept_main
from concept_attention.encoding import encode_concepts_flux2
from concept_attention.pipeline import ConceptAttentionPipeline
from flux_mini.flux2_pipeline import Flux2Pipeline
from flux_mini.tiny import build_tiny_flux2_weights

CONCEPTS = ["cat", "red sky", "grass"]
PROMPT = "a red cat sitting on the grass"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def klein(tmp_path_factory):
    return build_tiny_flux2_weights(tmp_path_factory.mktemp("klein") / "model", seed=2)


@pytest.fixture(scope="module")
def pipe(klein):
    return ConceptAttentionPipeline.from_folder(klein)


@pytest.fixture(scope="module")
def plain_image(pipe):
    return np.asarray(pipe.flux(PROMPT, seed=7, num_steps=2, progress=False))


def assert_distributions(maps, grid=(16, 16)):
    assert maps.shape == (len(CONCEPTS), *grid) and torch.isfinite(maps).all() and (maps >= 0).all()
    torch.testing.assert_close(maps.sum(dim=0), torch.ones(grid), rtol=0, atol=1e-5)
    assert maps.std() > 1e-3  # not uniform


def test_generate_image_is_the_plain_pipeline_image_and_maps_cover_every_layer(pipe, klein):
    assert isinstance(pipe.flux, Flux2Pipeline) and pipe.flux.variant == "klein"
    out = pipe.generate_image(PROMPT, CONCEPTS, seed=3, per_layer=True, progress=False)
    plain = Flux2Pipeline.from_folder(klein)(PROMPT, seed=3, progress=False)
    assert np.array_equal(np.asarray(out.image), np.asarray(plain))
    assert_distributions(out.concept_maps)
    assert_distributions(out.cross_attention_maps)
    assert out.layer_maps["output"].shape == (4, 3, 16, 16)  # default: all 2 double + 2 single blocks
    torch.testing.assert_close(out.layer_maps["output"].mean(dim=0), out.concept_maps)
    assert len(out.concept_heatmaps) == 3 and out.concept_heatmaps[0].size == (64, 64)


def test_authors_positions_change_the_maps_not_the_image(pipe):
    ours = pipe.generate_image(PROMPT, CONCEPTS, seed=3, progress=False, layer_indices=[1, 3])
    authors = pipe.generate_image(PROMPT, CONCEPTS, seed=3, progress=False, layer_indices=[1, 3],
                                  concept_positions="authors", concept_encoding="authors")
    assert np.array_equal(np.asarray(ours.image), np.asarray(authors.image))
    assert (ours.concept_maps - authors.concept_maps).abs().max() > 1e-3
    with pytest.raises(ValueError, match="FLUX.2 has no pooled"):
        pipe.generate_image(PROMPT, CONCEPTS, concept_pooled="clip", progress=False)


def test_encode_image_maps(pipe):
    image = pipe.generate_image(PROMPT, CONCEPTS, seed=1, progress=False, layer_indices=[0]).image
    out = pipe.encode_image(image, CONCEPTS, num_samples=2, layer_indices=[0, 2, 3])
    assert_distributions(out.concept_maps)
    again = pipe.encode_image(image, CONCEPTS, num_samples=2, layer_indices=[0, 2, 3])
    assert torch.equal(out.concept_maps, again.concept_maps)
    with pytest.raises(ValueError, match="FLUX.2 has no pooled text vector"):
        pipe.encode_image(image, CONCEPTS, pooled="clip")


def test_concept_encodings_pick_the_concept_s_own_tokens(pipe):
    """Qwen3 template: <|im_start|> user <concept tokens> <|im_end|> ...: the concept starts at position 2."""
    encoder = pipe.flux.text_encoder
    features = encoder(["red sky", "cat"])  # (2, T, C), each concept as a prompt
    first = encode_concepts_flux2(encoder, ["red sky", "cat"], "first_token")
    mean = encode_concepts_flux2(encoder, ["red sky", "cat"], "mean")
    authors = encode_concepts_flux2(encoder, ["red sky", "cat"], "authors")
    torch.testing.assert_close(first, features[:, 2])
    torch.testing.assert_close(mean[0], features[0, 2:4].mean(dim=0))
    torch.testing.assert_close(mean[1], features[1, 2])
    torch.testing.assert_close(authors, features[:, 32 - 2])  # max_length 32: the authors' 510 of 512
    with pytest.raises(ValueError, match="FLUX.2 concept encoding must be one of"):
        encode_concepts_flux2(encoder, ["cat"], "last")


def test_base_checkpoint_uses_cfg_and_keeps_the_image(klein, tmp_path):
    folder = tmp_path / "base"
    shutil.copytree(klein, folder)
    (folder / "flux-2-klein-tiny.safetensors").rename(folder / "flux-2-klein-base-tiny.safetensors")
    pipe = ConceptAttentionPipeline.from_folder(folder)
    assert pipe.flux.variant == "klein-base"
    out = pipe.generate_image(PROMPT, CONCEPTS, seed=3, num_inference_steps=2, layer_indices=[3], progress=False)
    plain = pipe.flux(PROMPT, seed=3, num_steps=2, progress=False)
    assert np.array_equal(np.asarray(out.image), np.asarray(plain))
    assert_distributions(out.concept_maps)


def test_cli_generate_encode_and_eval_on_a_flux2_folder(klein, tmp_path):
    common = ["--weights", str(klein), "--concepts", *CONCEPTS, "--quiet", "--device", "cpu"]
    assert concept_main(["generate", "--prompt", PROMPT, "--out", str(tmp_path / "gen"), "--layers", "2", "3",
                         *common]) == 0
    maps = np.load(tmp_path / "gen" / "concept_maps.npy")
    assert maps.shape == (3, 16, 16)
    assert concept_main(["encode", "--image", str(tmp_path / "gen" / "image.png"), "--out", str(tmp_path / "enc"),
                         "--concept-encoding", "mean", *common]) == 0
    assert (tmp_path / "enc" / "concept_maps.npy").is_file()
    code = concept_main(["eval", "--dataset", "shapes", "--weights", str(klein), "--out", str(tmp_path / "eval"),
                         "--limit", "2", "--no-plots", "--no-progress", "--device", "cpu",
                         "--methods", "concept_attention,cross_attention"])
    assert code == 0
    assert any((tmp_path / "eval").iterdir())


WORDS = ["cat", "dog", "sky", "red sky", "grass", "tree", "water"]


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    concepts=st.lists(st.sampled_from(WORDS), min_size=2, max_size=4, unique=True),
    encoding=st.sampled_from(["first_token", "mean", "authors"]),
    positions=st.sampled_from(["zero", "authors"]),
    layers=st.lists(st.integers(0, 3), min_size=1, max_size=4, unique=True),
)
def test_concepts_never_change_the_image(pipe, plain_image, concepts, encoding, positions, layers):
    out = pipe.generate_image(PROMPT, concepts, seed=7, num_inference_steps=2, layer_indices=layers,
                              concept_encoding=encoding, concept_positions=positions, progress=False)
    assert np.array_equal(np.asarray(out.image), plain_image)
    torch.testing.assert_close(out.concept_maps.sum(dim=0), torch.ones(16, 16), rtol=0, atol=1e-5)
