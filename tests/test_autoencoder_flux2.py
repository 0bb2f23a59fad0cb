"""The FLUX.2 autoencoder against the official key dump and diffusers' AutoencoderKLFlux2 (spec flux2 §5)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from flux_mini.autoencoder import AutoEncoder, AutoEncoderConfig, load_autoencoder
from flux_mini.autoencoder_flux2 import (
    Flux2AutoEncoder,
    Flux2AutoEncoderConfig,
    flux2_bfl_to_diffusers,
    flux2_diffusers_to_bfl,
    load_flux2_autoencoder,
    patchify,
    unpatchify,
)
from flux_mini.checkpoint import CheckpointError
from flux_mini.tiny import randomize_

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKLFlux2  # noqa: E402
from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline as DiffusersFlux2Pipeline  # noqa: E402

DATA = Path(__file__).parent / "data"
# Four levels with distinct widths and f = 8 (16 pixels per token), as the official AE, but narrow.
TINY = Flux2AutoEncoderConfig(ch=32, ch_mult=(1, 2, 3, 3), num_res_blocks=1, z_channels=4)
SIZES = [(48, 80), (16, 48)]  # token grids 3 x 5 and 1 x 3: odd, non-square


def diffusers_config(config: Flux2AutoEncoderConfig) -> dict:
    levels = len(config.ch_mult)
    return dict(
        in_channels=config.in_channels,
        out_channels=config.out_ch,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(config.ch * m for m in config.ch_mult),
        layers_per_block=config.num_res_blocks,
        latent_channels=config.z_channels,
        norm_num_groups=32,
        batch_norm_eps=config.bn_eps,
    )


def shapes(state: dict) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in state.items()}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_ae() -> Flux2AutoEncoder:
    model = randomize_(Flux2AutoEncoder(TINY), seed=1, std=0.1).eval()
    g = torch.Generator().manual_seed(5)  # statistics far from (0, 1), so skipping or swapping them shows
    model.bn.running_mean.copy_(torch.randn(TINY.latent_channels, generator=g))
    model.bn.running_var.copy_(torch.rand(TINY.latent_channels, generator=g) * 3 + 0.01)
    return model


@pytest.fixture(scope="module")
def reference(tiny_ae) -> AutoencoderKLFlux2:
    model = AutoencoderKLFlux2(**diffusers_config(TINY)).eval()
    model.load_state_dict(flux2_bfl_to_diffusers(dict(tiny_ae.state_dict())), strict=True)  # BN fills its counter
    return model


def images(size, batch=2, seed=2):
    return torch.rand(batch, 3, *size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def diffusers_encode(reference: AutoencoderKLFlux2, x):
    """The diffusers pipelines' recipe: posterior mode, their patchify, their BatchNorm module in eval mode."""
    mode = reference.encode(x).latent_dist.mode()
    return reference.bn(DiffusersFlux2Pipeline._patchify_latents(mode))


def diffusers_decode(reference: AutoencoderKLFlux2, z):
    std = torch.sqrt(reference.bn.running_var.view(1, -1, 1, 1) + reference.config.batch_norm_eps)
    latent = z * std + reference.bn.running_mean.view(1, -1, 1, 1)
    return reference.decode(DiffusersFlux2Pipeline._unpatchify_latents(latent)).sample


# ----------------------------------------------------------------------------------------------
# Structure


def test_official_structure_matches_spec_dump():
    spec = json.loads((DATA / "flux-keys-flux2-ae.json").read_text())
    params = dict(spec["params"])
    assert params.pop("patch_size") == [2, 2] and params.pop("bn_momentum") == 0.1
    assert Flux2AutoEncoderConfig(**params) == Flux2AutoEncoderConfig()
    with torch.device("meta"):
        model = Flux2AutoEncoder(Flux2AutoEncoderConfig())
    state = model.state_dict()
    assert shapes(state) == {name: tuple(shape) for name, shape in spec["keys"].items()}
    assert sum(t.numel() for n, t in state.items() if not n.startswith("bn.")) == 84_046_115
    assert model.latent_channels == 128 and model.downsample_factor == 16


def test_mapping_matches_a_fresh_diffusers_model_at_official_size():
    with torch.device("meta"):
        bfl = dict(Flux2AutoEncoder(Flux2AutoEncoderConfig()).state_dict())
        fresh = AutoencoderKLFlux2().state_dict()
    fresh.pop("bn.num_batches_tracked")
    ours = flux2_bfl_to_diffusers(bfl)
    assert len(ours) == 250 and shapes(ours) == shapes(fresh)
    assert shapes(flux2_diffusers_to_bfl(ours)) == shapes(bfl)


