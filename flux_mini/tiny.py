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
from flux_mini.flux2 import Flux2, Flux2Config
from flux_mini.flux3 import Flux3, Flux3Config


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



def tiny_flux3_config(flow_map: bool = True, **overrides) -> Flux3Config:
    """A tiny FLUX.3 with the official structure: 3 token modes, 4 RoPE axes, head dim 16, SwiGLU ratio 3."""
    fields = dict(
        in_channels=16,
        cond_in_channels=16,
        out_channels=16,
        context_in_dim=40,
        hidden_size=64,
        mlp_ratio=3.0,
        num_heads=4,
        depth=2,
        depth_single_blocks=2,
        axes_dim=(4, 4, 4, 4),
        theta=10_000,
        flow_map=flow_map,
    )
    return Flux3Config(**{**fields, **overrides})


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
    pixel_downsample: int = 1,
) -> Path:
    """Write a complete random tiny model in the official single-file layout and return the folder:

        flux1-tiny.safetensors   the transformer, BFL keys, its FluxConfig in the safetensors metadata
        ae.safetensors           a tiny AE (identity-autoencoder.json instead if pixel_space)
        t5/, clip/               tokenizers and encoders (save_pretrained layout)
        sampling.json            the T5 length (tiny prompts need far fewer than 256 tokens) and the small
                                 image size the model is meant for (32x32), so that
                                 `flux-mini generate --weights DIR` runs in seconds

    Deterministic for a seed; no downloads. guidance_embed=True gives a dev-family (guidance) model;
    pixel_downsample folds f x f pixels into the latent channels of a pixel-space model."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    t5_dim, clip_dim = 48, 32
    build_tiny_t5(folder / "t5", seed=seed + 1, d_model=t5_dim)
    build_tiny_clip(folder / "clip", seed=seed + 2, hidden_size=clip_dim)

    if pixel_space:
        autoencoder = IdentityAutoEncoder(channels=3, downsample=pixel_downsample)
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


# ----------------------------------------------------------------------------------------------
# FLUX.2 text encoders: tiny chat LLMs (Qwen3 for klein, Mistral3 for dev) with word-level tokenizers
# and short chat templates that render like the official ones (flux2-format.md §6).

# Qwen3's template for one user turn with add_generation_prompt and enable_thinking=False.
QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and not enable_thinking %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    "{% endif %}"
)
# Mistral-Small's template for a system turn and a user turn, with text content parts.
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% set text = message['content'][0]['text'] %}"
    "{% if message['role'] == 'system' %}{{ '[SYSTEM_PROMPT]' + text + '[/SYSTEM_PROMPT]' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST]' + text + '[/INST]' }}{% endif %}{% endfor %}"
)
QWEN3_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
MISTRAL_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
                          "[IMG]", "[IMG_BREAK]", "[IMG_END]")


def _word_tokenizer(specials: tuple[str, ...], **kwargs):
    """A word-level fast tokenizer: the special tokens, <unk>, the chat roles, TINY_WORDS and single characters."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {}
    for token in (*specials, "<unk>", "system", "user", "assistant", *TINY_WORDS, *_ALPHABET):
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    backend.add_special_tokens(list(specials))
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", **kwargs)


def build_tiny_qwen3(folder: str | Path, seed: int = 0, hidden_size: int = 16, num_layers: int = 30) -> Path:
    """A Qwen3 tokenizer (chat template, right padding with <|endoftext|>) and a random Qwen3ForCausalLM
    deep enough for the official hidden layers 9, 18, 27."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = _word_tokenizer(
        QWEN3_SPECIAL_TOKENS, pad_token="<|endoftext|>", eos_token="<|im_end|>", padding_side="right",
        chat_template=QWEN3_CHAT_TEMPLATE,
    )
    tokenizer.save_pretrained(folder)
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=512,
        tie_word_embeddings=True,  # as Qwen3-4B
        pad_token_id=tokenizer.pad_token_id,
    )
    randomize_(Qwen3ForCausalLM(config), seed, std=0.3).save_pretrained(folder)
    return folder


def build_tiny_mistral3(folder: str | Path, seed: int = 0, hidden_size: int = 16, num_layers: int = 32) -> Path:
    """A Mistral tokenizer (chat template, left padding) and a random Mistral3ForConditionalGeneration
    (tiny vision tower) deep enough for the official hidden layers 10, 20, 30."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = _word_tokenizer(
        MISTRAL_SPECIAL_TOKENS, bos_token="<s>", eos_token="</s>", pad_token="<pad>", padding_side="left",
        chat_template=MISTRAL_CHAT_TEMPLATE,
    )
    tokenizer.save_pretrained(folder)
    text = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = PixtralVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, head_dim=8,
        image_size=32, patch_size=8,
    )
    config = Mistral3Config(
        text_config=text, vision_config=vision, image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
        spatial_merge_size=2,
    )
    randomize_(Mistral3ForConditionalGeneration(config), seed, std=0.3).save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------------------------
# A complete tiny FLUX.2 folder


def tiny_flux2_autoencoder_config():
    """A 2-level FLUX.2 AE with 4 latent channels: 4 pixels per token, so 64x64 images have 256 tokens."""
    from flux_mini.autoencoder_flux2 import Flux2AutoEncoderConfig

    return Flux2AutoEncoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4)


