"""What a user can pass the pipelines and the two CLIs: folder defaults, batches, seeds, sizes that would
eat the machine, non-finite results, odd images, concept words the tokenizer does not know, and output
paths that cannot be written. Each test names the bug it catches."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from concept_attention import ConceptAttentionPipeline
from concept_attention.cli import main as concept_main
from concept_attention.encoding import check_concept_tokens
from flux_mini.cli import main as flux_main
from flux_mini.pipeline import FluxPipeline, NonFiniteError
from flux_mini.tiny import build_tiny_weights

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
CONCEPTS = ["circle", "grass", "sky"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_weights(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="module")
def pipe(folder):
    return ConceptAttentionPipeline.from_folder(folder)


@pytest.fixture(scope="module")
def dev_folder(tmp_path_factory):
    """A dev-family (guidance) tiny model whose folder asks for 3 steps."""
    folder = build_tiny_weights(tmp_path_factory.mktemp("dev"), seed=1, guidance_embed=True)
    sampling = json.loads((folder / "sampling.json").read_text())
    (folder / "sampling.json").write_text(json.dumps({**sampling, "num_steps": 3, "width": 32, "height": 16}))
    return folder


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


# ----------------------------------------------------------------------------------------------
# One source of defaults: the model folder


def test_size_and_steps_come_from_the_folder(pipe):
    """Bug: 1024x1024 and 4 steps whatever the folder says (the tiny folder says 32x32)."""
    image = pipe.flux("a cat", progress=False)
    assert image.size == (32, 32) and pipe.flux.defaults.num_steps == 4
    out = pipe.generate_image("a cat", CONCEPTS, num_inference_steps=1, progress=False)
    assert out.image.size == (32, 32) and out.concept_maps.shape == (3, 8, 8)


def test_dev_defaults_are_the_same_in_both_pipelines(dev_folder):
    """Bug: ConceptAttentionPipeline ran a dev model with guidance 0.0 and 4 steps, FluxPipeline with 3.5 and
    the folder's steps."""
    concept_pipe = ConceptAttentionPipeline.from_folder(dev_folder)
    flux = concept_pipe.flux
    out = concept_pipe.generate_image("a cat", CONCEPTS, progress=False)
    explicit = flux("a cat", width=32, height=16, num_steps=3, guidance=3.5, progress=False)
    assert np.array_equal(pixels(out.image), pixels(explicit))
    assert not np.array_equal(pixels(out.image), pixels(flux("a cat", guidance=0.0, progress=False)))
    assert not np.array_equal(pixels(out.image), pixels(flux("a cat", num_steps=4, progress=False)))


def test_encode_resizes_to_the_folders_size_unless_told(pipe):
    image = Image.new("RGB", (200, 120), (200, 30, 30))
    assert pipe.encode_image(image, CONCEPTS, layer_indices=[0]).concept_maps.shape == (3, 8, 8)  # 32x32
    assert pipe.encode_image(image, CONCEPTS, layer_indices=[0], width=32, height=16).concept_maps.shape == (3, 4, 8)


@pytest.mark.parametrize("steps", [0, -1, 1.5, True])
def test_bad_step_counts_are_errors_not_the_default(pipe, steps):
    """Bug: `num_steps or default` turned 0 into the default."""
    with pytest.raises(ValueError, match="num_steps must be an integer >= 1"):
        pipe.flux("a cat", width=16, height=16, num_steps=steps, progress=False)


def test_sampling_json_values_are_checked(folder, tmp_path):
    copy = shutil.copytree(folder, tmp_path / "model")
    (copy / "sampling.json").write_text('{"width": 0}')
    with pytest.raises(ValueError, match=r"sampling.json: sampling default width must be a positive integer"):
        FluxPipeline.from_folder(copy)


# ----------------------------------------------------------------------------------------------
# Batches, seeds and generators


def test_a_list_of_prompts_is_a_batch_equal_to_a_loop(pipe):
    """Bug: a list reached the tokenizer as one sentence pair (one image for two prompts)."""
    flux = pipe.flux
    batch = flux(["a cat", "a red car"], width=32, height=32, num_steps=2, seed=5, progress=False)
    loop = [flux(p, width=32, height=32, num_steps=2, seed=s, progress=False)
            for p, s in [("a cat", 5), ("a red car", 6)]]
    assert len(batch) == 2
    for a, b in zip(batch, loop):
        assert np.abs(pixels(a) - pixels(b)).max() <= 1  # batched float32 matmuls may round differently
    assert np.abs(pixels(batch[0]) - pixels(batch[1])).mean() > 1
    outs = pipe.generate_image(["a cat", "a red car"], CONCEPTS, width=32, height=32, num_inference_steps=2, seed=5,
                               progress=False)
    assert [pixels(o.image).tolist() for o in outs] == [pixels(i).tolist() for i in loop]
    with pytest.raises(ValueError, match="list of strings"):
        flux.encode_prompt([["a cat", "a dog"]])


