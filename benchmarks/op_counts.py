"""How many ATen ops (on a GPU: kernel launches) the concept path adds to each block, plain vs with concepts.

    PYTHONPATH=. python benchmarks/op_counts.py

On a GPU a handful of concept tokens per block costs launch latency, not arithmetic, so the number of
operations is the cost that matters. A counting dispatch mode records every ATen op that runs between two
yields of `model.layers` (one block), on tiny random models of each generation (the count does not depend
on the size), with and without the concept stream ("both" attention, the default output-space maps).
"kernels" leaves out views (free on every device); "all" counts them too. The mode block layer of FLUX.3
holds a text, an image and a reference mode block. "maps/layer" is what `MapAccumulator.add` then does
with one layer's results (scores, softmax over concepts, running sum).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from concept_attention.maps import MapAccumulator
from flux_mini.flux1 import Flux
from flux_mini.flux2 import Flux2
from flux_mini.flux3 import Flux3
from flux_mini.tiny import randomize_, tiny_flux2_config, tiny_flux3_config, tiny_flux_config

FREE = {torch.ops.aten._unsafe_view.default}  # not marked as a view, yet only reinterprets metadata


def launches_kernel(op: torch._ops.OpOverload) -> bool:
    """Ops that compute something: not views, and returning tensors (`promote_types` returns a dtype)."""
    returns_tensor = any("Tensor" in str(ret.type) for ret in op._schema.returns)
    return returns_tensor and not op.is_view and op not in FREE


class OpCounter(TorchDispatchMode):
    """Counts the ATen ops dispatched inside it (a context manager around code; nothing is attached to a model)."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func] += 1
        return func(*args, **(kwargs or {}))

    def snapshot(self) -> Counter:
        return Counter(self.ops)


@dataclass
class Counts:
    kernels: int
    all: int

    @classmethod
    def of(cls, ops: Counter) -> Counts:
        return cls(sum(n for op, n in ops.items() if launches_kernel(op)), sum(ops.values()))


def per_layer(layers, counter: OpCounter, accumulator: MapAccumulator | None = None) -> tuple[dict, dict]:
    """Run a `layers` generator inside `counter`: ops of each layer (between yields), and of its map step."""
    blocks, maps = {}, {}
    with counter:
        before = counter.snapshot()
        for layer in layers:
            after = counter.snapshot()
            blocks[layer.index] = after - before
            if accumulator is not None and layer.concepts is not None:
                accumulator.add(layer)
                maps[layer.index] = counter.snapshot() - after
            before = counter.snapshot()
    return blocks, maps


def tiny_case(
    generation: str, concepts: int = 3, seed: int = 0
) -> tuple[torch.nn.Module, dict, torch.Tensor, dict[str, int]]:
    """A tiny random model, its inputs (B 1, 12 image tokens, 5 text tokens), r concepts, and the layer to read
    for each block kind (never the first of its kind, whose step also holds the setup before it)."""
    g = torch.Generator().manual_seed(seed)
    config = {"flux1": tiny_flux_config, "flux2": tiny_flux2_config, "flux3": tiny_flux3_config}[generation]()
    model = randomize_({"flux1": Flux, "flux2": Flux2, "flux3": Flux3}[generation](config), seed).eval()
    axes = len(config.axes_dim)
    ids = torch.zeros(1, 12, axes)
    ids[0, :, 1], ids[0, :, 2] = torch.arange(12) // 4, torch.arange(12) % 4
    x = dict(img=torch.randn(1, 12, config.in_channels, generator=g), img_ids=ids,
             txt=torch.randn(1, 5, config.context_in_dim, generator=g), txt_ids=torch.zeros(1, 5, axes),
             timesteps=torch.tensor([0.6]))  # fmt: skip
    if generation == "flux1":
        x["y"] = torch.randn(1, config.vec_in_dim, generator=g)
        kinds = {"double block": 1, "single block": config.depth + 1}
    elif generation == "flux2":
        kinds = {"double block": 1, "single block": config.depth + 1}
    else:
        x["target_timesteps"] = torch.tensor([0.3])
        kinds = {"mode block layer": 1, "joint block": config.depth + 1}
    concept_txt = torch.randn(1, concepts, config.context_in_dim, generator=g)
    return model, x, concept_txt, kinds


@torch.no_grad()
def block_counts(generation: str, concepts: int = 3) -> dict[str, dict[str, Counts]]:
    """kind of block -> {"plain", "concepts", "maps/layer"} -> Counts, for one tiny model of `generation`."""
    model, x, concept_txt, kinds = tiny_case(generation, concepts)
    plain, _ = per_layer(model.layers(**x), OpCounter())
    with_concepts, maps = per_layer(model.concept_pass(**x, concept_txt=concept_txt), OpCounter(), MapAccumulator())
    return {
        kind: {
            "plain": Counts.of(plain[i]),
            "concepts": Counts.of(with_concepts[i]),
            "maps/layer": Counts.of(maps.get(i, Counter())),
        }
        for kind, i in kinds.items()
    }


def main() -> None:
    print("ATen ops per block, tiny random models, B=1, 3 concepts, float32, no_grad (kernels: ops that are not views)")
    columns = ("plain", "with concepts", "extra", "ratio", "maps/layer")
    print(f"{'generation':<11}{'block':<18}" + "".join(f"{c:>15}" for c in columns))
    print(" " * 29 + "".join(f"{c:>15}" for c in ("kernels/all",) * 3 + ("kernels",) + ("kernels/all",)))
    for generation in ("flux1", "flux2", "flux3"):
        for kind, c in block_counts(generation).items():
            p, w, m = c["plain"], c["concepts"], c["maps/layer"]
            cells = (f"{p.kernels}/{p.all}", f"{w.kernels}/{w.all}", f"{w.kernels - p.kernels}/{w.all - p.all}",
                     f"{w.kernels / p.kernels:.2f}x", f"{m.kernels}/{m.all}")
            print(f"{generation:<11}{kind:<18}" + "".join(f"{cell:>15}" for cell in cells))


if __name__ == "__main__":
    main()
