"""benchmarks/gpu_check.py at a tiny size on the CPU: the script a GPU user runs must work end to end."""

import importlib.util
import json
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "gpu_check.py"


def test_gpu_check_runs_tiny_on_cpu(tmp_path, capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", gpu_check)  # dataclasses look their module up
    spec.loader.exec_module(gpu_check)
    gpu_check.main(["--tiny", "--device", "cpu", "--no-compile", "--reps", "1", "--json", str(tmp_path / "out.json")])

    cases = json.loads((tmp_path / "out.json").read_text())
    assert [case["case"] for case in cases] == ["flux1-tiny", "flux2-tiny", "flux3-tiny"]
    for case in cases:
        check(case)
    printed = capsys.readouterr().out
    assert "| offload fp8 |" in printed and "flux_mini / diffusers" in printed


def check(case: dict) -> None:
    modes = case["modes"]
    assert set(modes) == {"bf16", "fp8", "offload bf16", "offload fp8"}
    # offload changes where weights live, never the result
    assert modes["offload bf16"]["equal_to_resident"] and modes["offload fp8"]["equal_to_resident"]
    assert modes["offload bf16"]["error_vs_fp32"] == modes["bf16"]["error_vs_fp32"]
    # bf16 is close to fp32; fp8 storage costs more but stays a small error
    assert 0 < modes["bf16"]["error_vs_fp32"] < 0.03
    assert modes["bf16"]["error_vs_fp32"] < modes["fp8"]["error_vs_fp32"] < 0.1
    # fp8 halves the block weights; offload keeps two block slots per list instead of every block
    assert modes["fp8"]["device_weight_bytes"] < 0.75 * modes["bf16"]["device_weight_bytes"]
    assert modes["offload bf16"]["device_weight_bytes"] < modes["bf16"]["device_weight_bytes"]
    assert 0 <= modes["fp8"]["argmax_changed_vs_bf16"] <= 1
    assert case["speed"]["flux_mini / diffusers"] > 0
    assert case["concepts"]["forward + maps / forward"] > 1
