"""flux_mini: a small, exact PyTorch implementation of Flux.1 and FLUX.2: transformers, autoencoder, sampling."""

from flux_mini.autoencoder import AutoEncoder, AutoEncoderConfig, IdentityAutoEncoder, load_autoencoder
from flux_mini.checkpoint import CheckpointError
from flux_mini.loading import load_flux
from flux_mini.flux1 import Flux, FluxConfig
from flux_mini.flux2 import Flux2, Flux2Config
from flux_mini.pipeline import FluxPipeline

__all__ = [
    "AutoEncoder",
    "AutoEncoderConfig",
    "CheckpointError",
    "Flux",
    "FluxConfig",
    "Flux2",
    "Flux2Config",
    "FluxPipeline",
    "IdentityAutoEncoder",
    "load_autoencoder",
    "load_flux",
]
