"""`concept-attention generate | encode | eval`: concept maps from the command line.

Without --weights the embedded demo model (weights/demo/) is used; where it is absent (an install
without the repository's weights/), a tiny RANDOM model is built in a temporary folder instead (and
removed afterwards). Unset sizes, steps and guidance come from the model folder, as in `flux-mini`."""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from flux_mini.cli import (
    HelpFormatter,
    add_run_options,
    add_size_options,
    check_output_path,
    positive_int,
    resolve_device,
    resolve_dtype,
)


def add_common(parser: argparse.ArgumentParser, steps: bool) -> None:
    """The options of generate and encode (encode resizes the image to --width x --height)."""
    parser.add_argument("--weights", type=Path, help="model folder (default: the embedded demo model)")
    parser.add_argument("--concepts", nargs="+", required=True, help="concept words, e.g. cat sky grass")
    parser.add_argument("--out", type=Path, required=True, help="output folder for the maps and pictures")
    add_size_options(parser, steps, what="pixels" if steps else "resize the image to this many pixels")
    parser.add_argument("--layers", type=int, nargs="+",
                        help="layer numbers (default: Flux.1 the last 4 double blocks, FLUX.2 every layer)")
    parser.add_argument("--no-softmax", action="store_true", help="average raw scores instead of softmax maps")
    parser.add_argument("--normalize", choices=["linear"], help="linear concept normalisation (default: none)")
    parser.add_argument("--blur", action="store_true", help="3x3 Gaussian blur of the final maps")
    parser.add_argument("--attention", choices=["both", "cross", "self", "none"], default="both",
                        help="what the concept queries attend to")
    parser.add_argument("--concept-encoding", choices=["first_token", "mean", "authors"], default="first_token",
                        help="how a concept word becomes one text vector (authors: FLUX.2's fixed position 510)")
    parser.add_argument("--concept-positions", choices=["zero", "authors"], default="zero",
                        help="FLUX.2 concept RoPE ids: zero, or the authors' (0, 0, 0, 510)")
    parser.add_argument("--overlay", action="store_true", help="draw the maps over the image in the figures")
    add_run_options(parser)


def build_parser() -> argparse.ArgumentParser:
    from concept_attention.segmentation.evaluate import add_eval_arguments

    parser = argparse.ArgumentParser(prog="concept-attention", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser("generate", help="generate an image and its concept maps",
                                   formatter_class=HelpFormatter)
    add_common(generate, steps=True)
    generate.add_argument("--prompt", required=True, help="the text to draw")
    generate.add_argument("--timesteps", type=int, nargs="+", help="denoising steps to average (default: all)")
    encode = commands.add_parser("encode", help="concept maps of an existing image", formatter_class=HelpFormatter)
    add_common(encode, steps=False)
    encode.add_argument("--image", type=Path, required=True, help="the image file (PNG, JPEG, TIFF, ...)")
    encode.add_argument("--prompt", default="", help="caption fed to the text stream")
    encode.add_argument("--noise-timestep", type=int, default=2, help="index into the model's 4-step schedule")
    encode.add_argument("--t", type=float, help="noise time in [0, 1], overrides --noise-timestep")
    encode.add_argument("--num-samples", type=positive_int, default=1, help="noise samples averaged (seed + i)")
    encode.add_argument("--samples", dest="num_samples", type=positive_int, help=argparse.SUPPRESS)  # old spelling
    add_eval_arguments(commands.add_parser("eval", help="zero-shot segmentation benchmark",
                                           formatter_class=HelpFormatter))
    return parser


# ----------------------------------------------------------------------------------------------
# Output files: planned (and checked) before computing, arrays written before pictures


@dataclass(frozen=True)
class OutputFiles:
    folder: Path
    heatmaps: list[Path]  # heatmap_<index>_<slug>.png: unique by construction

    @classmethod
    def plan(cls, folder: Path, concepts: list[str]) -> OutputFiles:
        """Check the folder can be written and name every file, before any model runs."""
        check_output_path(folder / "cross_attention_maps.png")
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"--out {folder} is a file; give a folder for the maps and pictures")
        return cls(folder, [folder / f"heatmap_{i:02d}_{slug(c)}.png" for i, c in enumerate(concepts)])



