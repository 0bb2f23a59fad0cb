"""FLUX.2 reference images in the transformer and the sampling loop, against diffusers 0.42.1 on one tiny random
checkpoint in float32: references appended after the noise tokens (every variant), and klein 9B KV's cached
reference keys and values (diffusers' `kv_cache_mode="extract"` at the first step, `"cached"` after it).

The KV equivalence we rely on: at the first step diffusers runs [txt ; ref ; noise] with the references
attending only to themselves at timestep 0; we run the references alone once (`Flux2.reference_kv`) and splice
their keys and values into every step. The first step's noise velocity therefore equals our cached forward's."""

import copy

import pytest
import torch
import torch.nn.functional as F

from flux_mini import Flux2
from flux_mini.convert import flux2_bfl_to_diffusers
from flux_mini.flux2 import ReferenceKV
from flux_mini.layers import ModulationOut, apply_rope, merge_heads
from flux_mini.sampling import denoise_flux2, flux2_image_ids, flux2_text_ids
from flux_mini.tiny import randomize_, tiny_flux2_config

diffusers = pytest.importorskip("diffusers")
from diffusers.models.transformers.transformer_flux2 import (  # noqa: E402
    Flux2KVAttnProcessor,
    Flux2KVParallelSelfAttnProcessor,
)
from test_flux2_parity import diffusers_model  # noqa: E402

torch.set_num_threads(1)
ROWS, COLS, TEXT = 3, 5, 7  # a 3 x 5 noise grid, 7 text tokens


@pytest.fixture(scope="module", params=[False, True], ids=["klein-like", "dev-like"])
def models(request):
    """Our tiny FLUX.2 and diffusers' model on the same weights, its blocks given the KV-aware processors (as
    diffusers' Flux2KleinKVPipeline does; without KV arguments they behave as the default ones)."""
    config = tiny_flux2_config(use_guidance_embed=request.param)
    ours = randomize_(Flux2(config), seed=1).eval()
    theirs = diffusers_model(config, flux2_bfl_to_diffusers(ours.state_dict()))
    for block in theirs.transformer_blocks:
        block.attn.set_processor(Flux2KVAttnProcessor())
    for block in theirs.single_transformer_blocks:
        block.attn.set_processor(Flux2KVParallelSelfAttnProcessor())
    return ours, theirs


def inputs(model: Flux2, batch=2, seed=0) -> dict:
    """Noise tokens, text, and two references on their own grids (2 x 2 at t = 10, 1 x 3 at t = 20); each batch
    element has its own reference tokens (on shared ids), so that a mix-up across the batch shows."""
    config = model.config
    g = torch.Generator().manual_seed(seed)
    cond_ids = torch.cat((flux2_image_ids(batch, 2, 2, t=10), flux2_image_ids(batch, 1, 3, t=20)), dim=1)
    return dict(
        img=torch.randn(batch, ROWS * COLS, config.in_channels, generator=g),
        img_ids=flux2_image_ids(batch, ROWS, COLS),
        txt=torch.randn(batch, TEXT, config.context_in_dim, generator=g),
        txt_ids=flux2_text_ids(batch, TEXT),
        cond=torch.randn(batch, cond_ids.shape[1], config.in_channels, generator=g),
        cond_ids=cond_ids,
        timesteps=torch.full((batch,), 0.73),
        guidance=torch.full((batch,), 4.0) if config.use_guidance_embed else None,
    )


def theirs_forward(model, x: dict, tokens, ids, **kv):
    return model(
        hidden_states=tokens, encoder_hidden_states=x["txt"], timestep=x["timesteps"], img_ids=ids[0],
        txt_ids=x["txt_ids"][0], guidance=x["guidance"], return_dict=False, **kv,
    )  # fmt: skip


def without_references(x: dict) -> dict:
    return {k: v for k, v in x.items() if k not in ("cond", "cond_ids")}


def assert_close(ours, theirs, what, rtol=1e-5):
    scale = theirs.abs().max()
    assert ours.shape == theirs.shape and scale > 0.5, what
    assert (ours - theirs).abs().max() <= rtol * scale, f"{what}: {(ours - theirs).abs().max()} vs scale {scale}"


