"""The check a user with a GPU runs: every implemented model at full size with random weights (no downloads).

    python benchmarks/gpu_check.py                      # full size on cuda, writes gpu_check.json
    python benchmarks/gpu_check.py --tiny --device cpu  # the same code at a tiny size (the tests run this)

For each model, side by side in one run, one table:
  speed     flux_mini vs diffusers forward (bf16)
  concepts  forward + maps of the default map layers (Flux.1: double blocks; FLUX.2: all; FLUX.3: joint) in
            one pass, as a generation step runs, vs the plain forward; maps stopping after the last map layer
            vs the plain blocks up to it (encode / segmentation mode)
  compile   torch.compile vs eager forward (first call and steady state), and the compiled pass with maps vs
            the compiled forward (what the pipelines' compile=True runs)
  modes     bf16 resident, fp8 storage, block offload (bf16 and fp8): peak device memory, weights held on
            the device, forward time, output error against fp32, and how often the argmax of the concept
            maps differs from bf16's
Random weights are scaled like a trained model's (std 1/sqrt(fan_in)) so activations stay O(1).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from concept_attention.maps import compute_concept_maps, concept_pass_maps
from flux_mini.convert import (
    bfl_to_diffusers,
    diffusers_config,
    flux2_bfl_to_diffusers,
    flux2_diffusers_config,
    flux3_bfl_to_diffusers,
    flux3_diffusers_config,
)
from flux_mini.flux1 import PRESETS, Flux, FluxConfig
from flux_mini.flux2 import PRESETS as FLUX2_PRESETS
from flux_mini.flux2 import Flux2, Flux2Config
from flux_mini.flux3 import PRESETS as FLUX3_PRESETS
from flux_mini.flux3 import Flux3, Flux3Config
from flux_mini.lowmem import offload_blocks, store_float8


@dataclass
class Case:
    """One model at one size: its config, image grid (tokens per side), text tokens and concepts."""

    name: str
    config: FluxConfig | Flux2Config | Flux3Config
    grid: int
    text: int
    concepts: int = 10

    @property
    def model_class(self) -> type[nn.Module]:
        return {FluxConfig: Flux, Flux2Config: Flux2, Flux3Config: Flux3}[type(self.config)]


def cases(tiny: bool) -> list[Case]:
    """At full size 1024x1024 (4096 image tokens) with each model's usual text length."""
    if tiny:
        flux1 = FluxConfig(
            in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=48, hidden_size=64, num_heads=4,
            depth=3, depth_single_blocks=3, axes_dim=(4, 6, 6),
        )
        flux2 = Flux2Config(
            in_channels=16, context_in_dim=48, hidden_size=64, num_heads=4, depth=3, depth_single_blocks=3,
            axes_dim=(4, 4, 4, 4), use_guidance_embed=False,
        )
        flux3 = Flux3Config(
            in_channels=16, cond_in_channels=16, out_channels=16, context_in_dim=48, hidden_size=64, num_heads=4,
            depth=2, depth_single_blocks=3, axes_dim=(4, 4, 4, 4),
        )
        return [
            Case("flux1-tiny", flux1, grid=8, text=8, concepts=3),
            Case("flux2-tiny", flux2, grid=8, text=8, concepts=3),
            Case("flux3-tiny", flux3, grid=8, text=8, concepts=3),
        ]
    return [
        Case("flux1-schnell", PRESETS["flux-schnell"], grid=64, text=256),
        Case("flux2-klein-4b", FLUX2_PRESETS["flux2-klein-4b"], grid=64, text=512),
        Case("flux2-klein-9b", FLUX2_PRESETS["flux2-klein-9b"], grid=64, text=512),
        Case("flux3-klein", FLUX3_PRESETS["flux3-klein"], grid=64, text=480),  # text padded to a multiple of 80
    ]


@torch.no_grad()
def init_random_(model: nn.Module, seed: int) -> nn.Module:
    """Weights N(0, 1/fan_in), biases N(0, 0.02^2), norm gains 1 + N(0, 0.1^2); drawn on the model's device."""
    generator = torch.Generator(next(model.parameters()).device).manual_seed(seed)
    for name, param in model.named_parameters():
        if param.ndim == 2:
            param.normal_(0.0, param.shape[1] ** -0.5, generator=generator)
        elif name.endswith(".scale"):
            param.normal_(1.0, 0.1, generator=generator)
        else:
            param.normal_(0.0, 0.02, generator=generator)
    return model


