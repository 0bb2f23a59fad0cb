"""flux_mini vs diffusers: forward speed, efficiency against plain matmul, and checkpoint-load memory.

    PYTHONPATH=. python benchmarks/bench_transformer.py [--reps 5] [--skip-load]

One run prints, side by side at 1 and 2 threads: the forward time of both models on the same random
weights (medium config, float32, no_grad; repetitions interleaved, medians; wall and process CPU
time), their ratio, and flux_mini's throughput (matmul + attention FLOPs counted analytically, per
CPU second) as a fraction of a plain 2048x2048 fp32 matmul's, measured in the same run. Then the peak RSS
of loading a ~1 GB fp32 checkpoint,
measured in fresh subprocesses, relative to the file size.
Goals: time ratio <= 0.95, >= 75% of matmul peak, load peak <= 1.2x the file size.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from flux_mini.convert import bfl_to_diffusers, diffusers_config
from flux_mini.flux1 import Flux, FluxConfig
from flux_mini.tiny import randomize_

MEDIUM = FluxConfig(hidden_size=768, num_heads=12, axes_dim=(8, 28, 28), depth=4, depth_single_blocks=8)
LOAD = FluxConfig(hidden_size=1024, num_heads=16, axes_dim=(8, 28, 28), depth=4, depth_single_blocks=8)  # ~1.1 GB fp32
GRID, TEXT = (32, 32), 128
CHILD_ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def forward_flops(c: FluxConfig, image_tokens: int, text_tokens: int) -> tuple[float, float]:
    """(Linear FLOPs, attention FLOPs) of one batch-1 forward: 2 x multiply-adds; attention = QK^T and PV."""
    n, d, m = image_tokens + text_tokens, c.hidden_size, c.mlp_hidden_dim
    double = 2 * n * d * (3 * d + d + 2 * m) + 2 * 2 * d * 6 * d  # qkv, proj, mlp up + down; 2 modulations
    single = 2 * n * d * (3 * d + m) + 2 * n * (d + m) * d + 2 * d * 3 * d  # linear1, linear2, modulation
    embed = 2 * (image_tokens * c.in_channels * d + text_tokens * c.context_in_dim * d)  # img_in, txt_in
    embed += 2 * (256 * d + d * d + c.vec_in_dim * d + d * d) + 2 * d * 2 * d + 2 * image_tokens * d * c.out_channels
    linear = c.depth * double + c.depth_single_blocks * single + embed
    attention = (c.depth + c.depth_single_blocks) * 2 * 2 * n * n * d  # over all heads: H * Dh = D
    return linear, attention


def inputs(c: FluxConfig, seed: int = 0, grid: tuple[int, int] = GRID) -> dict:
    g = torch.Generator().manual_seed(seed)
    rows, cols = grid
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


def diffusers_twin(model: Flux):
    from diffusers import FluxTransformer2DModel

    twin = FluxTransformer2DModel(**diffusers_config(model.config))
    twin.load_state_dict(bfl_to_diffusers(model.state_dict()), strict=True)
    return twin.eval()


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process): CPU time barely moves when other processes steal the
    cores, so on a shared machine its ratios are the trustworthy ones."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def medians(samples: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(s[0] for s in samples), statistics.median(s[1] for s in samples)


@torch.no_grad()
def speed(reps: int) -> None:
    torch.manual_seed(0)
    model = randomize_(Flux(MEDIUM), std=0.02).eval()
    twin = diffusers_twin(model)
    x = inputs(MEDIUM)
    ours = lambda: model(**x)  # noqa: E731
    theirs = lambda: twin(  # noqa: E731
        hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"], timestep=x["timesteps"],
        img_ids=x["img_ids"][0], txt_ids=x["txt_ids"][0], return_dict=False,
    )[0]  # fmt: skip
    delta = (ours() - theirs()).abs().max().item()
    linear, attn = forward_flops(MEDIUM, GRID[0] * GRID[1], TEXT)
    flops = linear + attn
    with FlopCounterMode(display=False) as counter:
        ours()
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    c = MEDIUM
    print(f"medium config: hidden {c.hidden_size}, {c.num_heads} heads, {c.depth}+{c.depth_single_blocks} blocks, "
          f"{GRID[0] * GRID[1]} image + {TEXT} text tokens, fp32, batch 1; {flops / 1e9:.1f} GFLOP/forward = "
          f"Linear {linear / 1e9:.1f} (torch's FlopCounterMode: {counter.get_total_flops() / 1e9:.1f}; it skips "
          f"CPU SDPA) "
          f"+ attention {attn / 1e9:.1f}; max |flux_mini - diffusers| = {delta:.2e}")  # fmt: skip
    print(f"{reps} interleaved repetitions, medians; wall = elapsed seconds, cpu = CPU seconds of this process")
    print(f"{'threads':>7} {'flux_mini wall/cpu':>19} {'diffusers wall/cpu':>19} {'ratio wall/cpu':>15} "
          f"{'per-rep cpu ratios':>30} {'matmul GF/cpu-s':>15} {'flux GF/cpu-s':>13} {'of matmul':>9}")  # fmt: skip
    for threads in (1, 2):
        torch.set_num_threads(threads)
        ours(), theirs()  # warm-up
        t_ours, t_theirs, t_mm = [], [], []
        for _ in range(reps):  # interleaved, so load from other processes hits both alike
            t_ours.append(timed(ours))
            t_theirs.append(timed(theirs))
            t_mm.append(min((timed(lambda: a @ b) for _ in range(3)), key=lambda t: t[1]))
        (ow, oc), (tw, tc), (_, mc) = medians(t_ours), medians(t_theirs), medians(t_mm)
        peak, achieved = 2 * 2048**3 / mc / 1e9, flops / oc / 1e9
        per_rep = " ".join(f"{o[1] / t[1]:.2f}" for o, t in zip(t_ours, t_theirs))
        print(f"{threads:>7} {ow:>9.3f} / {oc:>7.3f} {tw:>9.3f} / {tc:>7.3f} {ow / tw:>7.3f} / {oc / tc:>5.3f} "
              f"{per_rep:>30} {peak:>15.1f} {achieved:>13.1f} {achieved / peak:>9.1%}")  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Load memory, each measurement in a fresh process so the peak belongs to that load alone

MEASURE = r"""
import sys, torch
def status(field):
    return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1]) * 1024