@torch.no_grad()
def test_appended_references_match_diffusers(models):
    """[noise ; references] with their ids in one sequence; the velocity is the noise rows."""
    ours, theirs = models
    x = inputs(ours)
    expected = theirs_forward(
        theirs, x, torch.cat((x["img"], x["cond"]), dim=1), torch.cat((x["img_ids"], x["cond_ids"]), dim=1)
    )[0][:, : ROWS * COLS]
    assert_close(ours(**x), expected, "appended references")
    # controls: the references matter, and so do their ids (the t offset 10 + 10 i)
    assert (ours(**without_references(x)) - expected).abs().max() > 1e-2 * expected.abs().max()
    shifted = x | {"cond_ids": x["cond_ids"] - torch.tensor([10.0, 0, 0, 0])}
    assert (ours(**shifted) - expected).abs().max() > 1e-3 * expected.abs().max()


@torch.no_grad()
def test_reference_kv_matches_diffusers_extract_and_cached_steps(models):
    ours, theirs = models
    x = inputs(ours)
    num_refs = x["cond"].shape[1]
    # first step: diffusers' extract pass over [ref ; noise]
    first, cache = theirs_forward(
        theirs, x, torch.cat((x["cond"], x["img"]), dim=1), torch.cat((x["cond_ids"], x["img_ids"]), dim=1),
        kv_cache_mode="extract", num_ref_tokens=num_refs,
    )  # fmt: skip
    reference_kv = ours.reference_kv(x["cond"], x["cond_ids"], x["guidance"])
    assert_close(ours(**without_references(x), reference_kv=reference_kv), first, "KV first step")
    for index, block in enumerate(reference_kv.double + reference_kv.single):
        k, v = (cache.get_double(index) if index < len(reference_kv.double)
                else cache.get_single(index - len(reference_kv.double))).get()  # fmt: skip
        assert_close(block.k, k.transpose(1, 2), f"cached keys of block {index}")  # theirs: (B, R, H, Dh)
        assert_close(block.v, v.transpose(1, 2), f"cached values of block {index}")

    # a later step: noise tokens only, the cache spliced between text and image keys
    later = without_references(x) | {"img": torch.randn_like(x["img"]), "timesteps": torch.full((2,), 0.31)}
    expected = theirs_forward(theirs, later, later["img"], later["img_ids"], kv_cache=cache, kv_cache_mode="cached")[0]
    assert_close(ours(**later, reference_kv=reference_kv), expected, "KV cached step")

    # controls: KV is not the appended recipe, and the references' own time 0 matters
    assert (ours(**x) - first).abs().max() > 1e-2 * first.abs().max()
    wrong_kv = reference_kv_at(ours, x, 0.73)
    assert (ours(**without_references(x), reference_kv=wrong_kv) - first).abs().max() > 1e-3 * first.abs().max()


@torch.no_grad()
def test_a_batch_1_reference_kv_serves_the_whole_batch(models):
    """Images that share their references share one reference pass: a batch-1 cache (expanded, not copied) gives
    what a cache repeated to the batch gives, in the model and in the loop."""
    ours, _ = models
    x = inputs(ours)
    cond, cond_ids = x["cond"][:1], x["cond_ids"][:1]
    guidance = None if x["guidance"] is None else x["guidance"][:1]
    shared = ours.reference_kv(cond, cond_ids, guidance)
    repeated = ours.reference_kv(cond.repeat(2, 1, 1), cond_ids.repeat(2, 1, 1), x["guidance"])
    expected = ours(**without_references(x), reference_kv=repeated)
    assert_close(ours(**without_references(x), reference_kv=shared), expected, "a batch-1 cache")
    loop = (ours, x["img"], x["img_ids"], x["txt"], x["txt_ids"], [1.0, 0.6, 0.0], None if guidance is None else 4.0)
    shared_loop = denoise_flux2(*loop, progress=False, cond=cond, cond_ids=cond_ids, cache_references=True)
    repeated_loop = denoise_flux2(*loop, progress=False, cond=cond.repeat(2, 1, 1), cond_ids=cond_ids.repeat(2, 1, 1),
                                  cache_references=True)  # fmt: skip
    assert_close(shared_loop, repeated_loop, "a batch-1 cache in the loop")


