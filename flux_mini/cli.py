"""Command line: `flux-mini generate --weights DIR --prompt "..." --out image.png`.

`flux-mini tiny DIR` writes a random tiny model folder (no download) to try the pipeline on.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flux-mini", description="Flux.1 text-to-image in plain PyTorch")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="generate an image from a prompt")
    gen.add_argument("--weights", required=True, type=Path, help="model folder (see flux_mini/pipeline.py for layouts)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--out", required=True, type=Path, help="output image file, e.g. image.png")
    gen.add_argument("--width", type=int, default=1024, help="multiple of 16 (of 2 x the AE downsample factor)")
    gen.add_argument("--height", type=int, default=1024)
    gen.add_argument("--steps", type=int, default=None, help="default: 4 for schnell, 50 for dev")
    gen.add_argument("--guidance", type=float, default=None, help="dev family only; default 3.5")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    gen.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    gen.add_argument("--offload", action="store_true", help="keep only the running stage on the device")
    gen.add_argument("--variant", choices=["schnell", "dev"], default=None, help="default: from the checkpoint")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")

    tiny = commands.add_parser("tiny", help="write a random tiny model folder (for trying the pipeline)")
    tiny.add_argument("folder", type=Path)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--guidance-embed", action="store_true", help="a dev-family (guidance-distilled) tiny model")
    return parser


def generate(args: argparse.Namespace) -> None:
    from flux_mini.pipeline import FluxPipeline

    pipe = FluxPipeline.from_folder(
        args.weights, device=args.device, dtype=DTYPES[args.dtype], offload=args.offload, variant=args.variant
    )
    image = pipe(
        args.prompt,
        width=args.width,
        height=args.height,
        num_steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        progress=not args.quiet,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    image.save(args.out)
    print(f"wrote {args.out} ({image.width}x{image.height}, {pipe.variant}, seed {args.seed})")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            generate(args)
        else:
            from flux_mini.tiny import build_tiny_weights

            folder = build_tiny_weights(args.folder, seed=args.seed, guidance_embed=args.guidance_embed)
            print(f"wrote a random tiny model to {folder}")
    except (FileNotFoundError, ValueError) as e:  # bad input: one readable line, no traceback
        print(f"flux-mini: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
