"""What the named sites cost: the plain forward against the same forward through `run_with_cache`.

    PYTHONPATH=. python benchmarks/bench_interp.py [--reps 7]

One run prints, side by side at 1 thread (medium config, float32, no_grad, batch 1; repetitions interleaved,
medians of process CPU time): `model(...)` (every site is the identity `NO_SITES`), `run_with_cache(names=[])`
(every site goes through a full-name lookup and nothing is kept), and `run_with_cache` keeping the image
stream after every double block; then the ratios to the plain forward. Goal: the empty cache <= 1.01x.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from flux_mini.flux1 import Flux, FluxConfig
from flux_mini.interp import run_with_cache, site_names
from flux_mini.tiny import randomize_

MEDIUM = FluxConfig(hidden_size=768, num_heads=12, axes_dim=(8, 28, 28), depth=4, depth_single_blocks=8)
GRID, TEXT = (32, 32), 128


def inputs(c: FluxConfig, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    rows, cols = GRID
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1], ids[..., 2] = torch.arange(rows)[:, None], torch.arange(cols)[None, :]
    return dict(
        img=torch.randn(1, rows * cols, c.in_channels, generator=g),
        img_ids=ids.reshape(1, rows * cols, 3),
        txt=torch.randn(1, TEXT, c.context_in_dim, generator=g),
        txt_ids=torch.zeros(1, TEXT, 3),
        timesteps=torch.tensor([0.6]),
        y=torch.randn(1, c.vec_in_dim, generator=g),
    )


def cpu_seconds(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


@torch.no_grad()
def main(reps: int) -> None:
    torch.set_num_threads(1)
    model = randomize_(Flux(MEDIUM), std=0.02).eval()
    x = inputs(MEDIUM)
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
    c = MEDIUM
    visited = len(run_with_cache(model, **x, names=["*"])[1])
    print(f"medium config: hidden {c.hidden_size}, {c.num_heads} heads, {c.depth}+{c.depth_single_blocks} blocks, "
          f"{GRID[0] * GRID[1]} image + {TEXT} text tokens, fp32, batch 1, 1 thread; {visited} sites visited "
          f"(of {len(site_names(model))}: no concept stream); {reps} interleaved repetitions, medians of process CPU seconds")  # fmt: skip
    base = statistics.median(times["model(...)"])
    print(f"{'variant':<38} {'cpu s':>8} {'ratio':>7} {'per-rep ratios':>40}")
    for name, samples in times.items():
        per_rep = " ".join(f"{t / p:.3f}" for t, p in zip(samples, times["model(...)"]))
        print(f"{name:<38} {statistics.median(samples):>8.3f} {statistics.median(samples) / base:>7.3f} {per_rep:>40}")
    ratio = statistics.median(times["run_with_cache(names=[])"]) / base
    print(f"empty cache / plain forward = {ratio:.3f} (goal <= 1.01): {'met' if ratio <= 1.01 else 'NOT met'}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    main(parser.parse_args().reps)
