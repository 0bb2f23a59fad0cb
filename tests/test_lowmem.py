"""fp8 storage (official fp8 file formats written here, loaded strictly) and block offload.

Each fp8 file is compared with a plain bf16 model whose weights are the file's values dequantized by hand
(w * scale in float32, then bf16): computing in bf16 with per-layer upcast must give exactly its output."""

import pytest
import torch
from safetensors.torch import save_file

from concept_attention.maps import compute_concept_maps
from flux_mini.checkpoint import CheckpointError
from flux_mini.flux1 import Flux
from flux_mini.loading import load_flux, save_flux
from flux_mini.lowmem import Float8Linear, OffloadedBlocks, offload_blocks, store_float8
from flux_mini.tiny import randomize_, tiny_flux_config

CONFIG = tiny_flux_config()
FP8 = torch.float8_e4m3fn


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in randomize_(Flux(CONFIG), seed=4).state_dict().items()}


def inputs(batch: int = 1, seed: int = 0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(batch, 12, CONFIG.in_channels, generator=g).to(dtype)
    txt = torch.randn(batch, 5, CONFIG.context_in_dim, generator=g).to(dtype)
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(3.0), torch.arange(4.0), indexing="ij"), -1)
    img_ids = img_ids.reshape(1, 12, 3).expand(batch, -1, -1)
    txt_ids = torch.zeros(batch, 5, 3)
    t = torch.full((batch,), 0.6, dtype=dtype)
    y = torch.randn(batch, CONFIG.vec_in_dim, generator=g).to(dtype)
    return img, img_ids, txt, txt_ids, t, y


def is_block_linear_weight(name: str) -> bool:
    return name.startswith(("double_blocks.", "single_blocks.")) and name.endswith(".weight") and "norm" not in name


def reference(state: dict, weights: dict[str, torch.Tensor]) -> Flux:
    """A plain bf16 Flux with `weights` replacing the matching entries of `state`."""
    model = Flux(CONFIG)
    model.load_state_dict({k: weights.get(k, v).to(torch.bfloat16) for k, v in state.items()})
    return model.to(torch.bfloat16).eval()


def quantized(state: dict, per_row: bool) -> tuple[dict, dict, dict]:
    """fp8 weights with scales (per tensor or per output row), and what they dequantize to."""
    fp8, scales, exact = {}, {}, {}
    for name, w in state.items():
        if is_block_linear_weight(name):
            amax = w.abs().amax(dim=1) if per_row else w.abs().amax()
            scale = (amax / 448.0).float()
            q = (w / (scale[:, None] if per_row else scale)).to(FP8)
            fp8[name], scales[name[: -len(".weight")]] = q, scale
            exact[name] = q.float() * (scale[:, None] if per_row else scale)
    return fp8, scales, exact


def assert_fp8_linears(model: Flux) -> None:
    """Every Linear inside the blocks stores one byte per weight (10 per double block, 3 per single)."""
    in_blocks = [m for n, m in model.named_modules() if n.startswith(("double_blocks.", "single_blocks."))]
    linears = [m for m in in_blocks if isinstance(m, (torch.nn.Linear, Float8Linear))]
    assert len(linears) == 10 * CONFIG.depth + 3 * CONFIG.depth_single_blocks
    assert all(isinstance(m, Float8Linear) and m.weight.element_size() == 1 for m in linears)


def test_raw_fp8_file_under_prefix_keeps_fp8_and_computes_in_bf16(tmp_path, state):
    """`flux1-schnell-fp8-e4m3fn` style: every tensor cast to fp8, under `model.diffusion_model.`."""
    file = {f"model.diffusion_model.{k}": v.to(FP8) for k, v in state.items()}
    save_file(file, tmp_path / "fp8.safetensors")
    model = load_flux(tmp_path / "fp8.safetensors", config=CONFIG)
    assert_fp8_linears(model)
    ref = reference(state, {k: v.to(FP8).float() for k, v in state.items()})
    args = inputs()
    assert torch.equal(model(*args), ref(*args))
    concept_txt = torch.randn(1, 3, CONFIG.context_in_dim).to(torch.bfloat16)
    maps = compute_concept_maps(model, *args, concept_txt, layers=[0, 1, 2])
    assert torch.equal(maps, compute_concept_maps(ref, *args, concept_txt, layers=[0, 1, 2]))