def inputs(case: Case, device: torch.device, dtype: torch.dtype, seed: int = 0) -> dict:
    """Flux.1: 3-axis ids, text at 0, a pooled y. FLUX.2 and FLUX.3: 4-axis ids, text positions on the last
    axis (FLUX.3: image positions scaled by its image_rope_scale, and a target time for the flow map)."""
    c, n = case.config, case.grid
    generator = torch.Generator().manual_seed(seed)
    flux1 = isinstance(c, FluxConfig)
    ids = torch.zeros(n, n, len(c.axes_dim))
    ids[..., 1], ids[..., 2] = torch.arange(n)[:, None], torch.arange(n)[None, :]
    ids = ids * getattr(c, "image_rope_scale", 1.0)
    txt_ids = torch.zeros(1, case.text, len(c.axes_dim))
    if not flux1:
        txt_ids[..., 3] = torch.arange(case.text)
    x = dict(
        img=torch.randn(1, n * n, c.in_channels, generator=generator),
        img_ids=ids.reshape(1, n * n, -1),
        txt=torch.randn(1, case.text, c.context_in_dim, generator=generator),
        txt_ids=txt_ids,
        timesteps=torch.tensor([0.5]),
    )
    if isinstance(c, Flux2Config) and c.use_guidance_embed:
        x["guidance"] = torch.tensor([4.0])
    if isinstance(c, Flux3Config) and c.flow_map:
        x["target_timesteps"] = torch.tensor([0.25])
    if flux1:
        x["y"] = torch.randn(1, c.vec_in_dim, generator=generator)
    x = {k: v.to(device, dtype if k not in ("img_ids", "txt_ids") else torch.float32) for k, v in x.items()}
    concept_txt = torch.randn(1, case.concepts, c.context_in_dim, generator=generator).to(device, dtype)
    return x | {"concept_txt": concept_txt}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fns: dict[str, Callable], device: torch.device, reps: int) -> dict[str, float]:
    """Median wall time of each function, repetitions interleaved so that drift hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():  # warm-up
        fn()
    for _ in range(reps):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def relative_error(a: torch.Tensor, reference: torch.Tensor) -> float:
    return ((a.double() - reference.double()).norm() / reference.double().norm()).item()


def device_bytes(model: nn.Module, device: torch.device) -> int:
    """Bytes of weights held on `device`: offloaded block lists count their two slots, not their blocks."""
    total = 0
    for child in model.children():
        for module in getattr(child, "slots", [child]):
            tensors = (*module.parameters(), *module.buffers())
            total += sum(t.numel() * t.element_size() for t in tensors if t.device.type == device.type)
    return total


@dataclass
class Measured:
    case: str
    rows: dict[str, dict] = field(default_factory=dict)


def check_case(case: Case, device: torch.device, reps: int, compile_model: bool) -> Measured:
    result = Measured(case.name)
    bf16 = torch.bfloat16
    x = inputs(case, device, bf16)
    plain = {k: v for k, v in x.items() if k != "concept_txt"}
    map_layers = list(case.config.concept_layers)  # the default: Flux.1 double blocks, FLUX.2 all, FLUX.3 joint
    last = map_layers[-1]

    def maps(model: nn.Module) -> torch.Tensor:
        return compute_concept_maps(model, **plain, concept_txt=x["concept_txt"], layers=map_layers)

    def generation_step(model: nn.Module, maps_pass: Callable = concept_pass_maps):
        """One pass giving the velocity and the maps, as a generation step with maps runs."""
        inputs = {"y": None} | plain
        return maps_pass(model, **inputs, concept_txt=x["concept_txt"], layers=map_layers, need_output=True)

    # fp32 reference, then the bf16 master copy kept on the CPU
    with torch.device(device):
        model32 = init_random_(case.model_class(case.config), seed=0).eval()
    with torch.no_grad():
        x32 = {k: v.float() for k, v in plain.items()}
        reference = model32(**x32).float()
    master = {k: v.to("cpu", bf16) for k, v in model32.state_dict().items()}
    del model32
    empty_cache(device)

    def build(mode: str) -> nn.Module:
        """The model of one mode from the CPU master copy; fp8 is quantised where the blocks will live."""
        with torch.device("meta"):
            model = case.model_class(case.config)
        model.load_state_dict(master, assign=True)
        if mode.startswith("offload"):
            return offload_blocks(store_float8(model) if "fp8" in mode else model, device)
        model = model.to(device)
        return store_float8(model) if "fp8" in mode else model

    modes = {}
    for mode in ("bf16", "fp8", "offload bf16", "offload fp8"):
        model = build(mode).eval()
        reset_peak(device)
        with torch.no_grad():
            out = model(**plain).float()
            concept_maps = maps(model)
            seconds = median_seconds({"forward": lambda: model(**plain)}, device, reps)["forward"]
        modes[mode] = dict(
            peak_bytes=peak(device),
            device_weight_bytes=device_bytes(model, device),
            forward_ms=seconds * 1e3,
            error_vs_fp32=relative_error(out, reference),
            out=out,
            argmax=concept_maps.argmax(dim=1),
        )
        if mode == "bf16":
            resident = model
        else:
            del model
            empty_cache(device)
    outs = {mode: row.pop("out") for mode, row in modes.items()}
    argmaxes = {mode: row.pop("argmax") for mode, row in modes.items()}
    for mode, row in modes.items():
        row["argmax_changed_vs_bf16"] = (argmaxes[mode] != argmaxes["bf16"]).float().mean().item()
        row["equal_to_resident"] = torch.equal(outs[mode], outs["fp8" if "fp8" in mode else "bf16"])
    result.rows["modes"] = modes

    with torch.no_grad():
        speed = {"flux_mini": lambda: resident(**plain)}
        twin = diffusers_twin(resident, device)
        if twin is not None:
            dx = dict(
                hidden_states=plain["img"], encoder_hidden_states=plain["txt"], timestep=plain["timesteps"],
                img_ids=plain["img_ids"][0], txt_ids=plain["txt_ids"][0], return_dict=False,
            )
            renamed = {"y": "pooled_projections", "guidance": "guidance", "target_timesteps": "target_timestep"}
            dx |= {theirs: plain[ours] for ours, theirs in renamed.items() if ours in plain}
            speed["diffusers"] = lambda: twin(**dx)[0]
        timings = {f"{k} forward ms": v * 1e3 for k, v in median_seconds(speed, device, reps).items()}
        speed.clear()  # releases the twin
        empty_cache(device)

        def plain_until_last_map_layer():
            for layer in resident.layers(**plain):
                if layer.index == last:
                    return layer.img

        concept_times = median_seconds(  # seconds
            {
                "forward": lambda: resident(**plain),
                "forward + maps (generation)": lambda: generation_step(resident),
                "blocks up to the last map layer": plain_until_last_map_layer,
                "maps, stopping there": lambda: maps(resident),
            },
            device,
            reps,
        )
    ratio = timings["flux_mini forward ms"] / timings.get("diffusers forward ms", float("nan"))
    result.rows["speed"] = timings | {"flux_mini / diffusers": ratio}
    result.rows["concepts"] = {f"{k} ms": v * 1e3 for k, v in concept_times.items()} | {
        "forward + maps / forward": concept_times["forward + maps (generation)"] / concept_times["forward"],
        "stop-after maps / the same blocks": concept_times["maps, stopping there"]
        / concept_times["blocks up to the last map layer"],
    }
    if compile_model:  # what the pipelines' compile=True does: the forward and the pass with maps, compiled
        compiled, compiled_maps = torch.compile(resident), torch.compile(concept_pass_maps)
        with torch.no_grad():
            start = time.perf_counter()
            compiled(**plain)
            synchronize(device)
            first = time.perf_counter() - start
            generation_step(resident, compiled_maps)
            steady = median_seconds(
                {
                    "eager": lambda: resident(**plain),
                    "compiled": lambda: compiled(**plain),
                    "compiled + maps": lambda: generation_step(resident, compiled_maps),
                },
                device,
                reps,
            )
        result.rows["compile"] = {
            "first call ms": first * 1e3,
            "compiled / eager": steady["compiled"] / steady["eager"],
            "compiled forward + maps / compiled forward": steady["compiled + maps"] / steady["compiled"],
        }
    return result


def diffusers_twin(model: nn.Module, device: torch.device):
    """diffusers' transformer of the same generation on the same weights, or None where diffusers is missing."""
    try:
        from diffusers import Flux2Transformer2DModel, Flux3Transformer2DModel, FluxTransformer2DModel
    except ImportError:
        return None
    cls, config, state = {
        Flux: (FluxTransformer2DModel, diffusers_config, bfl_to_diffusers),
        Flux2: (Flux2Transformer2DModel, flux2_diffusers_config, flux2_bfl_to_diffusers),
        Flux3: (Flux3Transformer2DModel, flux3_diffusers_config, flux3_bfl_to_diffusers),
    }[type(model)]
    config = config(model.config)
    with torch.device("meta"):
        twin = cls(**config)
    twin.load_state_dict(state(model.state_dict()), strict=True, assign=True)
    return twin.to(device).eval()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def table(results: list[Measured]) -> str:
    lines = []
    for r in results:
        lines.append(f"## {r.case}")
        lines.append("| mode | peak device memory | weights on device | forward | error vs fp32 | map argmax changed |")
        lines.append("|---|---|---|---|---|---|")
        for mode, row in r.rows["modes"].items():
            peak_text = "n/a (CPU)" if row["peak_bytes"] is None else f"{row['peak_bytes'] / 2**30:.2f} GiB"
            lines.append(
                f"| {mode} | {peak_text} | {row['device_weight_bytes'] / 2**30:.3f} GiB | {row['forward_ms']:.1f} ms "
                f"| {row['error_vs_fp32']:.5f} | {row['argmax_changed_vs_bf16']:.2%} |"
            )
        lines.append("")
        lines.append("| measure | value |")
        lines.append("|---|---|")
        for section in ("speed", "concepts", "compile"):
            for name, value in r.rows.get(section, {}).items():
                lines.append(f"| {section}: {name} | {value:.1f} |" if name.endswith(" ms") else f"| {section}: {name} | {value:.3f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[Measured]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny configs (a CPU check of the script itself)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows (minutes at full size)")
    parser.add_argument("--json", type=Path, default=Path("gpu_check.json"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    results = [check_case(case, device, args.reps, not args.no_compile) for case in cases(args.tiny)]
    print(table(results))
    args.json.write_text(json.dumps([{"case": r.case, **r.rows} for r in results], indent=2))
    print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
