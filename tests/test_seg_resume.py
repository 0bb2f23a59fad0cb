"""A results folder is trusted only when it proves to hold the same experiment: another model, dtype, data or
protocol is refused with what differs; records are matched by image id; one run writes at a time; a start that
fails leaves nothing that blocks the fixed command; faults (disk full, NaN maps, bad files) are one clear line."""

import errno
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from concept_attention.segmentation.evaluate import EvalConfig, EvalError, evaluate, run_eval, score_maps
from concept_attention.segmentation.protocols import Vocabulary, get_preset
from test_seg_eval import Interrupted, PaintedProvider, painted_dataset, parse, protocol

REPO = Path(__file__).resolve().parents[1]
DEMO, UNTRAINED = REPO / "weights" / "demo", REPO / "weights" / "demo-untrained"


def run(*argv):
    return run_eval(parse(*argv, "--no-progress", "--no-plots"))


def background_only(out, *extra):
    """A shapes run that needs no model (the predict-background line only): fast, and every check before
    the first map applies to it."""
    return run("--dataset", "shapes", "--data", "3:1", "--methods", "predict_background", "--out", str(out), *extra)


# ---- identity: model, dtype, data, protocol ------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo-run")
    assert run("--dataset", "shapes", "--data", "2:1", "--weights", str(DEMO), "--num-samples", "1",
               "--out", str(out)) == 0
    return out


def test_resume_with_another_model_or_dtype_is_refused(demo_run):
    common = ["--dataset", "shapes", "--data", "2:1", "--num-samples", "1", "--out", str(demo_run)]
    summary = (demo_run / "summary.json").read_text()
    with pytest.raises(SystemExit, match=r"differs in: sources\.weights .*another --out, or --overwrite"):
        run(*common, "--weights", str(UNTRAINED))
    with pytest.raises(SystemExit, match=r"differs in: sources\.dtype \('float32' -> 'bfloat16'\)"):
        run(*common, "--weights", str(DEMO), "--dtype", "bfloat16")
    assert (demo_run / "summary.json").read_text() == summary          # nothing was reported as the new run's
    assert run(*common, "--weights", str(DEMO)) == 0                   # the same experiment resumes (finished)


def test_weights_fingerprint_follows_content_not_notes(tmp_path):
    from concept_attention.segmentation.resume import weights_fingerprint

    folder = tmp_path / "model"
    (folder / "t5").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"header" + bytes(100))
    (folder / "t5" / "config.json").write_text("{}")
    (folder / "README.md").write_text("notes")
    first = weights_fingerprint(folder)
    (folder / "README.md").write_text("other notes")                   # notes do not count
    assert weights_fingerprint(folder) == first
    (folder / "t5" / "config.json").write_text('{"d_model": 8}')       # an encoder's file does
    assert weights_fingerprint(folder) != first


def test_large_weight_files_are_sampled_but_any_retrained_region_counts(tmp_path):
    from concept_attention.segmentation import resume

    size = resume.FULL_HASH_LIMIT + (5 << 20)
    path = tmp_path / "big.safetensors"
    data = bytearray(size)
    path.write_bytes(data)
    first = resume.file_digest(path)
    # a change in the middle of the file (not the first MiB): one of the 64 spread chunks sees it
    step = (size - resume.SAMPLE_SIZE) // (resume.SAMPLE_COUNT - 1)
    data[step * 10 + 5] = 1
    path.write_bytes(data)
    assert resume.file_digest(path) != first


def test_resume_with_other_data_is_refused(tmp_path):
    assert background_only(tmp_path) == 0
    # another stream: other images (the generator's digest of the first image) and another seed
    with pytest.raises(SystemExit, match=r"differs in: data\.first_image_sha256 \(.*\), data\.seed \(1 -> 7\)"):
        run("--dataset", "shapes", "--data", "3:7", "--methods", "predict_background", "--out", str(tmp_path))


