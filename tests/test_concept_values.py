"""Values, not shapes: each test here is written against a plausible bug that the rest of the suite let
through (named in its docstring), with an independent re-computation to compare against."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from concept_attention import ConceptAttentionPipeline, compute_concept_maps, encode_concepts, gaussian_blur3x3
from concept_attention.maps import MapAccumulator, layer_maps, run_concept_layers
from flux_mini import FluxPipeline
from flux_mini.flux1 import Flux
from flux_mini.layers import ConceptLayer, ConceptStream, LayerOutput, RoPE
from flux_mini.loading import infer_config
from flux_mini.tiny import build_tiny_weights, randomize_, tiny_flux_config

torch.set_num_threads(1)
CONCEPTS = ["circle", "grass", "sky"]


def model_inputs(config, batch=1, h=3, w=4, txt_len=5, concepts=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(batch, h * w, 3)
    ids[..., 1], ids[..., 2] = torch.arange(h).repeat_interleave(w), torch.arange(w).repeat(h)
    return dict(
        img=torch.randn(batch, h * w, config.in_channels, generator=g),
        img_ids=ids,
        txt=torch.randn(batch, txt_len, config.context_in_dim, generator=g),
        txt_ids=torch.zeros(batch, txt_len, 3),
        timesteps=torch.rand(batch, generator=g),
        y=torch.randn(batch, config.vec_in_dim, generator=g),
        concept_txt=torch.randn(batch, concepts, config.context_in_dim, generator=g),
    )


# ----------------------------------------------------------------------------------------------
# RoPE and the config


def test_rope_uses_theta():
    """Bug: RoPE ignoring `theta` (every other test uses 10000). Angles: pos * theta^(-2j/d) per axis."""
    axes_dim, theta = (4, 6, 6), 500
    ids = torch.tensor([[[0.0, 2.0, 3.0], [1.0, 5.0, 0.0], [7.0, 1.0, 4.0]]], dtype=torch.float64)
    angles = []
    for axis, d in enumerate(axes_dim):
        for j in range(d // 2):
            angles.append(ids[0, :, axis] * theta ** (-2.0 * j / d))
    angle = torch.stack(angles, dim=-1)  # (L, 8)
    expected = torch.complex(torch.cos(angle), torch.sin(angle))
    got = RoPE(axes_dim, theta)(ids)[0, 0]
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(RoPE(axes_dim, 10_000)(ids)[0, 0], expected)
    assert Flux(tiny_flux_config(theta=theta)).pe_embedder.theta == theta


@pytest.mark.parametrize("qkv_bias", [False, True])
@pytest.mark.parametrize("guidance", [False, True])
def test_infer_config_round_trip(qkv_bias, guidance):
    """Bug: infer_config forcing qkv_bias=True (no test had a model without the qkv bias)."""
    config = tiny_flux_config(guidance_embed=guidance, qkv_bias=qkv_bias, mlp_ratio=3.0)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Flux(config).state_dict().items()}
    assert any(k.endswith("qkv.bias") for k in shapes) == qkv_bias
    assert infer_config(shapes, axes_dim=config.axes_dim) == config


# ----------------------------------------------------------------------------------------------
# Blur and linear normalisation, against loops


def naive_blur(maps: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """3x3 Gaussian exp(-d^2 / (2 sigma^2)), normalised, with reflected borders (index -1 -> 1, n -> n - 2)."""
    k = np.exp(-np.array([1.0, 0.0, 1.0]) / (2 * sigma**2))
    k /= k.sum()
    h, w = maps.shape[-2:]
    reflect = lambda i, n: -i if i < 0 else (2 * (n - 1) - i if i >= n else i)  # noqa: E731
    out = np.zeros_like(maps)
    for i in range(h):
        for j in range(w):
            for a in range(3):
                for b in range(3):
                    out[..., i, j] += k[a] * k[b] * maps[..., reflect(i + a - 1, h), reflect(j + b - 1, w)]
    return out


@pytest.mark.parametrize("where", [(2, 3), (0, 3), (4, 0), (0, 0), (4, 6)])
@pytest.mark.parametrize("sigma", [1.0, 0.6])
def test_blur_of_a_spike_matches_the_formula(where, sigma):
    """Bugs: the kernel with sigma**2 instead of 2*sigma**2; `replicate` padding instead of `reflect`
    (a spike on the border or in a corner tells them apart)."""
    spike = np.zeros((2, 5, 7))
    spike[1][where] = 1.0
    spike[0] = np.arange(35).reshape(5, 7) % 4  # a second, busier map in the same call
    got = gaussian_blur3x3(torch.from_numpy(spike), sigma=sigma).numpy()
    np.testing.assert_allclose(got, naive_blur(spike, sigma), rtol=1e-12, atol=1e-14)


def naive_linear_normalize(vectors: np.ndarray) -> np.ndarray:
    """(r, D): per feature d, subtract the minimum over the concepts, divide by the sum over the concepts."""
    out = np.zeros_like(vectors)
    for d in range(vectors.shape[1]):
        shifted = vectors[:, d] - vectors[:, d].min()
        out[:, d] = shifted / (shifted.sum() if shifted.sum() != 0 else 1.0)
    return out


def test_linear_normalisation_runs_over_the_concepts():
    """Bug: linear normalisation over the feature axis instead of the concept axis."""
    g = torch.Generator().manual_seed(0)
    concept_out, image_out = torch.randn(1, 4, 6, generator=g, dtype=torch.float64), torch.randn(1, 9, 6, generator=g,
                                                                                                  dtype=torch.float64)
    stream = ConceptStream(tokens=concept_out, vec=torch.zeros(1, 6))
    layer = LayerOutput(0, image_out, torch.zeros(1, 6), ConceptLayer(concept_out, image_out, stream))
    expected = naive_linear_normalize(concept_out[0].numpy()) @ image_out[0].numpy().T  # (r, N)
    got = layer_maps(layer, "output", softmax=False, normalize="linear")[0].numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    softmaxed = layer_maps(layer, "output", softmax=True, normalize="linear")[0]
    torch.testing.assert_close(softmaxed, torch.from_numpy(expected).softmax(dim=0))


# ----------------------------------------------------------------------------------------------
# Which blocks run: default layers, early stop


class CountingFlux(Flux):
    """Flux that records which layers its block loop produced (the loop runs a block, then yields it)."""

    def __init__(self, config):
        super().__init__(config)
        self.produced: list[int] = []

    def layers(self, *args, **kwargs):
        for layer in super().layers(*args, **kwargs):
            self.produced.append(layer.index)
            yield layer


@pytest.fixture(scope="module")
def counting():
    return randomize_(CountingFlux(tiny_flux_config(depth=3, depth_single_blocks=2)), seed=2).eval()


@pytest.mark.parametrize("layers, blocks_run", [([0], [0]), ([1], [0, 1]), ([0, 2], [0, 1, 2]), ([3], [0, 1, 2, 3])])
def test_maps_stop_after_the_last_requested_block(counting, layers, blocks_run):
    """Bug: the early stop running one block too many (the maps stay equal, the compute is wasted)."""
    counting.produced.clear()
    with torch.no_grad():
        compute_concept_maps(counting, **model_inputs(counting.config), layers=layers)
    assert counting.produced == blocks_run


def test_a_velocity_pass_runs_every_block(counting):
    counting.produced.clear()
    x = model_inputs(counting.config)
    concept_txt = x.pop("concept_txt")
    with torch.no_grad():
        run_concept_layers(counting, **x, concept_txt=concept_txt, accumulator=MapAccumulator(), layers=[0],
                           need_output=True)
    assert counting.produced == list(range(counting.config.num_layers))


def test_default_layers_are_every_double_block(counting):
    """Bug: the default map layers `range(depth - 1)`."""
    x = model_inputs(counting.config, seed=4)
    with torch.no_grad():
        default = compute_concept_maps(counting, **x)
        every_double = compute_concept_maps(counting, **x, layers=range(counting.config.depth))
        one_fewer = compute_concept_maps(counting, **x, layers=range(counting.config.depth - 1))
    torch.testing.assert_close(default, every_double, rtol=0, atol=0)
    assert not torch.allclose(default, one_fewer)


# ----------------------------------------------------------------------------------------------
# The single block's cross-attention baseline


def naive_layer_norm(x):
    mean = x.mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(((x - mean) ** 2).mean(-1, keepdim=True) + 1e-6)


def naive_rms(x, gain):
    return x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6) * gain


def test_single_block_cross_attention_uses_unrotated_image_queries():
    """Bug: the single block's cross-attention baseline built from RoPE-rotated queries. The baseline is
    q_img . k_concept per head with QK-norm but no RoPE, as in the double blocks (spec)."""
    model = randomize_(Flux(tiny_flux_config()), seed=6).double().eval()
    block, cfg = model.single_blocks[0], model.config
    H, Dh, D = cfg.num_heads, cfg.head_dim, cfg.hidden_size
    g = torch.Generator().manual_seed(3)
    T, L, r = 4, 12, 3
    x = torch.randn(1, T + L, D, generator=g, dtype=torch.float64)
    vec, concept_vec = torch.randn(2, 1, D, generator=g, dtype=torch.float64)
    tokens = torch.randn(1, r, D, generator=g, dtype=torch.float64)
    pos = torch.zeros(T + L, 3, dtype=torch.float64)
    pos[T:, 1], pos[T:, 2] = torch.arange(L) // 4 + 1, torch.arange(L) % 4 + 1  # RoPE moves every image query
    with torch.no_grad():
        stream = ConceptStream(tokens, concept_vec, cross_attention=True)
        _, got = block(x, vec, model.pe_embedder(pos[None]), stream, T)
    sd = {k: v.double() for k, v in block.state_dict().items()}

    def q_and_k(h, cond):
        mod = F.silu(cond[0]) @ sd["modulation.lin.weight"].T + sd["modulation.lin.bias"]
        out = ((1 + mod[D : 2 * D]) * naive_layer_norm(h) + mod[:D]) @ sd["linear1.weight"].T + sd["linear1.bias"]
        heads = lambda z: z.reshape(-1, H, Dh).transpose(0, 1)  # noqa: E731  (H, tokens, Dh)
        return naive_rms(heads(out[:, :D]), sd["norm.query_norm.scale"]), naive_rms(heads(out[:, D : 2 * D]),
                                                                                  sd["norm.key_norm.scale"])

    q, _ = q_and_k(x[0], vec)
    _, k_c = q_and_k(tokens[0], concept_vec)
    expected = torch.einsum("hnd,hrd->hrn", q[:, T:], k_c)  # (H, r, L), unscaled
    torch.testing.assert_close(got.cross_attention[0], expected, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------------------------
# The pipeline's options, by value


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return ConceptAttentionPipeline.from_folder(build_tiny_weights(tmp_path_factory.mktemp("tiny"), seed=0))


IMAGE = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8))


def test_first_token_concept_encoding_is_the_unmasked_first_output(pipe):
    """Bug: the default concept encoding only shape-checked (e.g. masked, or another token)."""
    t5 = pipe.flux.t5
    got = encode_concepts(t5, ["grass", "sky", "red circle"], "first_token")
    for row, concept in zip(got, ["grass", "sky", "red circle"]):
        ids, _ = t5.tokenize([concept])
        with torch.no_grad():
            expected = t5.model(input_ids=ids).last_hidden_state[0, 0]
        torch.testing.assert_close(row, expected, rtol=0, atol=0)


def test_linear_normalisation_and_per_layer_maps_by_value(pipe):
    """Per-layer maps and the mean are softmax_r(norm_r(o_c) . o_x) of the layers' own raw vectors."""
    layers = [0, 2, 3]
    out = pipe.encode_image(IMAGE, CONCEPTS, layer_indices=layers, normalize="linear", per_layer=True,
                            return_vectors=True, spaces=["output"])
    assert [v["layer"] for v in out.vectors] == layers
    h, w = out.concept_maps.shape[-2:]
    expected = []
    for vectors in out.vectors:
        concept_out, image_out = vectors["concept_out"][0].double().numpy(), vectors["image_out"][0].double().numpy()
        scores = torch.from_numpy(naive_linear_normalize(concept_out) @ image_out.T)  # (r, N)
        expected.append(scores.softmax(dim=0).reshape(len(CONCEPTS), h, w))
    expected = torch.stack(expected).float()
    torch.testing.assert_close(out.layer_maps["output"], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.concept_maps, expected.mean(0), rtol=1e-5, atol=1e-6)
    plain = pipe.encode_image(IMAGE, CONCEPTS, layer_indices=layers, spaces=["output"])
    assert not torch.allclose(plain.concept_maps, out.concept_maps, atol=1e-3)  # the option does something


