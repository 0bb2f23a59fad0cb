"""torch.compile: the pass with concept maps as one graph (fullgraph=True fails on any graph break or host
synchronisation that dynamo cannot capture), and the pipelines' compile= switch.

The tests compile with a recording backend that runs each captured graph as captured (what the "eager" backend
does): dynamo's capture is what they check, and inductor's code generation would take minutes on a CPU."""

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch

from concept_attention import ConceptAttentionPipeline
from concept_attention.maps import concept_pass_maps
from flux_mini import FluxPipeline
from flux_mini.cli import build_parser
from flux_mini.flux1 import Flux
from flux_mini.flux2 import Flux2
from flux_mini.flux3 import Flux3
from flux_mini.pipeline import compile_options
from flux_mini.tiny import build_tiny_weights, randomize_, tiny_flux2_config, tiny_flux3_config

torch.set_num_threads(1)


class GraphRecorder:
    """A torch.compile backend that keeps each captured graph and runs it unchanged."""

    def __init__(self):
        self.graphs = []

    def __call__(self, graph_module, example_inputs):
        self.graphs.append(graph_module)
        return graph_module.forward


def inputs(axes: int, in_channels: int, context: int, g: torch.Generator) -> dict:
    ids = torch.zeros(1, 6, axes)
    ids[0, :, 1], ids[0, :, 2] = torch.arange(6) // 3, torch.arange(6) % 3
    text_ids = torch.zeros(1, 4, axes)
    text_ids[0, :, -1] = torch.arange(4)
    return dict(img=torch.randn(1, 6, in_channels, generator=g), img_ids=ids,
                txt=torch.randn(1, 4, context, generator=g), txt_ids=text_ids, timesteps=torch.tensor([0.7]))  # fmt: skip


@pytest.mark.parametrize("generation", ["flux2", "flux3"])
def test_pass_with_maps_compiles_as_one_graph(generation):
    """FLUX.2 and FLUX.3 (Flux.1, and the other map spaces: the pipeline test below): velocity and maps."""
    g = torch.Generator().manual_seed(0)
    if generation == "flux2":
        config = tiny_flux2_config(depth=1, depth_single_blocks=1)
        model, extra = Flux2(config), {}
    else:
        config = tiny_flux3_config(depth=1, depth_single_blocks=1)
        model, extra = Flux3(config), {"target_timesteps": torch.tensor([0.2])}
    model = randomize_(model, seed=1).eval()
    x = inputs(len(config.axes_dim), config.in_channels, config.context_in_dim, g) | extra
    args = dict(y=None, concept_txt=torch.randn(1, 3, config.context_in_dim, generator=g),
                layers=list(config.map_layers), need_output=True, **x)  # fmt: skip
    recorder = GraphRecorder()
    compiled = torch.compile(concept_pass_maps, backend=recorder, fullgraph=True)
    with torch.no_grad():
        velocity, maps, _ = compiled(model, **args)
        eager_velocity, eager_maps, _ = concept_pass_maps(model, **args)
    assert len(recorder.graphs) == 1
    torch.testing.assert_close(velocity, eager_velocity, rtol=1e-6, atol=1e-6)
    assert maps.keys() == eager_maps.keys() == set(config.map_layers)
    for layer, by_space in maps.items():
        torch.testing.assert_close(by_space["output"], eager_maps[layer]["output"], rtol=1e-6, atol=1e-6)


def test_compiled_concept_pipeline_matches_eager(tmp_path):
    """compile= compiles the transformer's forward in place (keys unchanged) and the pass with maps (every space),
    each as one graph (fullgraph=True), and changes neither the image nor the maps. Step 0 gives maps; step 1 is
    plain. The folder's components around a one-double, one-single-block transformer: compiling is the cost."""
    folder = FluxPipeline.from_folder(build_tiny_weights(tmp_path / "tiny", seed=0))
    config = replace(folder.model.config, depth=1, depth_single_blocks=1)
    model = randomize_(Flux(config), seed=1).eval()

    def pipeline(model, compile) -> ConceptAttentionPipeline:
        parts = (folder.autoencoder, folder.t5, folder.clip, folder.defaults, folder.variant)
        return ConceptAttentionPipeline(FluxPipeline(model, *parts, compile=compile))

    eager = pipeline(copy.deepcopy(model), False)
    recorder = GraphRecorder()
    compiled = pipeline(model, {"backend": recorder, "fullgraph": True})
    options = dict(width=32, height=32, num_inference_steps=2, timesteps=[0], seed=3, progress=False)
    out = compiled.generate_image("a red circle on grass", ["circle", "grass"], **options)
    expected = eager.generate_image("a red circle on grass", ["circle", "grass"], **options)
    assert len(recorder.graphs) == 2  # the pass with maps and the plain forward
    np.testing.assert_allclose(np.asarray(out.image, dtype=float), np.asarray(expected.image, dtype=float), atol=1)
    pairs = [(out.concept_maps, expected.concept_maps), (out.cross_attention_maps, expected.cross_attention_maps),
             (out.value_maps, expected.value_maps)]  # fmt: skip
    for maps, expected_maps in pairs:
        torch.testing.assert_close(maps, expected_maps, rtol=1e-5, atol=1e-6)
    assert list(compiled.flux.model.state_dict()) == list(eager.flux.model.state_dict())
    assert compiled.flux.compile_options == {"backend": recorder, "fullgraph": True}


def test_compile_switch_values():
    assert compile_options(False) is None and compile_options(True) == {}
    assert compile_options({"mode": "max-autotune"}) == {"mode": "max-autotune"}
    with pytest.raises(ValueError, match="compile must be True, False or a dict"):
        compile_options("inductor")
    args = build_parser().parse_args(["generate", "--weights", "w", "--prompt", "p", "--out", "o.png", "--compile"])
    assert args.compile is True
