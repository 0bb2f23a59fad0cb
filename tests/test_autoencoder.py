"""The Flux.1 autoencoder against the spec's key dump and against diffusers' AutoencoderKL."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from flux_mini.autoencoder import (
    AutoEncoder,
    AutoEncoderConfig,
    IdentityAutoEncoder,
    bfl_to_diffusers,
    diffusers_to_bfl,
    load_autoencoder,
)
from flux_mini.checkpoint import CheckpointError
from flux_mini.flux1 import Flux
from flux_mini.tiny import randomize_, tiny_flux_config

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKL  # noqa: E402
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint  # noqa: E402

SPEC_DIR = Path(__file__).parent / "data"  # copies of the official key lists (shared/spec)
OFFICIAL_SCALE, OFFICIAL_SHIFT = 0.3611, 0.1159

# Four levels with distinct widths (a swapped decoder level cannot load) and f = 8, so 36x52 inputs go
# through odd intermediate sizes (9x13 -> 4x6) as in spec §8.4.
TINY = AutoEncoderConfig(ch=32, ch_mult=(1, 2, 3, 3), num_res_blocks=2, z_channels=4)


def diffusers_config(config: AutoEncoderConfig) -> dict:
    return dict(
        in_channels=config.in_channels,
        out_channels=config.out_ch,
        block_out_channels=tuple(config.ch * m for m in config.ch_mult),
        down_block_types=("DownEncoderBlock2D",) * len(config.ch_mult),
        up_block_types=("UpDecoderBlock2D",) * len(config.ch_mult),
        layers_per_block=config.num_res_blocks,
        latent_channels=config.z_channels,
        norm_num_groups=32,
        act_fn="silu",
        mid_block_add_attention=True,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=config.scale_factor,
        shift_factor=config.shift_factor,
    )


def shapes(state: dict) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in state.items()}


def assert_close(ours: torch.Tensor, theirs: torch.Tensor, rel: float = 1e-5) -> None:
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=rel, atol=rel * theirs.abs().max().item())


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: on a shared 2-core machine, thread hand-offs cost more than they save."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_ae() -> AutoEncoder:
    torch.manual_seed(0)
    return randomize_(AutoEncoder(TINY), seed=1).eval()


@pytest.fixture(scope="module")
def reference(tiny_ae) -> AutoencoderKL:
    """diffusers' model holding the tiny AE's weights, converted with our own BFL -> diffusers mapping."""
    model = AutoencoderKL(**diffusers_config(TINY)).eval()
    model.load_state_dict(bfl_to_diffusers(dict(tiny_ae.state_dict())), strict=True)
    return model


@pytest.fixture(scope="module")
def images() -> dict[tuple[int, int], torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return {size: torch.rand(2, 3, *size, generator=g) * 2 - 1 for size in [(40, 56), (36, 52)]}


# ----------------------------------------------------------------------------------------------
# Structure


def test_config_validation_and_factor():
    assert AutoEncoderConfig.official().downsample_factor == 8
    assert TINY.downsample_factor == 8
    assert AutoEncoderConfig(ch=32, ch_mult=(1, 2)).downsample_factor == 2
    assert AutoEncoderConfig(ch_mult=[1, 2.0]).ch_mult == (1, 2)
    with pytest.raises(ValueError, match="positive integers"):
        AutoEncoderConfig(ch=32, ch_mult=(1, 1.5))
    with pytest.raises(ValueError, match="multiple of 32, got ch 48"):
        AutoEncoderConfig(ch=48)


def test_official_structure_matches_spec_dump():
    spec_file = SPEC_DIR / "flux-keys-ae.json"
    if not spec_file.is_file():
        pytest.skip(f"spec dump {spec_file} not available")
    spec = json.loads(spec_file.read_text())
    assert AutoEncoderConfig(**spec["params"]) == AutoEncoderConfig.official()
    with torch.device("meta"):
        model = AutoEncoder(AutoEncoderConfig.official())
    state = model.state_dict()
    assert list(state) == list(spec["keys"])  # same names, same order
    assert shapes(state) == {name: tuple(shape) for name, shape in spec["keys"].items()}
    assert sum(t.numel() for t in state.values()) == 83_819_683
    assert model.z_channels == 16 and model.downsample_factor == 8


# ----------------------------------------------------------------------------------------------
# The diffusers mapping


def test_mapping_agrees_with_diffusers_converter_at_official_size():
    """Key names and shapes only (meta tensors): ours == diffusers' converter == a fresh AutoencoderKL."""
    official = AutoEncoderConfig.official()
    with torch.device("meta"):
        bfl = dict(AutoEncoder(official).state_dict())
        fresh = AutoencoderKL(**diffusers_config(official)).state_dict()
    ours = bfl_to_diffusers(bfl)
    theirs = convert_ldm_vae_checkpoint(dict(bfl), diffusers_config(official))
    assert len(ours) == len(theirs) == len(fresh) == 244
    assert shapes(ours) == shapes(theirs) == shapes(fresh)


