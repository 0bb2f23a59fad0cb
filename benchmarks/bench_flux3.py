"""FLUX.3: flux_mini's Flux3 vs diffusers' Flux3Transformer2DModel, and what concept maps cost, side by side.

    PYTHONPATH=. python benchmarks/bench_flux3.py [--reps 5] [--threads 1]

Medium config (hidden 768, 12 heads, 1 mode block per mode + 4 joint blocks, text width 2048), 24 x 32 image
tokens, 160 text tokens (two windows of 80), one 16 x 16 reference image, 10 concepts, float32, no_grad, the
flow map. Repetitions of every variant are interleaved and medians reported (wall and process CPU time), so
load from other processes hits all alike. Rows:
  diffusers         diffusers on the same weights / flux_mini's plain forward (goal: flux_mini <= 0.95x)
  maps, generation  the forward with maps from every joint layer (velocity still computed) / plain forward
  maps, encode      maps from every joint layer, stopping there / the plain forward  (goal: both <= 1.05x)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from concept_attention.maps import MapAccumulator, run_concept_layers
from flux_mini.convert import flux3_bfl_to_diffusers, flux3_diffusers_config
from flux_mini.flux3 import Flux3, Flux3Config
from flux_mini.tiny import randomize_

MEDIUM = Flux3Config(
    context_in_dim=2048, hidden_size=768, num_heads=12, axes_dim=(16, 16, 16, 16), depth=1, depth_single_blocks=4
)
GRID, REFERENCE, TEXT, CONCEPTS = (24, 32), (16, 16), 160, 10


def grid_ids(rows: int, cols: int, l: float) -> torch.Tensor:
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    zeros = torch.zeros(rows * cols)
    return torch.stack([zeros, 0.5 * r.flatten(), 0.5 * c.flatten(), torch.full_like(zeros, l)], dim=-1)[None]


def inputs(c: Flux3Config, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    text_ids = torch.zeros(1, TEXT, 4)
    text_ids[..., 3] = torch.arange(TEXT)
    return dict(
        img=torch.randn(1, GRID[0] * GRID[1], c.in_channels, generator=g),
        img_ids=grid_ids(*GRID, 0.0),
        txt=torch.randn(1, TEXT, c.context_in_dim, generator=g),
        txt_ids=text_ids,
        timesteps=torch.tensor([0.7]),
        cond=torch.randn(1, REFERENCE[0] * REFERENCE[1], c.cond_in_channels, generator=g),
        cond_ids=grid_ids(*REFERENCE, -1.0),
        target_timesteps=torch.tensor([0.6]),
    )


def diffusers_twin(model: Flux3):
    from diffusers import Flux3Transformer2DModel

    twin = Flux3Transformer2DModel(**flux3_diffusers_config(model.config))
    twin.load_state_dict(flux3_bfl_to_diffusers(model.state_dict()), strict=True)
    return twin.eval()


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process); CPU time is the steadier one on a shared machine."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = randomize_(Flux3(MEDIUM), std=0.02).eval()
    twin = diffusers_twin(model)
    x = inputs(MEDIUM)
    concept_txt = torch.randn(1, CONCEPTS, MEDIUM.context_in_dim)
    joint = list(MEDIUM.map_layers)

    def maps(need_output: bool):
        accumulator = MapAccumulator(spaces=("output",))
        run_concept_layers(
            model, **x, y=None, concept_txt=concept_txt, accumulator=accumulator, layers=joint, need_output=need_output
        )
        return accumulator.mean()

    runs = {
        "flux_mini": lambda: model(**x),
        "diffusers": lambda: twin(
            hidden_states=x["img"], encoder_hidden_states=x["txt"], timestep=x["timesteps"], img_ids=x["img_ids"][0],
            txt_ids=x["txt_ids"][0], image_cond_hidden_states=x["cond"], image_cond_ids=x["cond_ids"][0],
            target_timestep=x["target_timesteps"], return_dict=False,
        )[0],  # fmt: skip
        "maps, generation": lambda: maps(need_output=True),
        "maps, encode": lambda: maps(need_output=False),
    }
    delta = (runs["flux_mini"]() - runs["diffusers"]()).abs().max().item()
    for run in runs.values():  # warm-up
        run()
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for _ in range(args.reps):  # interleaved
        for name, run in runs.items():
            samples[name].append(timed(run))
    median = {name: tuple(statistics.median(s[i] for s in v) for i in (0, 1)) for name, v in samples.items()}

    c = MEDIUM
    print(f"FLUX.3 medium config: hidden {c.hidden_size}, {c.num_heads} heads, {c.depth} mode block(s) per mode + "
          f"{c.depth_single_blocks} joint blocks; {GRID[0] * GRID[1]} image + {TEXT} text + "
          f"{REFERENCE[0] * REFERENCE[1]} reference tokens, {CONCEPTS} concepts, fp32, batch 1, {args.threads} "
          f"thread(s); max |flux_mini - diffusers| = {delta:.2e}")  # fmt: skip
    print(f"{args.reps} interleaved repetitions, medians; wall = elapsed seconds, cpu = CPU seconds of this process")
    base_wall, base_cpu = median["flux_mini"]
    print(f"{'run':<18} {'wall s':>8} {'cpu s':>8}   {'flux_mini / diffusers':<22} {'run / plain forward':<20} goal")
    print(f"{'flux_mini forward':<18} {base_wall:>8.3f} {base_cpu:>8.3f}")
    wall, cpu = median["diffusers"]
    print(f"{'diffusers forward':<18} {wall:>8.3f} {cpu:>8.3f}   {base_wall / wall:>6.3f} / {base_cpu / cpu:<13.3f} "
          f"{'':<20} <= 0.95")  # fmt: skip
    for name in ("maps, generation", "maps, encode"):
        wall, cpu = median[name]
        ratios = f"{wall / base_wall:>6.3f} / {cpu / base_cpu:<11.3f}"
        print(f"{name:<18} {wall:>8.3f} {cpu:>8.3f}   {'':<22} {ratios} <= 1.05")


if __name__ == "__main__":
    main()