def test_seeds_repeat_after_2_to_the_32():
    """The fact behind the seed range: torch's CPU generator keeps a seed's low 32 bits."""
    draw = [torch.randn(4, generator=torch.Generator().manual_seed(s)) for s in (7, 7 + 2**32)]
    assert torch.equal(*draw)


@pytest.mark.parametrize("seed", [-1, 2**32, 2**64, 1.0, "3", True, None])
def test_seeds_outside_the_range_are_refused(pipe, seed):
    """Bug: seeds s and s + 2**32 gave the same image; floats were accepted."""
    with pytest.raises(ValueError, match=r"seed"):
        pipe.flux("a cat", width=16, height=16, num_steps=1, seed=seed, progress=False)


def test_the_last_seed_of_a_batch_must_fit(pipe):
    with pytest.raises(ValueError, match=r"seed \+ 1"):
        pipe.flux(["a", "b"], width=16, height=16, num_steps=1, seed=2**32 - 1, progress=False)


def test_a_generator_is_accepted_wherever_a_seed_is(pipe):
    flux = pipe.flux
    noise, _ = flux.prepare_latents(2, 32, 32, torch.Generator().manual_seed(9))
    expected = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(9))  # diffusers' convention
    torch.testing.assert_close(noise, expected.reshape(2, 4, 8, 2, 8, 2).permute(0, 2, 4, 1, 3, 5).reshape(2, 64, 16))
    a = flux("a cat", width=32, height=32, num_steps=1, seed=torch.Generator().manual_seed(3), progress=False)
    assert np.array_equal(pixels(a), pixels(flux("a cat", width=32, height=32, num_steps=1, seed=3, progress=False)))
    out = pipe.encode_image(a, CONCEPTS, seed=torch.Generator().manual_seed(4), layer_indices=[0], width=32, height=32)
    torch.testing.assert_close(out.concept_maps, pipe.encode_image(a, CONCEPTS, seed=4, layer_indices=[0], width=32,
                                                                   height=32).concept_maps)


# ----------------------------------------------------------------------------------------------
# Sizes that would eat the machine


def test_a_run_larger_than_memory_is_refused_with_a_size_that_fits(pipe):
    flux = pipe.flux
    need = max(flux.memory_estimate(512, 512).values())
    with pytest.raises(ValueError, match=r"512x512 needs about .* GiB .* free; use a size that fits, e.g. width (\d+)"):
        flux.check_memory(512, 512, available=need - 1)
    flux.check_memory(512, 512, available=need)  # exactly enough: accepted


def test_huge_width_is_refused_before_allocating(folder, capsys):
    """Bug: --width 100000 allocated until the kernel killed the process."""
    argv = ["generate", "--weights", str(folder), "--prompt", "a cat", "--out", "never.png", "--width", "100000",
            "--height", "100000", "--quiet"]
    assert flux_main(argv) == 2
    err = capsys.readouterr().err
    assert "100000x100000 needs about" in err and "e.g. width" in err and err.count("\n") == 1


def test_a_huge_t5_length_is_refused_naming_the_setting(folder, tmp_path):
    copy = shutil.copytree(folder, tmp_path / "model")
    (copy / "sampling.json").write_text(json.dumps({"t5_max_length": 100000}))
    with pytest.raises(ValueError, match=r"no image size fits: lower t5_max_length \(100000\)"):
        FluxPipeline.from_folder(copy)("a cat", progress=False)


def test_a_huge_encode_size_is_refused_before_resizing(pipe):
    with pytest.raises(ValueError, match=r"needs about"):
        pipe.encode_image(Image.new("RGB", (16, 16)), CONCEPTS, width=160000, height=160000)


# ----------------------------------------------------------------------------------------------
# Non-finite values and noise times


