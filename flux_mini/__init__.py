"""flux_mini: small, exact PyTorch Flux.1, FLUX.2 and FLUX.3: transformers, autoencoders, sampling."""

from flux_mini.autoencoder import AutoEncoder, AutoEncoderConfig, IdentityAutoEncoder, load_autoencoder
from flux_mini.autoencoder_flux2 import Flux2AutoEncoder, Flux2AutoEncoderConfig, load_flux2_autoencoder
from flux_mini.checkpoint import CheckpointError
from flux_mini.loading import load_flux
from flux_mini.flux1 import Flux, FluxConfig
from flux_mini.flux2 import Flux2, Flux2Config
from flux_mini.flux3 import Flux3, Flux3Config

__all__ = [
    "AutoEncoder",
    "AutoEncoderConfig",
    "CheckpointError",
    "Flux",
    "FluxConfig",
    "Flux2",
    "Flux2AutoEncoder",
    "Flux2AutoEncoderConfig",
    "Flux2Config",
    "Flux2Pipeline",
    "Flux3",
    "Flux3Config",
    "Flux3Pipeline",
    "FluxPipeline",
    "IdentityAutoEncoder",
    "load_autoencoder",
    "load_flux",
    "load_flux2_autoencoder",
]


def __getattr__(name: str):
    """The pipelines on first use: they pull in the text encoders' libraries, which take seconds to import."""
    if name == "FluxPipeline":
        from flux_mini.pipeline import FluxPipeline

        return FluxPipeline
    if name == "Flux2Pipeline":
        from flux_mini.flux2_pipeline import Flux2Pipeline

        return Flux2Pipeline
    if name == "Flux3Pipeline":
        from flux_mini.flux3_pipeline import Flux3Pipeline

        return Flux3Pipeline
    raise AttributeError(f"module 'flux_mini' has no attribute {name!r}")
