"""Command line: `flux-mini generate --weights DIR --prompt "..." --out image.png`.

`flux-mini tiny DIR` writes a random tiny model folder (no download) to try the pipeline on; `--generation flux2`
(flux3) makes it a FLUX.2 (FLUX.3) one. `generate` reads the generation (Flux.1, FLUX.2 or FLUX.3) from the folder;
`--reference IMAGE` (repeatable) conditions a FLUX.2 or FLUX.3 model on reference images (an edit). The argument helpers
below are shared with `concept-attention`, so both CLIs speak one vocabulary: --weights --prompt --out --width
--height --steps --guidance --seed --device --dtype --quiet, with unset sizes, steps and guidance read from the
model folder (its sampling.json, else the variant's).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FROM_FOLDER = "(default: from the model folder)"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows every default; an unset (None) default's help text says itself where it comes from."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


# ----------------------------------------------------------------------------------------------
# Argument types and options shared by both CLIs


def seed_type(text: str) -> int:
    """An integer in [0, 2**32): torch's CPU generator keeps only a seed's low 32 bits."""
    try:
        seed = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer seed (0 <= seed < 2**32)") from None
    if not 0 <= seed < 2**32:
        raise argparse.ArgumentTypeError(f"seed {seed} is outside 0 <= seed < 2**32 (larger seeds repeat smaller ones)")
    return seed


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not >= 1")
    return value


def add_size_options(parser: argparse.ArgumentParser, steps: bool = True, what: str = "pixels") -> None:
    """--width --height (--steps --guidance): unset, the model folder's (sampling.json, else the variant's)."""
    parser.add_argument("--width", type=positive_int, help=f"{what}, a multiple of 16 {FROM_FOLDER}")
    parser.add_argument("--height", type=positive_int, help=f"{what}, a multiple of 16 {FROM_FOLDER}")
    if steps:
        parser.add_argument("--steps", type=positive_int, help=f"denoising steps {FROM_FOLDER}: schnell 4, dev 50")
    parser.add_argument("--guidance", type=float, help=f"guidance-distilled (dev) models only {FROM_FOLDER}: 3.5")


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """--seed, --device, --dtype, --compile and --quiet, with the same meaning and defaults in both CLIs."""
    parser.add_argument("--seed", type=seed_type, default=0, help="integer in [0, 2**32); sample i uses seed + i")
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N, mps")
    parser.add_argument(
        "--dtype", choices=["auto", *DTYPES], default="auto", help="auto: bfloat16 on a GPU, float32 on the CPU"
    )
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the transformer (and the concept-map pass): faster steps on a GPU after "
                             "a first call that compiles (minutes at full size)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars and no library logging")
    parser.add_argument("--no-progress", dest="quiet", action="store_true", help=argparse.SUPPRESS)  # old spelling


def resolve_device(name: str) -> torch.device:
    """--device -> a torch.device this build of torch can use; one-line error naming the flag otherwise."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this torch build sees no CUDA GPU; use --device cpu (or a CUDA build)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA devices")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available on this machine; use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {name}: unsupported device type; use auto, cpu, cuda, cuda:N or mps")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    return DTYPES[name]


def check_output_path(path: Path, flag: str = "--out") -> None:
    """Refuse, before any computing, an output path that cannot be written: a name too long for the file
    system, a parent that is a file, a folder without write permission."""
    limit = 255  # NAME_MAX of the common file systems (ext4, APFS, NTFS)
    for part in path.parts:
        if len(os.fsencode(part)) > limit:
            raise ValueError(f"{flag}: the name {part[:40]}... is {len(os.fsencode(part))} bytes; at most {limit} fit")
    ancestor = path.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"{flag} {path}: {ancestor} is a file, not a folder; choose another path")
    if not os.access(ancestor, os.W_OK):
        raise ValueError(f"{flag} {path}: no permission to write in {ancestor}; choose another path")


def check_image_path(path: Path, flag: str = "--out") -> None:
    """An image file to write: not a folder, with an extension PIL can save (.png, .jpg, ...)."""
    from PIL import Image

    check_output_path(path, flag)
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder; give an image file name, e.g. {path / 'image.png'}")
    extensions = Image.registered_extensions()
    if path.suffix.lower() not in extensions or extensions[path.suffix.lower()] not in Image.SAVE:
        raise ValueError(f"{flag} {path}: the name needs an image extension such as .png or .jpg")


# ----------------------------------------------------------------------------------------------
# flux-mini


