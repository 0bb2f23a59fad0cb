"""Tiny random models for tests, demos and benchmarks: every layer non-zero, so comparisons prove something."""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from flux_mini.autoencoder import AutoEncoder, AutoEncoderConfig, IdentityAutoEncoder
from flux_mini.loading import save_flux
from flux_mini.flux1 import Flux, FluxConfig
from flux_mini.flux2 import Flux2Config


def tiny_flux_config(guidance_embed: bool = False, **overrides) -> FluxConfig:
    """A few-hundred-thousand-parameter Flux with the official structure (head dim 16, 3 RoPE axes)."""
    fields = dict(
        in_channels=16,
        out_channels=16,
        vec_in_dim=32,
        context_in_dim=48,
        hidden_size=64,
        mlp_ratio=4.0,
        num_heads=4,
        depth=2,
        depth_single_blocks=2,
        axes_dim=(4, 6, 6),
        theta=10_000,
        qkv_bias=True,
        guidance_embed=guidance_embed,
    )
    return FluxConfig(**{**fields, **overrides})


def tiny_flux2_config(use_guidance_embed: bool = False, **overrides) -> Flux2Config:
    """A FLUX.2 with the official structure at toy width (head dim 16, 4 RoPE axes, theta 2000)."""
    fields = dict(
        in_channels=16,
        context_in_dim=48,
        hidden_size=64,
        num_heads=4,
        depth=2,
        depth_single_blocks=2,
        axes_dim=(4, 4, 4, 4),
        theta=2000,
        mlp_ratio=3.0,
        use_guidance_embed=use_guidance_embed,
    )
    return Flux2Config(**{**fields, **overrides})


@torch.no_grad()
def randomize_(module: nn.Module, seed: int = 0, std: float = 0.2) -> nn.Module:
    """Fill every parameter with N(0, std^2) noise; gains named `scale`/`weight` of norms get 1 + noise,
    so that no layer is zero or an identity and swapped q/k or shift/scale would show."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in module.named_parameters():
        noise = torch.randn(param.shape, generator=generator, dtype=torch.float32) * std
        is_gain = name.endswith(".scale") or (param.ndim == 1 and "norm" in name and name.endswith(".weight"))
        param.copy_((1.0 + noise) if is_gain else noise)
    return module


# ----------------------------------------------------------------------------------------------
# A complete tiny model folder: transformer, autoencoder and both text encoders, built offline.
# transformers and sentencepiece are imported inside the builders: they take seconds to import.

# The words the tiny tokenizers know whole; any other lowercase word still tokenises (into pieces).
TINY_WORDS = (
    "a an the of on in with and under over near next to photo painting picture drawing "
    "cat dog bird horse cow fish tree flower grass sky sun moon cloud water river sea sand beach "
    "mountain road car bus boat house building city forest field snow rock "
    "red orange yellow green blue purple white black brown gray big small sitting standing flying"
).split()
_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"-()"

TINY_T5_MAX_LENGTH = 32


def _train_sentencepiece(words: list[str]) -> bytes:
    """A unigram SentencePiece model with T5's special ids: pad 0, </s> 1, <unk> 2, no <s>."""
    import sentencepiece as spm

    sentences = [" ".join(words[i : i + 6]) for i in range(len(words))] + list(words) + list(_ALPHABET)
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=proto,
        model_type="unigram",
        vocab_size=len(words) + 2 * len(_ALPHABET),
        hard_vocab_limit=False,
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    return proto.getvalue()


