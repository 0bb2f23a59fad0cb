"""Rectified-flow training for any FluxConfig: small, readable and resumable.

The objective is the one the Euler sampler integrates (`img <- img + (t_prev - t_curr) * pred`):

    x_t = (1 - t) * x0 + t * noise,      target v = noise - x0,      t ~ logit-normal.

Latents are packed into 2x2 patches exactly as at sampling time, so a pixel-space model trained here
(identity autoencoder, in_channels = 4 * 3 = 12) loads into the normal pipeline. Text conditioning
arrives precomputed (frozen encoders), so this loop never runs T5 or CLIP.

Everything random (timesteps, noise, caption dropout) comes from one CPU generator whose state is saved
with the model, the EMA and the optimizer: resuming from a checkpoint continues bit-identically as
long as the data source is a pure function of the step. The model may live on any device (batches are
moved to it); the random draws stay on the CPU, so a run's noise does not depend on the device.

Optionally (`token_loss_weight` > 0) a linear read-out of the image tokens after chosen layers is trained to
name each token's class (e.g. the shape of the object it lies on): an auxiliary loss that makes those layers
encode what the denoising loss alone does not teach a small model. The read-out is never exported.

Optionally (`grounding_loss_weight` > 0) the caption words that name something in the image are taught where
it is: in chosen double blocks, each such word's attention over the image tokens (its query on their keys,
averaged over heads) should fall on its region, loss (1 - mass inside)^2 -- the token-level grounding loss of
TokenCompose (Wang et al., CVPR 2024), here on the text-to-image direction of the joint attention.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from tqdm.auto import tqdm

from flux_mini.loading import save_flux
from flux_mini.flux1 import Flux, FluxConfig
from flux_mini.interp import NamedSites
from flux_mini.layers import LayerOutput
from flux_mini.sampling import image_ids, pack, text_ids


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and conditioning hyperparameters."""

    batch_size: int = 16
    lr: float = 5e-4
    warmup_steps: int = 200
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    caption_dropout: float = 0.1  # fraction of samples trained on the empty prompt (classifier-free guidance)
    zero_y_prob: float = 0.5  # fraction trained with pooled vector y = 0, the concept stream's convention
    logit_mean: float = 0.0  # t = sigmoid(N(logit_mean, logit_std^2))
    logit_std: float = 1.0
    seed: int = 0
    token_loss_weight: float = 0.0  # auxiliary token classification (0: off); batches then carry token_labels
    token_loss_layers: tuple[int, ...] = ()  # layers whose image tokens are classified (flux layer numbers)
    token_classes: int = 0
    grounding_loss_weight: float = 0.0  # caption words' attention on their regions (0: off); needs word_regions
    grounding_layers: tuple[int, ...] = ()  # double blocks whose attention is grounded

    def __post_init__(self) -> None:
        for name in ("caption_dropout", "zero_y_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.batch_size < 1 or self.lr <= 0:
            raise ValueError(f"batch_size must be >= 1 and lr > 0, got {self.batch_size} and {self.lr}")
        if self.token_loss_weight < 0:
            raise ValueError(f"token_loss_weight must be >= 0, got {self.token_loss_weight}")
        if self.token_loss_weight > 0 and (not self.token_loss_layers or self.token_classes < 2):
            raise ValueError("a token loss needs token_loss_layers (which layers to read) and token_classes >= 2, "
                             f"got {self.token_loss_layers} and {self.token_classes}")
        if self.grounding_loss_weight < 0 or (self.grounding_loss_weight > 0 and not self.grounding_layers):
            raise ValueError("grounding_loss_weight must be >= 0, and > 0 needs grounding_layers (double blocks), "
                             f"got {self.grounding_loss_weight} and {self.grounding_layers}")


@dataclass
class Batch:
    """Clean latents and their frozen text conditioning."""

    latents: Tensor  # (B, C, h, w), h and w even; pixels in [-1, 1] for pixel-space models
    txt: Tensor  # (B, T, context_in_dim)  T5 states of the captions
    y: Tensor  # (B, vec_in_dim)          pooled CLIP vectors
    token_labels: Tensor | None = None  # (B, L) class of each image token, -100 where it has none (token loss)
    word_regions: Tensor | None = None  # (B, T, L) share of each image token that caption token T names (grounding)

    def to(self, device: torch.device) -> Batch:
        """Text and latents on `device`; the labels and regions follow them where the losses use them."""
        move = lambda x: None if x is None else x.to(device)  # noqa: E731
        return Batch(*(move(x) for x in (self.latents, self.txt, self.y, self.token_labels, self.word_regions)))


@dataclass
class Conditioning:
    """What a dropped caption is replaced by: the encoders' output for the empty prompt."""

    null_txt: Tensor  # (1, T, context_in_dim)
    null_y: Tensor  # (1, vec_in_dim)


# ----------------------------------------------------------------------------------------------
# The objective


def sample_timesteps(n: int, mean: float, std: float, generator: torch.Generator) -> Tensor:
    """Logit-normal t in (0, 1), (n,): most samples at mid noise, where the velocity is hardest to predict."""
    return torch.sigmoid(mean + std * torch.randn(n, generator=generator))


def flow_pair(x0: Tensor, noise: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """The noisy input x_t and the velocity target noise - x0; t (B,) broadcasts over the rest."""
    t = t.view(-1, *([1] * (x0.ndim - 1)))
    return (1 - t) * x0 + t * noise, noise - x0


def drop_conditioning(batch: Batch, null: Conditioning, config: TrainConfig, generator: torch.Generator) -> Batch:
    """Replace whole captions by the empty prompt (caption_dropout), then zero y (zero_y_prob), per sample."""
    b, device = batch.latents.shape[0], batch.latents.device
    drop = (torch.rand(b, generator=generator) < config.caption_dropout).to(device)
    zero_y = (torch.rand(b, generator=generator) < config.zero_y_prob).to(device)
    txt = torch.where(drop[:, None, None], null.null_txt.to(batch.txt), batch.txt)
    y = torch.where(drop[:, None], null.null_y.to(batch.y), batch.y)
    y = torch.where(zero_y[:, None], torch.zeros_like(y), y)
    regions = batch.word_regions
    if regions is not None:  # a dropped caption has no words to ground
        regions = torch.where(drop[:, None, None], torch.zeros_like(regions), regions)
    return Batch(batch.latents, txt, y, batch.token_labels, regions)


class TokenClassifier(nn.Module):
    """One LayerNorm + Linear read-out per chosen layer: image tokens (B, L, D) -> class logits (B, L, classes)."""

    def __init__(self, dim: int, classes: int, layers: tuple[int, ...]):
        super().__init__()
        self.layers = tuple(layers)
        self.heads = nn.ModuleList(nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, classes)) for _ in self.layers)

    def loss(self, outputs: list[LayerOutput], labels: Tensor, t: Tensor) -> Tensor:
        """Cross-entropy averaged over the chosen layers and the labelled tokens, each sample weighted by 1 - t
        (at pure noise there is nothing to recognise)."""
        weight = (1 - t)[:, None] * (labels >= 0)  # (B, L)
        total = outputs[0].img.new_zeros(())
        for layer, head in zip(self.layers, self.heads):
            logits = head(outputs[layer].img)  # (B, L, classes)
            ce = F.cross_entropy(rearrange(logits, "b l c -> b c l"), labels, ignore_index=-100, reduction="none")
            total = total + (ce * weight).sum() / weight.sum().clamp_min(1e-8)
        return total / len(self.layers)


