"""Concept words -> concept embeddings in the text-feature space (Flux.1: T5; FLUX.2: the chat LLM; FLUX.3: the
Qwen3-VL tower), one concept at a time."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from flux_mini.text_encoders import Qwen3VLEmbedder, StackedLayersEmbedder, T5Embedder

ENCODINGS = ("first_token", "mean")


def check_concepts(concepts: Sequence[str]) -> list[str]:
    """Concepts must be a non-empty list of distinct, non-blank strings (duplicates would split the
    softmax mass between identical rows)."""
    if isinstance(concepts, str):
        raise ValueError(f"concepts must be a list of strings, got the single string {concepts!r}: wrap it in a list")
    concepts = list(concepts)
    if not concepts:
        raise ValueError("no concepts given: pass at least one concept word, e.g. ['cat', 'sky']")
    blank = [c for c in concepts if not isinstance(c, str) or not c.strip()]
    if blank:
        raise ValueError(f"concepts must be non-empty strings, got {blank!r}")
    seen, duplicates = set(), []
    for concept in concepts:
        key = concept.strip().lower()
        if key in seen:
            duplicates.append(concept)
        seen.add(key)
    if duplicates:
        raise ValueError(f"duplicate concepts {duplicates!r}: each concept may appear once")
    return [c.strip() for c in concepts]


def check_concept_tokens(t5: T5Embedder, concepts: Sequence[str], softmax: bool = True) -> None:
    """What the tokenizer makes of the concepts: words it knows only as <unk> and concepts with identical
    token ids get identical embeddings (so identical maps): warn, naming them; when every concept is the
    same to the model the maps cannot mean anything: error. One concept under softmax is 1.0 everywhere."""
    tokenizer = t5.tokenizer
    ids = {c: tuple(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in concepts}
    unknown = [c for c, pieces in ids.items() if tokenizer.unk_token_id in pieces]
    groups: dict[tuple[int, ...], list[str]] = {}
    for concept, pieces in ids.items():
        groups.setdefault(pieces, []).append(concept)
    same = [words for words in groups.values() if len(words) > 1]
    if len(concepts) > 1 and len(groups) == 1:
        raise ValueError(
            f"the concepts {list(concepts)!r} all tokenise to the same ids {list(ids[concepts[0]])} "
            "(words this tokenizer does not know become <unk>): their maps would be identical; use words in "
            "the model's vocabulary (check the case: the demo vocabulary is lowercase)"
        )
    if unknown:
        warnings.warn(
            f"the tokenizer knows the concept(s) {unknown!r} only partly or not at all (<unk> tokens): their "
            "maps describe an unknown word; use words in the model's vocabulary (the demo vocabulary is lowercase)",
            stacklevel=3,
        )
    if same:
        warnings.warn(
            "these concepts tokenise to the same ids and get identical maps: "
            + "; ".join(" = ".join(repr(w) for w in words) for words in same),
            stacklevel=3,
        )
    if len(concepts) == 1 and softmax:
        warnings.warn(
            f"a single concept ({concepts[0]!r}) under softmax gets a map of exactly 1.0 everywhere: add concepts "
            "to compare against (e.g. a background word) or turn softmax off (--no-softmax, softmax=False)",
            stacklevel=3,
        )


@torch.no_grad()
def encode_concepts(t5: T5Embedder, concepts: Sequence[str], encoding: str = "first_token") -> Tensor:
    """Each concept through T5 on its own -> (r, d_model).

    `first_token` (the authors'): the first output token of the concept padded to the prompt length,
    no attention mask (so the vector depends on that length, as in their code). `mean`: the mean over
    the concept's own tokens (end and pad tokens excluded) with a proper attention mask, which keeps
    all of a multi-piece word."""
    if encoding not in ENCODINGS:
        raise ValueError(f"concept encoding must be one of {ENCODINGS}, got {encoding!r}")
    input_ids, mask = t5.tokenize(check_concepts(concepts))  # (r, max_length) each
    if encoding == "first_token":
        return t5.model(input_ids=input_ids, attention_mask=None).last_hidden_state[:, 0]
    hidden = t5.model(input_ids=input_ids, attention_mask=mask).last_hidden_state  # (r, max_length, d)
    own = (mask.bool() & (input_ids != t5.tokenizer.eos_token_id)).to(hidden.dtype)  # (r, max_length)
    if (own.sum(dim=1) == 0).any():
        raise ValueError(f"a concept in {list(concepts)!r} has no tokens of its own after tokenisation")
    return torch.einsum("rld,rl->rd", hidden, own) / own.sum(dim=1, keepdim=True)


# ----------------------------------------------------------------------------------------------
# FLUX.2: concepts through the chat LLM, each as its own prompt (in the template, padded as a prompt)

FLUX2_ENCODINGS = ("first_token", "mean", "authors")


def authors_concept_position(max_length: int) -> int:
    """The text position the authors' FLUX.2 port reads every concept from: 510 of 512, i.e. the last but one."""
    return max_length - 2


@torch.no_grad()
def encode_concepts_flux2(embedder: StackedLayersEmbedder, concepts: Sequence[str], encoding: str = "first_token"):
    """Each concept as a prompt through the FLUX.2 text encoder -> (r, context_in_dim) features.

    `first_token` (default): the features at the first token of the concept's own text, i.e. the concept
    in the context of the chat template, as the prompt's words are. `mean`: the mean over the concept's
    own tokens (all pieces of a multi-token word). `authors`: the features at the fixed position
    `max_length - 2` (510 of 512), as the authors' port does; with left padding ([dev]) that is near the
    end of the template, with right padding ([klein]) it is padding."""
    if encoding not in FLUX2_ENCODINGS:
        raise ValueError(f"FLUX.2 concept encoding must be one of {FLUX2_ENCODINGS}, got {encoding!r}")
    concepts = check_concepts(concepts)
    features = embedder(concepts)  # (r, T, C)
    if encoding == "authors":
        return features[:, authors_concept_position(embedder.max_length)]
    own = embedder.prompt_tokens(concepts).to(features.device)  # (r, T)
    empty = [c for c, row in zip(concepts, own) if not row.any()]
    if empty:
        raise ValueError(
            f"the concept(s) {empty!r} have no tokens left after the chat template at max_length "
            f"{embedder.max_length}: raise max_length (sampling.json) or shorten them"
        )
    if encoding == "first_token":
        return features[torch.arange(len(concepts)), own.int().argmax(dim=1)]
    weights = own.to(features.dtype)
    return torch.einsum("rtc,rt->rc", features, weights) / weights.sum(dim=1, keepdim=True)


# ----------------------------------------------------------------------------------------------
# FLUX.3: concepts through the Qwen3-VL tower, each as its own prompt (in the template, its own window)


@torch.no_grad()
def encode_concepts_flux3(embedder: Qwen3VLEmbedder, concepts: Sequence[str], encoding: str = "first_token"):
    """Each concept as a prompt through the FLUX.3 text tower -> (r, context_in_dim) features, as FLUX.2 does
    with its LLM: `first_token` (default) the features at the first token of the concept's own text, `mean` the
    mean over its own tokens. Each concept has its own window (FLUX.3 pads per prompt), so one runs at a time."""
    if encoding not in ENCODINGS:
        raise ValueError(f"FLUX.3 concept encoding must be one of {ENCODINGS}, got {encoding!r}")
    rows = []
    for concept in check_concepts(concepts):
        features = embedder(concept)[0]  # (T, C)
        own = embedder.prompt_tokens(concept)[0].to(features.device)  # (T,)
        if not own.any():
            raise ValueError(
                f"the concept {concept!r} has no tokens left after the chat template at max_length "
                f"{embedder.max_length}: raise max_length (sampling.json) or shorten it"
            )
        rows.append(features[own][0] if encoding == "first_token" else features[own].mean(dim=0))
    return torch.stack(rows)
