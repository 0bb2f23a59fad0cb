"""FLUX.2 text encoders (flux2-format.md §6) on tiny offline Qwen3 / Mistral3 folders, against diffusers'
own prompt-embedding functions run on the full (untruncated) transformers models."""

import hashlib
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from flux_mini.text_encoders import FLUX2_SYSTEM_MESSAGE, MistralEmbedder, Qwen3Embedder
from flux_mini.tiny import build_tiny_mistral3, build_tiny_qwen3

diffusers = pytest.importorskip("diffusers")
from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline  # noqa: E402
from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, Mistral3ForConditionalGeneration  # noqa: E402

PROMPTS = ["a red cat sitting on the grass", "zebra!"]


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory):
    return build_tiny_qwen3(tmp_path_factory.mktemp("qwen3") / "text_encoder", seed=3)


@pytest.fixture(scope="module")
def mistral_folder(tmp_path_factory):
    return build_tiny_mistral3(tmp_path_factory.mktemp("mistral3") / "text_encoder", seed=4)


@pytest.fixture(scope="module")
def qwen(qwen_folder):
    return Qwen3Embedder(qwen_folder, max_length=24, dtype=torch.float32)


@pytest.fixture(scope="module")
def mistral(mistral_folder):
    return MistralEmbedder(mistral_folder, max_length=64, dtype=torch.float32)


def test_system_message_is_byte_exact():
    digest = hashlib.sha256(FLUX2_SYSTEM_MESSAGE.encode("utf-8")).hexdigest()
    assert digest == "d43d93082f24034d9c7f4e5b65cdeceb1e082c64c9cf95dfae5be89c31e1320d"
    assert len(FLUX2_SYSTEM_MESSAGE) == 168 and FLUX2_SYSTEM_MESSAGE.index("\n") == 123


def test_qwen3_matches_diffusers_klein_embedding(qwen, qwen_folder):
    full = AutoModelForCausalLM.from_pretrained(qwen_folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(qwen_folder)
    with torch.no_grad():
        theirs = Flux2KleinPipeline._get_qwen3_prompt_embeds(full, tokenizer, PROMPTS, max_sequence_length=24)
    ours = qwen(PROMPTS)
    assert ours.shape == (2, 24, 3 * 16) == theirs.shape and qwen.output_dim == 48
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    assert len(qwen.decoder.layers) == 28 and len(full.model.layers) == 30  # layers past 27 never run


def test_qwen3_features_are_layer_major_pre_norm_states(qwen, qwen_folder):
    """Feature c*hidden + d is hidden_states[(9, 18, 27)[c]][d], computed here with the masked full model."""
    full = AutoModelForCausalLM.from_pretrained(qwen_folder, dtype=torch.float32).eval()
    ids, mask = qwen.tokenize(PROMPTS[:1])
    with torch.no_grad():
        states = full.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        unmasked = full.model(input_ids=ids, output_hidden_states=True).hidden_states
    ours = qwen(PROMPTS[:1])
    for c, k in enumerate((9, 18, 27)):
        torch.testing.assert_close(ours[..., c * 16 : (c + 1) * 16], states[k], rtol=1e-6, atol=1e-6)
    assert (ours[..., 32:] - unmasked[27]).abs().max() > 1e-3  # the mask matters (right padding)


def test_qwen3_template_padding_and_truncation(qwen):
    ids, mask = qwen.tokenize(["a cat"])
    tokens = qwen.tokenizer.convert_ids_to_tokens(ids[0])
    n = int(mask.sum())
    assert tokens[:n] == ["<|im_start|>", "user", "a", "cat", "<|im_end|>", "<|im_start|>", "assistant", "<think>",
                          "</think>"]
    assert tokens[n:] == ["<|endoftext|>"] * (24 - n) and mask[0, :n].all()  # right padding
    ids, mask = qwen.tokenize([" ".join(["cat"] * 40)])
    assert ids.shape == (1, 24) and mask.all()


def test_mistral_matches_diffusers_dev_embedding(mistral, mistral_folder):
    full = Mistral3ForConditionalGeneration.from_pretrained(mistral_folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(mistral_folder)
    with torch.no_grad():
        theirs = Flux2Pipeline._get_mistral_3_small_prompt_embeds(full, tokenizer, PROMPTS, max_sequence_length=64)
    ours = mistral(PROMPTS)
    assert ours.shape == (2, 64, 48) == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    assert len(mistral.decoder.layers) == 31 and len(full.model.language_model.layers) == 32


def test_mistral_conversation_left_padding_one_bos(mistral):
    ids, mask = mistral.tokenize(["a cat [IMG]"])
    tokens = mistral.tokenizer.convert_ids_to_tokens(ids[0])
    n = int(mask.sum())
    assert tokens[: 64 - n] == ["<pad>"] * (64 - n) and not mask[0, : 64 - n].any()  # left padding
    real = tokens[64 - n :]
    assert real[:2] == ["<s>", "[SYSTEM_PROMPT]"] and real.count("<s>") == 1
    assert real[-4:] == ["[INST]", "a", "cat", "[/INST]"]
    assert "[IMG]" not in real


def break_weights(src, dst, drop: str | None = None, add: str | None = None):
    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    if drop:
        state.pop(drop)
    if add:
        state[add] = torch.zeros(2)
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_strict_loading_names_the_folder_and_the_weights(qwen_folder, mistral_folder, tmp_path):
    missing = break_weights(qwen_folder, tmp_path / "q", drop="model.layers.3.mlp.up_proj.weight")
    with pytest.raises(ValueError, match=r"the weights in .*q do not fit AutoModelForCausalLM exactly \(missing keys "
                                         r"\(1\): model\.layers\.3\.mlp\.up_proj\.weight"):
        Qwen3Embedder(missing, dtype=torch.float32)
    extra = break_weights(mistral_folder, tmp_path / "m", add="model.extra.weight")
    with pytest.raises(ValueError, match=r"the weights in .*m do not fit AutoModelForImageTextToText exactly "
                                         r"\(unexpected keys"):
        MistralEmbedder(extra, dtype=torch.float32)


def test_bad_layers_and_missing_files(qwen_folder, mistral_folder, tmp_path):
    with pytest.raises(ValueError, match=r"hidden_layers \[9, 18, 30\] must be decoder layers 1..29"):
        Qwen3Embedder(qwen_folder, hidden_layers=(9, 18, 30), dtype=torch.float32)
    with pytest.raises(FileNotFoundError, match="Qwen3 tokenizer: folder .* does not exist"):
        Qwen3Embedder(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="model_type 'mistral3', but the Qwen3 encoder needs 'qwen3'"):
        Qwen3Embedder(mistral_folder)


def test_prompt_tokens_locate_the_prompt_in_both_templates(qwen, mistral):
    for encoder in (qwen, mistral):
        ids, mask = encoder.tokenize(["a red cat", "sky"])
        own = encoder.prompt_tokens(["a red cat", "sky"])
        words = [encoder.tokenizer.convert_ids_to_tokens(row[flags]) for row, flags in zip(ids, own)]
        assert words == [["a", "red", "cat"], ["sky"]], type(encoder).__name__
        assert not (own & ~mask.bool()).any()