def test_a_nan_weight_is_an_error_not_a_black_image(folder):
    flux = FluxPipeline.from_folder(folder)
    with torch.no_grad():
        flux.model.final_layer.linear.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"latents hold .* NaN/Inf values .*weights"):
        flux("a cat", width=16, height=16, num_steps=1, progress=False)
    with pytest.raises(NonFiniteError):
        ConceptAttentionPipeline(flux).generate_image("a cat", CONCEPTS, width=16, height=16, num_inference_steps=1,
                                                      progress=False)


@pytest.mark.parametrize("t", [5.0, -0.1, float("nan"), float("inf")])
def test_noise_time_outside_0_1_is_refused(pipe, t):
    with pytest.raises(ValueError, match=r"t must be a noise time in \[0, 1\]"):
        pipe.encode_image(Image.new("RGB", (16, 16)), CONCEPTS, t=t, width=16, height=16)


def test_float16_scores_do_not_overflow():
    """Bug: concept . image products in float16 overflow 65504 and the softmax returns NaN."""
    from concept_attention.maps import dot_scores

    concepts = torch.full((1, 2, 64), 40.0, dtype=torch.float16)
    concepts[0, 1] = -40.0
    image = torch.full((1, 3, 64), 30.0, dtype=torch.float16)  # 64 * 40 * 30 = 76800 > 65504
    scores = dot_scores(concepts, image, None)
    expected = torch.einsum("brd,bnd->brn", concepts.double(), image.double())
    assert scores.dtype == torch.float32 and torch.isfinite(scores).all()
    torch.testing.assert_close(scores.double(), expected)
    assert torch.isfinite(scores.softmax(dim=1)).all()


def test_float16_pipeline_maps_are_finite(folder):
    pipe16 = ConceptAttentionPipeline.from_folder(folder, dtype=torch.float16)
    out = pipe16.encode_image(Image.new("RGB", (16, 16), (10, 200, 30)), CONCEPTS, width=16, height=16)
    for maps in (out.concept_maps, out.cross_attention_maps, out.value_maps):
        assert maps.dtype == torch.float32 and torch.isfinite(maps).all()


# ----------------------------------------------------------------------------------------------
# Concept words the tokenizer does not know


