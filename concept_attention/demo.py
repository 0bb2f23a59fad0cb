"""The embedded default model: the trained demo that ships in weights/demo/, or, where it is absent
(an install without the repository's weights/), a tiny random model built on the fly. No downloads."""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

DEMO_WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "demo"
GET_THE_DEMO = "for the trained demo model run from a clone of the repository (weights/demo/ ships with it)"


@dataclass(frozen=True)
class DemoModel:
    """A model folder, its size and steps (from its sampling.json, the one source of a folder's defaults)
    and the prompt, concepts and map layers it was made for (demo.json; layers None: the model's default)."""

    weights: Path
    trained: bool
    image_size: int
    num_steps: int
    prompt: str = "a circle and a square on grass"
    concepts: list[str] = field(default_factory=lambda: ["circle", "square", "grass"])
    layers: list[int] | None = None

    @property
    def label(self) -> str:
        """What figures of this model say about it."""
        return "demo model" if self.trained else "random model (untrained)"


def _folder_size_and_steps(folder: Path) -> dict:
    from flux_mini.pipeline import read_sampling_defaults

    defaults = read_sampling_defaults(folder)
    return {"image_size": defaults.width, "num_steps": defaults.num_steps}


def demo_model(announce: bool = True, folder: Path = DEMO_WEIGHTS) -> DemoModel:
    """The shipped demo model (in `folder`) if present, else a tiny random one in a fresh temporary folder
    (which the caller removes; `embedded_model()` does so)."""
    if any(folder.glob("flux1-*.safetensors")):
        settings = json.loads((folder / "demo.json").read_text())
        demo = DemoModel(weights=folder, trained=True, **_folder_size_and_steps(folder), **settings)
        if announce:
            layers = f", maps of layers {' '.join(map(str, demo.layers))} unless --layers" if demo.layers else ""
            print(f"Using the embedded demo model in {folder}{layers} (pass --weights DIR for the real Flux.1).")
        return demo
    from flux_mini.tiny import build_tiny_weights

    scratch = Path(tempfile.mkdtemp(prefix="flux-mini-tiny-random-"))
    build_tiny_weights(scratch, seed=0)
    if announce:
        print(
            f"NOTE: no --weights given and no demo model in {folder}: running on a tiny RANDOM model "
            f"built in the temporary folder {scratch} (removed afterwards). The pictures show the pipeline "
            f"working, not learned concepts; {GET_THE_DEMO}, or pass --weights DIR."
        )
    return DemoModel(weights=scratch, trained=False, **_folder_size_and_steps(scratch))


@contextlib.contextmanager
def embedded_model(announce: bool = True, folder: Path = DEMO_WEIGHTS) -> Iterator[DemoModel]:
    """demo_model() for the length of a `with` block; a random model's temporary folder is removed after it."""
    demo = demo_model(announce, folder)
    try:
        yield demo
    finally:
        if not demo.trained:
            shutil.rmtree(demo.weights, ignore_errors=True)
