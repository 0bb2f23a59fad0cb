"""ConceptAttention inside the FLUX.2 forward: a naive float64 re-computation of one double and one single
block from the spec's formulas, invariants (hypothesis), closed forms, and the named sites."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from concept_attention import compute_concept_maps
from concept_attention.maps import MapAccumulator, run_concept_layers
from flux_mini import Flux2
from flux_mini.flux2 import AUTHORS_CONCEPT_POSITION, concept_position_ids
from flux_mini.interp import attention_weights, site_names
from flux_mini.layers import Sites
from flux_mini.tiny import randomize_, tiny_flux2_config

torch.set_num_threads(1)
SETTINGS = settings(max_examples=12, deadline=None)


def make_model(guidance=False, seed=0, dtype=torch.float32, **overrides) -> Flux2:
    return randomize_(Flux2(tiny_flux2_config(use_guidance_embed=guidance, **overrides)), seed=seed).eval().to(dtype)


MODEL = make_model()
GUIDED = make_model(guidance=True, seed=1)
# float64 twins where summation orders differ (permutations, batch vs loop)
MODEL64 = make_model(dtype=torch.float64)
GUIDED64 = make_model(guidance=True, seed=1, dtype=torch.float64)


def inputs(model: Flux2, batch=2, h=3, w=4, txt_len=5, concepts=3, seed=0, dtype=torch.float32):
    """Image ids (1, r, c, 0), text ids (0, 0, 0, n): every RoPE axis but one moves, and t is non-zero."""
    g = torch.Generator().manual_seed(seed)
    c = model.config
    img_ids = torch.zeros(batch, h * w, 4)
    img_ids[..., 0] = 1
    img_ids[..., 1] = torch.arange(h).repeat_interleave(w)
    img_ids[..., 2] = torch.arange(w).repeat(h)
    txt_ids = torch.zeros(batch, txt_len, 4)
    txt_ids[..., 3] = torch.arange(txt_len)
    return dict(
        img=torch.randn(batch, h * w, c.in_channels, generator=g, dtype=dtype),
        img_ids=img_ids,
        txt=torch.randn(batch, txt_len, c.context_in_dim, generator=g, dtype=dtype),
        txt_ids=txt_ids,
        timesteps=torch.rand(batch, generator=g, dtype=dtype),
        guidance=torch.full((batch,), 4.0, dtype=dtype) if c.use_guidance_embed else None,
        concept_txt=torch.randn(batch, concepts, c.context_in_dim, generator=g, dtype=dtype),
    )


def maps(model, x, **kwargs):
    with torch.no_grad():
        return compute_concept_maps(model, **x, **kwargs)


class Recorder(Sites):
    """Every named value of a pass, by full name (a test-only Sites: reads, never replaces)."""

    def __init__(self, prefix: str = "", store: dict | None = None):
        self.prefix, self.store = prefix, {} if store is None else store

    def __call__(self, name, value):
        self.store[self.prefix + name] = value
        return value

    def scoped(self, prefix):
        return Recorder(f"{prefix}.", self.store)


# -- a naive float64 re-computation (spec flux2-format.md §3, concept-attention.md §3) ---------------


def naive_blocks(model: Flux2, x: dict, concept_ids: torch.Tensor) -> dict:
    """Double block 0 and single block 0 of a depth-1 + 1 model with the concept stream, from the formulas."""
    p = {k: v.double() for k, v in model.state_dict().items()}
    c = model.config
    D, H, Dh, M = c.hidden_size, c.num_heads, c.head_dim, c.mlp_hidden_dim
    T = x["txt"].shape[1]

    def lin(v, name):
        return v @ p[name].T

    def ln(v):
        mean = v.mean(-1, keepdim=True)
        return (v - mean) / torch.sqrt(((v - mean) ** 2).mean(-1, keepdim=True) + 1e-6)

    def rms(v, gain):  # v (B, N, H, Dh)
        return v / torch.sqrt((v**2).mean(-1, keepdim=True) + 1e-6) * p[gain]

    def temb(t):
        freqs = torch.exp(-math.log(10_000) * torch.arange(128, dtype=torch.float64) / 128)
        args = (1000 * t.double())[:, None] * freqs
        return torch.cat((torch.cos(args), torch.sin(args)), dim=-1)

    def rope(v, ids):  # v (B, N, H, Dh), ids (B, N, 4): pair p = (2p, 2p+1), axis after axis
        out, pair = v.clone(), 0
        for axis, dim in enumerate(c.axes_dim):
            for j in range(dim // 2):
                angle = (ids[..., axis].double() * c.theta ** (-2 * j / dim))[..., None]  # (B, N, 1)
                x0, x1 = v[..., 2 * pair], v[..., 2 * pair + 1]
                out[..., 2 * pair] = torch.cos(angle) * x0 - torch.sin(angle) * x1
                out[..., 2 * pair + 1] = torch.sin(angle) * x0 + torch.cos(angle) * x1
                pair += 1
        return out

    def heads(v):
        return v.reshape(*v.shape[:2], H, Dh)  # feature h * Dh + d

    def attend(q, k, v):  # (B, N, H, Dh) each -> (B, Nq, D)
        weights = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(Dh), dim=-1)
        return torch.einsum("bhqk,bkhd->bqhd", weights, v).reshape(q.shape[0], q.shape[1], D)

    def swiglu(a):
        gate, value = a[..., : a.shape[-1] // 2], a[..., a.shape[-1] // 2 :]
        return gate * torch.sigmoid(gate) * value

    def mods(name, sets):
        chunks = lin(torch.nn.functional.silu(vec), name)[:, None].chunk(3 * sets, dim=-1)
        return [chunks[i : i + 3] for i in range(0, 3 * sets, 3)]

    def embed(value, name):
        return lin(torch.nn.functional.silu(lin(temb(value), f"{name}.in_layer.weight")), f"{name}.out_layer.weight")

    vec = embed(x["timesteps"], "time_in")
    if c.use_guidance_embed:
        vec = vec + embed(x["guidance"], "guidance_in")
    img, txt, con = lin(x["img"].double(), "img_in.weight"), lin(x["txt"].double(), "txt_in.weight"), None
    con = lin(x["concept_txt"].double(), "txt_in.weight")
    (img_a, img_m), (txt_a, txt_m) = mods("double_stream_modulation_img.lin.weight", 2), mods(
        "double_stream_modulation_txt.lin.weight", 2
    )
    ids = torch.cat((x["txt_ids"], x["img_ids"]), dim=1)
    out = {}

    # double block 0
    b = "double_blocks.0."
    qkv = {}
    for stream, tokens, (shift, scale, _) in (("img", img, img_a), ("txt", txt, txt_a), ("con", con, txt_a)):
        w = "txt" if stream == "con" else stream
        y = lin((1 + scale) * ln(tokens) + shift, f"{b}{w}_attn.qkv.weight")
        q = rms(heads(y[..., :D]), f"{b}{w}_attn.norm.query_norm.scale")
        k = rms(heads(y[..., D : 2 * D]), f"{b}{w}_attn.norm.key_norm.scale")
        qkv[stream] = (q, k, heads(y[..., 2 * D :]))
    q = rope(torch.cat((qkv["txt"][0], qkv["img"][0]), dim=1), ids)
    k = rope(torch.cat((qkv["txt"][1], qkv["img"][1]), dim=1), ids)
    v = torch.cat((qkv["txt"][2], qkv["img"][2]), dim=1)
    joint = attend(q, k, v)
    txt_o, img_o = joint[:, :T], joint[:, T:]
    q_c, k_c = rope(qkv["con"][0], concept_ids), rope(qkv["con"][1], concept_ids)
    o_c = attend(q_c, torch.cat((k_c, k[:, T:]), dim=1), torch.cat((qkv["con"][2], v[:, T:]), dim=1))
    new = {}
    for stream, tokens, o, (a, m) in (("img", img, img_o, (img_a, img_m)), ("txt", txt, txt_o, (txt_a, txt_m)),
                                      ("con", con, o_c, (txt_a, txt_m))):  # fmt: skip
        w = "txt" if stream == "con" else stream
        tokens = tokens + a[2] * lin(o, f"{b}{w}_attn.proj.weight")
        hidden = swiglu(lin((1 + m[1]) * ln(tokens) + m[0], f"{b}{w}_mlp.0.weight"))
        new[stream] = tokens + m[2] * lin(hidden, f"{b}{w}_mlp.2.weight")
    out["double"] = dict(
        img=new["img"], concept_out=o_c, image_out=img_o, stream=new["con"], scores=o_c @ img_o.transpose(1, 2),
        cross=torch.einsum("bnhd,brhd->bhrn", qkv["img"][0], qkv["con"][1]),
        concept_values=qkv["con"][2].flatten(2), image_values=qkv["img"][2].flatten(2),
    )  # fmt: skip

    # single block 0
    ((shift, scale, gate),) = mods("single_stream_modulation.lin.weight", 1)
    b = "single_blocks.0."
    xs = torch.cat((new["txt"], new["img"]), dim=1)
    parts = {}
    for stream, tokens in (("x", xs), ("con", new["con"])):
        y = lin((1 + scale) * ln(tokens) + shift, f"{b}linear1.weight")
        q = rms(heads(y[..., :D]), f"{b}norm.query_norm.scale")
        k = rms(heads(y[..., D : 2 * D]), f"{b}norm.key_norm.scale")
        parts[stream] = (q, k, heads(y[..., 2 * D : 3 * D]), y[..., 3 * D :])
    assert parts["x"][3].shape[-1] == 2 * M
    q, k, v, mlp_in = parts["x"]
    q_r, k_r = rope(q, ids), rope(k, ids)
    attn = attend(q_r, k_r, v)
    xs = xs + gate * lin(torch.cat((attn, swiglu(mlp_in)), dim=-1), f"{b}linear2.weight")
    q_c, k_c, v_c, mlp_c = parts["con"]
    keys, values = torch.cat((rope(k_c, concept_ids), k_r[:, T:]), dim=1), torch.cat((v_c, v[:, T:]), dim=1)
    o_c = attend(rope(q_c, concept_ids), keys, values)
    stream = new["con"] + gate * lin(torch.cat((o_c, swiglu(mlp_c)), dim=-1), f"{b}linear2.weight")
    out["single"] = dict(
        img=xs[:, T:], concept_out=o_c, image_out=attn[:, T:], stream=stream, scores=o_c @ attn[:, T:].transpose(1, 2),
        cross=torch.einsum("bnhd,brhd->bhrn", q[:, T:], k_c),
        concept_values=v_c.flatten(2), image_values=v[:, T:].flatten(2),
    )  # fmt: skip
    return out


@pytest.mark.parametrize("guidance", [False, True], ids=["klein-like", "dev-like"])
def test_one_double_and_one_single_block_equal_the_naive_formulas(guidance):
    model = make_model(guidance=guidance, seed=3, dtype=torch.float64, depth=1, depth_single_blocks=1)
    x = inputs(model, dtype=torch.float64, seed=5)
    concept_ids = torch.tensor([[0, 0, 0, AUTHORS_CONCEPT_POSITION], [0, 1, 2, 3], [1, 0, 0, 7]]).expand(2, 3, 4)
    expected = naive_blocks(model, x, concept_ids)
    with torch.no_grad():
        concept_txt = x.pop("concept_txt")
        stream = model.concept_stream(concept_txt, x["timesteps"], concept_ids, x["guidance"], "both", True, True)
        double, single = list(model.layers(**x, concepts=stream))
    for layer, want in ((double, expected["double"]), (single, expected["single"])):
        got = layer.concepts
        close = dict(rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(layer.img, want["img"], **close)
        torch.testing.assert_close(got.concept_out, want["concept_out"], **close)
        torch.testing.assert_close(got.image_out, want["image_out"], **close)
        torch.testing.assert_close(got.stream.tokens, want["stream"], **close)
        torch.testing.assert_close(got.cross_attention, want["cross"], **close)
        torch.testing.assert_close(got.concept_values, want["concept_values"], **close)
        torch.testing.assert_close(got.image_values, want["image_values"], **close)
    both = maps(model, x | {"concept_txt": concept_txt}, concept_ids=concept_ids)  # default: every layer
    naive = (expected["double"]["scores"].softmax(dim=1) + expected["single"]["scores"].softmax(dim=1)) / 2
    torch.testing.assert_close(both, naive, rtol=1e-10, atol=1e-12)
    cross = maps(model, x | {"concept_txt": concept_txt}, concept_ids=concept_ids, space="cross_attention", layers=[1])
    torch.testing.assert_close(cross, expected["single"]["cross"].softmax(dim=2).mean(dim=1), rtol=1e-10, atol=1e-12)


# -- invariants ---------------------------------------------------------------------------------


@SETTINGS
@given(
    concepts=st.integers(1, 5),
    attention=st.sampled_from(["both", "cross", "self", "none"]),
    single=st.booleans(),
    guided=st.booleans(),
    position=st.sampled_from([0, AUTHORS_CONCEPT_POSITION]),
    seed=st.integers(0, 1000),
)
def test_concepts_never_change_image_or_text(concepts, attention, single, guided, position, seed):
    """Every named value of the image and text streams, every layer, and the velocity: bit-identical."""
    model = GUIDED if guided else MODEL
    x = inputs(model, concepts=concepts, seed=seed)
    concept_txt = x.pop("concept_txt")
    ids = concept_position_ids(2, concepts, position)
    with torch.no_grad():
        plain_sites, concept_sites = Recorder(), Recorder()
        plain = list(model.layers(**x, sites=plain_sites))
        stream = model.concept_stream(concept_txt, x["timesteps"], ids, x["guidance"], attention, True, True)
        with_concepts = list(model.layers(**x, concepts=stream, concepts_in_single_blocks=single, sites=concept_sites))
        assert len(plain) == len(with_concepts) == model.config.num_layers
        for a, b in zip(plain, with_concepts):
            assert torch.equal(a.img, b.img)
            assert (b.concepts is not None) == (b.index < model.config.depth or single)
        shared = {k: v for k, v in concept_sites.store.items() if k.rsplit(".", 1)[-1] not in CONCEPT_SITES}
        assert shared.keys() == plain_sites.store.keys()
        assert all(torch.equal(shared[k], plain_sites.store[k]) for k in shared)
        velocity = model(**x)
        accumulator = MapAccumulator(spaces=("output", "cross_attention", "value"))
        velocity_with_concepts = run_concept_layers(
            model, **x, y=None, concept_txt=concept_txt, accumulator=accumulator,
            layers=list(model.config.concept_layers), attention=attention, need_output=True, concept_ids=ids,
        )  # fmt: skip
    assert torch.equal(velocity, velocity_with_concepts)


@SETTINGS
@given(
    perm_seed=st.integers(0, 10_000),
    concepts=st.integers(2, 5),
    space=st.sampled_from(["output", "cross_attention", "value"]),
    attention=st.sampled_from(["both", "cross", "self"]),
    own_ids=st.booleans(),
)
def test_permuting_concepts_permutes_maps(perm_seed, concepts, space, attention, own_ids):
    """With shared ids or with each concept's own ids permuted alongside, through every layer."""
    x = inputs(MODEL64, concepts=concepts, seed=perm_seed, dtype=torch.float64)
    g = torch.Generator().manual_seed(perm_seed)
    ids = torch.randint(0, 600, (2, concepts, 4), generator=g) if own_ids else concept_position_ids(2, concepts, 510)
    perm = torch.randperm(concepts, generator=g)
    base = maps(MODEL64, x, space=space, attention=attention, concept_ids=ids)
    x_permuted = x | {"concept_txt": x["concept_txt"][:, perm]}
    permuted = maps(MODEL64, x_permuted, space=space, attention=attention, concept_ids=ids[:, perm])
    torch.testing.assert_close(permuted, base[:, perm], rtol=1e-9, atol=1e-12)


