"""Text encoders on the tiny offline fixtures: tokenizer settings of spec §5.1, outputs, clear errors."""

import json
import shutil

import pytest
import sentencepiece as spm
import torch
from safetensors.torch import load_file, save_file

from flux_mini.checkpoint import CheckpointError
from flux_mini.text_encoders import CLIPEmbedder, MissingFilesError, T5Embedder, TextEncoderError
from flux_mini.tiny import TINY_WORDS, build_tiny_clip, build_tiny_t5


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoders")
    return build_tiny_t5(root / "t5", seed=1), build_tiny_clip(root / "clip", seed=2)


@pytest.fixture(scope="module")
def t5(folders):
    return T5Embedder(folders[0], max_length=16, dtype=torch.float32)


@pytest.fixture(scope="module")
def clip(folders):
    return CLIPEmbedder(folders[1], dtype=torch.float32)


def test_t5_ids_layout(t5, folders):
    """SentencePiece tokens (read with sentencepiece itself), then </s> = 1, then pad = 0 up to max_length."""
    sp = spm.SentencePieceProcessor(model_file=str(folders[0] / "spiece.model"))
    assert (sp.pad_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2)
    prompts = ["a photo of a cat", "zebra in the snow!"]
    ids, mask = t5.tokenize(prompts)
    assert ids.shape == mask.shape == (2, 16) and ids.dtype == torch.int64
    for row, m, prompt in zip(ids.tolist(), mask.tolist(), prompts):
        pieces = sp.encode(prompt)
        assert row == pieces + [1] + [0] * (16 - len(pieces) - 1)
        assert m == [1] * (len(pieces) + 1) + [0] * (16 - len(pieces) - 1)
    assert sp.encode("a photo of a cat", out_type=str) == ["▁a", "▁photo", "▁of", "▁a", "▁cat"]  # whole words


def test_t5_truncates_to_max_length_with_end_token(t5):
    ids, mask = t5.tokenize(" ".join(TINY_WORDS))
    assert ids.shape == (1, 16) and ids[0, -1] == 1 and (ids[0, :-1] > 2).all() and mask.all()


def test_t5_output_is_unmasked_last_hidden_state(t5):
    txt = t5(["a cat", "a big red house on the beach"])
    assert txt.shape == (2, 16, 48) and txt.dtype == torch.float32
    ids, mask = t5.tokenize(["a cat", "a big red house on the beach"])
    with torch.no_grad():
        unmasked = t5.model(input_ids=ids).last_hidden_state
        masked = t5.model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(txt, unmasked, rtol=0, atol=0)
    assert (txt - masked).abs().max() > 1e-3  # pads are attended to, as in the reference


def test_clip_ids_layout(clip, folders):
    """<|startoftext|>, one BPE token per known word (lower-cased), <|endoftext|>, padded with <|endoftext|>."""
    vocab = json.loads((folders[1] / "vocab.json").read_text())
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    assert eos == max(vocab.values())  # the legacy argmax(ids) pooling finds the end token
    ids, mask = clip.tokenize(["A Photo of a CAT", "red  sky"])
    assert ids.shape == (2, 77)
    words = [vocab[w + "</w>"] for w in ["a", "photo", "of", "a", "cat"]]
    assert ids[0].tolist() == [bos, *words, eos] + [eos] * (77 - 7)
    assert ids[1].tolist()[:4] == [bos, vocab["red</w>"], vocab["sky</w>"], eos]
    assert mask[0].tolist() == [1] * 7 + [0] * 70


def test_clip_pools_final_normed_state_at_first_end_token(clip):
    prompts = ["a photo of a cat", "a big red house on the beach near the sea"]
    y = clip(prompts)
    assert y.shape == (2, 32)
    ids, _ = clip.tokenize(prompts)
    eos = clip.model.config.eos_token_id
    with torch.no_grad():
        out = clip.model(input_ids=ids, output_hidden_states=True)
        final_norm = getattr(clip.model, "text_model", clip.model).final_layer_norm  # transformers 4 / 5
        normed = final_norm(out.hidden_states[-1])
    for b, row in enumerate(ids.tolist()):
        position = row.index(eos)
        torch.testing.assert_close(y[b], normed[b, position], rtol=1e-6, atol=1e-6)
        assert (y[b] - normed[b, position + 1]).abs().max() > 1e-4  # a later pad token would differ


def test_tiny_encoders_are_deterministic(folders, tmp_path):
    t5_again, clip_again = build_tiny_t5(tmp_path / "t5", seed=1), build_tiny_clip(tmp_path / "clip", seed=2)
    for new, old in zip((t5_again, clip_again), folders):
        for name in ("model.safetensors", "tokenizer.json"):
            assert (new / name).read_bytes() == (old / name).read_bytes(), name
    other = build_tiny_clip(tmp_path / "clip3", seed=3)
    assert (other / "model.safetensors").read_bytes() != (folders[1] / "model.safetensors").read_bytes()


def test_tokenizers_load_from_original_files_only(t5, clip, folders, tmp_path):
    """google/t5-v1_1-xxl ships only spiece.model, openai/clip-vit-large-patch14 vocab.json + merges.txt."""
    prompts = ["a photo of a cat", "Zebra in the snow!"]
    for embedder, cls, folder in ((t5, T5Embedder, folders[0]), (clip, CLIPEmbedder, folders[1])):
        bare = shutil.copytree(folder, tmp_path / folder.name)
        (bare / "tokenizer.json").unlink()
        (bare / "tokenizer_config.json").unlink()
        again = cls(bare, max_length=embedder.max_length, dtype=torch.float32)
        assert torch.equal(again.tokenize(prompts)[0], embedder.tokenize(prompts)[0]), folder.name