def test_blur_option_blurs_the_final_maps(pipe):
    kwargs = dict(layer_indices=[1, 2], per_layer=True)
    plain = pipe.encode_image(IMAGE, CONCEPTS, **kwargs)
    blurred = pipe.encode_image(IMAGE, CONCEPTS, blur=True, **kwargs)
    for got, unblurred in [(blurred.concept_maps, plain.concept_maps),
                           (blurred.cross_attention_maps, plain.cross_attention_maps),
                           (blurred.layer_maps["output"], plain.layer_maps["output"])]:
        expected = naive_blur(unblurred.double().numpy())
        np.testing.assert_allclose(got.double().numpy(), expected, rtol=1e-5, atol=1e-6)


def test_default_layers_are_the_last_four_double_blocks(pipe):
    """Bug: the pipeline's default of the last 4 double blocks changed to 3 (tiny models have depth 2,
    so this needs a deeper one)."""
    flux = pipe.flux
    deep = randomize_(Flux(replace(flux.model.config, depth=6, depth_single_blocks=1)), seed=5).eval()
    deep_pipe = ConceptAttentionPipeline(FluxPipeline(deep, flux.autoencoder, flux.t5, flux.clip, flux.defaults,
                                                      flux.variant))
    default = deep_pipe.encode_image(IMAGE, CONCEPTS, spaces=["output"]).concept_maps
    last_four = deep_pipe.encode_image(IMAGE, CONCEPTS, spaces=["output"], layer_indices=[2, 3, 4, 5]).concept_maps
    last_three = deep_pipe.encode_image(IMAGE, CONCEPTS, spaces=["output"], layer_indices=[3, 4, 5]).concept_maps
    torch.testing.assert_close(default, last_four, rtol=0, atol=0)
    assert not torch.allclose(default, last_three)
    generated = deep_pipe.generate_image("a circle", CONCEPTS, width=32, height=32, num_inference_steps=1,
                                         progress=False, spaces=["output"])
    explicit = deep_pipe.generate_image("a circle", CONCEPTS, width=32, height=32, num_inference_steps=1,
                                        progress=False, spaces=["output"], layer_indices=[2, 3, 4, 5])
    torch.testing.assert_close(generated.concept_maps, explicit.concept_maps, rtol=0, atol=0)