@SETTINGS
@given(space=st.sampled_from(["output", "cross_attention", "value"]), softmax=st.booleans(), seed=st.integers(0, 1000))
def test_batch_equals_loop(space, softmax, seed):
    x = inputs(GUIDED64, batch=3, seed=seed, dtype=torch.float64)
    ids = torch.randint(0, 600, (3, 3, 4), generator=torch.Generator().manual_seed(seed))
    batched = maps(GUIDED64, x, space=space, softmax=softmax, concept_ids=ids)
    for i in range(3):
        item = {k: (v[i : i + 1] if v is not None else None) for k, v in x.items()}
        single = maps(GUIDED64, item, space=space, softmax=softmax, concept_ids=ids[i : i + 1])
        torch.testing.assert_close(single, batched[i : i + 1], rtol=1e-9, atol=1e-9)


# -- closed forms and defaults ------------------------------------------------------------------


def test_default_layers_are_every_layer_and_maps_are_distributions():
    x = inputs(MODEL, concepts=4)
    assert MODEL.config.concept_layers == tuple(range(4))
    default = maps(MODEL, x)
    torch.testing.assert_close(default, maps(MODEL, x, layers=[0, 1, 2, 3]), rtol=0, atol=0)
    assert not torch.allclose(default, maps(MODEL, x, layers=[0, 1]))  # the single blocks contribute
    assert default.shape == (2, 4, 12) and (default >= 0).all()
    torch.testing.assert_close(default.sum(dim=1), torch.ones(2, 12))


