"""ConceptAttention inside the model forward: invariants (hypothesis), closed forms, and a naive float64
re-computation of one block from the spec's formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from concept_attention import check_concepts, compute_concept_maps, gaussian_blur3x3, linear_normalize
from concept_attention.maps import MapAccumulator, run_concept_layers
from flux_mini.flux1 import Flux
from flux_mini.layers import ConceptStream
from flux_mini.tiny import randomize_, tiny_flux_config

torch.set_num_threads(1)
SETTINGS = settings(max_examples=12, deadline=None)


def make_model(guidance: bool = False, seed: int = 0, dtype=torch.float32) -> Flux:
    return randomize_(Flux(tiny_flux_config(guidance_embed=guidance)), seed=seed).eval().to(dtype)


MODEL = make_model()
GUIDED = make_model(guidance=True, seed=1)
# Float64 twins for comparisons across different summation orders (permutations, batch vs loop):
# random tiny weights give large activations, so float32 reordering noise reaches 1e-4 there.
MODEL64 = make_model(dtype=torch.float64)
GUIDED64 = make_model(guidance=True, seed=1, dtype=torch.float64)


def inputs(model: Flux, batch=2, h=3, w=4, txt_len=5, concepts=3, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    ids = torch.zeros(batch, h * w, 3)
    ids[..., 1] = torch.arange(h).repeat_interleave(w)
    ids[..., 2] = torch.arange(w).repeat(h)
    return dict(
        img=torch.randn(batch, h * w, c.in_channels, generator=g, dtype=dtype),
        img_ids=ids,
        txt=torch.randn(batch, txt_len, c.context_in_dim, generator=g, dtype=dtype),
        txt_ids=torch.zeros(batch, txt_len, 3),
        timesteps=torch.rand(batch, generator=g, dtype=dtype),
        y=torch.randn(batch, c.vec_in_dim, generator=g, dtype=dtype),
        guidance=torch.full((batch,), 3.5, dtype=dtype) if c.guidance_embed else None,
        concept_txt=torch.randn(batch, concepts, c.context_in_dim, generator=g, dtype=dtype),
    )


def maps(model, x, **kwargs):
    with torch.no_grad():
        return compute_concept_maps(model, **x, **kwargs)


# -- invariants ---------------------------------------------------------------------------------


@SETTINGS
@given(
    concepts=st.integers(1, 5),
    attention=st.sampled_from(["both", "cross", "self", "none"]),
    single=st.booleans(),
    guided=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_concepts_never_change_image_or_text(concepts, attention, single, guided, seed):
    model = GUIDED if guided else MODEL
    x = inputs(model, concepts=concepts, seed=seed)
    concept_txt = x.pop("concept_txt")
    with torch.no_grad():
        plain = list(model.layers(**x))
        stream = model.concept_stream(concept_txt, x["timesteps"], None, x["guidance"], attention, True, True)
        with_concepts = list(model.layers(**x, concepts=stream, concepts_in_single_blocks=single))
        assert len(plain) == len(with_concepts) == model.config.num_layers
        for a, b in zip(plain, with_concepts):
            assert torch.equal(a.img, b.img)  # bit-identical, every layer
            assert (b.concepts is not None) == (b.index < model.config.depth or single)
        velocity = model(**x)
        accumulator = MapAccumulator(spaces=("output", "cross_attention", "value"))
        layers = list(range(model.config.num_layers if single else model.config.depth))
        velocity_with_concepts = run_concept_layers(
            model, **x | {"guidance": x["guidance"]}, concept_txt=concept_txt, accumulator=accumulator,
            layers=layers, attention=attention, need_output=True,
        )
    assert torch.equal(velocity, velocity_with_concepts)


@SETTINGS
@given(
    perm_seed=st.integers(0, 10_000),
    concepts=st.integers(2, 5),
    space=st.sampled_from(["output", "cross_attention", "value"]),
    attention=st.sampled_from(["both", "cross", "self"]),
)
def test_permuting_concepts_permutes_maps(perm_seed, concepts, space, attention):
    x = inputs(MODEL64, concepts=concepts, seed=perm_seed, dtype=torch.float64)
    perm = torch.randperm(concepts, generator=torch.Generator().manual_seed(perm_seed))
    base = maps(MODEL64, x, space=space, attention=attention, layers=[0, 1, 2])
    permuted = maps(MODEL64, x | {"concept_txt": x["concept_txt"][:, perm]}, space=space, attention=attention, layers=[0, 1, 2])
    torch.testing.assert_close(permuted, base[:, perm], rtol=1e-9, atol=1e-12)


@SETTINGS
@given(
    concepts=st.integers(1, 6),
    space=st.sampled_from(["output", "cross_attention", "value"]),
    layers=st.lists(st.integers(0, 3), min_size=1, max_size=4),
    seed=st.integers(0, 1000),
)
def test_softmax_maps_are_distributions_over_concepts(concepts, space, layers, seed):
    out = maps(MODEL, inputs(MODEL, concepts=concepts, seed=seed), space=space, layers=layers)
    assert out.shape == (2, concepts, 12)
    assert (out >= 0).all()
    torch.testing.assert_close(out.sum(dim=1), torch.ones(2, 12))


@SETTINGS
@given(space=st.sampled_from(["output", "cross_attention", "value"]), softmax=st.booleans(), seed=st.integers(0, 1000))
def test_batch_equals_loop(space, softmax, seed):
    x = inputs(GUIDED64, batch=3, seed=seed, dtype=torch.float64)
    batched = maps(GUIDED64, x, space=space, softmax=softmax, layers=[1, 2])
    for i in range(3):
        item = {k: (v[i : i + 1] if v is not None else None) for k, v in x.items()}
        single = maps(GUIDED64, item, space=space, softmax=softmax, layers=[1, 2])
        torch.testing.assert_close(single, batched[i : i + 1], rtol=1e-9, atol=1e-9)


# -- closed forms -------------------------------------------------------------------------------


def first_layer(model, x, attention):
    concept_txt = x.pop("concept_txt")
    with torch.no_grad():
        stream = model.concept_stream(concept_txt, x["timesteps"], None, x["guidance"], attention, False, True)
        return next(model.layers(**x, concepts=stream))


def test_cross_only_with_one_image_token_returns_its_value():
    """Softmax over a single key is 1: every concept's output is that image token's value."""
    layer = first_layer(MODEL, inputs(MODEL, h=1, w=1, concepts=4), "cross")
    c = layer.concepts
    expected = c.image_values.expand_as(c.concept_out)  # (B, 1, D) -> (B, r, D)
    torch.testing.assert_close(c.concept_out, expected)


def test_self_only_with_one_concept_returns_its_value():
    layer = first_layer(MODEL, inputs(MODEL, concepts=1), "self")
    torch.testing.assert_close(layer.concepts.concept_out, layer.concepts.concept_values)


def test_neither_returns_the_concept_values():
    layer = first_layer(MODEL, inputs(MODEL, concepts=3), "none")
    torch.testing.assert_close(layer.concepts.concept_out, layer.concepts.concept_values)


def test_one_concept_softmax_map_is_all_ones():
    out = maps(MODEL, inputs(MODEL, concepts=1))
    torch.testing.assert_close(out, torch.ones_like(out))


# -- naive float64 re-computation of one double block ------------------------------------------------


def naive_layer_norm(x):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-6)


def naive_rms(x, gain):
    return x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6) * gain


def naive_rope(x, pos, axes_dim, theta):
    """x (L, Dh), pos (L, 3): rotate pairs (2p, 2p+1) by pos[axis] * theta^(-2j/d), axis by axis."""
    out = x.clone()
    pair = 0
    for axis, d in enumerate(axes_dim):
        for j in range(d // 2):
            angle = pos[:, axis] * theta ** (-2.0 * j / d)
            x0, x1 = x[:, 2 * pair], x[:, 2 * pair + 1]
            out[:, 2 * pair] = torch.cos(angle) * x0 - torch.sin(angle) * x1
            out[:, 2 * pair + 1] = torch.sin(angle) * x0 + torch.cos(angle) * x1
            pair += 1
    return out


def test_double_block_concept_attention_matches_naive_float64():
    model = make_model(guidance=True, seed=3, dtype=torch.float64)
    cfg = model.config
    x = inputs(model, batch=1, concepts=3, seed=7, dtype=torch.float64)
    x["img_ids"], x["txt_ids"] = x["img_ids"].double(), x["txt_ids"].double()
    got = first_layer(model, dict(x), "both").concepts

    H, Dh, D = cfg.num_heads, cfg.head_dim, cfg.hidden_size
    block = model.double_blocks[0]
    sd = {k: v.double() for k, v in block.state_dict().items()}

    def temb(t):
        freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float64) / 128)
        args = 1000 * t * freqs
        return torch.cat([torch.cos(args), torch.sin(args)])

    def mlp_embed(emb, prefix):
        p = {k[len(prefix) + 1 :]: v.double() for k, v in model.state_dict().items() if k.startswith(prefix + ".")}
        return p["out_layer.weight"] @ F.silu(p["in_layer.weight"] @ emb + p["in_layer.bias"]) + p["out_layer.bias"]

    t, g = x["timesteps"][0], x["guidance"][0]
    base = mlp_embed(temb(t), "time_in") + mlp_embed(temb(g), "guidance_in")
    vec = base + mlp_embed(x["y"][0], "vector_in")
    concept_vec = base + mlp_embed(torch.zeros(cfg.vec_in_dim, dtype=torch.float64), "vector_in")
    lin = lambda v, name: v @ sd[name + ".weight"].T + sd[name + ".bias"]  # noqa: E731

    img = x["img"][0] @ model.img_in.weight.T + model.img_in.bias
    txt = x["txt"][0] @ model.txt_in.weight.T + model.txt_in.bias
    c = x["concept_txt"][0] @ model.txt_in.weight.T + model.txt_in.bias

    def qkv(tokens, stream, cond):
        mod = lin(F.silu(cond), f"{stream}_mod.lin")
        shift, scale = mod[:D], mod[D : 2 * D]
        h = (1 + scale) * naive_layer_norm(tokens) + shift
        out = lin(h, f"{stream}_attn.qkv")
        q, k, v = out[:, :D], out[:, D : 2 * D], out[:, 2 * D :]
        heads = lambda z: z.reshape(-1, H, Dh).transpose(0, 1)  # noqa: E731  (H, L, Dh)
        q = naive_rms(heads(q), sd[f"{stream}_attn.norm.query_norm.scale"])
        k = naive_rms(heads(k), sd[f"{stream}_attn.norm.key_norm.scale"])
        return q, k, heads(v), mod

    img_q, img_k, img_v, _ = qkv(img, "img", vec)
    txt_q, txt_k, txt_v, _ = qkv(txt, "txt", vec)
    c_q, c_k, c_v, c_mod = qkv(c, "txt", concept_vec)
    pos = torch.cat([x["txt_ids"][0], x["img_ids"][0]])
    T = txt.shape[0]

    def softmax_attend(q, k, v):
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(Dh), dim=-1)
        return weights @ v

    o_x = torch.empty(H, img.shape[0], Dh, dtype=torch.float64)
    o_c = torch.empty(H, c.shape[0], Dh, dtype=torch.float64)
    for head in range(H):
        q_all = naive_rope(torch.cat([txt_q[head], img_q[head]]), pos, cfg.axes_dim, cfg.theta)
        k_all = naive_rope(torch.cat([txt_k[head], img_k[head]]), pos, cfg.axes_dim, cfg.theta)
        v_all = torch.cat([txt_v[head], img_v[head]])
        o_x[head] = softmax_attend(q_all, k_all, v_all)[T:]
        o_c[head] = softmax_attend(c_q[head], torch.cat([c_k[head], k_all[T:]]), torch.cat([c_v[head], v_all[T:]]))
    o_x = o_x.transpose(0, 1).reshape(-1, D)
    o_c = o_c.transpose(0, 1).reshape(-1, D)
    torch.testing.assert_close(got.image_out[0], o_x, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got.concept_out[0], o_c, rtol=1e-10, atol=1e-10)

    # the concept residual stream update, as the text stream's
    gate1, shift2, scale2, gate2 = (c_mod[i * D : (i + 1) * D] for i in (2, 3, 4, 5))
    c1 = c + gate1 * lin(o_c, "txt_attn.proj")
    hidden = F.gelu(lin((1 + scale2) * naive_layer_norm(c1) + shift2, "txt_mlp.0"), approximate="tanh")
    c2 = c1 + gate2 * lin(hidden, "txt_mlp.2")
    torch.testing.assert_close(got.stream.tokens[0], c2, rtol=1e-10, atol=1e-10)

    # the saliency of this layer: softmax over concepts of o_c . o_x
    x2 = inputs(model, batch=1, concepts=3, seed=7, dtype=torch.float64)
    x2["img_ids"], x2["txt_ids"] = x2["img_ids"].double(), x2["txt_ids"].double()
    expected = torch.softmax(o_c @ o_x.T, dim=0)
    torch.testing.assert_close(maps(model, x2, layers=[0])[0], expected, rtol=1e-10, atol=1e-10)
    # and the cross-attention baseline: per head q_img . k_c (pre-RoPE), softmax over concepts, mean over heads
    expected_cross = torch.stack([torch.softmax(c_k[h] @ img_q[h].T, dim=0) for h in range(H)]).mean(0)
    torch.testing.assert_close(maps(model, x2, layers=[0], space="cross_attention")[0], expected_cross, rtol=1e-10, atol=1e-10)


# -- stopping early, options, errors -------------------------------------------------------------------


def poison_(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(float("nan"))


def test_maps_only_run_the_blocks_they_read():
    """NaN weights in blocks after the last requested layer never reach the maps."""
    model = make_model(seed=5)
    poison_(model.single_blocks)
    poison_(model.final_layer)
    assert torch.isfinite(maps(model, inputs(model))).all()  # default: all double blocks, nothing after
    poison_(model.double_blocks[1])
    assert torch.isfinite(maps(model, inputs(model), layers=[0])).all()
    assert torch.isnan(maps(model, inputs(model), layers=[0, 1])).any()  # the poison does reach a read block


def test_single_block_layers_are_numbered_after_the_double_blocks():
    out = maps(MODEL, inputs(MODEL), layers=[MODEL.config.depth, MODEL.config.num_layers - 1])
    torch.testing.assert_close(out.sum(1), torch.ones(2, 12))


def test_linear_normalisation_and_blur():
    x = torch.tensor([[[1.0, -2.0], [3.0, -2.0], [2.0, -2.0]]])  # (B=1, r=3, D=2)
    n = linear_normalize(x, dim=1)
    torch.testing.assert_close(n[0, :, 0], torch.tensor([0.0, 2 / 3, 1 / 3]))
    torch.testing.assert_close(n[0, :, 1], torch.zeros(3))  # all equal: sum 0 counts as 1
    constant = torch.full((2, 3, 4, 5), 0.25)
    torch.testing.assert_close(gaussian_blur3x3(constant), constant)
    spike = torch.zeros(1, 5, 5)
    spike[0, 2, 2] = 1.0
    blurred = gaussian_blur3x3(spike)
    assert blurred[0, 2, 2] < 1 and blurred[0, 1, 2] > 0 and blurred[0, 0, 0] == 0
    torch.testing.assert_close(blurred.sum(), torch.tensor(1.0))
    no_norm = maps(MODEL, inputs(MODEL), softmax=False)
    assert not torch.allclose(no_norm.sum(1), torch.ones(2, 12))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(layers=[MODEL.config.num_layers]), "do not exist"),
        (dict(layers=[]), "no layers"),
        (dict(attention="sideways"), "attention must be one of"),
        (dict(space="pixel"), "spaces must be"),
    ],
)
def test_bad_options_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        maps(MODEL, inputs(MODEL), **kwargs)


def test_bad_concept_embeddings_are_named():
    x = inputs(MODEL)
    with pytest.raises(ValueError, match="concept_txt must be"):
        maps(MODEL, x | {"concept_txt": x["concept_txt"][..., :5]})
    with pytest.raises(ValueError, match="no concepts"):
        maps(MODEL, x | {"concept_txt": x["concept_txt"][:, :0]})


@pytest.mark.parametrize(
    "concepts, message",
    [([], "no concepts"), (["cat", "Cat"], "duplicate"), (["cat", " "], "non-empty"), ("cat", "single string")],
)
def test_bad_concept_lists_are_named(concepts, message):
    with pytest.raises(ValueError, match=message):
        check_concepts(concepts)


def test_config_without_blocks_is_refused():
    with pytest.raises(ValueError, match="at least one block"):
        tiny_flux_config(depth=0, depth_single_blocks=0)


def test_single_block_concept_attention_matches_naive_float64():
    """The extension: concepts through a single block's shared weights, recomputed from the formulas."""
    model = make_model(seed=4, dtype=torch.float64)
    cfg, block = model.config, model.single_blocks[0]
    H, Dh, D, M = cfg.num_heads, cfg.head_dim, cfg.hidden_size, cfg.mlp_hidden_dim
    g = torch.Generator().manual_seed(11)
    T, L, r = 5, 12, 3
    x = torch.randn(1, T + L, D, generator=g, dtype=torch.float64)
    vec, concept_vec = torch.randn(2, 1, D, generator=g, dtype=torch.float64)
    tokens = torch.randn(1, r, D, generator=g, dtype=torch.float64)
    pos = torch.zeros(T + L, 3, dtype=torch.float64)
    pos[T:, 1], pos[T:, 2] = torch.arange(L) // 4, torch.arange(L) % 4
    with torch.no_grad():
        stream = ConceptStream(tokens=tokens, vec=concept_vec)
        x_next, got = block(x, vec, model.pe_embedder(pos[None]), stream, num_txt=T)
    sd = {k: v.double() for k, v in block.state_dict().items()}

    def project(h, cond):
        mod = F.silu(cond) @ sd["modulation.lin.weight"].T + sd["modulation.lin.bias"]
        shift, scale, gate = mod[0, :D], mod[0, D : 2 * D], mod[0, 2 * D :]
        out = ((1 + scale) * naive_layer_norm(h)) + shift
        out = out @ sd["linear1.weight"].T + sd["linear1.bias"]
        heads = lambda z: z.reshape(-1, H, Dh).transpose(0, 1)  # noqa: E731
        q = naive_rms(heads(out[:, :D]), sd["norm.query_norm.scale"])
        k = naive_rms(heads(out[:, D : 2 * D]), sd["norm.key_norm.scale"])
        return q, k, heads(out[:, 2 * D : 3 * D]), out[:, 3 * D :], gate

    q, k, v, mlp_in, gate = project(x[0], vec)
    c_q, c_k, c_v, c_mlp, c_gate = project(tokens[0], concept_vec)
    attend = lambda q_, k_, v_: torch.softmax(q_ @ k_.T / math.sqrt(Dh), dim=-1) @ v_  # noqa: E731
    o_x, o_c = [], []
    for h in range(H):
        k_rot = naive_rope(k[h], pos, cfg.axes_dim, cfg.theta)
        o_x.append(attend(naive_rope(q[h], pos, cfg.axes_dim, cfg.theta), k_rot, v[h]))
        o_c.append(attend(c_q[h], torch.cat([c_k[h], k_rot[T:]]), torch.cat([c_v[h], v[h][T:]])))
    o_x = torch.stack(o_x, 1).reshape(T + L, D)
    o_c = torch.stack(o_c, 1).reshape(r, D)

    def linear2(a, m):
        return torch.cat([a, F.gelu(m, approximate="tanh")], -1) @ sd["linear2.weight"].T + sd["linear2.bias"]

    torch.testing.assert_close(x_next[0], x[0] + gate * linear2(o_x, mlp_in), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got.image_out[0], o_x[T:], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got.concept_out[0], o_c, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got.stream.tokens[0], tokens[0] + c_gate * linear2(o_c, c_mlp), rtol=1e-10, atol=1e-10)
    assert M == c_mlp.shape[-1]
