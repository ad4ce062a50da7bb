"""Layering: nothing imports a layer above its own (tasks -> engine -> losses -> trainers -> pipeline -> cli),
and within a layer nothing imports a room above its own (ROOMS)."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "src" / "posttrain"

RANK = {
    "errors": 0, "utils": 0, "config": 0, "tokenization": 0, "startup": 0, "rundir": 0,
    "tasks": 1, "engine": 2, "evaluation": 3, "losses": 3, "trainers": 4, "pipeline": 5, "cli": 6,
}


# Within a layer: a module imports only rooms of a lower rank (not its own rank: siblings stay apart).
ROOMS = {
    "trainers": {"metrics": 0, "checkpoints": 0, "data": 0, "logprobs": 0, "hub": 0,  # the parts
                 "run": 1,  # the run scaffolding, on the parts
                 "setup": 2,  # options and set-up, on the run's options
                 "sft": 3, "rl": 3, "pretrain": 3, "export": 3},  # the trainers (and merge/export); none imports another
    "pipeline": {"report": 0, "stages": 1},
    "cli": {"commands": 0, "main": 1},
}


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("posttrain."):
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names if a.name.startswith("posttrain.")]
    return names


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
        for name in _imports(path):
            other = _layer(name)
            if other in RANK and RANK[other] > RANK[own]:
                bad.append(f"{mod} imports {name}")
    assert not bad, bad


def test_rooms_within_a_layer_point_downward():
    bad, seen = [], set()
    for layer, rooms in ROOMS.items():
        files = {p.stem for p in (PKG / layer).glob("*.py")} - {"__init__"}
        assert files == set(rooms), f"{layer}/ holds {sorted(files)}; ROOMS names {sorted(rooms)}: update the map"
        for room, rank in rooms.items():
            for name in _imports(PKG / layer / f"{room}.py"):
                parts = name.split(".")
                if len(parts) > 2 and parts[1] == layer:
                    seen.add(layer)
                    if rooms[parts[2]] >= rank:
                        bad.append(f"{layer}.{room} imports {name}")
    assert not bad, bad
    assert seen == set(ROOMS)  # each map is exercised: its rooms do import one another


def test_losses_are_pure():
    """Loss modules import torch only: no models, tokenizers, engines or I/O."""
    for path in (PKG / "losses").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert node.module.split(".")[0] in {"torch", "__future__", "posttrain", "dataclasses", "typing", "math"}, (path, node.module)