def test_records_are_matched_by_image_id(tmp_path):
    data = painted_dataset(7)
    config = EvalConfig("painted", protocol(), methods=("concept_attention",))
    clean = evaluate(data, PaintedProvider(noise=0.4), config, tmp_path / "clean", progress=False, plots=False)
    out = tmp_path / "resumed"
    with pytest.raises(Interrupted):
        evaluate(data, PaintedProvider(noise=0.4, fail_after=2), config, out, progress=False, plots=False)
    provider = PaintedProvider(noise=0.4)                       # the same images listed in the opposite order
    resumed = evaluate(data[::-1], provider, config, out, progress=False, plots=False)
    assert len(provider.calls) == 5
    for key in ("pixel_accuracy", "miou", "iou_per_class"):
        assert resumed["concept_attention"][key] == clean["concept_attention"][key]
    assert resumed["concept_attention"]["map_paper"] == pytest.approx(clean["concept_attention"]["map_paper"])


def test_results_of_images_not_in_the_dataset_are_refused(tmp_path):
    data = painted_dataset(4)
    config = EvalConfig("painted", protocol(), methods=("concept_attention",))
    evaluate(data, PaintedProvider(), config, tmp_path, progress=False, plots=False)
    other = [*data[:3], replace(data[3], image_id="new")]
    with pytest.raises(EvalError, match="not in this dataset .img3."):
        evaluate(other, PaintedProvider(), config, tmp_path, progress=False, plots=False)
    assert evaluate(data, PaintedProvider(), config, tmp_path, progress=False, plots=False, limit=2)   # a subset


def test_a_folder_written_before_identities_resumes_when_the_rest_matches(tmp_path):
    data = painted_dataset(3)
    config = EvalConfig("painted", protocol(), methods=("concept_attention",))
    clean = evaluate(data, PaintedProvider(), config, tmp_path, progress=False, plots=False, limit=2)
    path = tmp_path / "config.json"
    legacy = {k: v for k, v in json.loads(path.read_text()).items() if k not in ("sources", "data")}
    path.write_text(json.dumps(legacy))
    provider = PaintedProvider()
    summary = evaluate(data, provider, config, tmp_path, progress=False, plots=False)
    assert len(provider.calls) == 1 and summary["concept_attention"]["n_images"] == 3 and clean
    assert json.loads(path.read_text())["data"] == {"length": 3}       # upgraded in place
    path.write_text(json.dumps(legacy))
    with pytest.raises(EvalError, match=r"differs in: seed \(0 -> 1\)"):
        evaluate(data, PaintedProvider(), replace(config, protocol=protocol(seed=1)), tmp_path, progress=False,
                 plots=False)


def test_a_folder_written_before_map_resample_resumes_as_nearest(tmp_path):
    """Such a folder upsampled its maps by nearest: a nearest protocol resumes it, a bilinear one (today's shapes
    presets) is refused rather than mixing the two in one table."""
    data = painted_dataset(3)
    config = EvalConfig("painted", protocol(), methods=("concept_attention",))
    assert config.protocol.map_resample == "nearest"
    evaluate(data, PaintedProvider(), config, tmp_path, progress=False, plots=False, limit=2)
    path = tmp_path / "config.json"
    stored = json.loads(path.read_text())
    del stored["protocol"]["map_resample"]
    path.write_text(json.dumps(stored))
    bilinear = replace(config, protocol=protocol(map_resample="bilinear"))
    with pytest.raises(EvalError, match=r"differs in: map_resample \('nearest' -> 'bilinear'\)"):
        evaluate(data, PaintedProvider(), bilinear, tmp_path, progress=False, plots=False)
    provider = PaintedProvider()
    summary = evaluate(data, provider, config, tmp_path, progress=False, plots=False)
    assert len(provider.calls) == 1 and summary["concept_attention"]["n_images"] == 3


# ---- a failed start blocks nothing -----------------------------------------------------------------------------

def test_a_failed_start_writes_no_configuration(tmp_path):
    common = ["--dataset", "shapes", "--data", "1:1", "--weights", str(DEMO), "--num-samples", "1",
              "--out", str(tmp_path)]
    with pytest.raises(SystemExit, match=r"layers \[99\] do not exist"):   # the model refuses the first image
        run(*common, "--layers", "99")
    assert not (tmp_path / "config.json").exists() and not list(tmp_path.glob("results*"))
    assert run(*common, "--layers", "3") == 0                              # the corrected command runs