def build_parser() -> argparse.ArgumentParser:
    description = "Flux.1, FLUX.2 and FLUX.3 image generation in plain PyTorch"
    parser = argparse.ArgumentParser(prog="flux-mini", description=description)
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="generate an image from a prompt", formatter_class=HelpFormatter)
    gen.add_argument("--weights", required=True, type=Path, help="model folder (see flux_mini/pipeline.py for layouts)")
    gen.add_argument("--prompt", required=True, help="the text to draw")
    gen.add_argument("--out", required=True, type=Path, help="output image file, e.g. image.png")
    add_size_options(gen)
    add_run_options(gen)
    gen.add_argument("--offload", action="store_true", help="keep only the running stage on the device")
    gen.add_argument(
        "--variant",
        choices=["schnell", "dev", "klein", "klein-base", "klein-kv", "flux3-klein", "flux3-klein-base"],
        help="(default: from the model folder)",
    )
    gen.add_argument("--reference", type=Path, action="append",
                     help="FLUX.2 / FLUX.3: a reference image to edit or draw from (repeat for several; FLUX.3 takes "
                          "up to 10)")

    tiny = commands.add_parser("tiny", help="write a random tiny model folder (to try the commands)",
                               formatter_class=HelpFormatter)
    tiny.add_argument("folder", type=Path, help="where to write it")
    tiny.add_argument("--seed", type=seed_type, default=0, help="seed of the random weights")
    tiny.add_argument("--guidance-embed", action="store_true", help="a dev-family (guidance-distilled) tiny model")
    tiny.add_argument("--generation", choices=["flux1", "flux2", "flux3"], default="flux1")
    tiny.add_argument("--base", action="store_true", help="FLUX.2 / FLUX.3 only: a Base (real CFG) tiny model")
    return parser


def generate(args: argparse.Namespace) -> None:
    from flux_mini import flux2_pipeline, flux3_pipeline
    from flux_mini.flux2_pipeline import Flux2Pipeline, is_flux2_folder
    from flux_mini.flux3_pipeline import Flux3Pipeline, is_flux3_folder
    from flux_mini.pipeline import FluxPipeline, quiet_transformers

    check_image_path(args.out)
    device = resolve_device(args.device)
    pipeline = (Flux3Pipeline if is_flux3_folder(args.weights) else
                Flux2Pipeline if is_flux2_folder(args.weights) else FluxPipeline)  # fmt: skip
    if args.reference and pipeline is FluxPipeline:
        raise ValueError("--reference needs a FLUX.2 or FLUX.3 model folder (Flux.1 generates from text here)")
    references = [_open_image(path) for path in args.reference or []]
    if references:  # a bad reference is refused before minutes of loading
        {Flux2Pipeline: flux2_pipeline, Flux3Pipeline: flux3_pipeline}[pipeline].check_references(references)
    with quiet_transformers(logging=args.quiet):
        pipe = pipeline.from_folder(
            args.weights, device=device, dtype=resolve_dtype(args.dtype, device), offload=args.offload,
            variant=args.variant, compile=args.compile,
        )
    image = pipe(
        args.prompt,
        width=args.width,
        height=args.height,
        num_steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        progress=not args.quiet,
        **(dict(references=references) if references else {}),
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    image.save(args.out)
    print(f"wrote {args.out} ({image.width}x{image.height}, {pipe.variant}, seed {args.seed})")


def _open_image(path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(path)
        image.load()  # read now, keeping the file name for the pipeline's messages
        return image
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"--reference {path}: not a readable image ({type(e).__name__})") from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            generate(args)
        elif args.generation == "flux3":
            from flux_mini.tiny import build_tiny_flux3_weights

            folder = build_tiny_flux3_weights(args.folder, seed=args.seed, base=args.base)
            what = "FLUX.3 Base" if args.base else "FLUX.3"
            print(f"wrote a random tiny {what} model to {folder}; try: flux-mini generate --weights {folder} "
                  f"--prompt \"a red cat\" --out tiny.png")
        elif args.generation == "flux2":
            from flux_mini.tiny import build_tiny_flux2_weights

            variant = "dev" if args.guidance_embed else "klein-base" if args.base else "klein"
            folder = build_tiny_flux2_weights(args.folder, seed=args.seed, variant=variant)
            print(f"wrote a random tiny FLUX.2 {variant} model to {folder}; try: flux-mini generate --weights "
                  f"{folder} --prompt \"a red cat\" --out tiny.png")
        else:
            from flux_mini.tiny import build_tiny_weights

            folder = build_tiny_weights(args.folder, seed=args.seed, guidance_embed=args.guidance_embed)
            print(f"wrote a random tiny model to {folder}; try: flux-mini generate --weights {folder} "
                  f"--prompt \"a red circle\" --out tiny.png")
    except (FileNotFoundError, ValueError) as e:  # bad input: one readable line, no traceback
        print(f"flux-mini: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
