"""What the named sites cost: the plain forward against the same forward through `run_with_cache`.

    PYTHONPATH=. python benchmarks/bench_interp.py [--reps 7] [--generations flux1 flux2]

One run prints, per generation, side by side at 1 thread (medium config, float32, no_grad, batch 1;
repetitions interleaved, medians of process CPU time): `model(...)` (every site is the identity
`NO_SITES`), `run_with_cache(names=[])` (every site goes through a full-name lookup and nothing is kept),
and `run_with_cache` keeping the image stream after every double block; then the ratios to the plain
forward, of the medians and of the fastest runs. On a shared machine these whole-forward ratios wander by a
few percent either way, far more than the sites cost, so the script also times the site mechanism apart
(the request and one call per visited site, without the model's arithmetic) and states the goal on that:
the empty cache <= 1.01x the plain forward.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from flux_mini.flux1 import Flux, FluxConfig
from flux_mini.flux2 import Flux2, Flux2Config
from flux_mini.interp import Interventions, run_with_cache, site_names
from flux_mini.tiny import randomize_

MEDIUM = FluxConfig(hidden_size=768, num_heads=12, axes_dim=(8, 28, 28), depth=4, depth_single_blocks=8)
MEDIUM2 = Flux2Config(in_channels=64, context_in_dim=1024, hidden_size=768, num_heads=6, depth=4, depth_single_blocks=8,
                      use_guidance_embed=False)  # head dim 128 as in FLUX.2; fmt: skip
GRID, TEXT = (32, 32), 128


def inputs(c: FluxConfig | Flux2Config, seed: int = 0) -> dict:
    """Flux.1: ids (0, row, col), pooled y; FLUX.2: ids (0, row, col, 0) and text (0, 0, 0, n), no y."""
    g = torch.Generator().manual_seed(seed)
    rows, cols = GRID
    axes = len(c.axes_dim)
    ids, txt_ids = torch.zeros(rows, cols, axes), torch.zeros(1, TEXT, axes)
    ids[..., 1], ids[..., 2] = torch.arange(rows)[:, None], torch.arange(cols)[None, :]
    if axes == 4:
        txt_ids[..., 3] = torch.arange(TEXT)
    x = dict(
        img=torch.randn(1, rows * cols, c.in_channels, generator=g),
        img_ids=ids.reshape(1, rows * cols, axes),
        txt=torch.randn(1, TEXT, c.context_in_dim, generator=g),
        txt_ids=txt_ids,
        timesteps=torch.tensor([0.6]),
    )
    if isinstance(c, FluxConfig):
        x["y"] = torch.randn(1, c.vec_in_dim, generator=g)
    return x


def cpu_seconds(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


@torch.no_grad()
def main(reps: int, generations: list[str]) -> None:
    torch.set_num_threads(1)
    for generation in generations:
        config = MEDIUM if generation == "flux1" else MEDIUM2
        compare(randomize_((Flux if generation == "flux1" else Flux2)(config), std=0.02).eval(), config, reps)


def compare(model, c, reps: int) -> None:
    x = inputs(c)
    variants = {
        "model(...)": lambda: model(**x),
        "run_with_cache(names=[])": lambda: run_with_cache(model, **x, names=[]),
        "run_with_cache(double_blocks.*.img)": lambda: run_with_cache(model, **x, names=["double_blocks.*.img"]),
    }
    plain = model(**x)
    for name, fn in variants.items():  # warm-up, and the outputs must be the plain forward's
        output = fn()
        assert torch.equal(output if isinstance(output, torch.Tensor) else output[0], plain), name
    times = {name: [] for name in variants}
    for _ in range(reps):  # interleaved, so load from other processes hits every variant alike
        for name, fn in variants.items():
            times[name].append(cpu_seconds(fn))
    visited = len(run_with_cache(model, **x, names=["*"])[1])
    blocks = f"{c.depth}+{c.depth_single_blocks} blocks"
    print(f"{type(model).__name__}, medium config: hidden {c.hidden_size}, {c.num_heads} heads, {blocks}, "
          f"{GRID[0] * GRID[1]} image + {TEXT} text tokens, fp32, batch 1, 1 thread; {visited} sites visited "
          f"(of {len(site_names(model))}: no concept stream); {reps} interleaved repetitions, process CPU seconds")
    plain = times["model(...)"]
    print(f"{'variant':<38} {'median s':>9} {'ratio':>6} {'min s':>7} {'ratio':>6}   per-rep ratios")
    for name, samples in times.items():
        per_rep = " ".join(f"{t / p:.3f}" for t, p in zip(samples, plain))
        median, fastest = statistics.median(samples), min(samples)
        print(f"{name:<38} {median:>9.3f} {median / statistics.median(plain):>6.3f} {fastest:>7.3f} "
              f"{fastest / min(plain):>6.3f}   {per_rep}")  # fmt: skip
    ratio = min(times["run_with_cache(names=[])"]) / min(plain)
    mechanism = site_mechanism_seconds(model, x)
    print(f"empty cache / plain forward, fastest runs = {ratio:.3f}; the site mechanism alone (building the request "
          f"and {visited} visits, timed apart) = {mechanism * 1e3:.3f} ms per forward = "
          f"{1 + mechanism / statistics.median(plain):.5f}x (goal <= 1.01): "
          f"{'met' if mechanism / statistics.median(plain) <= 0.01 else 'NOT met'}\n")  # fmt: skip


def site_mechanism_seconds(model, x: dict, reps: int = 200) -> float:
    """CPU seconds per forward spent in `run_with_cache(names=[])`'s own work: the request (checked against the
    model's site list) and one scoped call per visited site, replayed without the model's arithmetic, which
    no timing of two whole forwards can resolve on a shared machine."""
    visited = [name.rpartition(".") for name in run_with_cache(model, **x, names=["*"])[1]]
    value = torch.zeros(())

    def replay():
        sites = Interventions(model, cache=[]).sites()
        for prefix, _, site in visited:
            (sites.scoped(prefix) if prefix else sites)(site, value)

    return cpu_seconds(lambda: [replay() for _ in range(reps)]) / reps

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--generations", nargs="+", choices=["flux1", "flux2"], default=["flux1", "flux2"])
    arguments = parser.parse_args()
    main(arguments.reps, arguments.generations)
