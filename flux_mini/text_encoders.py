"""The frozen text encoders of Flux.1 (T5, CLIP), FLUX.2 (Qwen3, Mistral) and FLUX.3 (Qwen3-VL), local folders only.

T5 (`txt`): every token's last hidden state, (B, max_length, d_model); it carries the prompt's content.
CLIP (`y`): the pooled vector at the end-of-text token, (B, hidden); it modulates every block.
Both tokenise with padding to `max_length` and truncation, and the encoders run WITHOUT an attention
mask, as in the reference: T5's pad tokens are attended to and their outputs are part of `txt`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from einops import rearrange
from torch import Tensor, nn

from flux_mini.checkpoint import read_header

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


class MissingFilesError(FileNotFoundError):
    """A model folder lacks a file it needs; the message names the file and what to put there."""


def _require(folder: Path, alternatives: tuple[str, ...], what: str) -> None:
    """Raise MissingFilesError unless `folder` exists and holds one of `alternatives`."""
    if not folder.is_dir():
        raise MissingFilesError(f"{what}: folder {folder} does not exist; put the {what} files there")
    if not any((folder / name).exists() for name in alternatives):
        raise MissingFilesError(
            f"{what}: none of {', '.join(alternatives)} found in {folder}; put the {what} files there "
            f"(e.g. from the FLUX.1-schnell repo on Hugging Face)"
        )


class TextEncoderError(ValueError):
    """A text-encoder folder that transformers cannot read exactly; the message names the folder and the fix."""


# config.json model_type of each encoder, and how to tell the user which folder they gave instead
MODEL_TYPES = {"T5": ("t5",), "CLIP": ("clip_text_model", "clip"), "Qwen3": ("qwen3",), "Mistral": ("mistral3",)}


def _read_json_object(path: Path, fix: str) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TextEncoderError(f"{path} is not valid JSON ({e}); {fix}") from None
    if not isinstance(value, dict):
        raise TextEncoderError(f"{path} is not a JSON object (it holds a {type(value).__name__}); {fix}")
    return value


def _check_folder(kind: str, folder: Path, tokenizer_folder: Path) -> None:
    """Read what transformers would choke on with its own tracebacks: the JSON files, the encoder kind
    (swapped t5/ and clip/ folders) and the weights' safetensors headers (truncated downloads)."""
    fetch = "fetch the folder's files again"
    config = _read_json_object(folder / "config.json", fetch)
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES[kind]:
        other = next((name for name, types in MODEL_TYPES.items() if model_type in types), None)
        swapped = ": are the t5/ and clip/ folders swapped?" if {kind, other} == {"T5", "CLIP"} else ""
        hint = f"it holds a {other} text encoder{swapped}" if other else fetch
        raise TextEncoderError(
            f"{folder / 'config.json'} has model_type {model_type!r}, but the {kind} encoder needs "
            f"{' or '.join(map(repr, MODEL_TYPES[kind]))}; {hint}"
        )
    for name in ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json"):
        if (tokenizer_folder / name).exists():
            _read_json_object(tokenizer_folder / name, "fetch it again, or delete it to use the other tokenizer files")
    for name in ("model.safetensors.index.json", "model.safetensors"):
        if (folder / name).exists():
            read_header(folder / name)  # CheckpointError naming the file for a truncated or corrupt one
            break