def build_tiny_t5(folder: str | Path, seed: int = 0, d_model: int = 48) -> Path:
    """Write a T5 tokenizer (spiece.model + tokenizer.json) and a random 2-layer T5 encoder to `folder`."""
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(_train_sentencepiece(list(TINY_WORDS)))
    tokenizer = T5Tokenizer.from_pretrained(folder, local_files_only=True)
    tokenizer.save_pretrained(folder)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=d_model // 4,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",  # T5 v1.1, as in Flux
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    model = randomize_(T5EncoderModel(config), seed, std=0.1)
    model.save_pretrained(folder)
    return folder


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: printable bytes map to themselves, the rest to chars from U+0100 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _apply_merges(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one word: repeatedly merge the lowest-ranked adjacent pair (leftmost first)."""
    while len(symbols) > 1:
        rank, i = min((ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(symbols, symbols[1:])))
        if rank == len(ranks):
            break
        symbols = [*symbols[:i], symbols[i] + symbols[i + 1], *symbols[i + 2 :]]
    return symbols


def clip_vocab(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP-style BPE vocab and merges in which each of `words` is a single token `word</w>`.

    Order as in CLIP: 256 byte chars, the same with `</w>`, merged tokens, then <|startoftext|> and
    <|endoftext|> last, so the end token has the largest id (the legacy pooling takes argmax(ids))."""
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        symbols = [*word[:-1], word[-1] + "</w>"]
        while len(pieces := _apply_merges(symbols, ranks)) > 1:
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            if pair[0] + pair[1] not in tokens:
                tokens.append(pair[0] + pair[1])
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}, merges


def build_tiny_clip(folder: str | Path, seed: int = 0, hidden_size: int = 32) -> Path:
    """Write a CLIP BPE tokenizer (vocab.json, merges.txt) and a random 2-layer CLIP text tower."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab(list(TINY_WORDS))
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True, model_max_length=77)
    tokenizer.save_pretrained(folder)
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )
    model = randomize_(CLIPTextModel(config), seed, std=0.1)
    model.save_pretrained(folder)
    return folder


def tiny_autoencoder_config() -> AutoEncoderConfig:
    """A 2-level AE (f = 2, 4 latent channels): 64x64 images become 32x32 latents, 256 tokens."""
    return AutoEncoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4)


def build_tiny_weights(
    folder: str | Path,
    seed: int = 0,
    guidance_embed: bool = False,
    pixel_space: bool = False,
    t5_max_length: int = TINY_T5_MAX_LENGTH,
) -> Path:
    """Write a complete random tiny model in the official single-file layout and return the folder:

        flux1-tiny.safetensors   the transformer, BFL keys, its FluxConfig in the safetensors metadata
        ae.safetensors           a tiny AE (identity-autoencoder.json instead if pixel_space)
        t5/, clip/               tokenizers and encoders (save_pretrained layout)
        sampling.json            the T5 length (tiny prompts need far fewer than 256 tokens) and the small
                                 image size the model is meant for (32x32), so that
                                 `flux-mini generate --weights DIR` runs in seconds

    Deterministic for a seed; no downloads. guidance_embed=True gives a dev-family (guidance) model."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    t5_dim, clip_dim = 48, 32
    build_tiny_t5(folder / "t5", seed=seed + 1, d_model=t5_dim)
    build_tiny_clip(folder / "clip", seed=seed + 2, hidden_size=clip_dim)

    if pixel_space:
        autoencoder = IdentityAutoEncoder(channels=3)
        autoencoder.save_json(folder / "identity-autoencoder.json")
    else:
        autoencoder = randomize_(AutoEncoder(tiny_autoencoder_config()), seed + 3, std=0.05)
        save_file(autoencoder.state_dict(), folder / "ae.safetensors")

    channels = 4 * autoencoder.z_channels  # 2x2 patches of latent channels
    config = tiny_flux_config(
        guidance_embed, in_channels=channels, out_channels=channels, context_in_dim=t5_dim, vec_in_dim=clip_dim
    )
    save_flux(randomize_(Flux(config), seed), folder / "flux1-tiny.safetensors")  # config in the metadata
    sampling = {"t5_max_length": t5_max_length, "width": 32, "height": 32}
    (folder / "sampling.json").write_text(json.dumps(sampling) + "\n")
    return folder