def test_mapping_moves_the_same_tensors_as_diffusers_converter(tiny_ae):
    bfl = {name: t.clone() for name, t in tiny_ae.state_dict().items()}
    ours = bfl_to_diffusers(bfl)
    theirs = convert_ldm_vae_checkpoint(dict(bfl), diffusers_config(TINY))
    assert ours.keys() == theirs.keys()
    for name in theirs:
        assert torch.equal(ours[name], theirs[name]), name


def test_mapping_round_trip(tiny_ae):
    bfl = tiny_ae.state_dict()
    back = diffusers_to_bfl(bfl_to_diffusers(dict(bfl)))
    assert list(back) == list(bfl)
    for name in bfl:
        assert torch.equal(back[name], bfl[name]), name


# ----------------------------------------------------------------------------------------------
# Numerical parity with diffusers


@torch.no_grad()
@pytest.mark.parametrize("size", [(40, 56), (36, 52)])
def test_encode_matches_diffusers(tiny_ae, reference, images, size):
    x = images[size]
    ours = tiny_ae.encode(x)
    theirs = (reference.encode(x).latent_dist.mean - OFFICIAL_SHIFT) * OFFICIAL_SCALE
    assert ours.shape == (2, 4, size[0] // 8, size[1] // 8)
    assert_close(ours, theirs)


@torch.no_grad()
@pytest.mark.parametrize("size", [(40, 56), (36, 52)])
def test_decode_matches_diffusers(tiny_ae, reference, images, size):
    z = tiny_ae.encode(images[size])
    ours = tiny_ae.decode(z)
    theirs = reference.decode(z / OFFICIAL_SCALE + OFFICIAL_SHIFT).sample
    assert ours.shape == (2, 3, 8 * z.shape[2], 8 * z.shape[3])
    assert ours.abs().max() > 1  # raw decoder output: no clamp
    assert_close(ours, theirs)


@torch.no_grad()
def test_float64_parity_pins_the_small_constants(tiny_ae, reference, images):
    """In float64 the two agree to ~1e-12, so a GroupNorm eps of 1e-5 instead of 1e-6 would show."""
    ours, theirs = copy.deepcopy(tiny_ae).double(), copy.deepcopy(reference).double()
    x = images[(36, 52)].double()
    z = ours.encode(x)
    assert_close(z, (theirs.encode(x).latent_dist.mean - OFFICIAL_SHIFT) * OFFICIAL_SCALE, rel=1e-10)
    assert_close(ours.decode(z), theirs.decode(z / OFFICIAL_SCALE + OFFICIAL_SHIFT).sample, rel=1e-10)


@torch.no_grad()
def test_sampling_with_a_generator(tiny_ae, reference, images):
    x = images[(40, 56)]
    a = tiny_ae.encode(x, generator=torch.Generator().manual_seed(7))
    b = tiny_ae.encode(x, generator=torch.Generator().manual_seed(7))
    c = tiny_ae.encode(x, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)

    posterior = reference.encode(x).latent_dist
    eps = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(7))
    expected = OFFICIAL_SCALE * (posterior.mean + torch.exp(0.5 * posterior.logvar) * eps - OFFICIAL_SHIFT)
    assert_close(a, expected)
    assert not torch.allclose(a, tiny_ae.encode(x))