class QueryKeyRecorder(NamedSites):
    """Keeps the joint attention's queries and keys of chosen double blocks (with their gradients)."""

    def __init__(self, layers: tuple[int, ...]):
        self.wanted = {f"double_blocks.{i}.{s}" for i in layers for s in ("q", "k")}
        self.values: dict[str, Tensor] = {}

    def visit(self, name: str, value: Tensor) -> Tensor:
        if name in self.wanted:
            self.values[name] = value
        return value


def grounding_loss(recorded: dict[str, Tensor], layers: tuple[int, ...], regions: Tensor, t: Tensor) -> Tensor:
    """(1 - share of each grounded word's head-averaged attention over the image tokens that lies on its region)^2,
    averaged over the grounded words (weighted by 1 - t) and the layers; regions (B, T, L) as in Batch."""
    num_txt = regions.shape[1]
    grounded = (regions.sum(-1) > 0) * (1 - t)[:, None]  # (B, T)
    total = regions.new_zeros(())
    for layer in layers:
        q, k = recorded[f"double_blocks.{layer}.q"], recorded[f"double_blocks.{layer}.k"]  # (B, H, T + L, Dh)
        scores = torch.einsum("bhtd,bhld->bhtl", q[:, :, :num_txt], k[:, :, num_txt:]) / q.shape[-1] ** 0.5
        attention = scores.softmax(-1).mean(1)  # (B, T, L): each text token's attention over the image tokens
        inside = (attention * regions).sum(-1)  # (B, T)
        total = total + ((1 - inside) ** 2 * grounded).sum() / grounded.sum().clamp_min(1e-8)
    return total / len(layers)


