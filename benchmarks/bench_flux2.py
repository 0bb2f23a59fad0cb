"""FLUX.2: flux_mini vs diffusers forward time, and the cost of concept maps through every layer.

    PYTHONPATH=. python benchmarks/bench_flux2.py [--reps 3] [--threads 1] [--concepts 10] [--grid 32] [--text 512]

One run prints, side by side, the CPU time of one forward of flux_mini's `Flux2` and diffusers'
`Flux2Transformer2DModel` on the same random weights (a medium klein-shaped config: head dim 128,
4 RoPE axes, SwiGLU, shared modulations; float32, no_grad, batch 1; a 32 x 32 token grid = 512 x 512
pixels and FLUX.2's fixed 512 text tokens by default), and of flux_mini's forward that
also computes concept maps from every layer (the concept stream through all double and single
blocks, `run_concept_layers` with `need_output=True`, as a generation step does). Repetitions are
interleaved; CPU seconds of this process are the trustworthy measure on a shared machine, and ratios of
the medians and of the minimums (other load only ever adds time) are printed.
Goals: flux_mini / diffusers <= 0.95, maps-through-all-layers / plain forward <= 1.05.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from concept_attention.maps import MapAccumulator, run_concept_layers
from flux_mini.convert import flux2_bfl_to_diffusers, flux2_diffusers_config
from flux_mini.flux2 import Flux2, Flux2Config
from flux_mini.tiny import randomize_

MEDIUM = Flux2Config(context_in_dim=3 * 256, hidden_size=768, num_heads=6, depth=2, depth_single_blocks=8,
                     use_guidance_embed=False)  # fmt: skip


def inputs(c: Flux2Config, concepts: int, grid: int, text: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    img_ids = torch.zeros(grid, grid, 4)
    img_ids[..., 1], img_ids[..., 2] = torch.arange(grid)[:, None], torch.arange(grid)[None, :]
    txt_ids = torch.zeros(text, 4)
    txt_ids[:, 3] = torch.arange(text)
    return dict(
        img=torch.randn(1, grid * grid, c.in_channels, generator=g),
        img_ids=img_ids.reshape(1, grid * grid, 4),
        txt=torch.randn(1, text, c.context_in_dim, generator=g),
        txt_ids=txt_ids[None],
        timesteps=torch.tensor([0.6]),
        concept_txt=torch.randn(1, concepts, c.context_in_dim, generator=g),
    )


def diffusers_twin(model: Flux2):
    from diffusers import Flux2Transformer2DModel

    twin = Flux2Transformer2DModel(**flux2_diffusers_config(model.config))
    twin.load_state_dict(flux2_bfl_to_diffusers(model.state_dict()), strict=True)
    return twin.eval()


def cpu_seconds(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--concepts", type=int, default=10)
    parser.add_argument("--grid", type=int, default=32, help="image tokens per side (64 = 1024 x 1024 pixels)")
    parser.add_argument("--text", type=int, default=512, help="text tokens (FLUX.2 always pads to 512)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = randomize_(Flux2(MEDIUM), std=0.02).eval()
    twin = diffusers_twin(model)
    x = inputs(MEDIUM, args.concepts, args.grid, args.text)
    concept_txt = x.pop("concept_txt")
    layers = list(MEDIUM.concept_layers)

    def ours():
        return model(**x)

    def theirs():
        return twin(hidden_states=x["img"], encoder_hidden_states=x["txt"], timestep=x["timesteps"],
                    img_ids=x["img_ids"][0], txt_ids=x["txt_ids"][0], return_dict=False)[0]  # fmt: skip

    def with_maps():
        accumulator = MapAccumulator(spaces=("output",))
        out = run_concept_layers(model, **x, y=None, concept_txt=concept_txt, accumulator=accumulator,
                                 layers=layers, need_output=True)  # fmt: skip
        accumulator.mean()
        return out

    delta = (ours() - theirs()).abs().max().item()
    assert torch.equal(ours(), with_maps())  # the maps never change the velocity
    c = MEDIUM
    print(f"medium FLUX.2 config: hidden {c.hidden_size}, {c.num_heads} heads x {c.head_dim}, {c.depth}+"
          f"{c.depth_single_blocks} blocks, {args.grid ** 2} image + {args.text} text tokens, {args.concepts} "
          f"concepts, fp32, batch 1, {args.threads} thread(s); max |flux_mini - diffusers| = {delta:.2e}")  # fmt: skip
    times: dict[str, list[float]] = {"flux_mini": [], "diffusers": [], "flux_mini + maps, all layers": []}
    runs = dict(zip(times, (ours, theirs, with_maps)))
    for fn in runs.values():
        fn()  # warm-up
    for _ in range(args.reps):  # interleaved, so load from other processes hits all alike
        for name, fn in runs.items():
            times[name].append(cpu_seconds(fn))
    print(f"{args.reps} interleaved repetitions, CPU seconds per forward:")
    for name, t in times.items():
        print(f"  {name:<30} median {statistics.median(t):7.3f} s, min {min(t):7.3f} s   "
              f"(reps: {', '.join(f'{v:.3f}' for v in t)})")  # fmt: skip
    for stat in (statistics.median, min):
        value = {name: stat(t) for name, t in times.items()}
        speed = value["flux_mini"] / value["diffusers"]
        overhead = value["flux_mini + maps, all layers"] / value["flux_mini"]
        print(f"{stat.__name__:>6}: flux_mini / diffusers {speed:.3f}x (goal <= 0.95);   maps through all "
              f"{len(layers)} layers / plain {overhead:.3f}x (goal <= 1.05)")  # fmt: skip


if __name__ == "__main__":
    main()
