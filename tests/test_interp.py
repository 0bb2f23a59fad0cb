"""Interpretability at named sites (flux_mini.interp): caches against naive float64 re-computations, identity
and stream patches against plain forwards, head ablation and attention weights against naive formulas,
gradients against finite differences, and the errors a typo gets."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from hypothesis import given, settings
from hypothesis import strategies as st

from concept_attention import ConceptAttentionPipeline, compute_concept_maps
from concept_attention.demo import demo_model
from flux_mini.flux1 import Flux
from flux_mini.flux2 import Flux2
from flux_mini.layers import CONCEPT_SITES
from flux_mini.interp import (
    Interventions,
    NamedSites,
    ablate_heads,
    attention_weights,
    run_with_cache,
    run_with_patches,
    site_names,
)
from flux_mini.sampling import pack
from flux_mini.tiny import randomize_, tiny_flux2_config, tiny_flux_config

torch.set_num_threads(1)
SETTINGS = settings(max_examples=10, deadline=None)


GENERATIONS = ("flux1", "flux2")


def make_model(generation="flux1", dtype=torch.float32, seed=0):
    model = Flux(tiny_flux_config()) if generation == "flux1" else Flux2(tiny_flux2_config())
    return randomize_(model, seed=seed).eval().to(dtype)


MODELS = {generation: make_model(generation) for generation in GENERATIONS}
MODELS64 = {generation: make_model(generation, torch.float64, seed=1) for generation in GENERATIONS}
MODEL, MODEL64 = MODELS["flux1"], MODELS64["flux1"]


def inputs(model, batch=2, h=3, w=4, txt_len=5, seed=0, **same):
    """Forward arguments of either generation; `same` overrides some (to share t, y and ids between two runs).
    FLUX.2 ids: image (1, row, col, 0), text (0, 0, 0, n), so that every RoPE axis moves."""
    g = torch.Generator().manual_seed(seed)
    c, dtype, axes = model.config, model.img_in.weight.dtype, len(model.config.axes_dim)
    img_ids, txt_ids = torch.zeros(batch, h * w, axes, dtype=dtype), torch.zeros(batch, txt_len, axes, dtype=dtype)
    img_ids[..., 1], img_ids[..., 2] = torch.arange(h).repeat_interleave(w), torch.arange(w).repeat(h)
    if axes == 4:
        img_ids[..., 0], txt_ids[..., 3] = 1, torch.arange(txt_len)
    x = dict(
        img=torch.randn(batch, h * w, c.in_channels, generator=g, dtype=dtype),
        img_ids=img_ids,
        txt=torch.randn(batch, txt_len, c.context_in_dim, generator=g, dtype=dtype),
        txt_ids=txt_ids,
        timesteps=torch.rand(batch, generator=g, dtype=dtype),
    )
    if isinstance(model, Flux):
        x["y"] = torch.randn(batch, c.vec_in_dim, generator=g, dtype=dtype)
    return x | same


def concept_stream(model, x: dict, concepts=3, seed=5, attention="both", values=False):
    """Flux.1: zero concept ids (no rotation); FLUX.2: concept ids (0, 0, 0, 7 + i), so RoPE turns them."""
    g = torch.Generator().manual_seed(seed)
    batch, dtype = x["img"].shape[0], x["img"].dtype
    concept_txt = torch.randn(batch, concepts, model.config.context_in_dim, generator=g, dtype=dtype)
    if isinstance(model, Flux):
        return model.concept_stream(concept_txt, x["timesteps"], attention=attention, values=values)
    ids = torch.zeros(batch, concepts, 4)
    ids[..., 3] = 7 + torch.arange(concepts)
    return model.concept_stream(concept_txt, x["timesteps"], concept_ids=ids, attention=attention, values=values)


class Recorder(NamedSites):
    def __init__(self):
        self.names = []

    def visit(self, name, value):
        self.names.append(name)
        return value


# -- the site list -------------------------------------------------------------------------------------


@pytest.mark.parametrize("generation", GENERATIONS)
def test_site_list_is_what_the_forward_visits(generation):
    """SITES (declared beside each forward) name exactly the sites a forward visits, in order."""
    model = MODELS[generation]
    x = inputs(model)
    full, plain = Recorder(), Recorder()
    list(model.layers(**x, concepts=concept_stream(model, x), concepts_in_single_blocks=True, sites=full))
    model(**x, sites=plain)
    assert full.names == site_names(model)
    assert plain.names == [n for n in site_names(model) if n.rsplit(".", 1)[-1] not in CONCEPT_SITES]
    assert "double_blocks.1.img_attn" in plain.names and "single_blocks.0.mlp" in plain.names


# -- cached values against a naive float64 re-computation ---------------------------------------------


def layer_norm(x):
    mean = x.mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(((x - mean) ** 2).mean(-1, keepdim=True) + 1e-6)


def rms(x, gain):
    return x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6) * gain


def rope(x, pos, axes_dim, theta):
    """x (H, N, Dh), pos (N, 3): each pair (2p, 2p+1) turned by the angle pos[axis] * theta^(-2j/d)."""
    out, pair = x.clone(), 0
    for axis, d in enumerate(axes_dim):
        for j in range(d // 2):
            angle = pos[:, axis] * theta ** (-2.0 * j / d)
            x0, x1 = x[..., 2 * pair], x[..., 2 * pair + 1]
            out[..., 2 * pair] = torch.cos(angle) * x0 - torch.sin(angle) * x1
            out[..., 2 * pair + 1] = torch.sin(angle) * x0 + torch.cos(angle) * x1
            pair += 1
    return out


def timestep_embedding(t, dim=256):
    freqs = torch.exp(-math.log(10_000) * torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
    return torch.cat([torch.cos(1000 * t * freqs), torch.sin(1000 * t * freqs)])


def embed(model, name, x):
    p = getattr(model, name).state_dict()
    return F.silu(x @ p["in_layer.weight"].T + p["in_layer.bias"]) @ p["out_layer.weight"].T + p["out_layer.bias"]


def naive_double_block(model, index, img, txt, vec, pos):
    """One double block on one sample, from the formulas: its site values by name."""
    cfg, p = model.config, {k: v for k, v in model.double_blocks[index].state_dict().items()}
    H, D, T = cfg.num_heads, cfg.hidden_size, txt.shape[0]
    lin = lambda x, name: x @ p[name + ".weight"].T + p[name + ".bias"]  # noqa: E731
    heads = lambda z: z.reshape(-1, H, D // H).transpose(0, 1)  # noqa: E731
    mods, qkv = {}, {}
    for stream, tokens in (("txt", txt), ("img", img)):
        mods[stream] = lin(F.silu(vec), f"{stream}_mod.lin").split(D)  # shift1 scale1 gate1 shift2 scale2 gate2
        h = lin((1 + mods[stream][1]) * layer_norm(tokens) + mods[stream][0], f"{stream}_attn.qkv")
        q, k, v = (heads(part) for part in h.split(D, dim=-1))
        norm = f"{stream}_attn.norm"
        qkv[stream] = rms(q, p[f"{norm}.query_norm.scale"]), rms(k, p[f"{norm}.key_norm.scale"]), v
    q, k, v = (torch.cat([qkv["txt"][i], qkv["img"][i]], dim=1) for i in range(3))
    q, k = rope(q, pos, cfg.axes_dim, cfg.theta), rope(k, pos, cfg.axes_dim, cfg.theta)
    out = (torch.softmax(q @ k.transpose(1, 2) / math.sqrt(D // H), dim=-1) @ v).transpose(0, 1).reshape(-1, D)
    sites = dict(q=q, k=k, v=v, txt_attn=out[:T], img_attn=out[T:])
    for stream, tokens in (("txt", txt), ("img", img)):
        shift1, scale1, gate1, shift2, scale2, gate2 = mods[stream]
        tokens = tokens + gate1 * lin(sites[f"{stream}_attn"], f"{stream}_attn.proj")
        hidden = F.gelu(lin((1 + scale2) * layer_norm(tokens) + shift2, f"{stream}_mlp.0"), approximate="tanh")
        sites[f"{stream}_mlp"] = lin(hidden, f"{stream}_mlp.2")
        sites[stream] = tokens + gate2 * sites[f"{stream}_mlp"]
    return sites


def naive_single_block(model, index, x, vec, pos):
    cfg, p = model.config, model.single_blocks[index].state_dict()
    H, D = cfg.num_heads, cfg.hidden_size
    shift, scale, gate = (F.silu(vec) @ p["modulation.lin.weight"].T + p["modulation.lin.bias"]).split(D)
    h = ((1 + scale) * layer_norm(x) + shift) @ p["linear1.weight"].T + p["linear1.bias"]
    heads = lambda z: z.reshape(-1, H, D // H).transpose(0, 1)  # noqa: E731
    q, k, v = (heads(part) for part in h[:, : 3 * D].split(D, dim=-1))
    q = rope(rms(q, p["norm.query_norm.scale"]), pos, cfg.axes_dim, cfg.theta)
    k = rope(rms(k, p["norm.key_norm.scale"]), pos, cfg.axes_dim, cfg.theta)
    attn = (torch.softmax(q @ k.transpose(1, 2) / math.sqrt(D // H), dim=-1) @ v).transpose(0, 1).reshape(-1, D)
    mlp = F.gelu(h[:, 3 * D :], approximate="tanh")
    x = x + gate * (torch.cat([attn, mlp], dim=-1) @ p["linear2.weight"].T + p["linear2.bias"])
    return dict(q=q, k=k, v=v, attn=attn, mlp=mlp, x=x)


def test_cached_values_equal_a_naive_recomputation():
    model, cfg = MODEL64, MODEL64.config
    x = inputs(model, batch=2, seed=3)
    with torch.no_grad():
        out, cache = run_with_cache(model, **x, names=["*"])
    assert torch.equal(out, model(**x))
    assert list(cache) == [n for n in site_names(model) if n.rsplit(".", 1)[-1] not in CONCEPT_SITES]
    pos = torch.cat([x["txt_ids"][0], x["img_ids"][0]])
    for b in range(2):  # every sample of the batch
        img = x["img"][b] @ model.img_in.weight.T + model.img_in.bias
        txt = x["txt"][b] @ model.txt_in.weight.T + model.txt_in.bias
        torch.testing.assert_close(cache["img_in"][b], img, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(cache["txt_in"][b], txt, rtol=1e-12, atol=1e-12)
        vec = embed(model, "time_in", timestep_embedding(x["timesteps"][b])) + embed(model, "vector_in", x["y"][b])
        torch.testing.assert_close(cache["vec"][b], vec, rtol=1e-12, atol=1e-12)
        for i in range(cfg.depth):
            expected = naive_double_block(model, i, cache[f"double_blocks.{i - 1}.img"][b] if i else img,
                                          cache[f"double_blocks.{i - 1}.txt"][b] if i else txt, vec, pos)  # fmt: skip
            for site, value in expected.items():
                torch.testing.assert_close(cache[f"double_blocks.{i}.{site}"][b], value, rtol=1e-10, atol=1e-10)
        last = f"double_blocks.{cfg.depth - 1}"
        stream = torch.cat([cache[f"{last}.txt"][b], cache[f"{last}.img"][b]])
        for i in range(cfg.depth_single_blocks):
            expected = naive_single_block(model, i, cache[f"single_blocks.{i - 1}.x"][b] if i else stream, vec, pos)
            for site, value in expected.items():
                torch.testing.assert_close(cache[f"single_blocks.{i}.{site}"][b], value, rtol=1e-10, atol=1e-10)


def test_cache_keeps_only_what_was_asked():
    x = inputs(MODEL)
    with torch.no_grad():
        _, cache = run_with_cache(MODEL, **x, names=["double_blocks.*.img", "single_blocks.1.attn"])
    assert list(cache) == ["double_blocks.0.img", "double_blocks.1.img", "single_blocks.1.attn"]


# -- patches -------------------------------------------------------------------------------------------


@SETTINGS
@given(
    generation=st.sampled_from(GENERATIONS),
    seed=st.integers(0, 10_000),
    batch=st.integers(1, 3),
    pattern=st.sampled_from(["*", "double_blocks.*", "*.q", "*concept*"]),
)
def test_identity_patch_is_bit_identical(generation, seed, batch, pattern):
    model = MODELS[generation]
    x = inputs(model, batch=batch, seed=seed)
    identity = {pattern: lambda v: v}
    with torch.no_grad():
        if "concept" not in pattern:
            assert torch.equal(run_with_patches(model, **x, patches=identity), model(**x))
        concept_txt = torch.randn(batch, 2, model.config.context_in_dim, generator=torch.Generator().manual_seed(seed))
        maps = compute_concept_maps(model, **x, concept_txt=concept_txt, layers=[0, 1, 2])
        patched = run_with_patches(compute_concept_maps, model, **x, concept_txt=concept_txt, layers=[0, 1, 2],
                                   patches=identity)  # fmt: skip
        assert torch.equal(maps, patched)


@pytest.mark.parametrize("generation", GENERATIONS)
def test_patching_both_streams_after_the_last_double_block_reproduces_the_other_run(generation):
    """Same t, y and positions; different image and text: the single blocks then see the other run."""
    model = MODELS[generation]
    a = inputs(model, seed=1)
    b = inputs(model, seed=2, **{name: a[name] for name in ("timesteps", "y") if name in a})
    last = f"double_blocks.{model.config.depth - 1}"
    with torch.no_grad():
        target, source = model(**a), model(**b)
        _, cache = run_with_cache(model, **b, names=[f"{last}.img", f"{last}.txt"])
        patched = run_with_patches(model, **a, patches=cache)
        only_img = run_with_patches(model, **a, patches={f"{last}.img": cache[f"{last}.img"]})
    assert not torch.allclose(target, source)
    assert torch.equal(patched, source)
    assert not torch.allclose(only_img, source)  # the text stream matters too


def test_zero_ablating_one_head_equals_a_naive_recomputation():
    model, cfg = MODEL64, MODEL64.config
    x = inputs(model, seed=4)
    H, Dh, head = cfg.num_heads, cfg.head_dim, 2
    names = ["vec", "img_in", "double_blocks.0.img_attn", "double_blocks.0.img", "double_blocks.0.txt"]
    with torch.no_grad():
        _, plain = run_with_cache(model, **x, names=names)
        patches = {"double_blocks.0.img_attn": ablate_heads(head, H)}
        _, ablated = run_with_cache(model, **x, patches=patches, names=names)
    attn = plain["double_blocks.0.img_attn"].clone()
    attn[..., head * Dh : (head + 1) * Dh] = 0
    assert torch.equal(ablated["double_blocks.0.img_attn"], attn)
    p = model.double_blocks[0].state_dict()
    lin = lambda v, name: v @ p[name + ".weight"].T + p[name + ".bias"]  # noqa: E731
    mods = lin(F.silu(plain["vec"]), "img_mod.lin")[:, None].split(cfg.hidden_size, -1)
    shift1, scale1, gate1, shift2, scale2, gate2 = mods
    img = plain["img_in"] + gate1 * lin(attn, "img_attn.proj")
    hidden = F.gelu(lin((1 + scale2) * layer_norm(img) + shift2, "img_mlp.0"), approximate="tanh")
    img = img + gate2 * lin(hidden, "img_mlp.2")
    torch.testing.assert_close(ablated["double_blocks.0.img"], img, rtol=1e-10, atol=1e-10)
    assert torch.equal(ablated["double_blocks.0.txt"], plain["double_blocks.0.txt"])  # the txt rows are untouched
    assert not torch.allclose(ablated["double_blocks.0.img"], plain["double_blocks.0.img"])


def test_patch_values_broadcast_and_functions_transform():
    x = inputs(MODEL64)
    site = "double_blocks.1.img"
    with torch.no_grad():
        _, cache = run_with_cache(MODEL64, **x, names=[site, "single_blocks.0.x"])
        mean = cache[site].mean(dim=(0, 1))  # (D,): mean ablation
        _, meaned = run_with_cache(MODEL64, **x, patches={site: mean}, names=[site])
        direction = torch.randn(MODEL64.config.hidden_size, dtype=torch.float64)
        _, steered = run_with_cache(MODEL64, **x, patches={site: lambda v: v + 3 * direction},
                                    names=[site])  # fmt: skip
        _, zeroed = run_with_cache(MODEL64, **x, patches={site: 0.0}, names=[site])
    assert torch.equal(meaned[site], mean.expand_as(cache[site]))
    assert torch.equal(steered[site], cache[site] + 3 * direction)
    assert torch.equal(zeroed[site], torch.zeros_like(cache[site]))


# -- attention weights -----------------------------------------------------------------------------------


def naive_weights(q, k):
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)


@pytest.mark.parametrize("queries,keys", [("img", "txt"), ("txt", "img"), ("img", "img"), ("all", "all")])
@pytest.mark.parametrize("generation", GENERATIONS)
def test_attention_weights_equal_naive_softmax_rows(generation, queries, keys):
    model = MODELS64[generation]
    cfg = model.config
    x = inputs(model, seed=6)
    T, L = x["txt"].shape[1], x["img"].shape[1]
    span = {"txt": slice(0, T), "img": slice(T, T + L), "all": slice(0, T + L)}
    layers = [0, cfg.depth + 1]  # a double and a single block
    blocks = ["double_blocks.0", "single_blocks.1"]
    index = [0, 4, 2] if queries != "all" else None
    with torch.no_grad():
        names = [f"{b}.{s}" for b in blocks for s in ("q", "k", "v")]
        names += ["double_blocks.0.img_attn", "single_blocks.1.attn"]
        _, cache = run_with_cache(model, **x, names=names)
        weights = attention_weights(model, **x, layers=layers, queries=queries, keys=keys, query_index=index)
        chunked = attention_weights(model, **x, layers=layers, queries=queries, keys=keys, query_index=index,
                                    chunk_size=2)  # fmt: skip
        full = attention_weights(model, **x, layers=layers, queries="all", keys="all")
    assert sorted(weights) == layers
    for layer, block in zip(layers, blocks):
        every = naive_weights(cache[f"{block}.q"], cache[f"{block}.k"])  # (B, H, T + L, T + L)
        rows = every[:, :, span[queries]]
        rows = rows[:, :, index] if index is not None else rows
        torch.testing.assert_close(weights[layer], rows[..., span[keys]], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(chunked[layer], weights[layer], rtol=1e-14, atol=1e-15)
        torch.testing.assert_close(full[layer].sum(-1), torch.ones_like(full[layer][..., 0]), rtol=1e-12, atol=1e-12)
        # the weights are what the forward used: they rebuild the attention output
        out = torch.einsum("bhqk,bhkd->bqhd", full[layer], cache[f"{block}.v"]).flatten(2)
        cached = cache["double_blocks.0.img_attn"] if block[0] == "d" else cache["single_blocks.1.attn"][:, T:]
        torch.testing.assert_close(out[:, T:], cached, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("attention,keys", [("both", "img"), ("both", "concepts"), ("both", "all"), ("cross", "img")])
@pytest.mark.parametrize("generation", GENERATIONS)
def test_concept_attention_weights(generation, attention, keys):
    model = MODELS64[generation]
    cfg = model.config
    x = inputs(model, seed=8)
    T = x["txt"].shape[1]
    stream = concept_stream(model, x, attention=attention, values=True)
    names = ["double_blocks.1.concept_q", "double_blocks.1.concept_k", "double_blocks.1.k",
             "single_blocks.0.concept_q", "single_blocks.0.concept_k", "single_blocks.0.k"]  # fmt: skip
    with torch.no_grad():
        layers, cache = run_with_cache(model.layers, **x, concepts=stream, concepts_in_single_blocks=True, names=names)
        weights = attention_weights(model, **x, concepts=stream, concepts_in_single_blocks=True, layers=[1, 2],
                                    queries="concepts", keys=keys)  # fmt: skip
    for layer, block in ((1, "double_blocks.1"), (2, "single_blocks.0")):
        k_c, k_img = cache[f"{block}.concept_k"], cache[f"{block}.k"][:, :, T:]
        every = naive_weights(cache[f"{block}.concept_q"], torch.cat([k_c, k_img], 2) if attention == "both" else k_img)
        r = k_c.shape[2] if attention == "both" else 0
        columns = {"img": slice(r, None), "concepts": slice(0, r), "all": slice(None)}[keys]
        torch.testing.assert_close(weights[layer], every[..., columns], rtol=1e-12, atol=1e-12)
        if keys == "all":  # the weights are what the forward used: they rebuild the concept attention output
            got = layers[layer].concepts
            values = [got.concept_values, got.image_values] if attention == "both" else [got.image_values]
            values = rearrange(torch.cat(values, dim=1), "b n (h d) -> b h n d", h=cfg.num_heads)
            out = rearrange(weights[layer] @ values, "b h r d -> b r (h d)")
            torch.testing.assert_close(out, got.concept_out, rtol=1e-10, atol=1e-10)
    assert len(layers) == cfg.num_layers


# -- gradients -------------------------------------------------------------------------------------------


def test_gradient_flows_from_a_map_to_the_input_image():
    """d(map of concept 0 at token 3) / d(pixels), against central finite differences in float64."""
    model = MODEL64
    g = torch.Generator().manual_seed(9)
    pixels = torch.randn(1, 4, 6, 8, generator=g, dtype=torch.float64, requires_grad=True)  # -> 3 x 4 tokens of 16
    x = inputs(model, batch=1, seed=9)
    concept_txt = torch.randn(1, 3, model.config.context_in_dim, generator=g, dtype=torch.float64)

    def score(p):
        return compute_concept_maps(model, **(x | {"img": pack(p)}), concept_txt=concept_txt, layers=[0, 1])[0, 0, 3]

    score(pixels).backward()
    assert pixels.grad.abs().max() > 0
    eps = 1e-6
    for where in [(0, 0, 0, 0), (0, 2, 3, 5), (0, 3, 5, 7)]:
        step = torch.zeros_like(pixels)
        step[where] = eps
        with torch.no_grad():
            numeric = (score(pixels + step) - score(pixels - step)) / (2 * eps)
        torch.testing.assert_close(pixels.grad[where], numeric, rtol=1e-5, atol=1e-9)


def test_gradient_reaches_a_steering_vector_and_cached_values():
    x = inputs(MODEL)
    direction = torch.zeros(MODEL.config.hidden_size, requires_grad=True)
    out, cache = run_with_cache(MODEL, **x, names=["single_blocks.0.attn"],
                                patches={"double_blocks.1.img": lambda v: v + direction})  # fmt: skip
    (out.square().sum() + cache["single_blocks.0.attn"].sum()).backward()
    assert direction.grad is not None and direction.grad.abs().sum() > 0


# -- inside the pipelines (the demo model) --------------------------------------------------------------


@pytest.fixture(scope="module")
def demo():
    settings = demo_model(announce=False)
    return ConceptAttentionPipeline.from_folder(settings.weights), settings


def test_flux_pipeline_caches_and_patches_at_chosen_steps(demo):
    pipe, settings = demo
    flux, model, size = pipe.flux, pipe.flux.model, settings.image_size
    run = dict(width=size, height=size, num_steps=4, seed=1, progress=False)
    plain = np.asarray(flux(settings.prompt, **run))
    chosen = Interventions(model, cache=["img_in", "double_blocks.*.img"], patches={"*": lambda v: v}, steps=[0, 2])
    assert np.array_equal(np.asarray(flux(settings.prompt, **run, interventions=chosen)), plain)
    assert sorted(chosen.cache) == [0, 2]
    assert list(chosen.cache[2]) == ["img_in"] + [f"double_blocks.{i}.img" for i in range(model.config.depth)]
    noise, _ = flux.prepare_latents(1, size, size, seed=1)
    with torch.no_grad():
        assert torch.equal(chosen.cache[0]["img_in"], model.img_in(noise))  # step 0 reads the seed's noise
    # patches from a run's own cache, step by step, give that run back; the same values one step late do not
    every = Interventions(model, cache=["img_in"])
    flux(settings.prompt, **run, interventions=every)
    replay = Interventions(model, patches=lambda step: every.cache[step])
    late = Interventions(model, patches=lambda step: every.cache[max(step - 1, 0)])
    assert np.array_equal(np.asarray(flux(settings.prompt, **run, interventions=replay)), plain)
    assert not np.array_equal(np.asarray(flux(settings.prompt, **run, interventions=late)), plain)


def test_flux2_pipeline_caches_and_patches_at_chosen_steps(tmp_path):
    from flux_mini.flux2_pipeline import Flux2Pipeline
    from flux_mini.tiny import build_tiny_flux2_weights

    pipe = Flux2Pipeline.from_folder(build_tiny_flux2_weights(tmp_path / "klein", seed=0))
    run = dict(width=32, height=32, num_steps=3, seed=4, progress=False)
    plain = np.asarray(pipe(PROMPT2, **run))
    chosen = Interventions(pipe.model, cache=["img_in", "single_blocks.*.x"], patches={"*": lambda v: v}, steps=[0, 2])
    assert np.array_equal(np.asarray(pipe(PROMPT2, **run, interventions=chosen)), plain)
    assert sorted(chosen.cache) == [0, 2] and len(chosen.cache[2]) == 1 + pipe.model.config.depth_single_blocks
    noise, _ = pipe.prepare_latents(1, 32, 32, seed=4)
    txt, _ = pipe.encode_prompt(PROMPT2)
    assert not torch.is_inference(txt)
    with torch.no_grad():
        assert torch.equal(chosen.cache[0]["img_in"], pipe.model.img_in(noise))
    zeroed = Interventions(pipe.model, patches={"double_blocks.0.img_attn": 0.0})
    assert not np.array_equal(np.asarray(pipe(PROMPT2, **run, interventions=zeroed)), plain)


PROMPT2 = "a red cat on the grass"


def test_concept_pipelines_take_interventions(demo):
    pipe, settings = demo
    model, size, concepts = pipe.flux.model, settings.image_size, settings.concepts
    run = dict(width=size, height=size, num_inference_steps=4, seed=2, progress=False)
    plain = pipe.generate_image(settings.prompt, concepts, **run)
    cached = Interventions(model, cache=["double_blocks.3.concepts"], patches={"*": lambda v: v}, steps=[1])
    out = pipe.generate_image(settings.prompt, concepts, **run, interventions=cached)
    assert torch.equal(out.concept_maps, plain.concept_maps)
    assert np.array_equal(np.asarray(out.image), np.asarray(plain.image))
    assert list(out.cache) == [1] and out.cache[1]["double_blocks.3.concepts"].shape == (1, len(concepts), model.config.hidden_size)
    heads = Interventions(model, patches={"double_blocks.*.img_attn": ablate_heads([0, 1], model.config.num_heads)})
    ablated = pipe.generate_image(settings.prompt, concepts, **run, interventions=heads)
    assert not torch.allclose(ablated.concept_maps, plain.concept_maps)
    image = plain.image
    encoded = pipe.encode_image(image, concepts, num_samples=2, interventions=Interventions(model, cache=["txt_in"]))
    assert sorted(encoded.cache) == [0, 1] and torch.equal(encoded.cache[0]["txt_in"], encoded.cache[1]["txt_in"])
    with pytest.raises(ValueError, match="stops"):  # the maps read layers 0..3; the pass ends there
        pipe.encode_image(image, concepts, interventions=Interventions(model, cache=["single_blocks.0.x"]))


def test_pipelines_run_under_autograd_when_asked(demo):
    pipe, settings = demo
    model, size = pipe.flux.model, settings.image_size
    txt, _, _ = pipe.flux.encode_prompt(settings.prompt)
    assert not torch.is_inference(txt)  # text embeddings can enter a differentiable forward
    direction = torch.zeros(model.config.hidden_size, requires_grad=True)
    steer = Interventions(model, patches={"double_blocks.1.img": lambda v: v + direction})
    out = pipe.generate_image(settings.prompt, settings.concepts, width=size, height=size, num_inference_steps=2,
                              progress=False, interventions=steer, grad=True)  # fmt: skip
    out.concept_maps[0].sum().backward()
    assert direction.grad.abs().sum() > 0
    plain = pipe.generate_image(settings.prompt, settings.concepts, width=size, height=size, num_inference_steps=2,
                                progress=False)  # fmt: skip
    assert not plain.concept_maps.requires_grad


# -- errors ----------------------------------------------------------------------------------------------


def test_attention_weights_refuse_a_layer_with_two_attentions():
    """A model whose layer runs two attentions (each with q and k sites) would be read wrongly: refused."""

    class TwoAttentions(torch.nn.Module):
        config = type("Config", (), {"num_layers": 1})

        def layers(self, q, sites):
            for block in ("a.0", "b.0"):
                sites.scoped(block)("q", q), sites.scoped(block)("k", q)
            yield type("Layer", (), {"index": 0})

    with pytest.raises(ValueError, match="a.0 and b.0 both attend within one layer"):
        attention_weights(TwoAttentions(), torch.zeros(1, 1, 2, 4), layers=[0])


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda x: run_with_cache(MODEL, **x, names=["double_blocks.0.imgg"]), "Did you mean double_blocks.0.img"),
        (lambda x: run_with_cache(MODEL, **x, names=["double_blocks.7.*"]), "matches no site of this model"),
        (lambda x: run_with_cache(MODEL, **x, names=["double_blocks.0.concepts"]), "concept stream"),
        (lambda x: run_with_cache(MODEL, **x, names=[3]), "must be strings"),
        (lambda x: run_with_patches(MODEL, **x, patches={"double_blocks.0.img": torch.zeros(2, 3)}), r"\(2, 12, 64\)"),
        (lambda x: run_with_patches(MODEL, **x, patches={"vec": lambda v: v[0]}), "must return a tensor"),
        (lambda x: run_with_patches(MODEL, **x, patches={"double_blocks.0.img": ablate_heads(0, 5)}), "does not split"),
        (lambda x: ablate_heads(4, 4), r"heads \[4\] do not exist"),
        (lambda x: attention_weights(MODEL, **x, queries="image"), "queries must be one of"),
        (lambda x: attention_weights(MODEL, **x, keys="concepts"), "no image or text token attends"),
        (lambda x: attention_weights(MODEL, **x, concepts=concept_stream(MODEL, x), queries="concepts"), "not 'txt'"),
        (lambda x: attention_weights(MODEL, **x, queries="concepts"), "needs the concept stream"),
        (lambda x: attention_weights(MODEL, **x, layers=[4]), r"subset of 0..3"),
        (lambda x: attention_weights(MODEL, **x, query_index=[12]), "out of range"),
        (
            lambda x: attention_weights(MODEL, **x, concepts=concept_stream(MODEL, x), layers=[2], queries="concepts",
                                        keys="img"),
            "concepts_in_single_blocks",
        ),
    ],
)
def test_bad_requests_are_clear_errors(call, message):
    x = inputs(MODEL)
    with torch.no_grad(), pytest.raises(ValueError if message != "must be strings" else TypeError, match=message):
        call(x)


def test_attention_weights_on_flux3_joint_layers():
    """FLUX.3: weights of a joint layer equal softmax(q k^T / sqrt(d)) of its cached q and k (float64, naive);
    its mode layers, where each mode attends within itself, are refused with the layers that work."""
    from flux_mini.flux3 import Flux3
    from flux_mini.tiny import tiny_flux3_config

    model = randomize_(Flux3(tiny_flux3_config()), seed=1).eval()
    c = model.config
    g = torch.Generator().manual_seed(0)
    rows, cols, text = 3, 4, 6
    r, col = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    zeros = torch.zeros(rows * cols)
    img_ids = torch.stack([zeros, 0.5 * r.flatten(), 0.5 * col.flatten(), zeros], dim=-1)[None]
    txt_ids = torch.stack([torch.zeros(text)] * 3 + [torch.arange(text, dtype=torch.float32)], dim=-1)[None]
    args = (torch.randn(1, rows * cols, c.in_channels, generator=g), img_ids,
            torch.randn(1, text, c.context_in_dim, generator=g), txt_ids, torch.tensor([0.7]))
    kwargs = {"target_timesteps": torch.tensor([0.3])} if c.flow_map else {}
    joint = c.depth + 1
    weights = attention_weights(model, *args, layers=[joint], queries="img", keys="txt", **kwargs)[joint]
    _, cache = run_with_cache(model, *args, names=["single_blocks.1.q", "single_blocks.1.k"], **kwargs)
    q, k = cache["single_blocks.1.q"].double(), cache["single_blocks.1.k"].double()
    naive = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)[:, :, text:, :text]
    torch.testing.assert_close(weights.double(), naive, rtol=0, atol=1e-6)
    assert set(attention_weights(model, *args, queries="img", keys="all", **kwargs)) == set(c.map_layers)
    with pytest.raises(ValueError, match="map_layers"):
        attention_weights(model, *args, layers=[0], **kwargs)