def test_a_shared_concept_position_cancels_in_self_attention_but_not_in_cross_attention():
    """RoPE scores depend on relative positions: among concepts at one common position they do not move,
    against image tokens they do. A rotation applied to q or k alone, or not at all, breaks one side."""
    x = inputs(MODEL64, concepts=3, dtype=torch.float64)
    at = {p: concept_position_ids(2, 3, p) for p in (0, AUTHORS_CONCEPT_POSITION)}
    self_only = [maps(MODEL64, x, attention="self", softmax=False, concept_ids=ids) for ids in at.values()]
    torch.testing.assert_close(self_only[0], self_only[1], rtol=1e-9, atol=1e-9)
    cross_only = [maps(MODEL64, x, attention="cross", softmax=False, concept_ids=ids) for ids in at.values()]
    assert (cross_only[0] - cross_only[1]).abs().max() > 1e-3 * cross_only[0].abs().max()
    assert torch.equal(at[AUTHORS_CONCEPT_POSITION][0, 0], torch.tensor([0.0, 0, 0, 510]))


def test_cross_only_with_one_image_token_returns_its_value():
    """Softmax over a single key is 1: every concept's output is that image token's value, in every layer."""
    x = inputs(MODEL, h=1, w=1, concepts=4)
    concept_txt = x.pop("concept_txt")
    with torch.no_grad():
        stream = MODEL.concept_stream(concept_txt, x["timesteps"], None, None, "cross", False, True)
        for layer in MODEL.layers(**x, concepts=stream):
            c = layer.concepts
            torch.testing.assert_close(c.concept_out, c.image_values.expand_as(c.concept_out))