@pytest.mark.parametrize("convention", ["comfyui", "bfl"])
def test_scaled_fp8_files_apply_their_scales(tmp_path, state, convention):
    """ComfyUI: `.scale_weight` (per tensor), `.scale_input`, a `scaled_fp8` marker, the rest bf16.
    BFL FLUX.2 -fp8 style: `.weight_scale` (here per output row) and `.input_scale`."""
    per_row = convention == "bfl"
    fp8, scales, exact = quantized(state, per_row)
    weight_key, input_key = ("scale_weight", "scale_input") if convention == "comfyui" else ("weight_scale", "input_scale")
    file = {k: fp8.get(k, v.to(torch.bfloat16)) for k, v in state.items()}
    for module, scale in scales.items():
        file[f"{module}.{weight_key}"] = scale
        file[f"{module}.{input_key}"] = torch.tensor(0.5)
    if convention == "comfyui":
        file["scaled_fp8"] = torch.empty(0, dtype=FP8)
    save_file(file, tmp_path / "scaled.safetensors")

    model = load_flux(tmp_path / "scaled.safetensors", config=CONFIG)
    assert_fp8_linears(model)
    args = inputs()
    assert torch.equal(model(*args), reference(state, exact)(*args))

    # dtype= casts everything, scales included
    full = load_flux(tmp_path / "scaled.safetensors", config=CONFIG, dtype=torch.float32)
    assert not any(isinstance(m, Float8Linear) for m in full.modules())
    for name, value in exact.items():
        torch.testing.assert_close(full.state_dict()[name], value, rtol=0, atol=0)


def test_fp8_model_round_trips_through_save_flux(tmp_path, state):
    model = store_float8(reference(state, {}))
    save_flux(model, tmp_path / "stored.safetensors")
    again = load_flux(tmp_path / "stored.safetensors")
    assert_fp8_linears(again)
    args = inputs()
    assert torch.equal(again(*args), model(*args))


def test_store_float8_error_is_small_and_scaled(state):
    """Per-tensor scaled e4m3 storage: the output moves by a few percent at most, not by the scale."""
    bf16 = reference(state, {})
    args = inputs(batch=2)
    expected = bf16(*args).float()
    stored = store_float8(reference(state, {}))
    assert_fp8_linears(stored)
    error = (stored(*args).float() - expected).norm() / expected.norm()
    assert 1e-4 < error < 0.08, error


def test_scale_without_fp8_weight_is_refused(tmp_path, state):
    file = {k: v.to(torch.bfloat16) for k, v in state.items()}
    file["double_blocks.0.img_attn.qkv.weight_scale"] = torch.tensor(0.1)
    save_file(file, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match="double_blocks.0.img_attn.qkv"):
        load_flux(tmp_path / "bad.safetensors", config=CONFIG)


def test_offload_is_bit_identical_and_keeps_the_state_dict(state):
    resident = reference(state, {})
    streamed = offload_blocks(reference(state, {}), "cpu")
    assert isinstance(streamed.double_blocks, OffloadedBlocks)
    assert list(streamed.state_dict()) == list(resident.state_dict())
    for seed in range(2):
        args = inputs(batch=2, seed=seed)
        assert torch.equal(streamed(*args), resident(*args))
        concept_txt = torch.randn(2, 3, CONFIG.context_in_dim).to(torch.bfloat16)
        layers = list(range(CONFIG.num_layers))
        expected = compute_concept_maps(resident, *args, concept_txt, layers=layers)
        assert torch.equal(compute_concept_maps(streamed, *args, concept_txt, layers=layers), expected)
    # the blocks that ran are the two slots, not the stored blocks
    ran = {id(block) for block in streamed.double_blocks}
    assert ran == {id(slot) for slot in streamed.double_blocks.slots}
    assert ran.isdisjoint(id(block) for block in streamed.double_blocks._modules.values())


def test_offload_composes_with_fp8_storage(state):
    stored = store_float8(reference(state, {}))
    args = inputs()
    expected = stored(*args)
    assert torch.equal(offload_blocks(stored, "cpu")(*args), expected)


def test_concept_maps_compile_as_one_graph(state):
    """The concept path has no host synchronisation or Python branching on values: torch.compile captures
    the forward with maps as one graph (what CUDA graphs and `mode="reduce-overhead"` need)."""
    import torch._dynamo

    model = reference(state, {}).float()
    args = [a.float() if a.is_floating_point() else a for a in inputs()]
    concept_txt = torch.randn(1, 3, CONFIG.context_in_dim)

    def forward_with_maps(*args):
        return model(*args), compute_concept_maps(model, *args, concept_txt, layers=list(range(CONFIG.num_layers)))

    explanation = torch._dynamo.explain(forward_with_maps)(*args)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons
