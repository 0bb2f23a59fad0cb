"""The two frozen text encoders of Flux, loaded from local folders only (spec §5.1).

T5 (`txt`): every token's last hidden state, (B, max_length, d_model); it carries the prompt's content.
CLIP (`y`): the pooled vector at the end-of-text token, (B, hidden); it modulates every block.
Both tokenise with padding to `max_length` and truncation, and the encoders run WITHOUT an attention
mask, as in the reference: T5's pad tokens are attended to and their outputs are part of `txt`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
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
MODEL_TYPES = {"T5": ("t5",), "CLIP": ("clip_text_model", "clip")}


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
        hint = f"it holds a {other} text encoder: are the t5/ and clip/ folders swapped?" if other else fetch
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
