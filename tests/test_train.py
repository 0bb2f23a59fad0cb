"""The rectified-flow trainer: objective and sign conventions, learning, exact resume, export layout."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from einops import rearrange

from flux_mini.layers import LayerOutput
from flux_mini.loading import load_flux
from flux_mini.flux1 import Flux
from flux_mini.interp import attention_weights
from flux_mini.sampling import euler_step, image_ids, pack, text_ids
from flux_mini.tiny import randomize_, tiny_flux_config
from flux_mini.train import (
    Batch,
    Conditioning,
    TokenClassifier,
    Trainer,
    TrainConfig,
    drop_conditioning,
    export_transformer,
    flow_loss,
    flow_pair,
    sample_timesteps,
    zero_init_modulation_,
)

torch.set_num_threads(1)
CONFIG = tiny_flux_config(in_channels=12, out_channels=12, hidden_size=32, num_heads=2, axes_dim=(4, 6, 6), depth=1)


def fixed_batch(b: int = 4, seed: int = 0) -> Batch:
    """Structured 8x8 RGB images (a bright square on a dark field) with random text conditioning."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.full((b, 3, 8, 8), -0.8)
    for i in range(b):
        r, c = torch.randint(0, 5, (2,), generator=g).tolist()
        latents[i, :, r : r + 4, c : c + 4] = torch.rand(3, 1, 1, generator=g) * 2 - 1
    txt = torch.randn(b, 5, CONFIG.context_in_dim, generator=g)
    y = torch.randn(b, CONFIG.vec_in_dim, generator=g)
    return Batch(latents, txt, y)


def null_conditioning() -> Conditioning:
    g = torch.Generator().manual_seed(99)
    txt = torch.randn(1, 5, CONFIG.context_in_dim, generator=g)
    return Conditioning(txt, torch.randn(1, CONFIG.vec_in_dim, generator=g))


def new_trainer(**overrides) -> Trainer:
    torch.manual_seed(0)
    config = TrainConfig(**{"batch_size": 4, "lr": 3e-3, "warmup_steps": 1, "ema_decay": 0.9, **overrides})
    return Trainer(zero_init_modulation_(Flux(CONFIG)), config, null_conditioning())