def test_folder_dataset_defaults_and_needs_data(tmp_path):
    with pytest.raises(SystemExit, match="--dataset folder needs --data"):
        run("--dataset", "folder", "--methods", "predict_background", "--out", str(tmp_path / "x"))
    from concept_attention.segmentation.evaluate import protocol_from_args

    preset = protocol_from_args(parse("--dataset", "folder", "--out", "x"))
    # model-agnostic: no paper layer numbers or sizes, label 0 offered under its own classes.csv name
    assert preset.name == "folder" and preset.layers is None and preset.pipeline_size is None
    assert preset.background_concepts == () and preset.task == "multiclass"


def test_folder_dataset_runs_on_the_demo_model_with_its_default_preset(tmp_path):
    # words of the demo vocabulary: concepts it knows only as <unk> would get identical maps (an error)
    write_folder(tmp_path / "data", n=1, size=32, classes="label,name\n0,grass\n1,circle\n2,square\n")
    assert run("--dataset", "folder", "--data", str(tmp_path / "data"), "--weights", str(DEMO),
               "--out", str(tmp_path / "out")) == 0
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["config"]["protocol"]["name"] == "folder"


# ---- one writer at a time, duplicates, disk full ---------------------------------------------------------------

HOLD_LOCK = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("resume", sys.argv[1])
resume = importlib.util.module_from_spec(spec)
spec.loader.exec_module(resume)
lock = resume.FolderLock(sys.argv[2])
lock.acquire()
print("locked", flush=True)
time.sleep(60)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="advisory locks are POSIX")
def test_a_second_run_and_overwrite_are_refused_while_one_writes(tmp_path):
    data, config = painted_dataset(2), EvalConfig("painted", protocol(), methods=("concept_attention",))
    evaluate(data, PaintedProvider(), config, tmp_path, progress=False, plots=False)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(REPO / "concept_attention/segmentation/resume.py"),
                               str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for overwrite in (False, True):
            with pytest.raises(EvalError, match=f"in use by another eval run .pid {holder.pid} "):
                evaluate(data, PaintedProvider(), config, tmp_path, progress=False, plots=False, overwrite=overwrite)
        assert (tmp_path / "results.rank0.jsonl").exists() and (tmp_path / "config.json").exists()   # untouched
    finally:
        holder.kill()
        holder.wait()
    assert evaluate(data, PaintedProvider(fail_after=0), config, tmp_path, progress=False, plots=False)  # released


def test_duplicate_records_are_removed_on_resume(tmp_path):
    data, config = painted_dataset(3), EvalConfig("painted", protocol(), methods=("concept_attention",))
    clean = evaluate(data, PaintedProvider(), config, tmp_path, progress=False, plots=False)
    lines = (tmp_path / "results.rank0.jsonl").read_text().splitlines()
    # two runs on one folder (before the lock) and a kill: repeated images in two files and a cut line
    (tmp_path / "results.rank0.jsonl").write_text("\n".join([*lines, lines[0], '{"index": 1, "ima']) + "\n")
    (tmp_path / "results.rank1.jsonl").write_text(lines[1] + "\n")
    again = evaluate(data, PaintedProvider(fail_after=0), config, tmp_path, progress=False, plots=False)
    assert again == clean
    ids = [json.loads(line)["image_id"] for path in sorted(tmp_path.glob("results.rank*.jsonl"))
           for line in path.read_text().splitlines()]
    assert sorted(ids) == ["img0", "img1", "img2"]


def test_disk_full_says_what_happened_and_a_rerun_resumes(tmp_path):
    from concept_attention.segmentation.resume import ResultsFile

    class DiskFullAfterTwo(ResultsFile):
        def append(self, record):
            if record["index"] >= 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            super().append(record)

    data, config = painted_dataset(4), EvalConfig("painted", protocol(), methods=("concept_attention",))
    with pytest.raises(EvalError, match="image img2 .*the disk is full; the images finished so far are kept.*resume"):
        evaluate(data, PaintedProvider(), config, tmp_path, progress=False, plots=False, results_file=DiskFullAfterTwo)
    provider = PaintedProvider()
    assert evaluate(data, provider, config, tmp_path, progress=False, plots=False)["concept_attention"]["n_images"] == 4
    assert len(provider.calls) == 2


# ---- empty selections, t out of range, non-finite maps ---------------------------------------------------------

