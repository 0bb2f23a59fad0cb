"""ConceptAttention on FLUX.3: concepts never change the image (hypothesis), and a naive float64 re-computation
of the concept path through the text mode blocks and one joint block, written from the spec's formulas."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flux_mini.flux3 import Flux3
from flux_mini.layers import Sites
from flux_mini.tiny import randomize_, tiny_flux3_config

from test_flux3_parity import grid_ids

torch.set_num_threads(1)
MODEL = randomize_(Flux3(tiny_flux3_config()), seed=7).eval()
BASE = randomize_(Flux3(tiny_flux3_config(flow_map=False)), seed=8).eval()
MODEL64 = randomize_(Flux3(tiny_flux3_config()), seed=9).eval().double()


def inputs(model: Flux3, batch=2, rows=2, cols=3, text=5, refs=0, concepts=3, seed=0, dtype=torch.float32) -> dict:
    c, g = model.config, torch.Generator().manual_seed(seed)

    def ids(grid):
        return grid.expand(batch, -1, -1).to(dtype)

    x = dict(
        img=torch.randn(batch, rows * cols, c.in_channels, generator=g, dtype=dtype),
        img_ids=ids(grid_ids(rows, cols, c.image_rope_scale, 0.0)),
        txt=torch.randn(batch, text, c.context_in_dim, generator=g, dtype=dtype),
        txt_ids=ids(torch.stack([torch.zeros(text)] * 3 + [torch.arange(text, dtype=torch.float32)], dim=-1)),
        timesteps=torch.rand(batch, generator=g, dtype=dtype),
        target_timesteps=torch.rand(batch, generator=g, dtype=dtype) * 0.5 if c.flow_map else None,
        cond=torch.randn(batch, refs * 4, c.cond_in_channels, generator=g, dtype=dtype) if refs else None,
        cond_ids=ids(torch.cat([grid_ids(2, 2, 0.5, -1.0 - i) for i in range(refs)])) if refs else None,
    )
    return x, torch.randn(batch, concepts, c.context_in_dim, generator=g, dtype=dtype)


@settings(max_examples=10, deadline=None)
@given(
    concepts=st.integers(1, 4),
    attention=st.sampled_from(["both", "cross", "self", "none"]),
    refs=st.integers(0, 2),
    distilled=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_concepts_never_change_the_image(concepts, attention, refs, distilled, seed):
    model = MODEL if distilled else BASE
    x, concept_txt = inputs(model, refs=refs, concepts=concepts, seed=seed)
    with torch.no_grad():
        plain = list(model.layers(**x))
        stream = model.concept_stream(concept_txt, x["timesteps"], x["target_timesteps"], attention, True, True)
        with_concepts = list(model.layers(**x, concepts=stream))
        assert len(plain) == len(with_concepts) == model.config.num_layers
        for a, b in zip(plain, with_concepts):
            assert torch.equal(a.img, b.img)  # bit-identical, every layer
            assert (b.concepts is None) == (b.index < model.config.depth)  # maps from joint layers only
        velocity = model.final_layer["image"](with_concepts[-1].img, with_concepts[-1].vec)
        assert torch.equal(velocity, model(**x))


class Record(Sites):
    """Keeps every named value (the test's window into the forward)."""

    def __init__(self, store: dict, prefix: str = ""):
        self.store, self.prefix = store, prefix

    def __call__(self, name, value):
        self.store[self.prefix + name] = value
        return value

    def scoped(self, prefix):
        return Record(self.store, f"{self.prefix}{prefix}.")


# -- the naive re-computation: plain float64 tensor algebra, one formula per spec line -------------


def temb(t):  # spec §3.2: x1000, 128 frequencies exp(-ln(10000) k / 128), [cos | sin]
    k = torch.arange(128, dtype=torch.float64)
    angle = 1000 * t[:, None] * torch.exp(-math.log(10000) * k / 128)[None]
    return torch.cat([angle.cos(), angle.sin()], dim=1)


def mlp_embed(mlp, t):
    return torch.nn.functional.silu(temb(t) @ mlp.in_layer.weight.T) @ mlp.out_layer.weight.T


def modulation(lin, vec):  # -> shift, scale, gate, each (B, 1, D)
    out = torch.nn.functional.silu(vec) @ lin.weight.T
    d = vec.shape[-1]
    return [out[:, None, i * d : (i + 1) * d] for i in range(3)]


def modulate(x, shift, scale):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (1 + scale) * (x - mean) / torch.sqrt(var + 1e-6) + shift


def heads(x, h):  # (B, N, D) -> (B, H, N, Dh), head h = features h*Dh ... h*Dh + Dh - 1
    b, n, d = x.shape
    return x.reshape(b, n, h, d // h).permute(0, 2, 1, 3)


def rms(x, gain):
    return x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6) * gain


def rope(x, ids, axes, theta):  # spec §3.6: per axis, interleaved pairs, x0' = cos x0 - sin x1, x1' = sin x0 + cos x1
    out, start = x.clone(), 0
    for axis, dim in enumerate(axes):
        for j in range(dim // 2):
            angle = ids[:, None, :, axis] * theta ** (-2 * j / dim)  # (B, 1, N)
            x0, x1 = x[..., start + 2 * j], x[..., start + 2 * j + 1]
            out[..., start + 2 * j] = angle.cos() * x0 - angle.sin() * x1
            out[..., start + 2 * j + 1] = angle.sin() * x0 + angle.cos() * x1
        start += dim
    return out


def softmax_attention(q, k, v):
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return weights @ v


def merge(x):
    b, h, n, d = x.shape
    return x.permute(0, 2, 1, 3).reshape(b, n, h * d)


def swiglu_mlp(block, a):
    g, u = (a @ block.mlp_in.weight.T).chunk(2, dim=-1)
    return (torch.nn.functional.silu(g) * u) @ block.mlp_out.weight.T


def qkv(block, a, h):
    q, k, v = (heads(a @ p.weight.T, h) for p in (block.q_proj, block.k_proj, block.v_proj))
    return rms(q, block.norm.query_norm.scale), rms(k, block.norm.key_norm.scale), v


@torch.no_grad()
def test_concept_path_matches_naive_float64():
    """Concepts through the 2 text mode blocks (self-attention, text modulation at t = 0 + target), then joint
    block 0: queries over [concepts ; image] keys, text modulation; also the image rows of the joint attention
    output and the cross-attention baseline. Text and image tokens entering the joint block are read from sites."""
    model, h, cfg = MODEL64, MODEL64.config.num_heads, MODEL64.config
    x, concept_txt = inputs(model, concepts=3, seed=11, dtype=torch.float64)
    sites: dict = {}
    stream = model.concept_stream(concept_txt, x["timesteps"], x["target_timesteps"], "both", cross_attention=True)
    layers = list(model.layers(**x, concepts=stream, sites=Record(sites)))
    got = layers[cfg.depth].concepts  # joint block 0

    target = mlp_embed(model.ref_time_in, x["target_timesteps"])
    vec0 = mlp_embed(model.time_in, torch.zeros_like(x["timesteps"])) + target
    vec = mlp_embed(model.time_in, x["timesteps"]) + target

    c = concept_txt @ model.txt_in.weight.T
    shift, scale, gate = modulation(model.early_stream_modulations["txt"].lin, vec0)
    for block in model.txt_mode_blocks:  # concepts attend among themselves, no rotation (zero ids)
        a = modulate(c, shift, scale)
        q, k, v = qkv(block, a, h)
        c = c + gate * (merge(softmax_attention(q, k, v)) @ block.attn_out.weight.T + swiglu_mlp(block, a))

    block = model.single_blocks[0]
    txt, img = sites[f"txt_mode_blocks.{cfg.depth - 1}.x"], sites[f"content_mode_blocks.image.{cfg.depth - 1}.x"]
    t_shift, t_scale, t_gate = modulation(model.single_stream_modulations["txt"].lin, vec0)
    i_shift, i_scale, _ = modulation(model.single_stream_modulations["image"].lin, vec)
    joint = torch.cat([modulate(txt, t_shift, t_scale), modulate(img, i_shift, i_scale)], dim=1)
    q_all, k_all, v_all = qkv(block, joint, h)
    ids = torch.cat([x["txt_ids"], x["img_ids"]], dim=1)
    q_rot, k_rot = rope(q_all, ids, cfg.axes_dim, cfg.theta), rope(k_all, ids, cfg.axes_dim, cfg.theta)
    image = slice(txt.shape[1], None)
    image_out = merge(softmax_attention(q_rot, k_rot, v_all))[:, image]

    a_c = modulate(c, t_shift, t_scale)
    q_c, k_c, v_c = qkv(block, a_c, h)
    keys, values = torch.cat([k_c, k_rot[:, :, image]], 2), torch.cat([v_c, v_all[:, :, image]], 2)
    o_c = merge(softmax_attention(q_c, keys, values))
    c_next = c + t_gate * (o_c @ block.attn_out.weight.T + swiglu_mlp(block, a_c))
    cross = torch.einsum("bhnd,bhrd->bhrn", q_all[:, :, image], k_c)

    for name, ours, naive in [
        ("concept_out", got.concept_out, o_c),
        ("image_out", got.image_out, image_out),
        ("stream", got.stream.tokens, c_next),
        ("cross_attention", got.cross_attention, cross),
    ]:
        assert ours.shape == naive.shape, name
        assert torch.allclose(ours, naive, rtol=1e-9, atol=1e-9 * naive.abs().max().item()), name


# -- concept maps through concept_attention.maps ---------------------------------------------------


def maps(model, x, concept_txt, **kwargs):
    from concept_attention import compute_concept_maps

    with torch.no_grad():
        return compute_concept_maps(model, **x, concept_txt=concept_txt, **kwargs)


@torch.no_grad()
def test_maps_are_the_mean_of_the_joint_layers_softmax_scores():
    x, concept_txt = inputs(MODEL, refs=1, concepts=3, seed=2)
    got = maps(MODEL, x, concept_txt)  # default layers: every joint block
    stream = MODEL.concept_stream(concept_txt, x["timesteps"], x["target_timesteps"])
    joint = [layer.concepts for layer in MODEL.layers(**x, concepts=stream) if layer.concepts is not None]
    assert len(joint) == MODEL.config.depth_single_blocks
    expected = sum(torch.einsum("brd,bnd->brn", c.concept_out, c.image_out).softmax(dim=1) for c in joint) / len(joint)
    assert got.shape == (2, 3, x["img"].shape[1])  # image tokens only, never the references
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(got.sum(dim=1), torch.ones(2, x["img"].shape[1]), atol=1e-5)


@settings(max_examples=8, deadline=None)
@given(space=st.sampled_from(["output", "cross_attention", "value"]), seed=st.integers(0, 1000))
def test_permuting_concepts_permutes_maps(space, seed):
    x, concept_txt = inputs(MODEL64, concepts=4, seed=seed, dtype=torch.float64)
    perm = torch.randperm(4, generator=torch.Generator().manual_seed(seed))
    a = maps(MODEL64, x, concept_txt, space=space)
    b = maps(MODEL64, x, concept_txt[:, perm], space=space)
    assert torch.allclose(a[:, perm], b, atol=1e-10)


def test_base_model_maps_need_no_target_time():
    x, concept_txt = inputs(BASE, concepts=2, seed=3)
    assert maps(BASE, x, concept_txt, layers=[BASE.config.depth]).shape == (2, 2, 6)


def test_mode_layers_give_no_maps_and_say_so():
    import pytest

    x, concept_txt = inputs(MODEL, concepts=2)
    with pytest.raises(ValueError, match=r"layers \[0\] do not exist or give no concept maps.*Flux3 maps layers 2..3"):
        maps(MODEL, x, concept_txt, layers=[0, 2])


# -- named sites ----------------------------------------------------------------------------------


@torch.no_grad()
def test_declared_sites_are_exactly_the_visited_ones_and_patches_work():
    from flux_mini.interp import run_with_cache, run_with_patches, site_names

    x, concept_txt = inputs(MODEL, refs=1, concepts=2, seed=4)
    visited: dict = {}
    stream = MODEL.concept_stream(concept_txt, x["timesteps"], x["target_timesteps"])
    list(MODEL.layers(**x, concepts=stream, sites=Record(visited)))
    declared = site_names(MODEL)
    image_concept = [n for n in declared if n.startswith("content_mode_blocks.") and ".concept" in n]
    assert set(visited) == set(declared) - set(image_concept)  # image modes never carry concepts
    assert "single_blocks.1.concept_attn" in visited and "txt_mode_blocks.0.concepts" in visited

    plain = MODEL(**x)
    output, cache = run_with_cache(MODEL, **x, names=["single_blocks.*.x"])
    assert torch.equal(output, plain) and torch.equal(cache["single_blocks.1.x"], visited["single_blocks.1.x"])
    identity = run_with_patches(MODEL, **x, patches={"single_blocks.0.attn": lambda v: v})
    assert torch.equal(identity, plain)
    ablated = run_with_patches(MODEL, **x, patches={"content_mode_blocks.image_cond.1.x": 0.0})
    assert not torch.equal(ablated, plain)  # the references reach the image through the joint blocks
