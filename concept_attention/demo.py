"""The embedded default model: the trained demo that ships in weights/demo/, or, where it is absent
(an install without the repository's weights/), a tiny random model built on the fly. No downloads."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

DEMO_WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "demo"


@dataclass(frozen=True)
class DemoModel:
    """A model folder and the settings it was made for (`demo.json` beside the weights)."""

    weights: Path
    trained: bool
    image_size: int = 64
    num_steps: int = 4
    prompt: str = "a circle and a square on grass"
    concepts: list[str] = field(default_factory=lambda: ["circle", "square", "grass"])


def demo_model(announce: bool = True) -> DemoModel:
    """The shipped demo model if present, else a tiny random one in a fresh temporary folder."""
    if any(DEMO_WEIGHTS.glob("flux1-*.safetensors")):
        settings = json.loads((DEMO_WEIGHTS / "demo.json").read_text())
        demo = DemoModel(weights=DEMO_WEIGHTS, trained=True, **settings)
        if announce:
            print(f"Using the embedded demo model in {DEMO_WEIGHTS} (pass --weights DIR for the real Flux.1).")
        return demo
    from flux_mini.tiny import build_tiny_weights

    folder = Path(tempfile.mkdtemp(prefix="flux-mini-tiny-random-"))
    build_tiny_weights(folder, seed=0)
    if announce:
        print(
            f"NOTE: no --weights given and no demo model in {DEMO_WEIGHTS}: running on a tiny RANDOM model "
            f"built in {folder}. The pictures show the pipeline working, not learned concepts."
        )
    return DemoModel(weights=folder, trained=False)