def test_unknown_and_identical_concepts_are_named(pipe):
    t5 = pipe.flux.t5
    with pytest.warns(UserWarning, match=r"'круг' = 'кошка'"):
        check_concept_tokens(t5, ["circle", "круг", "кошка"])
    with pytest.warns(UserWarning, match=r"\['Circle'\].*<unk>"):
        check_concept_tokens(t5, ["Circle", "grass"])
    with pytest.raises(ValueError, match=r"all tokenise to the same ids"):
        check_concept_tokens(t5, ["круг", "🙂"])
    with pytest.raises(ValueError, match=r"all tokenise to the same ids"):
        pipe.encode_image(Image.new("RGB", (16, 16)), ["круг", "кошка"], width=16, height=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_concept_tokens(t5, CONCEPTS)  # known, distinct words: silent


def test_a_single_concept_under_softmax_warns(pipe):
    with pytest.warns(UserWarning, match=r"single concept .* exactly 1.0 .*softmax"):
        out = pipe.encode_image(Image.new("RGB", (16, 16)), ["circle"], width=16, height=16, layer_indices=[0])
    assert torch.equal(out.concept_maps, torch.ones_like(out.concept_maps))  # what the warning is about
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_concept_tokens(pipe.flux.t5, ["circle"], softmax=False)


# ----------------------------------------------------------------------------------------------
# Images


def test_16_bit_float_and_rotated_images_are_converted_by_value(tmp_path):
    from concept_attention.images import open_image

    ramp = np.linspace(0, 1, 16 * 8).reshape(8, 16)
    Image.fromarray((ramp * 65535).round().astype(np.uint16)).save(tmp_path / "deep.png")
    Image.fromarray(ramp.astype(np.float32)).save(tmp_path / "float.tiff")
    expected = (ramp * 255).round()
    for name in ("deep.png", "float.tiff"):
        rgb = open_image(tmp_path / name)
        assert rgb.mode == "RGB" and rgb.size == (16, 8)
        assert np.abs(np.asarray(rgb)[..., 0] - expected).max() <= 1, name  # not all white / all black

    picture = Image.new("RGB", (16, 8), (0, 0, 0))
    picture.putpixel((0, 0), (255, 0, 0))
    exif = picture.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    picture.save(tmp_path / "rotated.png", exif=exif)
    upright = open_image(tmp_path / "rotated.png")
    assert upright.size == (8, 16) and np.asarray(upright)[0, -1, 0] > 200  # the red corner moved to the top right


def test_float_images_of_unknown_range_are_refused(tmp_path):
    from concept_attention.images import to_rgb

    with pytest.raises(ValueError, match=r"values in \[-5, 700\]"):
        to_rgb(Image.fromarray(np.array([[-5.0, 700.0]], dtype=np.float32)))


def test_a_corrupt_image_is_one_line_naming_the_file(folder, tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    argv = ["encode", "--weights", str(folder), "--image", str(bad), "--concepts", *CONCEPTS, "--out",
            str(tmp_path / "out"), "--quiet"]
    assert concept_main(argv) == 2
    err = capsys.readouterr().err
    assert "broken.png cannot be read" in err and err.count("\n") == 1


# ----------------------------------------------------------------------------------------------
# Output paths: checked before computing (the weights do not even exist here), arrays before pictures


@pytest.mark.parametrize("out, message", [
    ("", "is a folder"),
    ("image", "needs an image extension"),
    ("file.txt/image.png", "is a file, not a folder"),
    ("x" * 300 + ".png", "bytes; at most"),
])
def test_flux_mini_output_path_is_checked_first(tmp_path, capsys, out, message):
    (tmp_path / "file.txt").write_text("x")
    argv = ["generate", "--weights", str(tmp_path / "no-such-model"), "--prompt", "a cat", "--out", str(tmp_path / out)]
    assert flux_main(argv) == 2
    assert message in capsys.readouterr().err


def test_concept_attention_output_folder_is_checked_first(tmp_path, capsys):
    (tmp_path / "file.txt").write_text("x")
    for out, message in [(tmp_path / "file.txt", "is a file"),
                         (tmp_path / "file.txt" / "sub", "is a file, not a folder")]:
        argv = ["generate", "--weights", str(tmp_path / "no-such-model"), "--prompt", "x", "--concepts", "a", "b",
                "--out", str(out)]
        assert concept_main(argv) == 2
        assert message in capsys.readouterr().err


def test_awkward_concepts_get_unique_files_and_all_outputs(folder, tmp_path, capsys):
    """Bugs: `a b` and `a_b` wrote one heatmap file; `$x^$` crashed matplotlib after image.png, losing maps.pt."""
    concepts = ["a b", "a_b", "$x^$", "sky" * 100]
    argv = ["generate", "--weights", str(folder), "--prompt", "a $5 cat", "--concepts", *concepts, "--out",
            str(tmp_path / "out"), "--width", "16", "--height", "16", "--steps", "1", "--quiet", "--overlay"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny vocabulary does not know `$`
        assert concept_main(argv) == 0
    message = capsys.readouterr().out
    heatmaps = sorted(p.name for p in (tmp_path / "out").glob("heatmap_*.png"))
    assert heatmaps == ["heatmap_00_a_b.png", "heatmap_01_a_b.png", "heatmap_02_x.png", f"heatmap_03_{'sky' * 13}s.png"]
    saved = torch.load(tmp_path / "out" / "maps.pt")
    assert saved["concepts"] == concepts
    for space in ("concept_maps", "cross_attention_maps", "value_maps"):
        array = np.load(tmp_path / "out" / f"{space}.npy")
        np.testing.assert_array_equal(array, saved[space].numpy())
        assert f"{space}.npy" in message
    assert all(name in message for name in heatmaps) and "concept_maps.png" in message


# ----------------------------------------------------------------------------------------------
# One CLI vocabulary


@pytest.mark.parametrize("device", ["foo", "cuda", "mps", "cuda:7"])
def test_unusable_devices_are_one_line_naming_the_flag(folder, capsys, device):
    if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.device_count() > 7:
        pytest.skip("this machine has the device")
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has the device")
    for main, argv in ((flux_main, ["generate", "--out", "x.png"]),
                       (concept_main, ["generate", "--concepts", "a", "b", "--out", "x"])):
        assert main([*argv, "--weights", str(folder), "--prompt", "a", "--device", device]) == 2
        err = capsys.readouterr().err
        assert f"--device {device}:" in err and ("--device cpu" in err or "use auto" in err)


@pytest.mark.parametrize("value", ["1.5", "-1", str(2**32), "x"])
def test_bad_seeds_are_refused_by_both_clis(capsys, value):
    for main, argv in ((flux_main, ["generate", "--weights", "w", "--prompt", "a", "--out", "x.png"]),
                       (concept_main, ["encode", "--image", "i.png", "--concepts", "a", "--out", "x"])):
        with pytest.raises(SystemExit) as exit_:
            main([*argv, "--seed", value])
        assert exit_.value.code == 2 and "--seed" in capsys.readouterr().err


def test_both_clis_share_flags_and_show_defaults(capsys):
    helps = {}
    for name, main, command in (("flux", flux_main, "generate"), ("gen", concept_main, "generate"),
                                ("enc", concept_main, "encode")):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        helps[name] = capsys.readouterr().out
    for text in helps.values():
        for flag in ("--width", "--height", "--seed", "--device", "--dtype", "--quiet", "--guidance"):
            assert flag in text
        assert "(default: auto)" in text and "(default: from the model" in text
    assert "--steps" in helps["flux"] and "--steps" in helps["gen"] and "--num-samples" in helps["enc"]
    assert "resize the image" in helps["enc"]  # encode --width is the resize, not a generation size
    from concept_attention.cli import build_parser

    old = build_parser().parse_args(["encode", "--image", "i.png", "--concepts", "a", "--out", "o", "--samples", "3",
                                     "--no-progress"])
    assert old.num_samples == 3 and old.quiet  # the old spellings still work (hidden from --help)
    assert "--samples" not in helps["enc"].replace("--num-samples", "")
    with pytest.raises(SystemExit) as exit_:
        flux_main(["generate", "--weights", "w", "--prompt", "a", "--out", "x.png", "--steps", "0"])
    assert exit_.value.code == 2 and "--steps" in capsys.readouterr().err


def test_tiny_folder_then_generate_with_its_own_defaults(tmp_path, capsys):
    """The README's try-it path: `flux-mini tiny DIR` then `flux-mini generate --weights DIR` (no sizes)."""
    assert flux_main(["tiny", str(tmp_path / "tiny")]) == 0
    assert flux_main(["generate", "--weights", str(tmp_path / "tiny"), "--prompt", "a red circle", "--out",
                      str(tmp_path / "tiny.png"), "--quiet"]) == 0
    assert Image.open(tmp_path / "tiny.png").size == (32, 32) and "32x32" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# Start-up and the embedded model


def test_import_and_help_do_not_load_transformers_or_pyplot():
    """Bug: `import flux_mini` and `--help` took seconds importing transformers' model classes."""
    code = ("import sys, flux_mini, concept_attention, concept_attention.cli as c, flux_mini.cli as f; "
            "c.build_parser(); f.build_parser(); "
            "print(sorted(m for m in ('transformers', 'matplotlib.pyplot') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
    from flux_mini import FluxPipeline as lazy

    assert lazy is FluxPipeline


def test_random_fallback_model_is_labelled_and_cleaned_up(tmp_path, capsys):
    from concept_attention.demo import embedded_model

    with embedded_model(folder=tmp_path / "no-demo-here") as demo:
        assert not demo.trained and demo.label.startswith("random model") and demo.weights.is_dir()
        assert demo.image_size == 32
    assert not demo.weights.exists()
    said = capsys.readouterr().out
    assert "RANDOM model" in said and "weights/demo/" in said and "removed afterwards" in said


def test_concept_figure_has_one_colour_bar_on_the_shared_range_and_an_overlay():
    import matplotlib.pyplot as plt

    from concept_attention.pictures import concept_grid

    image = Image.new("RGB", (16, 16), (0, 120, 0))
    maps = torch.stack([torch.zeros(4, 4), torch.full((4, 4), 0.25), torch.linspace(0, 0.8, 16).reshape(4, 4)])
    figure = concept_grid(image, maps, ["a", "b", "c"])
    *panels, bar = figure.axes
    assert len(panels) == 4 and bar.get_ylim() == pytest.approx((0.0, 0.8))  # the range of all maps together
    plain = panels[1].images[0].get_array()
    overlaid = concept_grid(image, maps, ["a", "b", "c"], overlay_alpha=0.5).axes[1].images[0].get_array()
    assert np.asarray(overlaid)[0, 0, 1] > np.asarray(plain)[0, 0, 1]  # the green image shows through
    plt.close("all")


def test_quiet_restores_the_libraries_logging_state():
    from transformers.utils import logging as hf_logging

    from flux_mini.pipeline import quiet_transformers

    before = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    with quiet_transformers(logging=True):
        assert hf_logging.get_verbosity() == hf_logging.ERROR and not hf_logging.is_progress_bar_enabled()
    assert (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()) == before