def _load_exactly(model_class, folder: Path, kind: str, dtype: torch.dtype):
    """from_pretrained, refusing any missing, unexpected or mis-shaped weight (transformers would
    initialise a missing one at random and only warn)."""
    try:
        model, info = model_class.from_pretrained(folder, local_files_only=True, dtype=dtype, output_loading_info=True)
    except Exception as e:  # transformers raises many kinds; the user needs the folder and the fix
        raise TextEncoderError(
            f"{kind} text encoder in {folder} could not be loaded ({type(e).__name__}: {_first_line(e)}); "
            "fetch the folder's files again"
        ) from None
    problems = {name: sorted(info.get(name) or ()) for name in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {name: keys for name, keys in problems.items() if keys}
    if problems or info.get("error_msgs"):
        listing = "; ".join(
            f"{name.replace('_', ' ')} ({len(keys)}): {', '.join(map(str, keys[:5]))}{', ...' if len(keys) > 5 else ''}"
            for name, keys in problems.items()
        )
        raise TextEncoderError(
            f"the weights in {folder} do not fit {model_class.__name__} exactly ({listing or info['error_msgs']}); "
            "transformers would fill the gaps with random values. Fetch the encoder's files again, or use a "
            "transformers version that reads this layout (see pyproject.toml)"
        )
    return model


def _load_tokenizer(tokenizer_class, folder: Path, kind: str):
    try:
        return tokenizer_class.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # tokenizers raises bare Exceptions for malformed files
        raise TextEncoderError(
            f"{kind} tokenizer in {folder} could not be loaded ({type(e).__name__}: {_first_line(e)}); "
            "fetch the tokenizer files again"
        ) from None


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:200] if lines else "no message"


