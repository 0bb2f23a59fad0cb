"""flux_mini: a small, exact PyTorch implementation of Flux.1: transformer, autoencoder, sampling."""

from flux_mini.autoencoder import AutoEncoder, AutoEncoderConfig, IdentityAutoEncoder, load_autoencoder
from flux_mini.checkpoint import CheckpointError
from flux_mini.loading import load_flux
from flux_mini.flux1 import Flux, FluxConfig


__all__ = [
    "AutoEncoder",
    "AutoEncoderConfig",
    "CheckpointError",
    "Flux",
    "FluxConfig",
    "FluxPipeline",
    "IdentityAutoEncoder",
    "load_autoencoder",
    "load_flux",
]


def __getattr__(name: str):
    """FluxPipeline on first use: it pulls in the text encoders' libraries, which take seconds to import."""
    if name == "FluxPipeline":
        from flux_mini.pipeline import FluxPipeline

        return FluxPipeline
    raise AttributeError(f"module 'flux_mini' has no attribute {name!r}")
