"""Imports point one way (docs/architecture.md, "The layers"): megatron.core only inside megarl/backends/megatron,
vllm only in a vLLM backend, and the pure layers (losses, advantages, rollout, rewards, data, kernels, convert) never import a
backend or the CLI. Checked on the source with ast, so a lazy import inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "megarl"
PURE = ("losses", "advantages.py", "algo.py", "parallel.py", "checksums.py", "rollout", "rewards", "data", "kernels", "convert")


def imports_of(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def files(part: str) -> list[Path]:
    p = PKG / part
    return [p] if p.suffix == ".py" else sorted(p.rglob("*.py"))


@pytest.mark.parametrize("part", PURE)
def test_pure_layers_import_no_backend_framework_or_cli(part):
    for f in files(part):
        bad = {m for m in imports_of(f) if m.split(".")[0] in ("megatron", "vllm")
               or m.startswith(("megarl.backends", "megarl.cli", "megarl.demo", "megarl.smoke"))}
        assert not bad, f"{f.relative_to(PKG.parent)} imports {sorted(bad)}"


@pytest.mark.parametrize("framework", ["megatron", "vllm", "ray"])
def test_a_framework_is_imported_only_by_its_backend(framework):
    for f in sorted(PKG.rglob("*.py")):
        if f"backends/{framework}" in f.as_posix():
            continue
        bad = {m for m in imports_of(f) if m.split(".")[0] == framework}
        assert not bad, f"{f.relative_to(PKG.parent)} imports {sorted(bad)}; only megarl/backends/{framework} may"


def test_backends_never_import_the_cli_or_entry_points():
    for f in sorted((PKG / "backends").rglob("*.py")):
        bad = {m for m in imports_of(f) if m.startswith(("megarl.cli", "megarl.demo", "megarl.smoke"))}
        assert not bad, f"{f.relative_to(PKG.parent)} imports {sorted(bad)}"



LOOP = ("trainer/loop.py", "trainer/collect.py", "trainer/state.py", "trainer/checkpointing.py", "trainer/vstar.py")


@pytest.mark.parametrize("part", LOOP)
def test_the_loop_reaches_engines_only_through_protocols(part):
    """The RL loop and its phases use Policy / Reference / Generator (backends/protocols.py) and the RankLayout of
    megarl/parallel.py; only the composition root (trainer/build.py, trainer/__init__.py) names an engine."""
    for f in files(part):
        bad = {m for m in imports_of(f) if m.split(".")[0] in ("megatron", "vllm")
               or (m.startswith("megarl.backends") and m != "megarl.backends.protocols")}
        assert not bad, f"{f.relative_to(PKG.parent)} imports {sorted(bad)}"
