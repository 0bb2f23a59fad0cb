"""FLUX.3: flux_mini's Flux3 vs diffusers' Flux3Transformer2DModel, and what concept maps cost, side by side.

    PYTHONPATH=. python benchmarks/bench_flux3.py [--reps 5] [--threads 1]

Medium config (hidden 768, 12 heads, 1 mode block per mode + 4 joint blocks, text width 2048), 24 x 32 image
tokens, 160 text tokens (two windows of 80), one 16 x 16 reference image, 10 concepts, float32, no_grad, the
flow map. Repetitions of every variant are interleaved, so load from other processes hits all alike; reported:
the median wall time, and the median and the minimum process CPU time (on a shared machine the minimum is the
steadiest estimate of a run's own cost). Ratios use CPU time, median / minimum. Rows:
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
    parser.add_argument("--reps", type=int, default=6)
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
    stats = {
        name: (statistics.median(s[0] for s in v), statistics.median(s[1] for s in v), min(s[1] for s in v))
        for name, v in samples.items()
    }

    c = MEDIUM
    print(f"FLUX.3 medium config: hidden {c.hidden_size}, {c.num_heads} heads, {c.depth} mode block(s) per mode + "
          f"{c.depth_single_blocks} joint blocks; {GRID[0] * GRID[1]} image + {TEXT} text + "
          f"{REFERENCE[0] * REFERENCE[1]} reference tokens, {CONCEPTS} concepts, fp32, batch 1, {args.threads} "
          f"thread(s); max |flux_mini - diffusers| = {delta:.2e}")  # fmt: skip
    print(f"{args.reps} interleaved repetitions; wall = elapsed seconds (median), cpu = CPU seconds of this process")
    print(f"{'run':<18} {'wall s':>7} {'cpu med':>8} {'cpu min':>8}   {'ratio (cpu med / min)':<34} goal")
    _, base_med, base_min = stats["flux_mini"]
    rows = [
        ("flux_mini", "flux_mini forward", None),
        ("diffusers", "diffusers forward", "flux_mini / diffusers <= 0.95"),
        ("maps, generation", "maps, generation", "run / plain forward <= 1.05"),
        ("maps, encode", "maps, encode", "run / plain forward <= 1.05"),
    ]
    for key, label, goal in rows:
        wall, med, low = stats[key]
        if key == "diffusers":
            ratio = f"{base_med / med:.3f} / {base_min / low:.3f}"
        elif key != "flux_mini":
            ratio = f"{med / base_med:.3f} / {low / base_min:.3f}"
        else:
            ratio = ""
        print(f"{label:<18} {wall:>7.3f} {med:>8.3f} {low:>8.3f}   {ratio:<34} {goal or ''}")


if __name__ == "__main__":
    main()