def flow_loss(
    model: Flux, batch: Batch, t: Tensor, noise: Tensor, classifier: TokenClassifier | None = None,
    token_loss_weight: float = 0.0, grounding_loss_weight: float = 0.0, grounding_layers: tuple[int, ...] = (),
) -> Tensor:
    """Mean squared velocity error of `model` on a batch at timesteps t (B,) with noise like the latents,
    plus token_loss_weight x the classifier's loss when a classifier is given, plus grounding_loss_weight x
    the grounding loss of `grounding_layers` when that weight is > 0."""
    _, _, h, w = batch.latents.shape
    b = batch.latents.shape[0]
    x_t, target = flow_pair(batch.latents, noise, t)
    recorder = QueryKeyRecorder(grounding_layers if grounding_loss_weight > 0 else ())
    outputs = list(model.layers(
        img=pack(x_t),
        img_ids=image_ids(b, h // 2, w // 2, device=x_t.device),
        txt=batch.txt,
        txt_ids=text_ids(b, batch.txt.shape[1], device=x_t.device),
        timesteps=t.to(x_t.dtype),
        y=batch.y,
        sites=recorder,
    ))
    loss = F.mse_loss(model.velocity(outputs[-1]), pack(target))
    t = t.to(x_t.dtype)
    if classifier is not None:
        if batch.token_labels is None:
            raise ValueError("this run trains a token loss: every batch needs token_labels (B, L)")
        loss = loss + token_loss_weight * classifier.loss(outputs, batch.token_labels, t)
    if grounding_loss_weight > 0:
        if batch.word_regions is None:
            raise ValueError("this run trains a grounding loss: every batch needs word_regions (B, T, L)")
        loss = loss + grounding_loss_weight * grounding_loss(recorder.values, grounding_layers, batch.word_regions, t)
    return loss


# ----------------------------------------------------------------------------------------------
# The trainer


@dataclass
class Trainer:
    """Model, EMA copy, AdamW and the random state; `step` counts completed optimiser steps."""

    model: Flux
    config: TrainConfig
    null: Conditioning
    step: int = 0
    ema: Flux = field(init=False)
    classifier: TokenClassifier | None = field(init=False)  # the token loss's read-out; None without one
    optimizer: torch.optim.AdamW = field(init=False)
    generator: torch.Generator = field(init=False)

    def __post_init__(self) -> None:
        self.model.train()
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.classifier = None
        if self.config.token_loss_weight > 0:
            device = next(self.model.parameters()).device
            dim = self.model.config.hidden_size
            self.classifier = TokenClassifier(dim, self.config.token_classes, self.config.token_loss_layers).to(device)
        self.optimizer = torch.optim.AdamW(
            self.parameters(), lr=self.config.lr, betas=self.config.betas, weight_decay=self.config.weight_decay
        )
        self.generator = torch.Generator().manual_seed(self.config.seed)

    def parameters(self) -> list[nn.Parameter]:
        """What the optimiser trains: the model's parameters, then the token classifier's."""
        extra = list(self.classifier.parameters()) if self.classifier is not None else []
        return list(self.model.parameters()) + extra

    def lr_at(self, step: int) -> float:
        """Linear warmup, then constant: no schedule state to save, and training can always go on."""
        return self.config.lr * min(1.0, (step + 1) / max(1, self.config.warmup_steps))

    def train_step(self, batch: Batch) -> float:
        """One optimiser step on `batch`; returns the loss before the update."""
        cfg = self.config
        device = next(self.model.parameters()).device
        batch = batch.to(device)
        batch = drop_conditioning(batch, self.null, cfg, self.generator)
        t = sample_timesteps(batch.latents.shape[0], cfg.logit_mean, cfg.logit_std, self.generator).to(device)
        noise = torch.randn(batch.latents.shape, generator=self.generator).to(batch.latents)

        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        loss = flow_loss(self.model, batch, t, noise, self.classifier, cfg.token_loss_weight,
                         cfg.grounding_loss_weight, cfg.grounding_layers)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.update_ema()
        self.step += 1
        return loss.item()

    @torch.no_grad()
    def update_ema(self) -> None:
        """ema <- d * ema + (1 - d) * model, with d ramped up early so the EMA is not stuck at the init."""
        decay = min(self.config.ema_decay, (1 + self.step) / (10 + self.step))
        for ema_p, p in zip(self.ema.parameters(), self.model.parameters()):
            ema_p.lerp_(p.detach(), 1 - decay)

    def fit(
        self,
        data: Callable[[int], Batch],
        until: int,
        checkpoint: str | Path | None = None,
        checkpoint_every: int = 500,
        on_checkpoint: Callable[[Trainer], None] | None = None,
        progress: bool = True,
    ) -> list[float]:
        """Train from `self.step` to step `until`; batch i is `data(i)`. Saves (and calls on_checkpoint)
        every `checkpoint_every` steps and at the end. Returns the losses of the steps run."""
        losses: list[float] = []
        bar = tqdm(range(self.step, until), initial=self.step, total=until, disable=not progress, desc="training")
        for _ in bar:
            losses.append(self.train_step(data(self.step)))
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}", lr=f"{self.lr_at(self.step):.1e}")
            if checkpoint is not None and (self.step % checkpoint_every == 0 or self.step == until):
                self.save(checkpoint)
                if on_checkpoint is not None:
                    on_checkpoint(self)
        return losses

    # ------------------------------------------------------------------------------------------
    # Checkpoints

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "train_config": asdict(self.config),
            "flux_config": self.model.config.to_dict(),
            "null_txt": self.null.null_txt,
            "null_y": self.null.null_y,
        } | ({"classifier": self.classifier.state_dict()} if self.classifier is not None else {})

    def save(self, path: str | Path) -> None:
        """Write atomically (temporary file, then rename): a crash never leaves half a checkpoint."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save(self.state_dict(), tmp)
        tmp.replace(path)

    @classmethod
    def resume(cls, path: str | Path, config: TrainConfig | None = None, device: str | torch.device = "cpu") -> Trainer:
        """Rebuild a trainer from `save` on `device`; `config` overrides the saved one (e.g. a new lr) when given."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no training checkpoint at {path}; start a new run instead of resuming")
        state = torch.load(path, map_location="cpu", weights_only=True)
        saved = state["train_config"]
        tuples = {name: tuple(saved.get(name, ())) for name in ("betas", "token_loss_layers", "grounding_layers")}
        config = config or TrainConfig(**(saved | tuples))
        model = Flux(FluxConfig(**state["flux_config"]))
        model.load_state_dict(state["model"])
        model.to(device)
        trainer = cls(model, config, Conditioning(state["null_txt"], state["null_y"]), step=state["step"])
        trainer.ema.load_state_dict(state["ema"])
        if trainer.classifier is not None:
            if "classifier" not in state:
                raise ValueError(f"{path} was trained without a token loss, so it has no read-out to resume: "
                                 "resume with token_loss_weight 0, or start a new run with the token loss")
            trainer.classifier.load_state_dict(state["classifier"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.generator.set_state(state["generator"])
        return trainer


def export_transformer(
    model: Flux, folder: str | Path, name: str = "flux1-demo", dtype: torch.dtype = torch.float32
) -> Path:
    """Write `{name}.safetensors` (official BFL keys, config in the metadata) and `flux_config.json`.

    The rest of a pipeline folder (autoencoder, t5/, clip/) belongs to the caller."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = copy.deepcopy(model).to("cpu", dtype)
    path = folder / f"{name}.safetensors"
    save_flux(weights, path)
    (folder / "flux_config.json").write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
    return path


@torch.no_grad()
def zero_init_modulation_(model: Flux) -> Flux:
    """adaLN-Zero (Peebles & Xie, DiT): zero every modulation output layer and the final projection, so
    each block starts as the identity and the velocity as 0; trains faster and more stably from scratch."""
    for name, module in model.named_modules():
        if name.endswith(("_mod.lin", "modulation.lin", "adaLN_modulation.1", "final_layer.linear")):
            module.weight.zero_()
            module.bias.zero_()
    return model


def parameter_count(model: torch.nn.Module) -> str:
    n = sum(p.numel() for p in model.parameters())
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"

