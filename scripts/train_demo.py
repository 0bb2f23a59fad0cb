"""Train the embedded demo model (weights/demo/): a tiny pixel-space Flux on the procedural shapes dataset.

The exact recipe of the shipped model. A run keeps everything in --work-dir: text encoders (t5/, clip/),
`checkpoint.pt` (model, EMA, optimizer, step, RNG: resumable), `benchmark.jsonl` (ConceptAttention vs
cross-attention vs predict-background on held-out images, every --eval-every steps) and
`exports/step-NNNNNN/`, at every benchmark a folder FluxPipeline.from_folder loads (EMA weights).

    PYTHONPATH=. python scripts/train_demo.py --work-dir /work/demo-training --steps 20000   # new or resumed
    PYTHONPATH=. python scripts/train_demo.py --work-dir /work/demo-training --benchmark-only
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from concept_attention.maps import compute_concept_maps
from concept_attention.shapes import ShapesConfig, make_sample, vocabulary
from flux_mini.autoencoder import IdentityAutoEncoder
from flux_mini.loading import load_flux
from flux_mini.flux1 import Flux, FluxConfig
from flux_mini.sampling import image_ids, pack, text_ids
from flux_mini.text_encoders import CLIPEmbedder, T5Embedder
from flux_mini.tiny import clip_vocab
from flux_mini.train import (
    Batch, Conditioning, Trainer, TrainConfig, export_transformer, parameter_count, zero_init_modulation_,
)

T5_DIM, CLIP_DIM, T5_MAX_LENGTH = 64, 32, 12
TRAIN_SEED, HELD_OUT_SEED = 0, 1  # dataset streams: training images never appear in the benchmark


def demo_flux_config(depth: int = 4, depth_single_blocks: int = 1) -> FluxConfig:
    """1.6M parameters: 4 double blocks (where ConceptAttention reads) and 1 single block; hidden 96 so
    that a step takes well under a second on one core."""
    return FluxConfig(
        in_channels=12,  # 2x2 patches of RGB pixels
        out_channels=12,
        vec_in_dim=CLIP_DIM,
        context_in_dim=T5_DIM,
        hidden_size=96,
        mlp_ratio=4.0,
        num_heads=4,
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

    def concepts(self, words: list[str]) -> torch.Tensor:
        """Each word encoded alone, first output token kept (the authors' choice): (r, T5_DIM)."""
        return self.t5(words)[:, 0]


def to_pixels(images) -> torch.Tensor:
    """PIL RGB images -> (B, 3, H, W) in [-1, 1]."""
    array = np.stack([np.asarray(image, dtype=np.float32) for image in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1.0


def shapes_data(encoder: CaptionEncoder, batch_size: int, seed: int = TRAIN_SEED):
    """Batch i = samples i*B .. i*B + B - 1 of the stream `seed`: a pure function of the step."""

    def data(step: int) -> Batch:
        samples = [make_sample(seed, step * batch_size + i) for i in range(batch_size)]
        txt, y = encoder([s.caption for s in samples])
        return Batch(to_pixels([s.image for s in samples]), txt, y)

    return data


# ----------------------------------------------------------------------------------------------
# The benchmark: encode mode, exact masks


CLASSES = ("background", *ShapesConfig().shapes)  # scored classes; every background word counts as background


@torch.no_grad()
def benchmark(
    model: Flux, encoder: CaptionEncoder, num_images: int = 50, t: float = 0.5, layers: list[int] | None = None
) -> dict:
    """Pooled pixel accuracy and mIoU over (background, circle, square, triangle) on held-out images.

    Encode mode as in the paper: x_t = (1 - t) x0 + t noise, empty prompt, y = 0, one forward pass, maps
    averaged over `layers` (default: all double blocks), softmax over concepts. Concepts = every background
    word and every shape word (no oracle): a pixel counts as background when a background word wins."""
    config = ShapesConfig()
    words = [*config.backgrounds, *config.shapes]
    to_class = torch.tensor([0] * len(config.backgrounds) + list(range(1, len(config.shapes) + 1)))
    samples = [make_sample(HELD_OUT_SEED, i) for i in range(num_images)]
    x0 = to_pixels([s.image for s in samples])
    b, _, h, w = x0.shape
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1234))
    img = pack((1 - t) * x0 + t * noise)
    null_txt, _ = encoder([""])
    txt = null_txt.expand(b, -1, -1)
    concept_txt = encoder.concepts(words)[None].expand(b, -1, -1)
    args = (img, image_ids(b, h // 2, w // 2), txt, text_ids(b, txt.shape[1]), torch.full((b,), t))
    y = torch.zeros(b, model.config.vec_in_dim)
    truth = torch.stack([torch.from_numpy(_class_mask(s, config)) for s in samples])  # (B, H, W)

    results = {"predict_background": _scores(torch.zeros_like(truth), truth)}
    for name, space in (("concept_attention", "output"), ("cross_attention", "cross_attention")):
        maps = compute_concept_maps(model, *args, y, concept_txt, layers=layers, space=space)  # (B, r, N)
        maps = maps.reshape(b, len(words), h // 2, w // 2)
        maps = F.interpolate(maps, size=(h, w), mode="nearest")
        predicted = to_class[maps.argmax(dim=1)]
        results[name] = _scores(predicted, truth)
    return results


def benchmark_table(model: Flux, encoder: CaptionEncoder, num_images: int) -> str:
    """Markdown rows: the tracked protocol (all double blocks), the last two double blocks (as the paper
    reads Flux's last ones) and the single-block extension; pixel accuracy / mIoU, then per-class IoU."""
    depth = model.config.depth
    settings = {
        f"double blocks 0-{depth - 1}": None,
        f"double blocks {depth - 2}-{depth - 1}": [depth - 2, depth - 1],
        f"all {model.config.num_layers} blocks (single-block extension)": list(range(model.config.num_layers)),
    }
    header = "| layers | method | pixel acc. | mIoU | " + " | ".join(CLASSES) + " |"
    rows = [header, "|---|---|---|---|" + "---|" * len(CLASSES)]
    for label, layers in settings.items():
        for method, r in benchmark(model, encoder, num_images, layers=layers).items():
            ious = " | ".join(f"{r['iou'][c]:.3f}" for c in CLASSES)
            rows.append(f"| {label} | {method} | {r['pixel_accuracy']:.3f} | {r['miou']:.3f} | {ious} |")
    return "\n".join(rows)


def _class_mask(sample, config: ShapesConfig) -> np.ndarray:
    """The sample's labels mapped to CLASSES indices."""
    lookup = np.array([0] + [1 + config.shapes.index(n) for n in sample.class_names[1:]])
    return lookup[sample.mask]


def _scores(predicted: torch.Tensor, truth: torch.Tensor) -> dict:
    ious = {}
    for k, name in enumerate(CLASSES):
        p, g = predicted == k, truth == k
        union = (p | g).sum().item()
        ious[name] = (p & g).sum().item() / union if union else float("nan")
    return {
        "pixel_accuracy": (predicted == truth).float().mean().item(),
        "miou": float(np.nanmean(list(ious.values()))),
        "iou": ious,
    }


# ----------------------------------------------------------------------------------------------
# Exporting a pipeline folder


def export_folder(model: Flux, text_folder: Path, out: Path, dtype: torch.dtype = torch.float32) -> Path:
    """flux1-demo.safetensors + flux_config.json + identity-autoencoder.json + sampling.json + t5/ + clip/."""
    out.mkdir(parents=True, exist_ok=True)
    export_transformer(model, out, "flux1-demo", dtype=dtype)
    IdentityAutoEncoder(channels=3).save_json(out / "identity-autoencoder.json")
    (out / "sampling.json").write_text(json.dumps({"t5_max_length": T5_MAX_LENGTH, "num_steps": 16, "width": 32, "height": 32}) + "\n")
    for name in ("t5", "clip"):
        shutil.copytree(text_folder / name, out / name, dirs_exist_ok=True)
    return out


# ----------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=20_000, help="train until this step (resumes if possible)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-4, help="also applies when resuming")
    parser.add_argument("--checkpoint-every", type=int, default=250)
    parser.add_argument("--eval-every", type=int, default=1000)
    parser.add_argument("--eval-images", type=int, default=50)
    parser.add_argument("--depth", type=int, default=4, help="double blocks (new runs only)")
    parser.add_argument("--single-depth", type=int, default=1, help="single blocks (new runs only)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--benchmark-only", action="store_true", help="print a table for the EMA (or --model)")
    parser.add_argument("--model", type=Path, help="with --benchmark-only: a flux1-*.safetensors to score instead")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    work = args.work_dir
    if not (work / "t5").exists():
        build_text_encoders(work, vocabulary(), seed=0)
    encoder = CaptionEncoder(work)
    checkpoint = work / "checkpoint.pt"
    if checkpoint.exists():
        trainer = Trainer.resume(checkpoint)
        if args.lr != trainer.config.lr:  # e.g. a lower learning rate for the last stretch
            trainer = Trainer.resume(checkpoint, replace(trainer.config, lr=args.lr))
        print(f"resumed at step {trainer.step}, lr {trainer.config.lr}")
    else:
        torch.manual_seed(0)
        null_txt, null_y = encoder([""])
        config = TrainConfig(batch_size=args.batch_size, lr=args.lr, ema_decay=0.998)
        model = zero_init_modulation_(Flux(demo_flux_config(args.depth, args.single_depth)))
        trainer = Trainer(model, config, Conditioning(null_txt, null_y))
    print(f"model {parameter_count(trainer.model)} parameters, {json.dumps(trainer.model.config.to_dict())}")

    def evaluate(trainer: Trainer) -> None:
        if trainer.step % args.eval_every and trainer.step != args.steps and not args.benchmark_only:
            return
        start = time.time()
        scores = benchmark(trainer.ema, encoder, args.eval_images)
        record = {"step": trainer.step, "seconds": round(time.time() - start, 1), **scores}
        with open(work / "benchmark.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps({k: (v if not isinstance(v, dict) else {kk: vv for kk, vv in v.items() if kk != "iou"})
                          for k, v in record.items()}), flush=True)
        export_folder(trainer.ema, work, work / "exports" / f"step-{trainer.step:06d}")

    if args.benchmark_only:
        model = trainer.ema if args.model is None else load_flux(args.model)
        print(benchmark_table(model, encoder, args.eval_images))
        return
    if trainer.step == 0:
        evaluate(trainer)  # the untrained model, for the table
    data = shapes_data(encoder, trainer.config.batch_size)
    trainer.fit(data, args.steps, checkpoint, args.checkpoint_every, evaluate)


if __name__ == "__main__":
    main()
