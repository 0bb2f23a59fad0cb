"""FLUX.2 gets what Flux.1's pipeline has: interventions at named sites per denoising step (also with CFG),
the memory guard before anything is allocated, non-finite and seed checks. On the tiny klein / klein Base
folders of `flux_mini.tiny`."""

import numpy as np
import pytest
import torch

from concept_attention.pipeline import ConceptAttentionPipeline
from flux_mini.flux2_pipeline import Flux2Pipeline
from flux_mini.interp import Interventions, run_with_cache
from flux_mini.memory import RunTooLargeError
from flux_mini.pipeline import NonFiniteError
from flux_mini.sampling import timestep_vector
from flux_mini.tiny import build_tiny_flux2_weights

PROMPT = "a red cat sitting on the grass"
RUN = dict(seed=3, num_steps=2, progress=False)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def klein(tmp_path_factory):
    return Flux2Pipeline.from_folder(build_tiny_flux2_weights(tmp_path_factory.mktemp("flux2") / "klein", seed=0))


@pytest.fixture(scope="module")
def klein_base(tmp_path_factory):
    folder = build_tiny_flux2_weights(tmp_path_factory.mktemp("flux2") / "base", seed=0, variant="klein-base")
    pipe = Flux2Pipeline.from_folder(folder)
    assert pipe.defaults.cfg
    return pipe


def first_step_inputs(pipe: Flux2Pipeline, prompt: str = PROMPT) -> dict:
    """The model inputs of the pipeline's first denoising step, rebuilt from its stages."""
    with torch.no_grad():
        txt, txt_ids = pipe.encode_prompt([prompt])
    img, img_ids = pipe.prepare_latents(1, 64, 64, seed=RUN["seed"])
    t = pipe.timesteps(RUN["num_steps"], img.shape[1])[0]
    return dict(img=img, img_ids=img_ids, txt=txt, txt_ids=txt_ids, timesteps=timestep_vector(t, img))


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


@pytest.mark.parametrize("which", ["klein", "klein_base"])
def test_identity_interventions_leave_the_image_bit_identical(which, request):
    pipe = request.getfixturevalue(which)
    plain = pixels(pipe(PROMPT, **RUN))
    identity = Interventions(pipe.model, cache=["double_blocks.*.img"], patches={"*": lambda v: v})
    assert np.array_equal(pixels(pipe(PROMPT, **RUN, interventions=identity)), plain)
    assert sorted(identity.cache) == [0, 1] and "double_blocks.0.img" in identity.cache[1]


def test_cached_site_equals_a_naive_rerun_of_the_first_step(klein):
    interventions = Interventions(klein.model, cache=["double_blocks.0.img"])
    klein(PROMPT, **RUN, interventions=interventions)
    with torch.no_grad():
        _, naive = run_with_cache(klein.model, **first_step_inputs(klein), names=["double_blocks.0.img"])
    assert torch.equal(interventions.cache[0]["double_blocks.0.img"], naive["double_blocks.0.img"])
    assert not torch.equal(interventions.cache[1]["double_blocks.0.img"], naive["double_blocks.0.img"])


def test_a_zero_patch_changes_the_image(klein):
    plain = pixels(klein(PROMPT, **RUN))
    ablated = klein(PROMPT, **RUN, interventions=Interventions(klein.model, patches={"double_blocks.0.img_attn": 0.0}))
    assert np.abs(pixels(ablated) - plain).max() > 2
    one_step = Interventions(klein.model, patches={"double_blocks.0.img_attn": 0.0}, steps=[1])
    assert not np.array_equal(pixels(klein(PROMPT, **RUN, interventions=one_step)), pixels(ablated))


def test_with_cfg_patches_reach_both_passes_and_the_cache_holds_the_prompts(klein_base):
    calls = []
    counting = Interventions(
        klein_base.model, cache=["double_blocks.0.img"], patches={"img_in": lambda v: calls.append(1) or v}
    )
    klein_base(PROMPT, **RUN, interventions=counting)
    assert len(calls) == 2 * RUN["num_steps"]  # the empty-prompt and the prompt's call of every step
    inputs = first_step_inputs(klein_base)
    with torch.no_grad():
        _, prompt = run_with_cache(klein_base.model, **inputs, names=["double_blocks.0.img"])
        _, empty = run_with_cache(klein_base.model, **{**inputs, "txt": klein_base.encode_prompt([""])[0]},
                                  names=["double_blocks.0.img"])
    cached = counting.cache[0]["double_blocks.0.img"]
    assert torch.equal(cached, prompt["double_blocks.0.img"]) and not torch.equal(cached, empty["double_blocks.0.img"])


def test_gradients_flow_only_when_asked(klein):
    inputs = first_step_inputs(klein)
    steer = torch.zeros(klein.model.config.hidden_size, requires_grad=True)
    args = (inputs["img"], inputs["img_ids"], inputs["txt"], inputs["txt_ids"], klein.timesteps(1, 256))
    steering = Interventions(klein.model, patches={"double_blocks.0.img": lambda v: v + steer})
    klein.denoise(*args, progress=False, interventions=steering, grad=True).square().sum().backward()
    assert steer.grad is not None and steer.grad.abs().sum() > 0
    assert not klein.denoise(*args, progress=False, interventions=steering).requires_grad


def test_sizes_too_large_are_refused_up_front_with_the_estimate(klein):
    with pytest.raises(RunTooLargeError, match=r"100000x100000 needs about .* GiB \(transformer .*autoencoder .*"
                                               r"use a size that fits, e.g. width (\d+) and height \1"):
        klein(PROMPT, width=100000, height=100000, progress=False)  # refused before the noise (600 GB) exists
    budget = 64 * 2**20
    with pytest.raises(RunTooLargeError, match=r"has 0.1 GiB free; use a size that fits") as refused:
        klein.check_memory(4096, 2048, available=budget)  # height, width
    width, height = (int(s) for s in refused.value.args[0].split("width ")[-1].split(" and height "))
    assert abs(height - 2 * width) <= 4 and width % 4 == height % 4 == 0  # the same aspect, multiples of 4
    klein.check_memory(height, width, available=budget)  # the suggested size fits
    estimate = klein.memory_estimate(64, 64)
    assert klein.memory_estimate(128, 128)["autoencoder"] == 4 * estimate["autoencoder"]
    assert klein.memory_estimate(64, 64, batch=2)["transformer"] > estimate["transformer"]
    with pytest.raises(RunTooLargeError, match="needs about"):
        ConceptAttentionPipeline(klein).generate_image(PROMPT, ["cat", "grass"], width=100000, height=100000)


def test_nan_weights_and_bad_seeds_are_refused(klein):
    weight = klein.model.img_in.weight
    saved = weight[0, 0].item()
    with torch.no_grad():
        weight[0, 0] = float("nan")
    try:
        with pytest.raises(NonFiniteError, match="latents hold .* NaN/Inf values"):
            klein(PROMPT, **RUN)
    finally:
        with torch.no_grad():
            weight[0, 0] = saved
    with pytest.raises(ValueError, match=r"seed 4294967295 is outside \[0, 2\*\*32\) \(and seed \+ 1"):
        klein([PROMPT, PROMPT], seed=2**32 - 1, num_steps=1, progress=False)
    with pytest.raises(ValueError, match="seed must be an integer"):
        klein(PROMPT, seed=1.5, progress=False)