def test_an_empty_selection_is_an_error(tmp_path):
    with pytest.raises(SystemExit, match="nothing to evaluate: --limit 0 selects no images"):
        background_only(tmp_path / "out", "--limit", "0")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag,value", [("--t", "nan"), ("--t", "-1"), ("--t", "5"), ("--sweep-t", "0.5,nan"),
                                        ("--sweep-t", "1.5")])
def test_t_outside_0_1_is_refused(tmp_path, flag, value):
    with pytest.raises(SystemExit, match=r"in \[0, 1\]"):
        background_only(tmp_path, flag, value)
    assert not (tmp_path / "config.json").exists()


class NaNProvider(PaintedProvider):
    """Painted maps with one NaN, as a model with a NaN weight (or fp16 overflow) produces them."""

    def __init__(self, field):
        super().__init__()
        self.field = field

    def encode_image(self, image, concepts, **options):
        out = super().encode_image(image, concepts, **options)
        if self.field == "layer_maps":
            out.layer_maps["output"][1, 0, 0, 0] = float("nan")
        else:
            getattr(out, self.field)[0, 0, 0] = float("nan")
        return out


@pytest.mark.parametrize("field", ["concept_maps", "value_maps", "layer_maps"])
def test_non_finite_maps_are_never_scored(tmp_path, field):
    config = EvalConfig("painted", protocol(), methods=("concept_attention", "value_space"), per_layer=True)
    with pytest.raises(EvalError, match="image img0: the .*maps hold NaN or Inf.*non-finite model weights"):
        evaluate(painted_dataset(2), NaNProvider(field), config, tmp_path, progress=False, plots=False)
    assert not list(tmp_path.glob("results*")) and not (tmp_path / "config.json").exists()


# ---- damaged folders and files ---------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["", "{not json", "[1, 2]"])
def test_a_damaged_config_is_one_clear_error(tmp_path, text):
    assert background_only(tmp_path) == 0
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(SystemExit, match=r"config\.json .*(not valid JSON|not an eval configuration).*--overwrite"):
        background_only(tmp_path)
    assert background_only(tmp_path, "--overwrite") == 0


def test_a_line_that_is_not_a_record_names_file_and_line(tmp_path):
    assert background_only(tmp_path) == 0
    with open(tmp_path / "results.rank0.jsonl", "a") as file:
        file.write('{"scores": {}}\n')
    with pytest.raises(SystemExit, match=r"results\.rank0\.jsonl line 4 is not an eval record .*delete that line"):
        background_only(tmp_path)


def write_folder(root, n=2, size=8, classes="label,name\n0,background\n1,cat\n2,dog\n"):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.csv").write_text(classes, encoding="utf-8")
    for i in range(n):
        Image.fromarray(np.full((size, size, 3), 40 * i, np.uint8)).save(root / "images" / f"img{i}.png")
        mask = np.zeros((size, size), np.uint8)
        mask[1:3, 2:5] = 1 + i % 2
        Image.fromarray(mask, mode="L").save(root / "masks" / f"img{i}.png")


@pytest.mark.parametrize("classes,message", [
    ("label,name\n0,background\n1,cat\n1,dog\n", r"lines 3 and 4: label 1 is listed twice \('cat', 'dog'\)"),
    ("label,name\n0,background\n1,cat\n2,cat\n", r"lines 3 and 4: two labels are named 'cat'"),
    ("label,name\n0,background\none,cat\n", r"line 3: label 'one' is not a non-negative integer"),
    ("label,name\n0,background\n1,\n", r"line 3: label 1 has no name"),
    ("label,name\n0,background\n\u00b2,cat\n", r"line 3: label '\u00b2' is not a non-negative integer"),
])
def test_classes_csv_errors_name_the_rows(tmp_path, classes, message):
    from concept_attention.segmentation.datasets import DatasetError, FolderDataset

    write_folder(tmp_path, classes=classes)
    with pytest.raises(DatasetError, match=message):
        FolderDataset(tmp_path)


def test_classes_csv_with_a_byte_order_mark_reads(tmp_path):
    from concept_attention.segmentation.datasets import FolderDataset

    write_folder(tmp_path)
    (tmp_path / "classes.csv").write_text("label,name\n0,background\n1,cat\n2,dog\n", encoding="utf-8-sig")
    assert FolderDataset(tmp_path).class_names == ["background", "cat", "dog"]


