"""The direction of dependencies (docs/architecture.md, top): a module imports only from its own
layer or the layers below, and the top-level parts of one layer import each other without cycles.
Read from the source's import statements (lazy imports inside functions count too)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "hybridlm"

LAYERS = [
    {"errors", "fileio", "config", "settings", "device", "lineage", "tensors", "timing", "report_format", "sqlitedb"},
    {"model"},
    {"tokenizer", "data", "run"},
    {"train", "inference"},
    {"eval", "bench", "analysis"},
    {"serve", "interop", "quickstart", "registry", "quantize"},
    {"cli", "__main__"},
]
LAYER_OF = {part: i for i, layer in enumerate(LAYERS) for part in layer}


def _part(path: Path) -> str:
    """The top-level part of the package a file belongs to: `train` for train/trainer.py."""
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def _imported_parts(path: Path) -> set[str]:
    parts = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            pieces = name.split(".")
            if pieces[0] == "hybridlm" and len(pieces) > 1 and pieces[1] in LAYER_OF:
                parts.add(pieces[1])
    return parts


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        if path.name == "__init__.py" and path.parent == PACKAGE:
            continue
        part = _part(path)
        graph.setdefault(part, set()).update(_imported_parts(path) - {part})
    return graph


def test_every_part_of_the_package_has_a_layer():
    assert set(_graph()) <= set(LAYER_OF), sorted(set(_graph()) - set(LAYER_OF))


def test_no_part_imports_a_higher_layer():
    upward = sorted(f"{part} (layer {LAYER_OF[part]}) imports {other} (layer {LAYER_OF[other]})"
                    for part, imported in _graph().items() for other in imported if LAYER_OF[other] > LAYER_OF[part])
    assert not upward, "\n".join(upward)


def test_parts_of_one_layer_form_no_cycle():
    graph = _graph()

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in graph.get(start, ()):
            if nxt == goal or (nxt not in seen and LAYER_OF[nxt] == LAYER_OF[goal] and reaches(nxt, goal, seen | {nxt})):
                return True
        return False

    cycles = sorted(part for part in graph if reaches(part, part, {part}))
    assert not cycles, cycles


def test_serving_and_inference_never_load_training():
    """`hybridlm serve` imports nothing of train/: the server does not carry the trainer."""
    graph = _graph()

    def closure(part: str) -> set[str]:
        found, todo = set(), [part]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in found:
                    found.add(nxt)
                    todo.append(nxt)
        return found

    assert "train" not in closure("serve") and "train" not in closure("inference")
