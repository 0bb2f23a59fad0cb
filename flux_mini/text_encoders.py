"""The two frozen text encoders of Flux, loaded from local folders only (spec §5.1).

T5 (`txt`): every token's last hidden state, (B, max_length, d_model); it carries the prompt's content.
CLIP (`y`): the pooled vector at the end-of-text token, (B, hidden); it modulates every block.
Both tokenise with padding to `max_length` and truncation, and the encoders run WITHOUT an attention
mask, as in the reference: T5's pad tokens are attended to and their outputs are part of `txt`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

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

        tokenizer = T5Tokenizer.from_pretrained(tokenizer_folder, local_files_only=True)
        model = T5EncoderModel.from_pretrained(folder, local_files_only=True, dtype=dtype).to(device)
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

        tokenizer = CLIPTokenizer.from_pretrained(tokenizer_folder, local_files_only=True)
        model = CLIPTextModel.from_pretrained(folder, local_files_only=True, dtype=dtype).to(device)
        super().__init__(tokenizer, model, max_length)

    @torch.no_grad()
    def forward(self, prompts: str | list[str]) -> Tensor:
        input_ids, _ = self.tokenize(prompts)
        return self.model(input_ids=input_ids, attention_mask=None).pooler_output