from flux_mini.loading import inspect_checkpoint, load_flux
from flux_mini.flux1 import Flux
from safetensors.torch import load_file
path, how = sys.argv[1], sys.argv[2]
torch.set_num_threads(1)
base = status("VmRSS:")
if how == "load_flux":
    model = load_flux(path)
elif how == "load_flux+touch":
    model = load_flux(path)
    for p in model.parameters():
        p.sum()  # reads every page
else:  # the usual way: read the file into RAM, then copy into an allocated model
    with torch.device("meta"):
        model = Flux(inspect_checkpoint(path).config)
    model = model.to_empty(device="cpu")
    model.load_state_dict(load_file(path))
print(status("VmHWM:") - base)
"""


def load_memory() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "load-bench.safetensors"
        # written by a child process, so this process never holds the weights
        subprocess.run([sys.executable, "-c", (
            "import sys, torch; from flux_mini.loading import save_flux; from flux_mini.flux1 import Flux, FluxConfig;"
            f"torch.manual_seed(0); save_flux(Flux(FluxConfig(**{LOAD.to_dict()!r})), sys.argv[1])"
        ), str(path)], check=True, env=CHILD_ENV)  # fmt: skip
        size = path.stat().st_size
        c = LOAD
        print(f"\nload: {size / 1e9:.2f} GB fp32 file (hidden {c.hidden_size}, {c.depth}+{c.depth_single_blocks} "
              "blocks)")
        for how in ("load_flux", "load_flux+touch", "load_file+load_state_dict"):
            command = [sys.executable, "-c", MEASURE, str(path), how]
            out = subprocess.run(command, check=True, capture_output=True, text=True, env=CHILD_ENV)
            peak = int(out.stdout.split()[-1])
            print(f"  {how:<26} peak RSS above baseline {peak / 1e9:6.2f} GB = {peak / size:.2f}x file size")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--skip-load", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args()
    if not args.skip_speed:
        speed(args.reps)
    if not args.skip_load:
        load_memory()


if __name__ == "__main__":
    main()
