"""The declared licence and the lowest supported versions: constraints-min.txt must pin every dependency at a
version its lower bound admits, so that installing with it tests the bounds pyproject.toml claims."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENT = re.compile(r'^\s*"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?\s*(>=|==)\s*([0-9][0-9.]*)[^"]*",', re.MULTILINE)


def version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def declared() -> dict[str, tuple[str, str]]:
    return {name.lower(): (op, ver) for name, op, ver in REQUIREMENT.findall((ROOT / "pyproject.toml").read_text())}


def pinned() -> dict[str, str]:
    lines = [line.split("#")[0].strip() for line in (ROOT / "constraints-min.txt").read_text().splitlines()]
    return {name.lower(): ver for name, ver in (line.split("==") for line in lines if line)}


def test_licence_is_apache_and_declared():
    text = (ROOT / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License") and "Version 2.0, January 2004" in text
    assert "Copyright 2026 the flux-mini authors" in text
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^license = "Apache-2.0"$', pyproject, re.MULTILINE)
    assert re.search(r'^license-files = \["LICENSE"\]$', pyproject, re.MULTILINE)


def test_constraints_pin_every_dependency_within_its_bound():
    requirements, pins = declared(), pinned()
    assert {"transformers", "safetensors", "numpy", "einops", "diffusers"} <= set(requirements)
    unpinned = sorted(set(requirements) - set(pins) - {"torch"})  # torch: the README's CPU build
    assert not unpinned, f"constraints-min.txt lacks {unpinned}"
    for name, (op, bound) in requirements.items():
        if name in pins:
            ok = pins[name] == bound if op == "==" else version(pins[name]) >= version(bound)
            assert ok, f"{name}: constraints-min.txt pins {pins[name]}, pyproject.toml says {op}{bound}"

