"""How many ATen ops the concept path adds per block (on a GPU: kernel launches, its real cost for a few tokens).

Counted by benchmarks/op_counts.py's dispatch mode on tiny models. The bounds are today's counts with a little
room; a per-concept loop, a second attention over the image, or a norm per head would exceed them."""

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "op_counts.py"
# extra kernels per block with concepts (today: Flux.1 26 / 21, FLUX.2 25 / 21, FLUX.3 24 / 25; before the
# fusions of issue 15: 39 / 34, 40 / 35, 34 / 37)
BOUNDS = {
    "flux1": {"double block": 28, "single block": 23},
    "flux2": {"double block": 27, "single block": 23},
    "flux3": {"mode block layer": 26, "joint block": 27},
}


@pytest.fixture(scope="module")
def op_counts():
    spec = importlib.util.spec_from_file_location("op_counts", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["op_counts"] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules["op_counts"]


@pytest.mark.parametrize("generation", ["flux1", "flux2", "flux3"])
def test_concept_path_adds_few_ops_whatever_the_number_of_concepts(op_counts, generation):
    """Two and five concepts (one concept would make some reshapes free views) run the same ops."""
    two, five = op_counts.block_counts(generation, concepts=2), op_counts.block_counts(generation, concepts=5)
    for kind, bound in BOUNDS[generation].items():
        extra = {r: c[kind]["concepts"].all - c[kind]["plain"].all for r, c in ((2, two), (5, five))}
        assert extra[2] == extra[5], f"{generation} {kind}: the concept path's op count grows with the concepts"
        kernels = five[kind]["concepts"].kernels - five[kind]["plain"].kernels
        assert 0 < kernels <= bound, f"{generation} {kind}: {kernels} extra kernels per block (bound {bound})"
        # the maps of one layer: a product, a softmax, a running sum per space, whatever the number of concepts
        assert two[kind]["maps/layer"].all == five[kind]["maps/layer"].all
