"""Command line: `flux-mini generate --weights DIR --prompt "..." --out image.png`.

The generation (Flux.1 or FLUX.2) is read from the folder. `flux-mini tiny DIR` writes a random tiny model
folder (no download) to try the pipeline on; `--generation flux2` makes it a FLUX.2 one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flux-mini", description="Flux.1 and FLUX.2 text-to-image in plain PyTorch")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="generate an image from a prompt")
    gen.add_argument("--weights", required=True, type=Path, help="model folder (see flux_mini/pipeline.py for layouts)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--out", required=True, type=Path, help="output image file, e.g. image.png")
    gen.add_argument("--width", type=int, default=None, help="multiple of 16; default 1024 (FLUX.2: sampling.json's)")
    gen.add_argument("--height", type=int, default=None)
    gen.add_argument(
        "--steps", type=int, default=None, help="default: 4 for schnell and klein, 50 for dev and klein-base"
    )
    gen.add_argument(
        "--guidance", type=float, default=None, help="dev: embedded, default 3.5 (FLUX.2 4); klein-base: CFG scale, 4"
    )
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    gen.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    gen.add_argument("--offload", action="store_true", help="keep only the running stage on the device")
    gen.add_argument(
        "--variant", choices=["schnell", "dev", "klein", "klein-base"], default=None, help="default: from the folder"
    )
    gen.add_argument("--quiet", action="store_true", help="no progress bar")

    tiny = commands.add_parser("tiny", help="write a random tiny model folder (for trying the pipeline)")
    tiny.add_argument("folder", type=Path)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--guidance-embed", action="store_true", help="a dev-family (guidance-distilled) tiny model")
    tiny.add_argument("--generation", choices=["flux1", "flux2"], default="flux1")
    tiny.add_argument("--base", action="store_true", help="FLUX.2 only: a klein Base (real CFG) tiny model")
    return parser


def generate(args: argparse.Namespace) -> None:
    from flux_mini.flux2_pipeline import Flux2Pipeline, is_flux2_folder
    from flux_mini.pipeline import FluxPipeline

    pipeline = Flux2Pipeline if is_flux2_folder(args.weights) else FluxPipeline
    pipe = pipeline.from_folder(
        args.weights, device=args.device, dtype=DTYPES[args.dtype], offload=args.offload, variant=args.variant
    )
    size = {name: value for name in ("width", "height") if (value := getattr(args, name)) is not None}
    image = pipe(
        args.prompt,
        **size,
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
        elif args.generation == "flux2":
            from flux_mini.tiny import build_tiny_flux2_weights

            variant = "dev" if args.guidance_embed else "klein-base" if args.base else "klein"
            folder = build_tiny_flux2_weights(args.folder, seed=args.seed, variant=variant)
            print(f"wrote a random tiny FLUX.2 {variant} model to {folder}")
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
