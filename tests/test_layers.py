"""Layering: nothing imports a layer above its own (tasks -> engine -> losses -> trainers -> pipeline -> cli)."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "src" / "posttrain"

RANK = {
    "errors": 0, "utils": 0, "config": 0, "tokenization": 0, "startup": 0, "rundir": 0,
    "tasks": 1, "engine": 2, "evaluation": 3, "losses": 3, "trainers": 4, "pipeline": 5, "cli": 6,
}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_imports_point_downward():
    bad = []
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG.parent).with_suffix("")
        mod = ".".join(rel.parts)
        own = _layer(mod)
        if own not in RANK:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("posttrain."):
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.startswith("posttrain.")]
            for name in names:
                other = _layer(name)
                if other in RANK and RANK[other] > RANK[own]:
                    bad.append(f"{mod} imports {name}")
    assert not bad, bad


def test_losses_are_pure():
    """Loss modules import torch only: no models, tokenizers, engines or I/O."""
    for path in (PKG / "losses").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert node.module.split(".")[0] in {"torch", "__future__", "posttrain", "dataclasses", "typing", "math"}, (path, node.module)
