"""Train the embedded demo model (weights/demo/): a tiny pixel-space Flux on the procedural shapes dataset.

A run keeps everything in --work-dir (outside the repository): `recipe.json` (what a new run was started
with), text encoders (t5/, clip/), `checkpoint.pt` (model, EMA, optimizer, step, RNG: the same command
continues bit-exactly on the same device) and `exports/step-NNNNNN/`, every --export-every steps a folder
FluxPipeline.from_folder loads (EMA weights). Runs on the CPU or a GPU (--device). The shipped model is two
runs: the flow loss from scratch, then a fine-tuning run (--init-from) with the shape and grounding losses
(weights/demo/README.md has both commands).

    PYTHONPATH=. python scripts/train_demo.py --work-dir /work/demo-training-v2 --steps 20000   # new or resumed
    PYTHONPATH=. python scripts/train_demo.py --work-dir /work/demo-training-v2 --benchmark-only \
        --model /work/demo-training-v2/exports/step-020000
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from einops import rearrange

from concept_attention.shapes import BACKGROUND_COLOURS, COLOURS, SHAPES, ShapesConfig, ShapesSample, make_sample, vocabulary
from flux_mini.autoencoder import IdentityAutoEncoder
from flux_mini.flux1 import Flux, FluxConfig
from flux_mini.text_encoders import CLIPEmbedder, T5Embedder
from flux_mini.tiny import clip_vocab
from flux_mini.train import (
    Batch, Conditioning, Trainer, TrainConfig, export_transformer, parameter_count, zero_init_modulation_,
)

T5_DIM, CLIP_DIM, T5_MAX_LENGTH = 64, 32, 12
TRAIN_SEED = 0  # the training image stream; benchmarks use other seeds (1: the README's, 2-3: fresh)
RECIPE_DEFAULTS = {"batch_size": 16, "hidden": 96, "depth": 4, "single_depth": 1, "single_object_steps": 0,
                   "patch": 2, "caption_dropout": 0.1, "shape_loss": 0.0, "grounding_loss": 0.0,
                   "ground_background": True, "ground_colours": False, "init_from": None}
RECIPE_LEGACY = {"patch": 2, "caption_dropout": 0.1, "shape_loss": 0.0, "grounding_loss": 0.0,
                 "ground_background": False, "ground_colours": False, "init_from": None}  # what recipes written before these flags ran with


def demo_flux_config(
    depth: int = 4, depth_single_blocks: int = 1, hidden_size: int = 96, patch: int = 2
) -> FluxConfig:
    """1.6M parameters at hidden 96: 4 double blocks (where ConceptAttention reads) and 1 single block, so
    that a step takes well under a second on one core. Heads of 24 channels (RoPE axes 8/8/8). A token
    covers patch x patch RGB pixels (4: the autoencoder folds 2x2 pixels into channels first)."""
    if patch not in (2, 4):
        raise ValueError(f"patch must be 2 or 4 pixels, got {patch}")
    if hidden_size % 24:
        raise ValueError(f"hidden size {hidden_size} must be a multiple of 24 (heads of 24 channels)")
    return FluxConfig(
        in_channels=3 * patch * patch,
        out_channels=3 * patch * patch,
        vec_in_dim=CLIP_DIM,
        context_in_dim=T5_DIM,
        hidden_size=hidden_size,
        mlp_ratio=4.0,
        num_heads=hidden_size // 24,
        depth=depth,
        depth_single_blocks=depth_single_blocks,
        axes_dim=(8, 8, 8),
        theta=10_000,
        qkv_bias=True,
        guidance_embed=False,
    )


# ----------------------------------------------------------------------------------------------
# Text side: tiny random T5 and CLIP whose tokenizers know every dataset word as one token


def word_sentencepiece(words: list[str]) -> bytes:
    """A word-level SentencePiece model with T5's special ids (pad 0, </s> 1, <unk> 2): one token per word."""
    import sentencepiece as spm

    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([" ".join(words)] * 20), model_writer=proto, model_type="word",
        vocab_size=len(words) + 3, hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        num_threads=1, minloglevel=2,
    )
    return proto.getvalue()


