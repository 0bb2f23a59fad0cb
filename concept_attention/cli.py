"""`concept-attention generate | encode | eval`: concept maps from the command line.

Without --weights the embedded demo model (weights/demo/) is used; where it is absent (an install
without the repository's weights/), a tiny RANDOM model is built in a temporary folder instead."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from PIL import Image

from concept_attention.demo import demo_model
from concept_attention.pictures import concept_grid
from concept_attention.pipeline import ConceptAttentionOutput, ConceptAttentionPipeline
from concept_attention.segmentation.evaluate import add_eval_arguments, run_eval

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", type=Path, default=None, help="model folder (default: the embedded demo model)")
    parser.add_argument("--concepts", nargs="+", required=True, help="concept words, e.g. cat sky grass")
    parser.add_argument("--out", type=Path, required=True, help="output folder for PNGs and maps.pt")
    parser.add_argument("--width", type=int, default=None, help="multiple of 16 (default 1024; demo: its native size)")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, nargs="+", default=None, help="layer numbers (default: last 4 double blocks)")
    parser.add_argument("--no-softmax", action="store_true", help="average raw scores instead of softmax maps")
    parser.add_argument("--normalize", choices=["linear"], default=None, help="linear concept normalisation")
    parser.add_argument("--blur", action="store_true", help="3x3 Gaussian blur of the final maps")
    parser.add_argument("--attention", choices=["both", "cross", "self", "none"], default="both")
    parser.add_argument("--concept-encoding", choices=["first_token", "mean"], default="first_token")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="concept-attention", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser("generate", help="generate an image and its concept maps")
    add_common(generate)
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--steps", type=int, default=None, help="denoising steps (default 4; demo: its own)")
    generate.add_argument("--guidance", type=float, default=0.0)
    generate.add_argument("--timesteps", type=int, nargs="+", default=None, help="denoising steps to average (default all)")
    encode = commands.add_parser("encode", help="concept maps of an existing image")
    add_common(encode)
    encode.add_argument("--image", type=Path, required=True)
    encode.add_argument("--prompt", default="")
    encode.add_argument("--noise-timestep", type=int, default=2)
    encode.add_argument("--t", type=float, default=None, help="noise time in [0, 1] (overrides --noise-timestep)")
    encode.add_argument("--samples", type=int, default=1, help="noise samples averaged (seeds seed..seed+n-1)")
    add_eval_arguments(commands.add_parser("eval", help="zero-shot segmentation benchmark"))
    return parser


def save_outputs(out: ConceptAttentionOutput, folder: Path, title: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    out.image.save(folder / "image.png")
    concept_grid(out.image, out.concept_maps, out.concepts, folder / "concept_maps.png", title=f"ConceptAttention: {title}")
    if out.cross_attention_maps is not None:
        concept_grid(out.image, out.cross_attention_maps, out.concepts, folder / "cross_attention_maps.png",
                     title=f"cross attention: {title}")
    for concept, picture in zip(out.concepts, out.concept_heatmaps):
        picture.save(folder / f"heatmap_{concept.replace(' ', '_').replace('/', '_')}.png")
    torch.save(
        {"concepts": out.concepts, "concept_maps": out.concept_maps, "cross_attention_maps": out.cross_attention_maps,
         "value_maps": out.value_maps},
        folder / "maps.pt",
    )
    print(f"wrote {folder / 'image.png'}, {folder / 'concept_maps.png'} and one heatmap per concept")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "eval":
        return run_eval(args) or 0
    demo = demo_model() if args.weights is None else None
    weights, native = (args.weights, 1024) if demo is None else (demo.weights, demo.image_size)
    width, height = args.width or native, args.height or native
    try:
        pipe = ConceptAttentionPipeline.from_folder(weights, device=args.device, dtype=DTYPES[args.dtype])
        options = dict(
            layer_indices=args.layers, softmax=not args.no_softmax, normalize=args.normalize, blur=args.blur,
            attention=args.attention, concept_encoding=args.concept_encoding, seed=args.seed,
        )
        if args.command == "generate":
            out = pipe.generate_image(
                args.prompt, args.concepts, width=width, height=height,
                num_inference_steps=args.steps or (demo.num_steps if demo else 4),
                guidance=args.guidance, timesteps=args.timesteps, **options,
            )
            save_outputs(out, args.out, args.prompt)
        else:
            image = Image.open(args.image)
            out = pipe.encode_image(
                image, args.concepts, prompt=args.prompt, noise_timestep=args.noise_timestep, t=args.t,
                num_samples=args.samples, width=args.width, height=args.height, **options,
            )
            save_outputs(out, args.out, args.image.name)
    except (ValueError, FileNotFoundError) as error:
        print(f"concept-attention: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