def test_bad_shapes_are_rejected(tiny_ae):
    with pytest.raises(ValueError, match=r"x must be \(B, 3, H, W\)"):
        tiny_ae.encode(torch.zeros(3, 16, 16))
    with pytest.raises(ValueError, match=r"z must be \(B, 4, H, W\)"):
        tiny_ae.decode(torch.zeros(1, 16, 2, 2))


# ----------------------------------------------------------------------------------------------
# Loading


@pytest.fixture(scope="module")
def files(tiny_ae, reference, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ae")
    bfl = {name: t.contiguous() for name, t in tiny_ae.state_dict().items()}
    save_file(bfl, root / "ae.safetensors")
    extra = {"model.diffusion_model.img_in.weight": torch.zeros(2, 2)}  # an all-in-one file's other parts
    save_file({**{f"vae.{n}": t for n, t in bfl.items()}, **extra}, root / "all_in_one.safetensors")
    reference.save_pretrained(root / "repo" / "vae")
    save_file({n: t.contiguous() for n, t in reference.state_dict().items()}, root / "diffusers_vae.safetensors")
    return {"bfl": root / "ae.safetensors", "prefixed": root / "all_in_one.safetensors",
            "diffusers_repo": root / "repo", "diffusers_folder": root / "repo" / "vae",
            "diffusers_file": root / "diffusers_vae.safetensors", "root": root}


@torch.no_grad()
@pytest.mark.parametrize("kind", ["bfl", "prefixed", "diffusers_repo", "diffusers_folder", "diffusers_file"])
def test_load_autoencoder_layouts(tiny_ae, images, files, kind):
    ae = load_autoencoder(files[kind])
    assert ae.config == TINY  # inferred from shapes; official scale and shift
    x = images[(36, 52)]
    z = tiny_ae.encode(x)
    assert torch.equal(ae.encode(x), z)
    assert torch.equal(ae.decode(z), tiny_ae.decode(z))


def test_load_reads_diffusers_factors_and_casts(files, tmp_path):
    folder = tmp_path / "vae"
    folder.mkdir()
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(
        (files["diffusers_folder"] / "diffusion_pytorch_model.safetensors").read_bytes()
    )
    config = json.loads((files["diffusers_folder"] / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "scaling_factor": 0.5, "shift_factor": None}))
    ae = load_autoencoder(folder, dtype=torch.bfloat16)
    assert ae.config.scale_factor == 0.5 and ae.config.shift_factor == OFFICIAL_SHIFT
    assert {p.dtype for p in ae.parameters()} == {torch.bfloat16}


def test_load_with_explicit_config(files):
    custom = AutoEncoderConfig(**{**TINY.to_dict(), "scale_factor": 1.0, "shift_factor": 0.0})
    assert load_autoencoder(files["bfl"], config=custom).config == custom
    wrong = AutoEncoderConfig(**{**TINY.to_dict(), "z_channels": 8})
    with pytest.raises(CheckpointError, match=r"shape mismatches.*encoder\.conv_out\.weight"):
        load_autoencoder(files["bfl"], config=wrong)


def _write(path: Path, tensors: dict) -> Path:
    save_file({n: t.contiguous() for n, t in tensors.items()}, path)
    return path