class TextEmbedder(nn.Module):
    """A tokenizer + encoder pair; subclasses choose the classes and which output to return."""

    def __init__(self, tokenizer, model, max_length: int):
        super().__init__()
        self.tokenizer = tokenizer
        self.model = model.eval().requires_grad_(False)
        self.max_length = max_length

    def tokenize(self, prompts: str | list[str]) -> tuple[Tensor, Tensor]:
        """Prompts -> (input_ids, attention_mask), both (B, max_length) int64, on the encoder's device.

        The mask marks real tokens (and the end token); the encoder itself never receives it."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        batch = self.tokenizer(
            prompts,
            truncation=True,
            max_length=self.max_length,
            padding="max_length",
            return_length=False,
            return_overflowing_tokens=False,
            return_tensors="pt",
        )
        device = self.model.device
        return batch["input_ids"].to(device), batch["attention_mask"].to(device)


class T5Embedder(TextEmbedder):
    """T5 encoder: prompts -> last_hidden_state (B, max_length, d_model)."""

    def __init__(
        self,
        folder: str | Path,
        max_length: int = 512,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
        tokenizer_folder: str | Path | None = None,
    ):
        folder = Path(folder)
        tokenizer_folder = folder if tokenizer_folder is None else Path(tokenizer_folder)
        _require(tokenizer_folder, ("spiece.model", "tokenizer.json"), "T5 tokenizer")
        _require(folder, ("config.json",), "T5 encoder config")
        _require(folder, WEIGHT_FILES, "T5 encoder weights")
        from transformers import T5EncoderModel, T5Tokenizer  # seconds to import: only when a model is loaded

        _check_folder("T5", folder, tokenizer_folder)
        tokenizer = _load_tokenizer(T5Tokenizer, tokenizer_folder, "T5")
        model = _load_exactly(T5EncoderModel, folder, "T5", dtype).to(device)
        super().__init__(tokenizer, model, max_length)

    @torch.no_grad()
    def forward(self, prompts: str | list[str]) -> Tensor:
        input_ids, _ = self.tokenize(prompts)
        return self.model(input_ids=input_ids, attention_mask=None).last_hidden_state


class CLIPEmbedder(TextEmbedder):
    """CLIP text tower (no projection): prompts -> pooler_output (B, hidden), the final-normed EOS state."""

    def __init__(
        self,
        folder: str | Path,
        max_length: int = 77,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
        tokenizer_folder: str | Path | None = None,
    ):
        folder = Path(folder)
        tokenizer_folder = folder if tokenizer_folder is None else Path(tokenizer_folder)
        _require(tokenizer_folder, ("tokenizer.json", "vocab.json"), "CLIP tokenizer")
        if not (tokenizer_folder / "tokenizer.json").exists():
            _require(tokenizer_folder, ("merges.txt",), "CLIP tokenizer")
        _require(folder, ("config.json",), "CLIP text encoder config")
        _require(folder, WEIGHT_FILES, "CLIP text encoder weights")
        from transformers import CLIPTextModel, CLIPTokenizer  # seconds to import: only when a model is loaded

        _check_folder("CLIP", folder, tokenizer_folder)
        tokenizer = _load_tokenizer(CLIPTokenizer, tokenizer_folder, "CLIP")
        model = _load_exactly(CLIPTextModel, folder, "CLIP", dtype).to(device)
        super().__init__(tokenizer, model, max_length)

    @torch.no_grad()
    def forward(self, prompts: str | list[str]) -> Tensor:
        input_ids, _ = self.tokenize(prompts)
        return self.model(input_ids=input_ids, attention_mask=None).pooler_output


# ----------------------------------------------------------------------------------------------
# FLUX.2 (flux2-format.md §6): a chat LLM's residual stream at three depths, stacked feature-wise.


# The fixed system turn of every [dev] prompt (BFL `system_messages.py`). It is an input of the model, so it
# must be byte-exact; tests check its SHA-256 against flux2-format.md §6.2.
FLUX2_SYSTEM_MESSAGE = (
    "You are an AI that reasons about image descriptions. You give structured responses focusing on object "
    "relationships, object\nattribution and actions without speculation."
)


class StackedLayersEmbedder(nn.Module):
    """A chat LLM used as a text encoder: the hidden states after decoder layers `hidden_layers` (1-based,
    before the final norm), concatenated layer-major into (B, max_length, len(hidden_layers) * hidden).

    The prompt is padded to `max_length` and the LLM runs WITH the attention mask (unlike T5 in Flux.1),
    but every position, padding included, goes on to the transformer. Layers deeper than the last one used
    never run, so they are dropped after the (strict) load: 8 of Qwen3's 36 layers, 9 of Mistral's 40."""

    def __init__(self, tokenizer, model, decoder, hidden_layers: tuple[int, ...], max_length: int, folder: Path):
        super().__init__()
        depth = len(decoder.layers)
        if not hidden_layers or min(hidden_layers) < 1 or max(hidden_layers) >= depth:
            raise ValueError(
                f"hidden_layers {list(hidden_layers)} must be decoder layers 1..{depth - 1} of the {depth}-layer "
                f"encoder in {folder} (layer {depth}'s output is replaced by the final norm in transformers)"
            )
        decoder.layers = decoder.layers[: max(hidden_layers) + 1]  # one more: hidden_states[-1] is the normed one
        self.tokenizer = tokenizer
        self.model = model.eval().requires_grad_(False)
        self.decoder = decoder
        self.hidden_layers = tuple(hidden_layers)
        self.max_length = max_length

    @property
    def hidden_size(self) -> int:
        return self.decoder.config.hidden_size

    @property
    def output_dim(self) -> int:
        """The transformer's context_in_dim: 3 x the LLM width."""
        return len(self.hidden_layers) * self.hidden_size

    def render(self, prompts: list[str]) -> list[str]:
        """Each prompt in the model's chat template (text, not yet tokenised)."""
        raise NotImplementedError

    def _tokenize_texts(self, texts: list[str], offsets: bool = False):
        bos = self.tokenizer.bos_token
        return self.tokenizer(
            texts,
            add_special_tokens=not (bos and texts[0].startswith(bos)),  # a template that writes BOS itself
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_offsets_mapping=offsets,
            return_tensors="pt",
        )

    def tokenize(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Prompts -> (input_ids, attention_mask), both (B, max_length)."""
        batch = self._tokenize_texts(self.render(prompts))
        return batch["input_ids"], batch["attention_mask"]

    def prompt_tokens(self, prompts: list[str]) -> Tensor:
        """(B, max_length) bool: the positions holding each prompt's own text (not the template around it,
        not padding), found through the tokenizer's character offsets."""
        prefix, _, suffix = self.render(["\x00"])[0].partition("\x00")
        texts = self.render(prompts)
        for prompt, text in zip(prompts, texts):
            if not (text.startswith(prefix) and text.endswith(suffix)):
                raise ValueError(f"the chat template does not place {prompt!r} verbatim; cannot locate its tokens")
        batch = self._tokenize_texts(texts, offsets=True)
        start, end = batch["offset_mapping"].unbind(-1)  # (B, T) character spans
        lengths = torch.tensor([len(text) - len(prefix) - len(suffix) for text in texts])[:, None]
        inside = (end > start) & (end > len(prefix)) & (start < len(prefix) + lengths)
        return inside & batch["attention_mask"].bool()

    @torch.no_grad()
    def forward(self, prompts: str | list[str]) -> Tensor:
        """Prompts -> (B, max_length, len(hidden_layers) * hidden) in the encoder's dtype."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        input_ids, attention_mask = self.tokenize(prompts)
        device = self.decoder.device
        out = self.decoder(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            output_hidden_states=True,
            use_cache=False,
        )
        stacked = torch.stack([out.hidden_states[k] for k in self.hidden_layers], dim=1)  # (B, 3, T, hidden)
        return rearrange(stacked, "b layer t d -> b t (layer d)")


def _require_tokenizer(folder: Path, what: str) -> None:
    _require(folder, ("tokenizer.json", "tokenizer_config.json", "tekken.json"), what)


class Qwen3Embedder(StackedLayersEmbedder):
    """FLUX.2 [klein]: Qwen3-4B (hidden 2560) or Qwen3-8B (4096), layers 9, 18, 27 -> 7680 / 12288 features.

    Each prompt is one user message in the tokenizer's chat template with the generation prompt and
    thinking disabled (an empty think block), then tokenised and padded (right) to max_length."""

    HIDDEN_LAYERS = (9, 18, 27)

    def __init__(
        self,
        folder: str | Path,
        max_length: int = 512,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
        tokenizer_folder: str | Path | None = None,
        hidden_layers: tuple[int, ...] = HIDDEN_LAYERS,
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = Path(folder)
        tokenizer_folder = folder if tokenizer_folder is None else Path(tokenizer_folder)
        _require_tokenizer(tokenizer_folder, "Qwen3 tokenizer")
        _require(folder, ("config.json",), "Qwen3 text encoder config")
        _require(folder, WEIGHT_FILES, "Qwen3 text encoder weights")
        _check_folder("Qwen3", folder, tokenizer_folder)
        tokenizer = _load_tokenizer(AutoTokenizer, tokenizer_folder, "Qwen3")
        if tokenizer.chat_template is None:
            raise TextEncoderError(f"Qwen3 tokenizer in {tokenizer_folder} has no chat template; use Qwen3's files")
        model = _load_exactly(AutoModelForCausalLM, folder, "Qwen3", dtype).to(device)
        super().__init__(tokenizer, model, model.model, hidden_layers, max_length, folder)

    def render(self, prompts: list[str]) -> list[str]:
        return [
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True, enable_thinking=False
            )
            for prompt in prompts
        ]


def _chat_template(tokenizer, folder: Path, what: str) -> str:
    """The tokenizer's chat template, else the processor's (`chat_template.jinja` / `chat_template.json`)."""
    if tokenizer.chat_template:
        return tokenizer.chat_template
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    if (folder / "chat_template.json").is_file():
        try:
            return json.loads((folder / "chat_template.json").read_text())["chat_template"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise TextEncoderError(f"{what}: {folder / 'chat_template.json'} has no 'chat_template' entry") from None
    raise TextEncoderError(f"{what}: no chat template in {folder} (tokenizer_config.json, chat_template.jinja/.json)")


class MistralEmbedder(StackedLayersEmbedder):
    """FLUX.2 [dev]: Mistral-Small-3.2-24B (hidden 5120), layers 10, 20, 30 -> 15360 features.

    The checkpoint is the full `Mistral3ForConditionalGeneration` (its vision tower is loaded, strictly,
    but never run). Each prompt becomes a conversation of BFL's system message and the prompt (any
    literal "[IMG]" removed), rendered with the processor's chat template and tokenised as the processor
    does for text (no second BOS), padded to max_length. Only the tokenizer is loaded, so the image
    processor and its torchvision dependency are not needed."""

    HIDDEN_LAYERS = (10, 20, 30)

    def __init__(
        self,
        folder: str | Path,
        max_length: int = 512,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
        tokenizer_folder: str | Path | None = None,
        hidden_layers: tuple[int, ...] = HIDDEN_LAYERS,
        system_message: str = FLUX2_SYSTEM_MESSAGE,
    ):
        from transformers import AutoModelForImageTextToText, AutoTokenizer

        folder = Path(folder)
        tokenizer_folder = folder if tokenizer_folder is None else Path(tokenizer_folder)
        _require_tokenizer(tokenizer_folder, "Mistral tokenizer")
        _require(folder, ("config.json",), "Mistral text encoder config")
        _require(folder, WEIGHT_FILES, "Mistral text encoder weights")
        _check_folder("Mistral", folder, tokenizer_folder)
        tokenizer = _load_tokenizer(AutoTokenizer, tokenizer_folder, "Mistral")
        chat_template = _chat_template(tokenizer, tokenizer_folder, "Mistral tokenizer")
        model = _load_exactly(AutoModelForImageTextToText, folder, "Mistral", dtype)
        super().__init__(tokenizer, model.to(device), model.model.language_model, hidden_layers, max_length, folder)
        self.chat_template = chat_template
        self.system_message = system_message

    def render(self, prompts: list[str]) -> list[str]:
        conversations = [
            [
                {"role": "system", "content": [{"type": "text", "text": self.system_message}]},
                {"role": "user", "content": [{"type": "text", "text": prompt.replace("[IMG]", "")}]},
            ]
            for prompt in prompts
        ]
        return self.tokenizer.apply_chat_template(conversations, chat_template=self.chat_template, tokenize=False)


# ----------------------------------------------------------------------------------------------
# FLUX.3 (flux3-format.md §4): Qwen3-VL-4B-Instruct's text tower, eight depths stacked feature-wise.


class Qwen3VLEmbedder(nn.Module):
    """FLUX.3: the hidden states after Qwen3-VL decoder layers 4, 8, ..., 32 (HF `hidden_states` indices, before
    the final norm), stacked layer-major into (1, T, 8 x 2560 = 20480).

    One prompt per call: each prompt gets its own window, its templated length rounded up to a multiple of 80
    (capped at `max_length`), right-padded. The LLM runs with the attention mask and with explicit position ids
    arange(T), padding positions set to 1 (the training environment's, transformers 4.57); the transformer
    then attends to every position, padding included, so the window size is part of the recipe. The checkpoint
    is the full `Qwen3VLForConditionalGeneration`, loaded strictly; only its language model runs, and only up to
    the deepest layer used."""

    HIDDEN_LAYERS = (4, 8, 12, 16, 20, 24, 28, 32)
    PAD_MULTIPLE = 80

    def __init__(
        self,
        folder: str | Path,
        max_length: int = 8192,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
        tokenizer_folder: str | Path | None = None,
        hidden_layers: tuple[int, ...] = HIDDEN_LAYERS,
    ):
        super().__init__()
        from transformers import AutoTokenizer, Qwen3VLForConditionalGeneration

        folder = Path(folder)
        tokenizer_folder = folder if tokenizer_folder is None else Path(tokenizer_folder)
        _require(tokenizer_folder, ("tokenizer.json", "tokenizer_config.json"), "Qwen3-VL tokenizer")
        _require(folder, ("config.json",), "Qwen3-VL text encoder config")
        _require(folder, WEIGHT_FILES, "Qwen3-VL text encoder weights")
        self.tokenizer = _load_tokenizer(AutoTokenizer, tokenizer_folder, "Qwen3-VL")
        self.chat_template = self.tokenizer.chat_template or _processor_chat_template(tokenizer_folder)
        model = _load_exactly(Qwen3VLForConditionalGeneration, folder, "Qwen3-VL", dtype)
        decoder = model.model.language_model
        depth = len(decoder.layers)
        if not hidden_layers or min(hidden_layers) < 1 or max(hidden_layers) >= depth:
            raise ValueError(f"hidden_layers {list(hidden_layers)} must be decoder layers 1..{depth - 1} of {folder}")
        decoder.layers = decoder.layers[: max(hidden_layers) + 1]  # the deeper layers never contribute
        self.decoder = decoder.to(device).eval().requires_grad_(False)
        self.hidden_layers = tuple(hidden_layers)
        self.max_length = max_length

    @property
    def output_dim(self) -> int:
        """The transformer's context_in_dim: 8 x the LLM width."""
        return len(self.hidden_layers) * self.decoder.config.hidden_size

    def tokenize(self, prompt: str) -> tuple[Tensor, Tensor]:
        """One prompt -> (input_ids, attention_mask), each (1, T) with T = its length rounded up to 80."""
        batch = self._tokenize_text(self.render(prompt))
        return batch["input_ids"], batch["attention_mask"]

    def render(self, prompt: str) -> str:
        """One prompt in the chat template (text, not yet tokenised)."""
        if not isinstance(prompt, str):
            raise ValueError(f"FLUX.3 encodes one prompt per call (each has its own window), got {type(prompt)}")
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], chat_template=self.chat_template, tokenize=False,
            add_generation_prompt=True,
        )  # fmt: skip

    def _tokenize_text(self, text: str, offsets: bool = False):
        length = len(self.tokenizer(text, truncation=True, max_length=self.max_length)["input_ids"])
        window = min(-(-length // self.PAD_MULTIPLE) * self.PAD_MULTIPLE, self.max_length)
        return self.tokenizer(
            text, padding="max_length", padding_side="right", truncation=True, max_length=window,
            return_offsets_mapping=offsets, return_tensors="pt",
        )  # fmt: skip

    def window(self, prompt: str) -> int:
        """T, the length of `prompt`'s window: its templated length rounded up to a multiple of 80, capped."""
        return self._tokenize_text(self.render(prompt))["input_ids"].shape[1]

    def prompt_tokens(self, prompt: str) -> Tensor:
        """(1, T) bool over the prompt's window: the positions holding the prompt's own text (not the template
        around it, not padding), found through the tokenizer's character offsets."""
        prefix, _, suffix = self.render("\x00").partition("\x00")
        text = self.render(prompt)
        if not (text.startswith(prefix) and text.endswith(suffix)):
            raise ValueError(f"the chat template does not place {prompt!r} verbatim; cannot locate its tokens")
        batch = self._tokenize_text(text, offsets=True)
        start, end = batch["offset_mapping"].unbind(-1)  # (1, T) character spans
        inside = (end > start) & (end > len(prefix)) & (start < len(text) - len(suffix))
        return inside & batch["attention_mask"].bool()

    @torch.no_grad()
    def forward(self, prompt: str) -> Tensor:
        """One prompt -> (1, T, 8 x hidden) in the encoder's dtype; T is a multiple of 80."""
        input_ids, attention_mask = (t.to(self.decoder.device) for t in self.tokenize(prompt))
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        position_ids = position_ids.masked_fill(attention_mask == 0, 1)
        out = self.decoder(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            output_hidden_states=True, use_cache=False,
        )  # fmt: skip
        stacked = torch.stack([out.hidden_states[k] for k in self.hidden_layers], dim=1)  # (1, 8, T, hidden)
        return rearrange(stacked, "b layer t d -> b t (layer d)")


def _processor_chat_template(folder: Path) -> str:
    """A processor's chat template (`chat_template.jinja` / `chat_template.json`), where Qwen3-VL keeps it."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    try:
        return json.loads((folder / "chat_template.json").read_text())["chat_template"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
        raise ValueError(
            f"Qwen3-VL tokenizer: no chat template in {folder} (tokenizer_config.json, chat_template.jinja or "
            "chat_template.json); use the files of Qwen3-VL-4B-Instruct"
        ) from None
