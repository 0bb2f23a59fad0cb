"""FLUX.3's Qwen3-VL text tower on a tiny random model built on the fly: parity with diffusers' FLUX.3 prompt
encoding (the full Qwen3VLForConditionalGeneration, the window rounded to 80, padding positions at 1, the mask),
the window sizes of the spec, and clear errors."""

from types import SimpleNamespace

import pytest
import torch

from flux_mini.text_encoders import MissingFilesError, Qwen3VLEmbedder, TextEncoderError
from flux_mini.tiny import build_tiny_qwen3_vl

WORDS = "a red cat sitting on the grass under the blue sky".split()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_qwen3_vl(tmp_path_factory.mktemp("qwen3vl"))


@pytest.fixture(scope="module")
def embedder(folder):
    return Qwen3VLEmbedder(folder, dtype=torch.float32)


def prompt_of(words: int) -> str:
    """A prompt whose templated form has words + 5 tokens (<|im_start|> user ... <|im_end|> <|im_start|> assistant)."""
    return " ".join(WORDS[i % len(WORDS)] for i in range(words))


@pytest.mark.parametrize("words", [6, 90])  # windows of 80 and 160
def test_matches_diffusers_prompt_embeds(folder, embedder, words):
    from diffusers.modular_pipelines.flux3.encoders import Flux3TextEncoderStep
    from transformers import Qwen3VLForConditionalGeneration

    full = Qwen3VLForConditionalGeneration.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    tokenizer = embedder.tokenizer
    processor = SimpleNamespace(apply_chat_template=tokenizer.apply_chat_template, tokenizer=tokenizer)
    with torch.no_grad():
        expected = Flux3TextEncoderStep._get_qwen3_vl_prompt_embeds(full, processor, prompt_of(words))
    got = embedder(prompt_of(words))
    assert got.shape == expected.shape == (1, 80 if words < 75 else 160, 8 * 16)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("words, window", [(32, 80), (75, 80), (76, 160)])  # spec §9: 37 -> 80, 80 -> 80, 81 -> 160
def test_window_is_the_length_rounded_up_to_80(embedder, words, window):
    ids, mask = embedder.tokenize(prompt_of(words))
    assert ids.shape == mask.shape == (1, window)
    assert mask.sum().item() == words + 5 and mask[0, : words + 5].all()  # real tokens first, right padding
    assert (ids[0, words + 5 :] == embedder.tokenizer.pad_token_id).all()


def test_window_is_capped_and_bad_input_is_named(folder, tmp_path):
    capped = Qwen3VLEmbedder(folder, dtype=torch.float32, max_length=100)
    assert capped.tokenize(prompt_of(150))[0].shape == (1, 100)
    with pytest.raises(ValueError, match="one prompt per call"):
        capped.tokenize(["a cat", "a dog"])
    with pytest.raises(ValueError, match="hidden_layers"):
        Qwen3VLEmbedder(folder, dtype=torch.float32, hidden_layers=(4, 40))
    with pytest.raises(MissingFilesError, match="Qwen3-VL text encoder weights"):
        (tmp_path / "empty").mkdir()
        for name in ("tokenizer.json", "config.json"):
            (tmp_path / "empty" / name).write_text((folder / name).read_text())
        Qwen3VLEmbedder(tmp_path / "empty")


def test_incomplete_weights_are_refused(folder, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    weights = load_file(broken / "model.safetensors")
    name = next(k for k in weights if "layers.7.mlp.down_proj" in k)
    del weights[name]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(TextEncoderError, match="missing keys .1.: .*layers.7.mlp.down_proj"):
        Qwen3VLEmbedder(broken, dtype=torch.float32)