def test_load_errors(tiny_ae, tmp_path):
    bfl = dict(tiny_ae.state_dict())

    missing = {n: t for n, t in bfl.items() if n != "decoder.up.1.block.0.conv2.bias"}
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): decoder\.up\.1\.block\.0\.conv2\.bias"):
        load_autoencoder(_write(tmp_path / "missing.safetensors", missing))

    reshaped = {**bfl, "encoder.mid.attn_1.q.bias": torch.zeros(97)}
    with pytest.raises(CheckpointError, match=r"encoder\.mid\.attn_1\.q\.bias file \[97\] vs model \[96\]"):
        load_autoencoder(_write(tmp_path / "reshaped.safetensors", reshaped))

    sd_vae = {**bfl, "quant_conv.weight": torch.zeros(8, 8, 1, 1)}
    with pytest.raises(CheckpointError, match="Stable Diffusion"):
        load_autoencoder(_write(tmp_path / "sd_vae.safetensors", sd_vae))

    flux = randomize_(Flux(tiny_flux_config()), seed=0).state_dict()
    with pytest.raises(CheckpointError, match="transformer checkpoint, not an autoencoder"):
        load_autoencoder(_write(tmp_path / "flux.safetensors", flux))

    with pytest.raises(CheckpointError, match="not a Flux autoencoder"):
        load_autoencoder(_write(tmp_path / "other.safetensors", {"foo": torch.zeros(2)}))


# ----------------------------------------------------------------------------------------------
# The identity autoencoder of pixel-space models


def test_identity_autoencoder(tmp_path):
    ae = IdentityAutoEncoder(channels=4)
    x = torch.randn(2, 4, 6, 10)
    assert ae.encode(x, generator=torch.Generator().manual_seed(0)) is x
    assert ae.decode(x) is x
    assert ae.z_channels == 4 and ae.downsample_factor == 1
    with pytest.raises(ValueError, match=r"x must be \(B, 4, H, W\)"):
        ae.encode(torch.zeros(1, 3, 4, 4))

    path = tmp_path / "identity-autoencoder.json"
    ae.save_json(path)
    assert json.loads(path.read_text()) == {"channels": 4}
    assert IdentityAutoEncoder.from_json(path).z_channels == 4
    with pytest.raises(FileNotFoundError, match="save_json"):
        IdentityAutoEncoder.from_json(tmp_path / "absent.json")
    path.write_text('{"chanels": 3}')
    with pytest.raises(ValueError, match="not an identity-autoencoder config"):
        IdentityAutoEncoder.from_json(path)


def test_space_to_depth_autoencoder(tmp_path):
    """downsample f: channel c*f*f + p*f + q of latent pixel (i, j) is image pixel (c, i*f + p, j*f + q)."""
    ae = IdentityAutoEncoder(channels=3, downsample=2)
    assert ae.z_channels == 12 and ae.downsample_factor == 2
    x = torch.randn(2, 3, 6, 10)
    z = ae.encode(x)
    assert z.shape == (2, 12, 3, 5)
    for c, p, q, i, j in [(0, 0, 0, 0, 0), (2, 1, 0, 2, 4), (1, 0, 1, 1, 3), (2, 1, 1, 2, 0)]:
        assert z[1, c * 4 + p * 2 + q, i, j] == x[1, c, i * 2 + p, j * 2 + q]
    assert torch.equal(ae.decode(z), x)
    with pytest.raises(ValueError, match="not a multiple of the downsample factor 2"):
        ae.encode(torch.zeros(1, 3, 5, 4))
    with pytest.raises(ValueError, match=r"z must be \(B, 12, H, W\)"):
        ae.decode(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="positive"):
        IdentityAutoEncoder(channels=3, downsample=0)

    path = tmp_path / "identity-autoencoder.json"
    ae.save_json(path)
    assert json.loads(path.read_text()) == {"channels": 3, "downsample": 2}
    loaded = IdentityAutoEncoder.from_json(path)
    assert (loaded.z_channels, loaded.downsample_factor) == (12, 2)
    for bad in ('{"channels": 3, "downsample": 0}', '{"channels": 3, "downsampling": 2}', '[3]'):
        path.write_text(bad)
        with pytest.raises(ValueError, match="not an identity-autoencoder config"):
            IdentityAutoEncoder.from_json(path)