def build_text_encoders(folder: Path, words: list[str], seed: int = 0) -> None:
    """t5/ and clip/ in the save_pretrained layout, frozen and random.

    T5 uses the library's own (variance-preserving) init with the attention and MLP output weights
    scaled by 0.3: each word keeps its identity while its neighbours still mix in a little, so a word
    encoded alone (a concept) stays close to the same word inside a caption."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

    t5_dir, clip_dir = folder / "t5", folder / "clip"
    t5_dir.mkdir(parents=True, exist_ok=True)
    (t5_dir / "spiece.model").write_bytes(word_sentencepiece(words))
    tokenizer = T5Tokenizer.from_pretrained(t5_dir, local_files_only=True)
    tokenizer.save_pretrained(t5_dir)
    for word in words:
        if len(tokenizer(word, add_special_tokens=False).input_ids) != 1:
            raise RuntimeError(f"the tiny T5 tokenizer splits {word!r}; every dataset word must be one token")
    torch.manual_seed(seed)
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer), d_model=T5_DIM, d_kv=T5_DIM // 4, d_ff=2 * T5_DIM, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=32, feed_forward_proj="gated-gelu",
            dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        )
    )
    with torch.no_grad():
        for name, param in t5.named_parameters():
            if name.endswith((".o.weight", ".wo.weight")):
                param.mul_(0.3)
    t5.save_pretrained(t5_dir)

    clip_dir.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab(words)
    (clip_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    (clip_dir / "merges.txt").write_text("\n".join(["#version: 0.2", *(f"{a} {b}" for a, b in merges)]) + "\n")
    CLIPTokenizer.from_pretrained(clip_dir, local_files_only=True, model_max_length=77).save_pretrained(clip_dir)
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab), hidden_size=CLIP_DIM, intermediate_size=2 * CLIP_DIM, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
            bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
        )
    )
    clip.save_pretrained(clip_dir)


class CaptionEncoder:
    """Frozen T5 + CLIP with a cache: the dataset has only a few hundred distinct captions."""

    def __init__(self, folder: Path):
        self.t5 = T5Embedder(folder / "t5", max_length=T5_MAX_LENGTH, dtype=torch.float32)
        self.clip = CLIPEmbedder(folder / "clip", dtype=torch.float32)
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """captions -> txt (B, T, T5_DIM), y (B, CLIP_DIM)."""
        missing = sorted(set(captions) - set(self.cache))
        if missing:
            for caption, txt, y in zip(missing, self.t5(missing), self.clip(missing)):
                self.cache[caption] = (txt, y)
        return torch.stack([self.cache[c][0] for c in captions]), torch.stack([self.cache[c][1] for c in captions])

    def token_ids(self, captions: list[str]) -> torch.Tensor:
        """(B, T) the T5 token ids of the captions (the tiny tokenizer has one token per word)."""
        return self.t5.tokenize(captions)[0].cpu()

    def concepts(self, words: list[str]) -> torch.Tensor:
        """Each word encoded alone, first output token kept (the authors' choice): (r, T5_DIM)."""
        return self.t5(words)[:, 0]


def to_pixels(images) -> torch.Tensor:
    """PIL RGB images -> (B, 3, H, W) in [-1, 1]."""
    array = np.stack([np.asarray(image, dtype=np.float32) for image in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1.0


def pixel_autoencoder(patch: int) -> IdentityAutoEncoder:
    """The pixel-space 'autoencoder' that makes the transformer's 2x2 patches cover patch x patch pixels."""
    return IdentityAutoEncoder(channels=3, downsample=patch // 2)


def token_shapes(sample: ShapesSample, patch: int) -> torch.Tensor:
    """The class of each image token for the shape loss: 0 background, 1 + SHAPES.index(shape) on an object,
    -100 (no label) where a token's patch x patch pixels straddle an edge; (L,) in the packed token order."""
    classes = np.array([0] + [1 + SHAPES.index(name) for name in sample.class_names[1:]])[sample.mask]
    pixels = rearrange(torch.from_numpy(classes), "(h p) (w q) -> (h w) (p q)", p=patch, q=patch)
    whole = (pixels == pixels[:, :1]).all(1)
    return torch.where(whole, pixels[:, 0], -100)


def word_regions(sample: ShapesSample, token_ids: torch.Tensor, word_ids: dict[int, str], patch: int) -> torch.Tensor:
    """For the grounding loss: (T, L), row i the share of each image token's pixels that lie on what caption
    token i names when it is one of `word_ids`: a shape word all its objects of that shape, a colour word all its
    objects of that colour, the background word the background; zeros for every other token."""
    regions = torch.zeros(len(token_ids), (sample.mask.shape[0] // patch) * (sample.mask.shape[1] // patch))
    for position, token in enumerate(token_ids.tolist()):
        word = word_ids.get(token)
        named = [i for i, name in enumerate(sample.class_names) if name == word]
        named += [i for i, colour in enumerate(sample.colours, start=1) if colour == word]
        if named:
            on = torch.from_numpy(np.isin(sample.mask, named)).float()
            regions[position] = rearrange(on, "(h p) (w q) -> (h w) (p q)", p=patch, q=patch).mean(-1)
    return regions


def grounded_words(recipe: dict) -> tuple[str, ...]:
    """The caption words the recipe's grounding loss grounds (none without one): the shape words, then the
    background words and the colour words when asked."""
    if recipe["grounding_loss"] == 0:
        return ()
    return (*SHAPES, *(BACKGROUND_COLOURS if recipe["ground_background"] else ()),
            *(COLOURS if recipe["ground_colours"] else ()))


def shapes_data(
    encoder: CaptionEncoder, batch_size: int, single_object_steps: int = 0, seed: int = TRAIN_SEED, patch: int = 2,
    shape_labels: bool = False, grounded: tuple[str, ...] = (),
):
    """Batch i = samples i*B .. i*B + B - 1 of the stream `seed`: a pure function of the step. Curriculum: the
    first `single_object_steps` batches show one object per image (each shape word alone with its outline).
    For the auxiliary losses, batches also carry each token's shape (`shape_labels`: `token_shapes`) and the
    regions of the caption words in `grounded` (`word_regions`)."""
    single, mixed = ShapesConfig(two_object_prob=0.0), ShapesConfig()
    autoencoder = pixel_autoencoder(patch)
    word_ids = dict(zip(encoder.token_ids(list(grounded))[:, 0].tolist(), grounded)) if grounded else {}

    def data(step: int) -> Batch:
        config = single if step < single_object_steps else mixed
        samples = [make_sample(seed, step * batch_size + i, config) for i in range(batch_size)]
        txt, y = encoder([s.caption for s in samples])
        labels = torch.stack([token_shapes(s, patch) for s in samples]) if shape_labels else None
        regions = None
        if grounded:
            ids = encoder.token_ids([s.caption for s in samples])
            regions = torch.stack([word_regions(s, i, word_ids, patch) for s, i in zip(samples, ids)])
        return Batch(autoencoder.encode(to_pixels([s.image for s in samples])), txt, y, labels, regions)

    return data


def world_fingerprint(seed: int = TRAIN_SEED, count: int = 16) -> str:
    """SHA-256 of the first `count` samples of the training stream (pixels, masks, captions): a resumed run
    must see the same world it started on, so a change to concept_attention/shapes.py stops it."""
    digest = hashlib.sha256()
    for index in range(count):
        sample = make_sample(seed, index)
        digest.update(np.asarray(sample.image).tobytes() + sample.mask.tobytes() + sample.caption.encode())
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# Exporting a pipeline folder


def export_folder(model: Flux, text_folder: Path, out: Path, dtype: torch.dtype = torch.float32) -> Path:
    """flux1-demo.safetensors + flux_config.json + identity-autoencoder.json + sampling.json + t5/ + clip/."""
    out.mkdir(parents=True, exist_ok=True)
    export_transformer(model, out, "flux1-demo", dtype=dtype)
    patch = math.isqrt(model.config.in_channels // 3)  # 2x2 or 4x4 RGB pixels per token
    pixel_autoencoder(patch).save_json(out / "identity-autoencoder.json")
    sampling = {"t5_max_length": T5_MAX_LENGTH, "num_steps": 16, "width": 32, "height": 32}
    (out / "sampling.json").write_text(json.dumps(sampling) + "\n")
    for name in ("t5", "clip"):
        shutil.copytree(text_folder / name, out / name, dirs_exist_ok=True)
    return out


# ----------------------------------------------------------------------------------------------


def initial_weights(folder: Path, recipe: dict) -> tuple[Flux, str]:
    """The transformer of an export folder (--init-from) and the SHA-256 of its file; refused unless it is the
    architecture the recipe describes."""
    from flux_mini.loading import load_flux

    path = folder / "flux1-demo.safetensors"
    if not path.is_file() or not (folder / "t5").is_dir() or not (folder / "clip").is_dir():
        raise SystemExit(f"error: --init-from {folder} is not a demo export (flux1-demo.safetensors, t5/, clip/)")
    wanted = demo_flux_config(recipe["depth"], recipe["single_depth"], recipe["hidden"], recipe["patch"])
    model = load_flux(path)
    if model.config != wanted:
        raise SystemExit(f"error: --init-from {folder} holds {json.dumps(model.config.to_dict())}, the recipe asks for "
                         f"{json.dumps(wanted.to_dict())}: give the matching --hidden/--depth/--single-depth/--patch")
    return model.float(), hashlib.sha256(path.read_bytes()).hexdigest()


def benchmark_export(folder: Path, num_images: int, seed: int, out: Path, device: str) -> str:
    """The demo benchmark (`concept-attention eval --dataset shapes`) on `num_images` images of stream `seed`,
    with the caption prompt (preset shapes) and the empty prompt (preset shapes-binding): a markdown report."""
    from concept_attention.pipeline import ConceptAttentionPipeline
    from concept_attention.segmentation import EvalConfig, evaluate, get_preset, load_dataset
    from concept_attention.segmentation.evaluate import binding_table, default_methods

    dataset = load_dataset("shapes", f"{num_images}:{seed}")
    pipe = ConceptAttentionPipeline.from_folder(folder, device=device)
    report = [f"# {folder} on shapes {num_images}:{seed}"]
    for preset in ("shapes", "shapes-binding"):
        config = EvalConfig("shapes", get_preset(preset), default_methods(preset))
        summary = evaluate(dataset, pipe, config, out / preset, progress=False, plots=False, device=device)
        report += [f"\n## preset {preset}\n", binding_table(summary, dataset.class_names)]
    return "\n".join(report)


def train_config(recipe: dict, lr: float) -> TrainConfig:
    """The optimisation settings of a recipe; the shape and grounding losses act on every double block (the
    layers whose maps ConceptAttention averages)."""
    double_blocks = tuple(range(recipe["depth"]))
    return TrainConfig(
        batch_size=recipe["batch_size"], lr=lr, ema_decay=0.998, caption_dropout=recipe["caption_dropout"],
        token_loss_weight=recipe["shape_loss"], token_loss_layers=double_blocks, token_classes=1 + len(SHAPES),
        grounding_loss_weight=recipe["grounding_loss"], grounding_layers=double_blocks,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, required=True, help="keep it outside the repository")
    parser.add_argument("--steps", type=int, default=20_000, help="train until this step (resumes if possible)")
    parser.add_argument("--lr", type=float, default=5e-4, help="also applies when resuming")
    parser.add_argument("--checkpoint-every", type=int, default=250)
    parser.add_argument("--export-every", type=int, default=1000, help="write exports/step-NNNNNN/ (EMA weights)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1)
    group = parser.add_argument_group("recipe of a new run (stored in WORK/recipe.json; a resume reads it from there "
                                      "and refuses a flag that differs)")
    group.add_argument("--batch-size", type=int, help=f"default {RECIPE_DEFAULTS['batch_size']}")
    group.add_argument("--hidden", type=int, help=f"default {RECIPE_DEFAULTS['hidden']}")
    group.add_argument("--depth", type=int, help=f"double blocks, default {RECIPE_DEFAULTS['depth']}")
    group.add_argument("--single-depth", type=int, help=f"single blocks, default {RECIPE_DEFAULTS['single_depth']}")
    group.add_argument("--single-object-steps", type=int,
                       help=f"curriculum: one object per image first, default {RECIPE_DEFAULTS['single_object_steps']}")
    group.add_argument("--patch", type=int, choices=(2, 4),
                       help=f"pixels per token side, default {RECIPE_DEFAULTS['patch']}")
    group.add_argument("--caption-dropout", type=float,
                       help="fraction of samples trained on the empty prompt (the shape must then come from the "
                       f"image), default {RECIPE_DEFAULTS['caption_dropout']}")
    group.add_argument("--shape-loss", type=float,
                       help="weight of an auxiliary loss: a linear read-out of the image tokens after every double "
                       "block names the shape under each token (teaches the image stream to recognise shapes), "
                       f"default {RECIPE_DEFAULTS['shape_loss']} (off)")
    group.add_argument("--grounding-loss", type=float,
                       help="weight of an auxiliary loss: each shape word of a caption (and its background and "
                       "colour words, see below) attends (text queries on image keys, every double block) to what it "
                       "names, as TokenCompose's token loss; "
                       f"default {RECIPE_DEFAULTS['grounding_loss']} (off)")
    group.add_argument("--init-from", type=str, metavar="EXPORT",
                       help="start from the weights (and text encoders) of an export folder, e.g. weights/demo, "
                       "instead of a random init: a fine-tuning run; the recipe's architecture must match it")
    group.add_argument("--ground-background", action=argparse.BooleanOptionalAction,
                       help="the grounding loss also grounds the caption's background word on the background, "
                       f"default {RECIPE_DEFAULTS['ground_background']}")
    group.add_argument("--ground-colours", action=argparse.BooleanOptionalAction,
                       help="the grounding loss also grounds the caption's colour words on their objects, "
                       f"default {RECIPE_DEFAULTS['ground_colours']}")
    group = parser.add_argument_group("benchmark")
    group.add_argument("--benchmark-only", action="store_true",
                       help="score --model (an export folder) with the demo benchmark and print the tables")
    group.add_argument("--model", type=Path, help="with --benchmark-only: a pipeline folder (e.g. exports/step-N)")
    group.add_argument("--eval-images", type=int, default=200)
    group.add_argument("--eval-seed", type=int, default=2, help="image stream (training uses 0)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = args.work_dir

    if args.benchmark_only:
        if args.model is None:
            raise SystemExit("error: --benchmark-only needs --model FOLDER (e.g. WORK/exports/step-010000)")
        out = work / "benchmarks" / f"{args.model.resolve().name}-{args.eval_images}-{args.eval_seed}"
        report = benchmark_export(args.model, args.eval_images, args.eval_seed, out, args.device)
        (out / "report.md").write_text(report + "\n")
        print(report)
        return

    recipe_path = work / "recipe.json"
    world = world_fingerprint()
    given = {key: getattr(args, key) for key in RECIPE_DEFAULTS if getattr(args, key) is not None}
    if recipe_path.exists():
        recipe = RECIPE_LEGACY | json.loads(recipe_path.read_text())
        if recipe.get("world") != world:
            raise SystemExit(
                f"error: {work} was started on another version of the shapes world (recipe.json world "
                f"{recipe.get('world', 'not recorded')}, now {world}); resuming would mix two experiments. "
                "Start a new run with a new --work-dir."
            )
        differing = [f"--{key.replace('_', '-')} {value} (recipe.json: {recipe.get(key)})"
                     for key, value in given.items() if value != recipe.get(key)]
        if differing:
            raise SystemExit(f"error: {work} was started with another recipe: {', '.join(differing)}. Drop the flag "
                             "to resume this run, or give a new --work-dir to start one with it.")
    else:
        recipe = RECIPE_DEFAULTS | given | {"world": world}
        try:  # a recipe that cannot be built is refused before anything is written
            demo_flux_config(recipe["depth"], recipe["single_depth"], recipe["hidden"], recipe["patch"])
            train_config(recipe, args.lr)
        except ValueError as error:
            raise SystemExit(f"error: {error}") from None
        if recipe["init_from"] is not None:
            recipe["init_sha256"] = initial_weights(Path(recipe["init_from"]), recipe)[1]
        work.mkdir(parents=True, exist_ok=True)
        recipe_path.write_text(json.dumps(recipe, indent=2) + "\n")
    if not (work / "clip").exists():
        if recipe["init_from"] is None:
            build_text_encoders(work, vocabulary(), seed=0)
        else:  # the model reads words through the encoders it was trained with
            for name in ("t5", "clip"):
                shutil.copytree(Path(recipe["init_from"]) / name, work / name, dirs_exist_ok=True)
    encoder = CaptionEncoder(work)
    checkpoint = work / "checkpoint.pt"
    if checkpoint.exists():
        trainer = Trainer.resume(checkpoint, device=args.device)
        if args.lr != trainer.config.lr:  # e.g. a lower learning rate for the last stretch
            trainer = Trainer.resume(checkpoint, replace(trainer.config, lr=args.lr), device=args.device)
        print(f"resumed at step {trainer.step}, lr {trainer.config.lr}, recipe {json.dumps(recipe)}")
    else:
        torch.manual_seed(0)
        null_txt, null_y = encoder([""])
        config = train_config(recipe, args.lr)
        flux_config = demo_flux_config(recipe["depth"], recipe["single_depth"], recipe["hidden"], recipe["patch"])
        if recipe["init_from"] is None:
            model = zero_init_modulation_(Flux(flux_config))
        else:
            model, digest = initial_weights(Path(recipe["init_from"]), recipe)
            if digest != recipe["init_sha256"]:
                raise SystemExit(f"error: {recipe['init_from']} changed since this run was started (SHA-256 "
                                 f"{digest}, recipe.json {recipe['init_sha256']}); start a new --work-dir")
        model = model.to(args.device)
        trainer = Trainer(model, config, Conditioning(null_txt.to(args.device), null_y.to(args.device)))
    print(f"model {parameter_count(trainer.model)} parameters, {json.dumps(trainer.model.config.to_dict())}")

    def export(trainer: Trainer) -> None:
        if trainer.step % args.export_every and trainer.step != args.steps:
            return
        folder = export_folder(trainer.ema, work, work / "exports" / f"step-{trainer.step:06d}")
        print(f"step {trainer.step}: exported {folder}", flush=True)

    if trainer.step == 0:
        export(trainer)  # the untrained model (weights/demo-untrained)
    data = shapes_data(encoder, trainer.config.batch_size, recipe["single_object_steps"], patch=recipe["patch"],
                       shape_labels=recipe["shape_loss"] > 0, grounded=grounded_words(recipe))
    trainer.fit(data, args.steps, checkpoint, args.checkpoint_every, export)


if __name__ == "__main__":
    main()
