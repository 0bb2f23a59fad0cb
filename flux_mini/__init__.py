"""flux_mini: a small, exact PyTorch implementation of the Flux.1 transformer and its pipeline."""

from flux_mini.model import Flux, FluxConfig

__all__ = ["Flux", "FluxConfig"]