def test_bad_concept_inputs_say_what_to_pass():
    x = inputs(MODEL)
    with pytest.raises(ValueError, match="concept_txt must be"):
        maps(MODEL, x | {"concept_txt": x["concept_txt"][..., :5]})
    with pytest.raises(ValueError, match="layers \\[7\\] do not exist"):
        maps(MODEL, x, layers=[7])
    with pytest.raises(ValueError, match="4 axes"):
        maps(MODEL, x | {"img_ids": x["img_ids"][..., :3]})


# -- named sites --------------------------------------------------------------------------------

CONCEPT_SITES = ["concept_q", "concept_k", "concept_attn", "concepts"]
DOUBLE_SITES = ["q", "k", "v", "txt_attn", "img_attn", "img_mlp", "img", "txt_mlp", "txt"] + CONCEPT_SITES
SINGLE_SITES = ["q", "k", "v", "attn", "mlp", "x"] + CONCEPT_SITES


def test_named_sites_are_the_documented_ones_and_replacing_one_changes_the_output():
    x = inputs(GUIDED)
    concept_txt = x.pop("concept_txt")
    recorder = Recorder()
    with torch.no_grad():
        stream = GUIDED.concept_stream(concept_txt, x["timesteps"], None, x["guidance"])
        list(GUIDED.layers(**x, concepts=stream, sites=recorder))
    expected = ["vec", "double_stream_modulation_img", "double_stream_modulation_txt", "single_stream_modulation",
                "img_in", "txt_in"]  # fmt: skip
    expected += [f"double_blocks.{i}.{n}" for i in range(2) for n in DOUBLE_SITES]
    expected += [f"single_blocks.{i}.{n}" for i in range(2) for n in SINGLE_SITES]
    assert sorted(recorder.store) == sorted(expected)
    assert site_names(GUIDED) == list(recorder.store)  # the declared SITES, in the order the forward visits them
    assert recorder.store["double_stream_modulation_img"].shape == (2, 1, 6 * 64)
    assert recorder.store["single_blocks.0.mlp"].shape == (2, 5 + 12, 3 * 64)

    class ZeroModulation(Sites):
        def __call__(self, name, value):
            return torch.zeros_like(value) if name == "single_stream_modulation" else value

    with torch.no_grad():
        plain = GUIDED(**x)
        patched = GUIDED(**x, sites=ZeroModulation())
        gated_off = list(GUIDED.layers(**x, sites=ZeroModulation()))
    assert not torch.allclose(plain, patched)
    assert torch.equal(gated_off[-1].img, gated_off[1].img)  # gate 0: the single blocks change nothing


def test_concept_attention_weights_read_at_the_sites_reproduce_the_concept_outputs():
    """flux_mini.interp rebuilds the concept rows of the attention from the q/k sites (concept_q, concept_k
    and the image keys, all after RoPE): weighting [v_c ; v_img] with them must give o_c in every layer."""
    x = inputs(MODEL64, concepts=3, dtype=torch.float64)
    concept_txt = x.pop("concept_txt")
    ids = torch.tensor([[0, 0, 0, 510], [0, 2, 1, 0], [3, 0, 0, 9]]).expand(2, 3, 4)
    with torch.no_grad():
        stream = MODEL64.concept_stream(concept_txt, x["timesteps"], ids, None, "both", False, True)
        weights = attention_weights(MODEL64, **x, concepts=stream, queries="concepts", keys="all")
        layers = list(MODEL64.layers(**x, concepts=stream))
    for layer in layers:
        c = layer.concepts
        values = torch.cat((c.concept_values, c.image_values), dim=1).unflatten(-1, (4, 16)).transpose(1, 2)
        out = (weights[layer.index] @ values).transpose(1, 2).flatten(2)  # (B, r, D)
        torch.testing.assert_close(out, c.concept_out, rtol=1e-10, atol=1e-12)