def test_flow_pair_is_the_straight_path_the_euler_sampler_integrates():
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 3, 4, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(3, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    x_t, v = flow_pair(x0, noise, t)
    for i, ti in enumerate(t.tolist()):
        assert torch.allclose(x_t[i], (1 - ti) * x0[i] + ti * noise[i])
        assert torch.equal(v[i], noise[i] - x0[i])
        # integrating the exact velocity from t to 0 (and to 1) with the sampler's step lands on the data (noise)
        assert torch.allclose(euler_step(x_t[i], v[i], ti, 0.0), x0[i])
        assert torch.allclose(euler_step(x_t[i], v[i], ti, 1.0), noise[i])


def test_logit_normal_timesteps():
    t = sample_timesteps(20_000, 0.0, 1.0, torch.Generator().manual_seed(0))
    assert t.min() > 0 and t.max() < 1
    assert abs(t.median().item() - 0.5) < 0.02
    logits = torch.log(t / (1 - t))
    assert abs(logits.std().item() - 1.0) < 0.03
    shifted = sample_timesteps(20_000, 1.0, 1.0, torch.Generator().manual_seed(0))
    assert abs(torch.log(shifted / (1 - shifted)).mean().item() - 1.0) < 0.03


def test_caption_dropout_and_zero_y():
    batch, null = fixed_batch(8), null_conditioning()
    g = torch.Generator().manual_seed(0)
    dropped = drop_conditioning(batch, null, TrainConfig(caption_dropout=1.0, zero_y_prob=0.0), g)
    assert torch.equal(dropped.txt, null.null_txt.expand(8, -1, -1))
    assert torch.equal(dropped.y, null.null_y.expand(8, -1))
    zeroed = drop_conditioning(batch, null, TrainConfig(caption_dropout=0.0, zero_y_prob=1.0), g)
    assert torch.equal(zeroed.txt, batch.txt) and not zeroed.y.any()
    kept = drop_conditioning(batch, null, TrainConfig(caption_dropout=0.0, zero_y_prob=0.0), g)
    assert torch.equal(kept.txt, batch.txt) and torch.equal(kept.y, batch.y)
    mixed = drop_conditioning(fixed_batch(400), null, TrainConfig(caption_dropout=0.25, zero_y_prob=0.5), g)
    dropped_rows = (mixed.txt == null.null_txt).flatten(1).all(dim=1).float().mean().item()
    zero_rows = (mixed.y == 0).all(dim=1).float().mean().item()
    assert 0.17 < dropped_rows < 0.33 and 0.42 < zero_rows < 0.58


def test_zero_init_predicts_zero_velocity():
    model = zero_init_modulation_(randomize_(Flux(CONFIG), seed=3))
    batch = fixed_batch()
    x_t = pack(batch.latents)
    out = model(x_t, image_ids(4, 4, 4), batch.txt, text_ids(4, 5), torch.full((4,), 0.5), batch.y)
    assert out.shape == x_t.shape and not out.any()


def held_out_loss(model: Flux) -> float:
    g = torch.Generator().manual_seed(123)
    batch = fixed_batch()
    t = sample_timesteps(4, 0.0, 1.0, g).repeat(8)
    batch8 = Batch(batch.latents.repeat(8, 1, 1, 1), batch.txt.repeat(8, 1, 1), batch.y.repeat(8, 1))
    with torch.no_grad():
        return flow_loss(model, batch8, t, torch.randn(batch8.latents.shape, generator=g)).item()


def test_training_reduces_the_loss_on_a_fixed_batch():
    trainer = new_trainer(caption_dropout=0.0)
    before = held_out_loss(trainer.model)
    losses = trainer.fit(lambda step: fixed_batch(), until=60, progress=False)
    assert len(losses) == 60 and trainer.step == 60
    after = held_out_loss(trainer.model)
    assert after < 0.6 * before, (before, after)
    assert held_out_loss(trainer.ema) < before  # the EMA follows


def test_resume_continues_exactly(tmp_path):
    data = lambda step: fixed_batch(seed=step)  # noqa: E731  a pure function of the step
    path = tmp_path / "run" / "checkpoint.pt"
    straight = new_trainer()
    straight.fit(data, until=3, checkpoint=path, checkpoint_every=3, progress=False)
    assert path.exists() and not path.with_suffix(".pt.tmp").exists()
    expected_loss = straight.train_step(data(3))

    resumed = Trainer.resume(path)
    assert resumed.step == 3 and resumed.config == straight.config
    assert resumed.train_step(data(3)) == expected_loss
    for name in ("model", "ema"):
        a, b = getattr(straight, name).state_dict(), getattr(resumed, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    # and the random stream continues identically: one more step agrees too
    assert straight.train_step(data(4)) == resumed.train_step(data(4))


def test_token_loss_is_the_noise_weighted_cross_entropy_of_each_chosen_layer():
    """TokenClassifier.loss against a float64 loop: per token -log softmax(head(x))[label], weighted 1 - t,
    unlabelled tokens (-100) skipped, normalised per layer, averaged over the chosen layers only."""
    torch.manual_seed(0)
    classifier = TokenClassifier(dim=8, classes=3, layers=(0, 2)).double()
    for head in classifier.heads:   # a non-trivial LayerNorm too
        torch.nn.init.normal_(head[0].weight, 1.0, 0.3), torch.nn.init.normal_(head[0].bias, 0.0, 0.3)
    g = torch.Generator().manual_seed(1)
    outputs = [LayerOutput(i, torch.randn(2, 5, 8, generator=g, dtype=torch.float64), None, None) for i in range(3)]
    labels = torch.tensor([[0, 1, 2, -100, 1], [2, -100, -100, 0, 0]])
    t = torch.tensor([0.25, 0.75], dtype=torch.float64)
    expected = 0.0
    for layer, head in zip((0, 2), classifier.heads):
        norm, linear = head
        total = weights = 0.0
        for b in range(2):
            for i in range(5):
                if labels[b, i] < 0:
                    continue
                x = outputs[layer].img[b, i]
                x = (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + norm.eps) * norm.weight + norm.bias
                logits = linear.weight @ x + linear.bias
                total += (1 - t[b]) * (torch.logsumexp(logits, 0) - logits[labels[b, i]])
                weights += 1 - t[b]
        expected += total / weights / 2
    assert torch.allclose(classifier.loss(outputs, labels, t), expected, rtol=1e-12, atol=0)


def square_labels(batch: Batch) -> Batch:
    """fixed_batch with token labels: 1 where a 2x2-pixel token lies on the bright square, 0 on the field."""
    tokens = pack(batch.latents)[..., :1]                          # (B, 16, 1): the token's first pixel
    return Batch(batch.latents, batch.txt, batch.y, (tokens[..., 0] > -0.79).long())


def test_token_loss_trains_a_read_out_and_resumes_exactly(tmp_path):
    """With token_loss_weight > 0 the trainer also trains the classifier (its loss falls on a fixed batch), saves
    it, and a resumed run continues bit-identically; a batch without token labels is refused by name."""
    overrides = dict(token_loss_weight=1.0, token_loss_layers=(0,), token_classes=2, caption_dropout=0.0)
    data = lambda step: square_labels(fixed_batch(seed=step))  # noqa: E731
    trainer = new_trainer(**overrides)
    assert trainer.classifier is not None and len(trainer.optimizer.param_groups[0]["params"]) == (
        len(list(trainer.model.parameters())) + len(list(trainer.classifier.parameters())))

    def token_loss(trainer: Trainer) -> float:
        batch = data(100)
        outputs = list(trainer.model.layers(pack(batch.latents), image_ids(4, 4, 4), batch.txt, text_ids(4, 5),
                                            torch.zeros(4), batch.y))
        return trainer.classifier.loss(outputs, batch.token_labels, torch.zeros(4)).item()

    before = token_loss(trainer)
    path = tmp_path / "checkpoint.pt"
    trainer.fit(data, until=40, checkpoint=path, checkpoint_every=40, progress=False)
    assert token_loss(trainer) < 0.5 * before
    resumed = Trainer.resume(path)
    assert resumed.config == trainer.config and resumed.classifier is not None
    assert trainer.train_step(data(40)) == resumed.train_step(data(40))
    for a, b in [(trainer.model, resumed.model), (trainer.classifier, resumed.classifier)]:
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(ValueError, match="token_labels"):
        trainer.train_step(fixed_batch())
    with pytest.raises(ValueError, match="token_loss_layers"):
        TrainConfig(token_loss_weight=1.0)
    assert new_trainer().classifier is None      # off by default: nothing extra trained or saved


GROUNDED = tiny_flux_config(in_channels=12, out_channels=12, hidden_size=32, num_heads=2, axes_dim=(4, 6, 6), depth=2)


def square_regions(batch: Batch) -> Batch:
    """fixed_batch with text token 1 naming the bright square (its share of each 2x2-pixel token), the rest none."""
    on_square = (batch.latents[:, 0] != -0.8).float()  # (B, 8, 8)
    regions = torch.zeros(batch.txt.shape[0], batch.txt.shape[1], 16)
    regions[:, 1] = rearrange(on_square, "b (h p) (w q) -> b (h w) (p q)", p=2, q=2).mean(-1)
    return Batch(batch.latents, batch.txt, batch.y, None, regions)


def test_grounding_loss_is_the_share_of_each_words_image_attention_on_its_region():
    """flow_loss with a grounding weight adds weight x mean over the chosen layers of the (1 - t)-weighted mean
    over grounded words of (1 - sum_l a_l r_l)^2, a = the word's attention over the image tokens (the joint
    softmax renormalised over them, `interp.attention_weights`), averaged over heads; words without a region
    and unchosen layers count for nothing."""
    torch.manual_seed(0)
    model = randomize_(Flux(GROUNDED)).double()
    batch = square_regions(fixed_batch(b=2, seed=3))
    batch = Batch(batch.latents.double(), batch.txt.double(), batch.y.double(), None,
                  batch.word_regions.double())
    batch.word_regions[1, 3] = torch.rand(16, dtype=torch.float64)  # a second grounded word in sample 1
    g = torch.Generator().manual_seed(4)
    t, noise = torch.tensor([0.2, 0.7], dtype=torch.float64), torch.randn(2, 3, 8, 8, generator=g).double()
    plain = flow_loss(model, batch, t, noise)
    grounded = flow_loss(model, batch, t, noise, grounding_loss_weight=0.7, grounding_layers=(1,))

    x_t, _ = flow_pair(batch.latents, noise, t)
    weights = attention_weights(model, pack(x_t), image_ids(2, 4, 4), batch.txt, text_ids(2, 5), t, batch.y,
                                layers=[1], queries="txt", keys="img")[1]  # (B, H, T, L)
    expected, total_weight = 0.0, 0.0
    for b in range(2):
        for word in range(5):
            region = batch.word_regions[b, word]
            if region.sum() == 0:
                continue
            shares = [(weights[b, h, word] / weights[b, h, word].sum() * region).sum() for h in range(2)]
            expected += (1 - t[b]) * (1 - sum(shares) / 2) ** 2
            total_weight += 1 - t[b]
    assert torch.allclose(grounded - plain, 0.7 * expected / total_weight, rtol=1e-10, atol=0)


def test_grounding_loss_moves_a_words_attention_onto_its_region_and_resumes_exactly(tmp_path):
    overrides = dict(grounding_loss_weight=1.0, grounding_layers=(0,), caption_dropout=0.0)
    data = lambda step: square_regions(fixed_batch(seed=step))  # noqa: E731
    trainer = new_trainer(**overrides)

    def share_on_square(trainer: Trainer) -> float:
        batch = data(100)
        weights = attention_weights(trainer.model, pack(batch.latents), image_ids(4, 4, 4), batch.txt, text_ids(4, 5),
                                    torch.zeros(4), batch.y, layers=[0], queries="txt", keys="img")[0]
        weights = weights[:, :, 1] / weights[:, :, 1].sum(-1, keepdim=True)  # (B, H, L): word 1 over the image
        return (weights.mean(1) * batch.word_regions[:, 1]).sum(-1).mean().item()

    before = share_on_square(trainer)
    path = tmp_path / "checkpoint.pt"
    trainer.fit(data, until=40, checkpoint=path, checkpoint_every=40, progress=False)
    assert share_on_square(trainer) > before + 0.2
    resumed = Trainer.resume(path)
    assert resumed.config == trainer.config
    assert trainer.train_step(data(40)) == resumed.train_step(data(40))
    assert all(torch.equal(x, y) for x, y in zip(trainer.model.state_dict().values(), resumed.model.state_dict().values()))
    with pytest.raises(ValueError, match="word_regions"):
        trainer.train_step(fixed_batch())
    with pytest.raises(ValueError, match="grounding_layers"):
        TrainConfig(grounding_loss_weight=1.0)


def test_a_dropped_caption_has_no_words_to_ground():
    batch = square_regions(fixed_batch())
    config = TrainConfig(caption_dropout=0.5)
    dropped = drop_conditioning(batch, null_conditioning(), config, torch.Generator().manual_seed(0))
    gone = (dropped.txt == null_conditioning().null_txt).all(-1).all(-1)  # (B,) which captions were dropped
    assert 0 < gone.sum() < 4
    assert (dropped.word_regions[gone] == 0).all()
    assert torch.equal(dropped.word_regions[~gone], batch.word_regions[~gone])


def test_resume_reports_a_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no training checkpoint"):
        Trainer.resume(tmp_path / "missing.pt")


def test_export_is_the_official_layout_and_loads_strictly(tmp_path):
    trainer = new_trainer()
    trainer.fit(lambda step: fixed_batch(seed=step), until=2, progress=False)
    path = export_transformer(trainer.ema, tmp_path, "flux1-demo")
    assert path.name == "flux1-demo.safetensors"
    assert json.loads((tmp_path / "flux_config.json").read_text()) == CONFIG.to_dict()

    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    official = {  # names from the BFL reference (flux/model.py), spelled out independently of our model
        "img_in.weight", "time_in.in_layer.weight", "vector_in.out_layer.bias", "txt_in.weight",
        "double_blocks.0.img_mod.lin.weight", "double_blocks.0.img_attn.qkv.weight",
        "double_blocks.0.img_attn.norm.query_norm.scale", "double_blocks.0.txt_attn.proj.bias",
        "double_blocks.0.txt_mlp.2.weight", "single_blocks.1.linear1.weight", "single_blocks.1.norm.key_norm.scale",
        "single_blocks.0.modulation.lin.bias", "final_layer.adaLN_modulation.1.weight", "final_layer.linear.bias",
    }
    assert official <= keys
    roots = {"img_in", "time_in", "vector_in", "txt_in", "double_blocks", "single_blocks", "final_layer"}
    assert {k.split(".")[0] for k in keys} == roots

    loaded = load_flux(path)  # strict: any missing or unexpected key raises
    assert loaded.config == CONFIG
    ema = trainer.ema.state_dict()
    assert all(torch.equal(v, ema[k]) for k, v in loaded.state_dict().items())
    assert not all(torch.equal(v, trainer.model.state_dict()[k]) for k, v in loaded.state_dict().items())


def load_script(name: str = "train_demo"):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_recipe_resumes_bit_exactly_across_the_curriculum(tmp_path, monkeypatch):
    """scripts/train_demo.py itself: 3 steps straight == 2 steps, then the same command resumed to 3. The resumed
    command names no recipe flags: its curriculum (single objects until step 3) must come from recipe.json."""
    demo = load_script()
    tiny = ["--hidden", "24", "--depth", "1", "--single-depth", "0", "--batch-size", "2", "--single-object-steps", "3",
            "--checkpoint-every", "1", "--export-every", "100", "--device", "cpu"]

    def train(work: Path, steps: int, *extra: str) -> None:
        monkeypatch.setattr("sys.argv", ["train_demo.py", "--work-dir", str(work), "--steps", str(steps), *extra])
        demo.main()

    train(tmp_path / "straight", 3, *tiny)
    train(tmp_path / "resumed", 2, *tiny)
    train(tmp_path / "resumed", 3)                     # no recipe flags: recipe.json holds them
    a, b = (torch.load(tmp_path / run / "checkpoint.pt", weights_only=True) for run in ("straight", "resumed"))
    assert a["step"] == b["step"] == 3 and a["flux_config"]["hidden_size"] == 24
    for name in ("model", "ema"):
        assert all(torch.equal(a[name][k], b[name][k]) for k in a[name]), name
    assert (tmp_path / "resumed" / "exports" / "step-000003" / "flux1-demo.safetensors").exists()
    # the curriculum's data: step 0 single objects only, later steps the mixed world
    encoder = demo.CaptionEncoder(tmp_path / "straight")
    data = demo.shapes_data(encoder, batch_size=8, single_object_steps=1)
    from concept_attention.shapes import ShapesConfig, make_sample

    assert torch.equal(data(0).latents, demo.to_pixels([make_sample(0, i, ShapesConfig(two_object_prob=0.0)).image
                                                         for i in range(8)]))
    assert torch.equal(data(1).latents, demo.to_pixels([make_sample(0, 8 + i).image for i in range(8)]))
    assert data(1).token_labels is None and data(1).word_regions is None  # built only for the losses that read them
    words = demo.grounded_words(demo.RECIPE_DEFAULTS | {"grounding_loss": 1.0, "ground_colours": True})
    assert words == ("circle", "square", "triangle", "grass", "sky", "sand", "night",
                     "red", "orange", "yellow", "blue", "purple", "pink")
    assert demo.grounded_words(demo.RECIPE_DEFAULTS) == ()
    labelled = demo.shapes_data(encoder, batch_size=8, shape_labels=True, grounded=words)(1)
    sample = make_sample(0, 8)
    ids = encoder.token_ids([sample.caption])[0]
    assert torch.equal(labelled.token_labels[0], demo.token_shapes(sample, 2))
    assert labelled.word_regions[0].sum() > 0 and torch.equal(
        labelled.word_regions[0], demo.word_regions(sample, ids, dict(zip(encoder.token_ids(list(words))[:, 0].tolist(), words)), 2))
    # a recipe flag that differs from recipe.json is refused, not silently ignored; an equal one is fine, and a
    # recipe written before --patch existed ran with 2x2 pixels per token
    with pytest.raises(SystemExit, match=r"--hidden 48 \(recipe.json: 24\)"):
        train(tmp_path / "resumed", 4, "--hidden", "48", "--depth", "1")
    recipe = json.loads((tmp_path / "resumed" / "recipe.json").read_text())
    del recipe["patch"]
    (tmp_path / "resumed" / "recipe.json").write_text(json.dumps(recipe))
    train(tmp_path / "resumed", 3, "--hidden", "24", "--patch", "2")
    with pytest.raises(SystemExit, match=r"--patch 4 \(recipe.json: 2\)"):
        train(tmp_path / "resumed", 4, "--patch", "4")
    # a run started on another version of the world is refused, not mixed (recipe.json keeps its digest)
    assert recipe["world"] == demo.world_fingerprint()
    (tmp_path / "resumed" / "recipe.json").write_text(json.dumps({**recipe, "world": "0" * 64}))
    with pytest.raises(SystemExit, match="another version of the shapes world"):
        train(tmp_path / "resumed", 4)
    assert torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)["step"] == 3   # nothing lost


# ----------------------------------------------------------------------------------------------
# The shipped demo model (weights/demo/, trained by scripts/train_demo.py)

DEMO = Path(__file__).resolve().parents[1] / "weights" / "demo"
# Reference colours of the dataset's words, written out here rather than imported from the generator.
PALETTE = {
    "grass": (62, 140, 48), "sky": (130, 185, 235), "sand": (212, 186, 136), "night": (18, 22, 58),
    "red": (220, 35, 35), "orange": (250, 130, 20), "yellow": (240, 230, 50), "blue": (30, 70, 230),
    "purple": (145, 50, 205), "pink": (250, 125, 200),
}


def colour_shares(image) -> dict[str, float]:
    """Fraction of pixels whose nearest palette colour is each word's."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).reshape(-1, 3))  # (H*W, 3)
    palette = torch.tensor(list(PALETTE.values()), dtype=torch.float32)
    nearest = torch.cdist(pixels, palette).argmin(dim=1)
    return {word: (nearest == i).float().mean().item() for i, word in enumerate(PALETTE)}


def test_shipped_demo_model_loads_strictly_and_draws_its_captions():
    """A single object takes the colour its caption names (mostly), on the background it names; which shape
    it draws is not checked (see weights/demo/README.md)."""
    model = load_flux(DEMO / "flux1-demo.safetensors")  # strict: every official key present, nothing extra
    assert model.config.to_dict() == json.loads((DEMO / "flux_config.json").read_text())
    assert sum(f.stat().st_size for f in DEMO.rglob("*") if f.is_file()) < 30e6

    from flux_mini.pipeline import FluxPipeline

    pipe = FluxPipeline.from_folder(DEMO)
    captions = {"a red circle on grass": ("grass", "red"), "a blue square at night": ("night", "blue"),
                "a yellow triangle in the sky": ("sky", "yellow"), "a pink circle on sand": ("sand", "pink")}
    images = pipe(list(captions), width=32, height=32, seed=0, progress=False)
    colours = ("red", "orange", "yellow", "blue", "purple", "pink")
    dominant = 0
    for (caption, (background, colour)), image in zip(captions.items(), images):
        shares = colour_shares(image)
        assert shares[background] > 0.4, (caption, shares)
        assert 0.05 < sum(shares[c] for c in colours) < 0.6, (caption, shares)  # one object, not a blank or a wall
        dominant += max(colours, key=shares.get) == colour
    assert dominant >= 3  # measured: 3 of 4 (the blue square at night comes out pink)


def test_demo_recipe_with_4x4_pixel_tokens_and_more_caption_dropout(tmp_path, monkeypatch):
    """--patch 4 and --caption-dropout reach recipe.json, the trainer, the data and the exported folder."""
    demo = load_script()
    work = tmp_path / "p4"
    monkeypatch.setattr("sys.argv", [
        "train_demo.py", "--work-dir", str(work), "--steps", "1", "--hidden", "24", "--depth", "1", "--single-depth",
        "0", "--batch-size", "2", "--patch", "4", "--caption-dropout", "0.5", "--export-every", "1", "--device", "cpu",
    ])
    demo.main()
    recipe = json.loads((work / "recipe.json").read_text())
    assert (recipe["patch"], recipe["caption_dropout"]) == (4, 0.5)
    assert torch.load(work / "checkpoint.pt", weights_only=True)["train_config"]["caption_dropout"] == 0.5

    from flux_mini.pipeline import FluxPipeline

    pipe = FluxPipeline.from_folder(work / "exports" / "step-000001")
    assert pipe.autoencoder.downsample_factor == 2 and pipe.model.config.in_channels == 48
    encoder = demo.CaptionEncoder(work)
    latents = demo.shapes_data(encoder, batch_size=1, patch=4)(0).latents       # (1, 12, 16, 16)
    from concept_attention.shapes import make_sample

    pixels = demo.to_pixels([make_sample(0, 0).image])                            # (1, 3, 32, 32)
    assert latents.shape == (1, 12, 16, 16)
    for c, p, q, i, j in [(0, 0, 0, 0, 0), (1, 1, 0, 7, 3), (2, 1, 1, 15, 9)]:
        assert latents[0, c * 4 + p * 2 + q, i, j] == pixels[0, c, 2 * i + p, 2 * j + q]


def test_token_shapes_labels_each_token_by_the_shape_under_it():
    """By hand on a 4x4 mask with 2x2-pixel tokens (token order: rows of tokens), then on real samples: a token
    wholly on one object takes 1 + that shape's index, wholly on the background 0, across an edge -100."""
    from types import SimpleNamespace

    demo = load_script()
    sample = SimpleNamespace(class_names=["grass", "triangle", "circle"], mask=np.array([[1, 1, 0, 0],
                                                                                         [1, 1, 0, 2],
                                                                                         [0, 0, 2, 2],
                                                                                         [0, 0, 2, 2]]))
    assert demo.token_shapes(sample, 2).tolist() == [3, -100, 0, 1]
    assert demo.token_shapes(sample, 4).tolist() == [-100]
    from concept_attention.shapes import make_sample

    for index in range(20):
        real = make_sample(5, index)
        labels = demo.token_shapes(real, 2).reshape(16, 16)
        centre = real.mask[::2, ::2]                                     # each token's top-left pixel
        names = np.array([0] + [1 + ["circle", "square", "triangle"].index(n) for n in real.class_names[1:]])
        whole = labels >= 0
        assert (labels[whole].numpy() == names[centre][whole.numpy()]).all()
        assert set(labels[whole].tolist()) == set(names.tolist())        # every object has whole tokens


def test_word_regions_ground_each_shape_word_of_a_caption_on_its_objects():
    """By hand (4x4 mask, 2x2-pixel tokens, both circles under the one word "circle"), then on real captions: each
    shape word's row is the share of each token on the objects of that shape, the background word's the share on
    the background; other words (and words not offered) have empty rows."""
    from types import SimpleNamespace

    demo = load_script()
    sample = SimpleNamespace(class_names=["grass", "circle", "square", "circle"], colours=["red", "blue", "blue"],
                             mask=np.array([[1, 1, 0, 0],
                                                                                              [1, 0, 0, 3],
                                                                                              [2, 2, 3, 3],
                                                                                              [2, 2, 3, 3]]))
    ids = torch.tensor([5, 7, 9, 13, 17, 1])  # "a circle square grass blue </s>": circle 7, square 9, grass 13, blue 17
    words = {7: "circle", 9: "square", 11: "triangle", 13: "grass", 17: "blue"}
    regions = demo.word_regions(sample, ids, words, 2)
    assert regions.tolist() == [[0] * 4, [0.75, 0.25, 0, 1], [0, 0, 1, 0], [0.25, 0.75, 0, 0], [0, 0.25, 1, 1], [0] * 4]
    assert demo.word_regions(sample, ids, {7: "circle"}, 2)[2:].sum() == 0
    from concept_attention.shapes import make_sample

    names = ["circle", "square", "triangle", "grass", "sky", "sand", "night", "red", "orange", "yellow", "blue",
             "purple", "pink"]
    words = {name: i for i, name in enumerate(names, 100)}
    for index in range(20):
        real = make_sample(5, index)
        tokens = real.caption.split()
        ids = torch.tensor([words.get(w, 0) for w in tokens])
        regions = demo.word_regions(real, ids, {i: w for w, i in words.items()}, 2)
        for position, word in enumerate(tokens):
            named = [i for i, name in enumerate(real.class_names) if name == word]
            named += [i for i, colour in enumerate(real.colours, start=1) if colour == word]
            assert regions[position].sum().item() == pytest.approx(np.isin(real.mask, named).sum() / 4)  # 0: none


def test_demo_recipe_with_a_shape_loss_resumes_bit_exactly(tmp_path, monkeypatch):
    """--shape-loss and --grounding-loss reach recipe.json and the trainer (every double block, 4 classes); the
    classifier is saved, a resumed run equals a straight one, and the export holds only the transformer."""
    demo = load_script()
    tiny = ["--hidden", "24", "--depth", "2", "--single-depth", "0", "--batch-size", "2", "--shape-loss", "0.5",
            "--grounding-loss", "0.25", "--checkpoint-every", "1", "--export-every", "2", "--device", "cpu"]

    def train(work: Path, steps: int, *extra: str) -> None:
        monkeypatch.setattr("sys.argv", ["train_demo.py", "--work-dir", str(work), "--steps", str(steps), *extra])
        demo.main()

    train(tmp_path / "straight", 2, *tiny)
    train(tmp_path / "resumed", 1, *tiny)
    train(tmp_path / "resumed", 2)
    a, b = (torch.load(tmp_path / run / "checkpoint.pt", weights_only=True) for run in ("straight", "resumed"))
    config = a["train_config"]
    assert (config["token_loss_weight"], tuple(config["token_loss_layers"]), config["token_classes"]) == (0.5, (0, 1), 4)
    assert (config["grounding_loss_weight"], tuple(config["grounding_layers"])) == (0.25, (0, 1))
    for name in ("model", "ema", "classifier"):
        assert all(torch.equal(a[name][k], b[name][k]) for k in a[name]), name
    assert json.loads((tmp_path / "resumed" / "recipe.json").read_text())["shape_loss"] == 0.5
    with pytest.raises(SystemExit, match=r"--shape-loss 1.0 \(recipe.json: 0.5\)"):
        train(tmp_path / "resumed", 3, "--shape-loss", "1.0")
    load_flux(tmp_path / "straight" / "exports" / "step-000002" / "flux1-demo.safetensors")   # strict: no extras


def test_demo_recipe_can_start_from_an_export(tmp_path, monkeypatch):
    """--init-from: the new run's step 0 is the export's transformer (and text encoders), recorded with its SHA-256;
    an export of another architecture is refused by name before anything is written."""
    demo = load_script()
    tiny = ["--hidden", "24", "--depth", "2", "--single-depth", "0", "--batch-size", "2", "--export-every", "1",
            "--device", "cpu"]

    def train(work: Path, steps: int, *extra: str) -> None:
        monkeypatch.setattr("sys.argv", ["train_demo.py", "--work-dir", str(work), "--steps", str(steps), *extra])
        demo.main()

    train(tmp_path / "base", 1, *tiny)
    base = tmp_path / "base" / "exports" / "step-000001"
    train(tmp_path / "fork", 1, *tiny, "--init-from", str(base), "--grounding-loss", "1")
    start = load_flux(tmp_path / "fork" / "exports" / "step-000000" / "flux1-demo.safetensors").state_dict()
    assert all(torch.equal(x, y) for x, y in zip(load_flux(base / "flux1-demo.safetensors").state_dict().values(),
                                                 start.values()))
    assert (tmp_path / "fork" / "t5" / "config.json").read_bytes() == (base / "t5" / "config.json").read_bytes()
    recipe = json.loads((tmp_path / "fork" / "recipe.json").read_text())
    assert recipe["init_from"] == str(base) and len(recipe["init_sha256"]) == 64
    with pytest.raises(SystemExit, match="--init-from .* the recipe asks for"):
        train(tmp_path / "wider", 1, *tiny[:1], "48", *tiny[2:], "--init-from", str(base))
    assert not (tmp_path / "wider").exists()


@pytest.mark.parametrize("flag", [["--hidden", "100"], ["--caption-dropout", "1.5"]])
def test_demo_recipe_that_cannot_be_built_is_refused_before_writing(tmp_path, monkeypatch, flag):
    demo = load_script()
    work = tmp_path / "bad"
    monkeypatch.setattr("sys.argv", ["train_demo.py", "--work-dir", str(work), "--steps", "1", *flag])
    with pytest.raises(SystemExit, match="must be"):
        demo.main()
    assert not (work / "recipe.json").exists()      # a corrected command starts cleanly in the same folder


def test_drawing_probe_names_the_shape_of_every_dataset_object():
    """scripts/probe_demo.py judges a drawn shape by how much of its bounding box it fills: on the dataset's own
    single objects (every shape, colour and size) it must always be right, or its 'drawn as asked' means nothing."""
    probe = load_script("probe_demo")
    from concept_attention.shapes import ShapesConfig, make_sample

    samples = [make_sample(7, i, ShapesConfig(two_object_prob=0.0)) for i in range(90)]
    assert {s.class_names[1] for s in samples} == {"circle", "square", "triangle"}
    assert all(probe.drawn_shape(s.image, s.colours[0]) == s.class_names[1] for s in samples)
    assert probe.drawn_shape(samples[0].image, "pink" if samples[0].colours[0] != "pink" else "red") is None


def test_decodability_probe_finds_object_tokens_and_separable_labels():
    """scripts/probe_demo.py decodable: the tokens wholly inside one object (by hand on a 4x4 mask with 2x2-pixel
    tokens), and a linear probe that is perfect on linearly separable labels and at chance on random ones."""
    probe = load_script("probe_demo")
    mask = np.array([[1, 1, 0, 0],
                     [1, 1, 0, 2],
                     [0, 0, 2, 2],
                     [0, 0, 2, 2]])
    inside, owner = probe.object_tokens(mask, (2, 2))       # tokens: top-left, top-right, bottom-left, bottom-right
    assert inside.tolist() == [True, False, False, True] and owner[inside].tolist() == [1, 2]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 5, generator=g, dtype=torch.float64) * torch.tensor([1.0, 5.0, 0.1, 1.0, 1.0])
    score = x[:, 0] - x[:, 1] / 5                             # three classes: bands of one direction
    labels = (score > -0.7).long() + (score > 0.7).long()
    assert probe.linear_probe_accuracy(x[:400], labels[:400], x[400:], labels[400:], 1e-4).double().mean() > 0.95
    random = torch.randint(0, 3, (600,), generator=g)
    assert probe.linear_probe_accuracy(x[:400], random[:400], x[400:], random[400:]).double().mean() < 0.45