# ----------------------------------------------------------------------------------------------
# Errors


def test_missing_tokenizer_file_is_named(folders, tmp_path):
    broken = shutil.copytree(folders[0], tmp_path / "t5")
    (broken / "spiece.model").unlink()
    (broken / "tokenizer.json").unlink()
    with pytest.raises(MissingFilesError, match="spiece.model") as err:
        T5Embedder(broken, max_length=8, dtype=torch.float32)
    assert isinstance(err.value, FileNotFoundError) and "T5 tokenizer" in str(err.value)

    broken = shutil.copytree(folders[1], tmp_path / "clip")
    (broken / "merges.txt").unlink()
    (broken / "tokenizer.json").unlink()
    with pytest.raises(MissingFilesError, match="merges.txt"):
        CLIPEmbedder(broken, dtype=torch.float32)


def test_missing_weights_and_folder_are_named(folders, tmp_path):
    broken = shutil.copytree(folders[1], tmp_path / "clip")
    (broken / "model.safetensors").unlink()
    with pytest.raises(MissingFilesError, match="model.safetensors"):
        CLIPEmbedder(broken, dtype=torch.float32)
    with pytest.raises(MissingFilesError, match="does not exist"):
        T5Embedder(tmp_path / "nowhere", max_length=8)


# ----------------------------------------------------------------------------------------------
# Strict loading: every weight of the file goes into the model, none is left random


def rewrite_weights(folder, change):
    path = folder / "model.safetensors"
    save_file(change(load_file(path)), path, metadata={"format": "pt"})


@pytest.mark.parametrize("cls, index", [(T5Embedder, 0), (CLIPEmbedder, 1)])
def test_a_missing_weight_is_an_error_naming_folder_and_key(folders, tmp_path, cls, index):
    broken = shutil.copytree(folders[index], tmp_path / "enc")
    state = load_file(broken / "model.safetensors")
    dropped = sorted(k for k in state if "layers.1" in k or "block.1" in k)[0]
    rewrite_weights(broken, lambda s: {k: v for k, v in s.items() if k != dropped})
    with pytest.raises(TextEncoderError) as info:
        cls(broken, max_length=8, dtype=torch.float32)
    message = str(info.value)
    assert str(broken) in message and "missing keys (1)" in message and dropped.split(".", 1)[1] in message


@pytest.mark.parametrize("cls, index", [(T5Embedder, 0), (CLIPEmbedder, 1)])
def test_an_unexpected_weight_is_an_error_naming_folder_and_key(folders, tmp_path, cls, index):
    broken = shutil.copytree(folders[index], tmp_path / "enc")
    rewrite_weights(broken, lambda s: s | {"encoder.surplus.weight": torch.zeros(3)})
    with pytest.raises(TextEncoderError) as info:
        cls(broken, max_length=8, dtype=torch.float32)
    message = str(info.value)
    assert str(broken) in message and "unexpected keys (1)" in message and "surplus.weight" in message


def test_official_clip_layout_loads_exactly(clip, folders, tmp_path):
    """FLUX.1's text_encoder/ stores CLIP under `text_model.`; transformers 5 saves without it: both load."""
    official = shutil.copytree(folders[1], tmp_path / "text_encoder")
    rewrite_weights(official, lambda s: {"text_model." + k: v for k, v in s.items()})
    again = CLIPEmbedder(official, dtype=torch.float32)
    prompts = ["a photo of a cat", "red sky"]
    torch.testing.assert_close(again(prompts), clip(prompts), rtol=0, atol=0)


def one_line_error(cls, folder):
    with pytest.raises((TextEncoderError, CheckpointError)) as info:
        cls(folder, max_length=8, dtype=torch.float32)
    assert info.value.__cause__ is None and (info.value.__context__ is None or info.value.__suppress_context__)
    return str(info.value)


@pytest.mark.parametrize("name", ["tokenizer_config.json", "tokenizer.json", "config.json"])
@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b"\xff\xfe"])
def test_garbage_json_files_are_named(folders, tmp_path, name, content):
    broken = shutil.copytree(folders[1], tmp_path / "clip")
    (broken / name).write_bytes(content)
    message = one_line_error(CLIPEmbedder, broken)
    assert str(broken / name) in message and ("JSON" in message) and "again" in message


def test_swapped_t5_and_clip_folders_are_named(folders):
    message = one_line_error(T5Embedder, folders[1])
    assert "config.json" in message and "CLIP text encoder" in message and "swapped" in message
    message = one_line_error(CLIPEmbedder, folders[0])
    assert "config.json" in message and "T5 text encoder" in message and "swapped" in message


def test_truncated_encoder_weights_are_named(folders, tmp_path):
    broken = shutil.copytree(folders[0], tmp_path / "t5")
    path = broken / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    message = one_line_error(T5Embedder, broken)
    assert str(path) in message and "truncated" in message and "fetch the file again" in message
    path.write_bytes(b"not a safetensors file at all")
    assert str(path) in one_line_error(T5Embedder, broken)


def test_unreadable_tokenizer_model_is_one_line(folders, tmp_path):
    broken = shutil.copytree(folders[0], tmp_path / "t5")
    (broken / "tokenizer.json").unlink()
    (broken / "tokenizer_config.json").unlink()
    (broken / "spiece.model").write_bytes(b"garbage")
    message = one_line_error(T5Embedder, broken)
    assert "T5 tokenizer" in message and str(broken) in message and "fetch the tokenizer files again" in message
