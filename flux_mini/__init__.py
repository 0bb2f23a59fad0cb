"""flux_mini: a small, exact PyTorch implementation of Flux.1 and FLUX.3: transformers, autoencoder, sampling."""

from flux_mini.autoencoder import AutoEncoder, AutoEncoderConfig, IdentityAutoEncoder, load_autoencoder
from flux_mini.checkpoint import CheckpointError
from flux_mini.loading import load_flux
from flux_mini.flux1 import Flux, FluxConfig
from flux_mini.flux3 import Flux3, Flux3Config
from flux_mini.pipeline import FluxPipeline

__all__ = [
    "AutoEncoder",
    "AutoEncoderConfig",
    "CheckpointError",
    "Flux",
    "FluxConfig",
    "Flux3",
    "Flux3Config",
    "FluxPipeline",
    "IdentityAutoEncoder",
    "load_autoencoder",
    "load_flux",
]