def test_patchify_order_matches_the_spec_vector():
    mean = torch.arange(32 * 4 * 6, dtype=torch.float32).reshape(1, 32, 4, 6)  # mean[0, c, y, x] = c*24 + y*6 + x
    z = patchify(mean)
    assert z.shape == (1, 128, 2, 3)
    assert z[0, :6, 0, 0].tolist() == [0, 1, 6, 7, 24, 25]
    assert z[0, :4, 0, 1].tolist() == [2, 3, 8, 9]
    assert torch.equal(unpatchify(z), mean)


# ----------------------------------------------------------------------------------------------
# Numerical parity with diffusers


@torch.no_grad()
@pytest.mark.parametrize("size", SIZES)
def test_encode_matches_diffusers(tiny_ae, reference, size):
    x = images(size)
    ours, theirs = tiny_ae.encode(x), diffusers_encode(reference, x)
    assert ours.shape == (2, 16, size[0] // 16, size[1] // 16)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * theirs.abs().max().item())


@torch.no_grad()
@pytest.mark.parametrize("size", SIZES)
def test_decode_matches_diffusers(tiny_ae, reference, size):
    z = torch.randn(2, 16, size[0] // 16, size[1] // 16, generator=torch.Generator().manual_seed(3))
    ours, theirs = tiny_ae.decode(z), diffusers_decode(reference, z)
    assert ours.shape == (2, 3, *size)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * theirs.abs().max().item())


@torch.no_grad()
def test_encode_is_deterministic_and_uses_the_statistics(tiny_ae):
    x = images(SIZES[1], batch=1)
    z = tiny_ae.encode(x)
    assert torch.equal(z, tiny_ae.encode(x))
    raw = patchify(tiny_ae.encoder(x)[:, : TINY.z_channels])
    mean, var = tiny_ae.bn.running_mean.view(1, -1, 1, 1), tiny_ae.bn.running_var.view(1, -1, 1, 1)
    expected = (raw - mean) / (var + 1e-4).sqrt()
    torch.testing.assert_close(z, expected)


def test_sizes_that_do_not_tile_are_refused_with_the_fix(tiny_ae):
    with pytest.raises(ValueError, match="height 40 is not a positive multiple of 16.*32 or 48"):
        tiny_ae.encode(images((40, 48), batch=1))
    with pytest.raises(ValueError, match=r"z must be \(B, 16, H, W\)"):
        tiny_ae.decode(torch.zeros(1, 4, 2, 2))


# ----------------------------------------------------------------------------------------------
# Loading: both layouts, prefixes, the BN counter, strict errors


def assert_same_model(a: Flux2AutoEncoder, b: Flux2AutoEncoder):
    assert a.config == b.config
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_load_bfl_file_with_and_without_counter_and_prefix(tiny_ae, tmp_path):
    state = {k: v.contiguous() for k, v in tiny_ae.state_dict().items()}
    save_file(state, tmp_path / "ae.safetensors")
    loaded = load_flux2_autoencoder(tmp_path)  # a folder holding ae.safetensors
    assert_same_model(loaded, tiny_ae)
    assert loaded.bn.running_mean.dtype == torch.float32 and not loaded.training
    counted = {**{f"vae.{k}": v for k, v in state.items()}, "vae.bn.num_batches_tracked": torch.tensor(0)}
    save_file(counted, tmp_path / "all-in-one.safetensors")
    assert_same_model(load_flux2_autoencoder(tmp_path / "all-in-one.safetensors"), tiny_ae)


def test_load_diffusers_folder(tiny_ae, reference, tmp_path):
    reference.save_pretrained(tmp_path / "vae")
    assert_same_model(load_flux2_autoencoder(tmp_path), tiny_ae)  # a repo folder with vae/


def test_strict_errors_name_the_file_and_the_keys(tiny_ae, tmp_path):
    state = {k: v.contiguous() for k, v in tiny_ae.state_dict().items() if k != "decoder.post_quant_conv.bias"}
    save_file({**state, "bn.extra": torch.zeros(1)}, tmp_path / "ae.safetensors")
    pattern = r"ae\.safetensors(.|\n)*missing keys \(1\): decoder\.post_quant_conv\.bias"
    pattern += r"(.|\n)*unexpected keys \(1\): bn\.extra"
    with pytest.raises(CheckpointError, match=pattern):
        load_flux2_autoencoder(tmp_path / "ae.safetensors")


def test_each_generation_s_loader_refuses_the_other_ae(tiny_ae, tmp_path):
    flux1 = AutoEncoder(AutoEncoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4))
    save_file(flux1.state_dict(), tmp_path / "flux1-ae.safetensors")
    save_file({k: v.contiguous() for k, v in tiny_ae.state_dict().items()}, tmp_path / "flux2-ae.safetensors")
    with pytest.raises(CheckpointError, match="Flux.1-style autoencoder.*load_autoencoder"):
        load_flux2_autoencoder(tmp_path / "flux1-ae.safetensors")
    with pytest.raises(CheckpointError, match="FLUX.2 autoencoder.*load_flux2_autoencoder"):
        load_autoencoder(tmp_path / "flux2-ae.safetensors")