def test_two_images_for_one_mask_are_refused(tmp_path):
    from concept_attention.segmentation.datasets import DatasetError, FolderDataset

    write_folder(tmp_path)
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "img1.jpg")
    with pytest.raises(DatasetError, match=r"one id has several images \(img1.jpg, img1.png\)"):
        FolderDataset(tmp_path)


def test_unreadable_images_are_named(tmp_path):
    from concept_attention.segmentation.datasets import DatasetError, FolderDataset

    write_folder(tmp_path / "garbage")
    (tmp_path / "garbage" / "images" / "img1.png").write_bytes(b"not an image at all")
    with pytest.raises(DatasetError, match=r"image .*img1.png cannot be read as an image"):
        FolderDataset(tmp_path / "garbage")                                    # before the run starts
    write_folder(tmp_path / "cut")
    path = tmp_path / "cut" / "images" / "img1.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:60])                                   # a valid header, then cut
    with pytest.raises(SystemExit, match=r"img1.png is damaged .*finished so far are kept.*resume"):
        run("--dataset", "folder", "--data", str(tmp_path / "cut"), "--methods", "predict_background",
            "--background-concepts", "background", "--out", str(tmp_path / "out"))
    assert (tmp_path / "out" / "results.rank0.jsonl").read_text().count("\n") == 1     # img0 is kept


# ---- memory: refuse an eval size the machine cannot hold -------------------------------------------------------

def test_eval_memory_estimate_bounds_the_real_peak():
    import tracemalloc

    from concept_attention.segmentation.evaluate import eval_memory_bytes

    size, classes = 256, 4
    proto = protocol(eval_size=size)
    vocab = Vocabulary(["background", "sky", "cat", "dog", "cow"], [0, 0, 1, 2, 3], "")
    maps = torch.rand(5, 8, 8)
    target = np.random.default_rng(0).integers(0, classes, (size, size))
    tracemalloc.start()
    score_maps(maps, vocab, target, proto, classes)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    estimate = eval_memory_bytes(size, num_concepts=5, num_channels=4)
    assert estimate == 8 * size ** 2 * (5 + 8 * 4 + 8)
    assert peak <= estimate <= 4 * peak                      # an upper bound, not a wild one


def test_an_eval_size_that_cannot_fit_is_refused_with_one_that_does():
    from concept_attention.segmentation.evaluate import check_eval_memory, eval_memory_bytes

    proto = get_preset("paper-voc-multi")                 # 5 background words, 21 classes: 26 maps, 21 channels
    available = 8 << 30
    with pytest.raises(EvalError, match=r"--eval-size 30000 needs about 1354\.5 GiB .* 8\.0 GiB available: "
                                        r"use --eval-size (\d+) or less") as error:
        check_eval_memory(replace(proto, eval_size=30000), 21, available=available)
    fits = int(str(error.value).split("use --eval-size ")[1].split()[0])
    assert eval_memory_bytes(fits, 26, 21) <= available // 2 < eval_memory_bytes(fits + 1, 26, 21)
    check_eval_memory(replace(proto, eval_size=fits), 21, available=available)
    with pytest.raises(EvalError, match=r"--pipeline-size 100000 needs about 223\.5 GiB .* use --pipeline-size 13377 "):
        check_eval_memory(replace(proto, pipeline_size=100000), 21, available=available)
    check_eval_memory(replace(proto, pipeline_size=13377), 21, available=available)


def test_eval_size_guard_runs_before_anything_is_allocated(tmp_path):
    with pytest.raises(SystemExit, match=r"--eval-size 1000000 needs about .* GiB"):
        background_only(tmp_path, "--eval-size", "1000000")


def test_eval_speaks_the_shared_cli_vocabulary(tmp_path, capsys):
    from concept_attention.cli import build_parser

    with pytest.raises(SystemExit, match="--device foo: not a device"):
        background_only(tmp_path, "--device", "foo")
    assert parse("--dataset", "shapes", "--out", "x", "--quiet").no_progress
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "--help"])
    assert "(default: float32)" in capsys.readouterr().out
