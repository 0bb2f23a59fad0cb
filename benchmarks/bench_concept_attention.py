"""What ConceptAttention costs on top of the plain forward: time and memory, measured side by side.

    PYTHONPATH=. python benchmarks/bench_concept_attention.py [--reps 5] [--tokens 1024 4096] [--threads 2]

Medium config (hidden 768, 12 heads, 4 double + 8 single blocks), 128 text tokens, 10 concepts, float32,
no_grad. Repetitions of every variant are interleaved and medians reported, so load from other processes
hits all alike. Rows:
  full forward      plain forward vs the same forward with maps from every double block (the velocity
                    is still computed: generation mode), and with all three map spaces
  stop after double plain double blocks only vs maps from every double block (encode / segmentation mode)
  single extension  maps from all 12 layers vs the plain forward
  diffusers         diffusers' FluxTransformer2DModel on the same weights vs flux_mini's plain forward
Then peak memory of a generation loop with maps from every layer, in fresh processes, for 1, 4 and 16
steps: it must not grow with steps x layers.
Goals: overhead <= 2% (full forward), <= 3% (stop after double), <= 8% (single extension).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_transformer import MEDIUM, diffusers_twin, timed  # noqa: E402
from bench_transformer import inputs as grid_inputs  # noqa: E402

from concept_attention.maps import MapAccumulator, run_concept_layers  # noqa: E402
from flux_mini.flux1 import Flux  # noqa: E402
from flux_mini.tiny import randomize_  # noqa: E402

TEXT, CONCEPTS = 128, 10
CHILD_ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def inputs(tokens: int) -> dict:
    side = int(tokens**0.5)
    return grid_inputs(MEDIUM, grid=(side, side))


def variants(model: Flux, twin, x: dict, concept_txt: torch.Tensor) -> dict:
    depth, layers = model.config.depth, model.config.num_layers
    double, every = list(range(depth)), list(range(layers))

    def with_maps(chosen, need_output, spaces=("output",)):
        accumulator = MapAccumulator(spaces=spaces)
        run_concept_layers(model, **x, concept_txt=concept_txt, accumulator=accumulator, layers=chosen,
                           need_output=need_output)
        return accumulator.mean()

    def plain_double():
        for layer in model.layers(**x):
            if layer.index == depth - 1:
                return layer.img

    return {
        "plain": lambda: model(**x),
        "full+maps": lambda: with_maps(double, True),
        "full+3 spaces": lambda: with_maps(double, True, ("output", "cross_attention", "value")),
        "plain double": plain_double,
        "double+maps": lambda: with_maps(double, False),
        "all layers+maps": lambda: with_maps(every, False),
        "diffusers": lambda: twin(
            hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"],
            timestep=x["timesteps"], img_ids=x["img_ids"][0], txt_ids=x["txt_ids"][0], return_dict=False,
        )[0],
    }


@torch.no_grad()
def speed(tokens: int, reps: int, twin, model: Flux) -> None:
    x = inputs(tokens)
    concept_txt = torch.randn(1, CONCEPTS, MEDIUM.context_in_dim, generator=torch.Generator().manual_seed(1))
    runs = variants(model, twin, x, concept_txt)
    for fn in runs.values():  # warm-up
        fn()
    times = {name: [] for name in runs}  # CPU seconds of this process: robust when others share the cores
    for _ in range(reps):
        for name, fn in runs.items():
            times[name].append(timed(fn)[1])
    med = {name: statistics.median(t) for name, t in times.items()}

    def row(label, name, base, goal):
        ratios = [a / b for a, b in zip(times[name], times[base])]
        print(f"  {label:<36} {med[name]:8.3f} s vs {med[base]:8.3f} s CPU  overhead {med[name] / med[base] - 1:+7.2%}"
              f"  (per-rep median {statistics.median(ratios) - 1:+7.2%}; goal {goal})")

    print(f"\n{tokens} image tokens + {TEXT} text tokens, {CONCEPTS} concepts, {torch.get_num_threads()} thread(s)")
    row("full forward, maps from double blocks", "full+maps", "plain", "<= +2%")
    row("full forward, all three spaces", "full+3 spaces", "plain", "")
    row("stop after double blocks, maps", "double+maps", "plain double", "<= +3%")
    row("single-block extension, 12 layers", "all layers+maps", "plain", "<= +8%")
    row("diffusers vs flux_mini plain forward", "diffusers", "plain", "flux_mini <= 0.95x diffusers")


MEMORY = r"""
import sys, torch
from concept_attention.maps import MapAccumulator, run_concept_layers
from flux_mini.flux1 import Flux, FluxConfig
from flux_mini.sampling import euler_step, get_schedule, timestep_vector
sys.path.insert(0, sys.argv[2])
from bench_concept_attention import MEDIUM, inputs
def status(field):
    return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1]) * 1024
torch.set_num_threads(2)
steps = int(sys.argv[1])
model = Flux(MEDIUM).eval()
x = inputs(1024)
concept_txt = torch.randn(1, 10, MEDIUM.context_in_dim)
accumulator = MapAccumulator(spaces=("output", "cross_attention", "value"))
layers = list(range(MEDIUM.num_layers))
with torch.no_grad():
    model(**x)  # allocator warm-up: the baseline includes one plain forward
    base = status("VmHWM:")
    img = x.pop("img")
    schedule = get_schedule(steps, img.shape[1], shift=False)
    for t_curr, t_prev in zip(schedule[:-1], schedule[1:]):
        t = timestep_vector(t_curr, img)
        pred = run_concept_layers(model, img, **(x | {"timesteps": t}), concept_txt=concept_txt,
                                  accumulator=accumulator, layers=layers, need_output=True)
        img = euler_step(img, pred, t_curr, t_prev)
print(status("VmHWM:") - base, accumulator.count)
"""


def memory() -> None:
    print("\npeak memory of a generation loop with maps from all 12 layers in 3 spaces (1024 tokens, 10 concepts),")
    print("above one plain forward's peak, in fresh processes:")
    here = str(Path(__file__).resolve().parent)
    for steps in (1, 4, 16):
        out = subprocess.run([sys.executable, "-c", MEMORY, str(steps), here], capture_output=True, text=True,
                             env=CHILD_ENV, check=True)
        grown, count = (int(v) for v in out.stdout.split())
        print(f"  {steps:>2} steps ({count:>3} layer maps averaged): +{grown / 2**20:7.1f} MiB")
    per_layer = (CONCEPTS + 4096) * 3072 * 4  # concept + image output vectors of one layer, float32
    print(f"  (storing raw vectors instead, as the authors' code does, would hold steps x layers x {per_layer / 2**20:.0f} MiB "
          f"at real size and 4096 tokens: {4 * 19 * per_layer / 2**30:.1f} GiB for 4 steps x 19 layers)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = randomize_(Flux(MEDIUM), std=0.02).eval()
    twin = diffusers_twin(model)
    for tokens in args.tokens:
        speed(tokens, args.reps, twin, model)
    if not args.skip_memory:
        memory()


if __name__ == "__main__":
    main()