def build_tiny_flux2_weights(folder: str | Path, seed: int = 0, variant: str = "klein") -> Path:
    """Write a random tiny FLUX.2 model in the official repo layout and return the folder:

        flux-2-klein-tiny.safetensors   (klein-base: flux-2-klein-base-tiny, dev: flux2-dev-tiny) BFL keys,
                                        the Flux2Config in the safetensors metadata
        ae.safetensors                  a tiny FLUX.2 AE with random BN statistics
        text_encoder/                   a tiny Qwen3 (klein) or Mistral3 (dev) with its tokenizer
        sampling.json                   64x64 images and short prompts

    Deterministic for a seed; no downloads."""
    from flux_mini.autoencoder_flux2 import Flux2AutoEncoder

    names = {"klein": "flux-2-klein-tiny", "klein-base": "flux-2-klein-base-tiny", "dev": "flux2-dev-tiny"}
    if variant not in names:
        raise ValueError(f"variant must be one of {sorted(names)}, got {variant!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dev = variant == "dev"
    text_width = 16
    if dev:
        build_tiny_mistral3(folder / "text_encoder", seed=seed + 1, hidden_size=text_width)
    else:
        build_tiny_qwen3(folder / "text_encoder", seed=seed + 1, hidden_size=text_width)

    autoencoder = randomize_(Flux2AutoEncoder(tiny_flux2_autoencoder_config()), seed + 3, std=0.05)
    generator = torch.Generator().manual_seed(seed + 4)
    with torch.no_grad():
        autoencoder.bn.running_mean.copy_(0.3 * torch.randn(autoencoder.latent_channels, generator=generator))
        autoencoder.bn.running_var.copy_(0.5 + torch.rand(autoencoder.latent_channels, generator=generator))
    save_file(autoencoder.state_dict(), folder / "ae.safetensors")

    config = tiny_flux2_config(dev, in_channels=autoencoder.latent_channels, context_in_dim=3 * text_width)
    save_flux(randomize_(Flux2(config), seed), folder / f"{names[variant]}.safetensors")
    sampling = {"max_length": 64 if dev else 32, "width": 64, "height": 64}  # dev: room for the system turn
    (folder / "sampling.json").write_text(json.dumps(sampling) + "\n")
    return folder


# ----------------------------------------------------------------------------------------------
# FLUX.3: a tiny Qwen3-VL text tower and a complete tiny FLUX.3 Klein folder.

# Qwen3-VL-Instruct's template for text-only user turns with the generation prompt (no thinking block)
QWEN3_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_tiny_qwen3_vl(folder: str | Path, seed: int = 0, hidden_size: int = 16, num_layers: int = 33) -> Path:
    """A word-level Qwen tokenizer (chat template, right padding with <|endoftext|>) and a random
    Qwen3VLForConditionalGeneration (tiny vision tower) deep enough for FLUX.3's hidden layers 4..32."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = _word_tokenizer(
        QWEN3_SPECIAL_TOKENS, pad_token="<|endoftext|>", eos_token="<|im_end|>", padding_side="right",
        chat_template=QWEN3_VL_CHAT_TEMPLATE,
    )  # fmt: skip
    tokenizer.save_pretrained(folder)
    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
            max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
            rope_parameters=dict(rope_type="default", rope_theta=5_000_000.0, mrope_section=[2, 1, 1],
                                 mrope_interleaved=True),
        ),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=hidden_size,
                           deepstack_visual_indexes=[0], num_position_embeddings=16),
        tie_word_embeddings=True,  # as Qwen3-VL-4B
    )  # fmt: skip
    randomize_(Qwen3VLForConditionalGeneration(config), seed, std=0.3).save_pretrained(folder)
    return folder


def build_tiny_flux3_weights(folder: str | Path, seed: int = 0, base: bool = False) -> Path:
    """Write a random tiny FLUX.3 Klein model in the official repo layout and return the folder:

        flux-3-image-klein-tiny.safetensors   (Base: flux-3-image-klein-base-tiny) BFL keys, config in the metadata
        ae.safetensors                        a tiny FLUX.2 AE (FLUX.3 shares it) with random BN statistics
        text_encoder/                         a tiny Qwen3-VL with its tokenizer and chat template
        sampling.json                         64x64 images

    Deterministic for a seed; no downloads."""
    from flux_mini.autoencoder_flux2 import Flux2AutoEncoder

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text_width = 16
    build_tiny_qwen3_vl(folder / "text_encoder", seed=seed + 1, hidden_size=text_width)
    autoencoder = randomize_(Flux2AutoEncoder(tiny_flux2_autoencoder_config()), seed + 3, std=0.05)
    generator = torch.Generator().manual_seed(seed + 4)
    with torch.no_grad():
        autoencoder.bn.running_mean.copy_(0.3 * torch.randn(autoencoder.latent_channels, generator=generator))
        autoencoder.bn.running_var.copy_(0.5 + torch.rand(autoencoder.latent_channels, generator=generator))
    save_file(autoencoder.state_dict(), folder / "ae.safetensors")
    channels = autoencoder.latent_channels
    config = tiny_flux3_config(flow_map=not base, in_channels=channels, cond_in_channels=channels,
                               out_channels=channels, context_in_dim=8 * text_width)  # fmt: skip
    name = "flux-3-image-klein-base-tiny" if base else "flux-3-image-klein-tiny"
    save_flux(randomize_(Flux3(config), seed, std=0.05), folder / f"{name}.safetensors")
    (folder / "sampling.json").write_text(json.dumps({"width": 64, "height": 64, "num_steps": 4}) + "\n")
    return folder