def reference_kv_at(model: Flux2, x: dict, t: float) -> ReferenceKV:
    """The references' K/V as if modulated at the step's time t instead of 0 (a plausible bug)."""
    vec = model.conditioning(torch.full((x["cond"].shape[0],), t), x["guidance"])
    mod, pe, ref = model.modulations(vec), model.rope(x["cond_ids"], torch.float32), model.img_in(x["cond"])
    kvs = []
    for block in [*model.double_blocks, *model.single_blocks]:
        ref, kv = block.reference_forward(ref, pe, mod)
        kvs.append(kv)
    return ReferenceKV(tuple(kvs[: model.config.depth]), tuple(kvs[model.config.depth :]))


@torch.no_grad()
def test_denoising_with_references_matches_a_diffusers_loop(models):
    """Three Euler steps appended, and three KV steps (extract, then cached), against loops over diffusers."""
    ours, theirs = models
    x = inputs(ours, batch=1, seed=5)
    schedule, guidance = [1.0, 0.8, 0.45, 0.0], 4.0 if ours.config.use_guidance_embed else None
    common = (ours, x["img"], x["img_ids"], x["txt"], x["txt_ids"], schedule, guidance)
    appended = denoise_flux2(*common, progress=False, cond=x["cond"], cond_ids=x["cond_ids"])
    cached = denoise_flux2(*common, progress=False, cond=x["cond"], cond_ids=x["cond_ids"], cache_references=True)

    def loop(kv: bool):
        img, cache = x["img"], None
        for step, (t, t_next) in enumerate(zip(schedule[:-1], schedule[1:])):
            guidance_vec = None if guidance is None else torch.tensor([guidance])
            step_x = x | {"timesteps": torch.tensor([t]), "guidance": guidance_vec}
            if not kv:
                tokens, ids = torch.cat((img, x["cond"]), dim=1), torch.cat((x["img_ids"], x["cond_ids"]), dim=1)
                pred = theirs_forward(theirs, step_x, tokens, ids)[0][:, : img.shape[1]]
            elif step == 0:
                tokens, ids = torch.cat((x["cond"], img), dim=1), torch.cat((x["cond_ids"], x["img_ids"]), dim=1)
                pred, cache = theirs_forward(theirs, step_x, tokens, ids, kv_cache_mode="extract",
                                             num_ref_tokens=x["cond"].shape[1])  # fmt: skip
            else:
                pred = theirs_forward(theirs, step_x, img, x["img_ids"], kv_cache=cache, kv_cache_mode="cached")[0]
            img = img + (t_next - t) * pred
        return img

    assert_close(appended, loop(kv=False), "appended loop")
    assert_close(cached, loop(kv=True), "KV loop")
    assert (appended - cached).abs().max() > 1e-3 * cached.abs().max()


def test_bad_reference_inputs_are_refused(models):
    ours, _ = models
    x = inputs(ours)
    with pytest.raises(ValueError, match="both cond and cond_ids"):
        ours(**x | {"cond_ids": None})
    with pytest.raises(ValueError, match="4 axes"):
        ours(**x | {"cond_ids": x["cond_ids"][..., :3]})
    with pytest.raises(ValueError, match="repeat the references"):
        ours(**x | {"cond": x["cond"][:1], "cond_ids": x["cond_ids"][:1]})
    with pytest.raises(ValueError, match=r"cond is torch.float64 with 16 channels but img is torch.float32 with 16"):
        ours(**x | {"cond": x["cond"].double()})  # torch.cat would promote img and fail in a matmul
    with pytest.raises(ValueError, match=r"cond is torch.float32 with 8 channels but img is torch.float32 with 16"):
        ours(**x | {"cond": x["cond"][..., :8]})
    reference_kv = ours.reference_kv(x["cond"], x["cond_ids"], x["guidance"])
    with pytest.raises(ValueError, match="not both"):
        ours(**x, reference_kv=reference_kv)
    with pytest.raises(ValueError, match="build it for this batch"):
        ours(**without_references(inputs(ours, batch=3)), reference_kv=reference_kv)
    with pytest.raises(ValueError, match="this model's reference_kv"):
        ours(**without_references(x), reference_kv=ReferenceKV(reference_kv.double, ()))
    with pytest.raises(ValueError, match="pass both cond and cond_ids"):
        ours.reference_kv(x["cond"], None)
    loop = (ours, x["img"], x["img_ids"], x["txt"], x["txt_ids"], [1.0, 0.0])
    for cond, cond_ids in ((None, None), (x["cond"], None), (None, x["cond_ids"])):
        with pytest.raises(ValueError, match="cache_references=True .* pass both cond and cond_ids"):
            denoise_flux2(*loop, progress=False, cond=cond, cond_ids=cond_ids, cache_references=True)
    concepts = torch.randn(2, 3, ours.config.context_in_dim)
    with pytest.raises(ValueError, match="ConceptAttention does not take reference images"):
        list(ours.concept_pass(**without_references(x), concept_txt=concepts, cond=x["cond"], cond_ids=x["cond_ids"]))