def slug(concept: str, length: int = 40) -> str:
    """A file-name-safe short form of a concept (letters, digits, - and _)."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", concept).strip("_")[:length] or "concept"


def mathtext_safe(text: str) -> str:
    """matplotlib reads $...$ as mathematics (and fails on `$x^$`): show dollar signs literally."""
    return text.replace("$", r"\$")


def save_outputs(out, files: OutputFiles, title: str, overlay: bool, label: str | None) -> list[Path]:
    """maps.pt and one .npy per space first (the results), then the image and the pictures."""
    import numpy as np
    import torch

    from concept_attention.pictures import concept_grid

    files.folder.mkdir(parents=True, exist_ok=True)
    spaces = {"concept_maps": out.concept_maps, "cross_attention_maps": out.cross_attention_maps,
              "value_maps": out.value_maps}
    folder = files.folder
    torch.save({"concepts": out.concepts, **spaces}, folder / "maps.pt")
    written = [folder / "maps.pt"]
    for name, maps in spaces.items():
        if maps is not None:
            np.save(folder / f"{name}.npy", maps.float().cpu().numpy())  # (concepts, h, w), concepts as in maps.pt
            written.append(folder / f"{name}.npy")
    out.image.save(folder / "image.png")
    written.append(folder / "image.png")
    prefix = f"{label}: " if label else ""
    alpha = 0.5 if overlay else None
    concepts = [mathtext_safe(c) for c in out.concepts]
    figures = {"concept_maps.png": ("ConceptAttention", out.concept_maps),
               "cross_attention_maps.png": ("cross attention", out.cross_attention_maps)}
    for name, (method, maps) in figures.items():
        if maps is not None:
            concept_grid(out.image, maps, concepts, folder / name, overlay_alpha=alpha,
                         title=mathtext_safe(f"{prefix}{method}: {title}"))
            written.append(folder / name)
    for path, picture in zip(files.heatmaps, out.concept_heatmaps):
        picture.save(path)
    return written + files.heatmaps


# ----------------------------------------------------------------------------------------------


def run(args: argparse.Namespace, weights: Path, label: str | None) -> None:
    from concept_attention.encoding import check_concepts
    from concept_attention.images import open_image
    from concept_attention.pipeline import ConceptAttentionPipeline
    from flux_mini.pipeline import quiet_transformers

    concepts = check_concepts(args.concepts)
    files = OutputFiles.plan(args.out, concepts)
    device = resolve_device(args.device)
    image = open_image(args.image) if args.command == "encode" else None
    with quiet_transformers(logging=args.quiet):
        pipe = ConceptAttentionPipeline.from_folder(
            weights, device=device, dtype=resolve_dtype(args.dtype, device), compile=args.compile
        )
    options = dict(
        layer_indices=args.layers, softmax=not args.no_softmax, normalize=args.normalize, blur=args.blur,
        attention=args.attention, concept_encoding=args.concept_encoding, concept_positions=args.concept_positions,
        seed=args.seed, width=args.width,
        height=args.height, guidance=args.guidance, progress=not args.quiet,
    )
    if args.command == "generate":
        out = pipe.generate_image(args.prompt, concepts, num_inference_steps=args.steps, timesteps=args.timesteps,
                                  **options)
        title = args.prompt
    else:
        out = pipe.encode_image(image, concepts, prompt=args.prompt, noise_timestep=args.noise_timestep, t=args.t,
                                num_samples=args.num_samples, **options)
        title = args.image.name
    written = save_outputs(out, files, title, args.overlay, label)
    print(f"wrote {len(written)} files to {files.folder}: " + ", ".join(path.name for path in written))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "eval":
        from concept_attention.segmentation.evaluate import run_eval

        return run_eval(args) or 0
    from concept_attention.demo import embedded_model

    try:
        with embedded_model() if args.weights is None else contextlib.nullcontext() as demo:
            label = demo.label if demo is not None and not demo.trained else None
            if demo is not None and args.layers is None:
                args.layers = demo.layers  # the layers its demo.json names (None: the model's default)
            run(args, args.weights or demo.weights, label)
    except (ValueError, FileNotFoundError) as error:
        print(f"concept-attention: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