def naive_kv_layout(model: Flux2, x: dict) -> torch.Tensor:
    """BFL's uncached KV layout written out: one sequence [txt ; ref ; noise], the references modulated at time 0
    and masked to attend only to themselves, text and noise attending to everything -> the noise velocity."""
    num_txt, num_refs, num_noise = x["txt"].shape[1], x["cond"].shape[1], x["img"].shape[1]
    vec = model.conditioning(x["timesteps"], x["guidance"])
    mod, ref_mod = model.modulations(vec), model.modulations(model.conditioning(0 * x["timesteps"], x["guidance"]))

    def rows(*parts: tuple[ModulationOut, int]) -> ModulationOut:
        """(modulation set, token count) pairs -> one set with a row per token."""
        def stack(field: str) -> torch.Tensor:
            return torch.cat([getattr(m, field).expand(-1, n, -1) for m, n in parts], dim=1)

        return ModulationOut(stack("shift"), stack("scale"), stack("gate"))

    seen = torch.ones(num_txt + num_refs + num_noise, num_txt + num_refs + num_noise, dtype=torch.bool)
    refs = slice(num_txt, num_txt + num_refs)
    seen[refs] = False
    seen[refs, refs] = True
    pe = model.rope(torch.cat((x["txt_ids"], x["cond_ids"], x["img_ids"]), dim=1), x["img"].dtype)
    img, txt = model.img_in(torch.cat((x["cond"], x["img"]), dim=1)), model.txt_in(x["txt"])
    for block in model.double_blocks:
        img1, img2 = (rows((r, num_refs), (m, num_noise)) for r, m in zip(ref_mod.img, mod.img))
        txt1, txt2 = mod.txt
        img_q, img_k, img_v = block.img_attn.heads(block.img_attn.qkv(img1.modulate(img)))
        txt_q, txt_k, txt_v = block.txt_attn.heads(block.txt_attn.qkv(txt1.modulate(txt)))
        q, k = (apply_rope(torch.cat(pair, dim=2), pe) for pair in ((txt_q, img_q), (txt_k, img_k)))
        out = merge_heads(F.scaled_dot_product_attention(q, k, torch.cat((txt_v, img_v), dim=2), attn_mask=seen))
        img = img1.residual(img, block.img_attn.proj(out[:, num_txt:]))
        img = img2.residual(img, block.img_mlp(img2.modulate(img)))
        txt = txt1.residual(txt, block.txt_attn.proj(out[:, :num_txt]))
        txt = txt2.residual(txt, block.txt_mlp(txt2.modulate(txt)))
    h = torch.cat((txt, img), dim=1)
    single = rows((mod.single, num_txt), (ref_mod.single, num_refs), (mod.single, num_noise))
    for block in model.single_blocks:
        q, k, v, mlp_in = block.split(block.linear1(single.modulate(h)))
        out = merge_heads(F.scaled_dot_product_attention(apply_rope(q, pe), apply_rope(k, pe), v, attn_mask=seen))
        h = single.residual(h, block.output(out, block.mlp_act(mlp_in)))
    return model.final_layer(h[:, num_txt + num_refs :], vec)


@torch.no_grad()
def test_cached_steps_equal_the_uncached_kv_layout_in_float64(models):
    """Running the references once and splicing their K/V is exactly BFL's masked single sequence, at the first
    step and at a later one (float64, to 1e-12): the cache loses nothing."""
    ours = copy.deepcopy(models[0]).double()
    x = {k: v.double() if v is not None and v.is_floating_point() else v for k, v in inputs(ours).items()}
    reference_kv = ours.reference_kv(x["cond"], x["cond_ids"], x["guidance"])
    for t in (0.73, 0.31):
        step = x | {"timesteps": torch.full((2,), t, dtype=torch.float64)}
        assert_close(ours(**without_references(step), reference_kv=reference_kv), naive_kv_layout(ours, step),
                     f"t = {t}", rtol=1e-12)  # fmt: skip
