"""The built-in corpus `stdlib-docs`: English technical prose that ships with every Python.

Three deterministic parts (DESIGN.md section 5):
- docstrings: module/class/function docstrings of the standard library, read with `ast`
  (no module is imported, so nothing runs and the order is fixed);
- reference: the language reference topics in `pydoc_data.topics`;
- qa: question/answer pairs from documented public functions (signature + first sentence).
"""

from __future__ import annotations

import ast
import os
import re
import sysconfig
from functools import lru_cache
from pathlib import Path
from typing import Iterator

PARTS = ("docstrings", "reference", "qa")
_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "__pycache__", "lib2to3", "ensurepip", "turtledemo"}
_FIRST_SENTENCE = re.compile(r"^(.+?[.!?])(\s|$)", re.S)
_MIN_DOC_CHARS = 40


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_modules() -> Iterator[tuple[str, ast.Module]]:
    """(dotted module name, parsed tree) for each stdlib source file, in sorted path order."""
    root = stdlib_root()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for filename in sorted(f for f in filenames if f.endswith(".py")):
            path = Path(dirpath, filename)
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue  # a few files are templates or use another encoding
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            yield name, tree


def docstrings() -> Iterator[str]:
    """Each docstring of at least 40 characters, headed by the dotted name it documents."""
    for module, tree in _stdlib_modules():
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node)
            if doc and len(doc) >= _MIN_DOC_CHARS:
                name = module if isinstance(node, ast.Module) else f"{module}.{node.name}"
                yield f"{name}\n\n{doc}"


def reference() -> Iterator[str]:
    """The language reference topics, sorted by topic name."""
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield topics[key].strip()


def qa_pairs() -> Iterator[tuple[str, str]]:
    """(question, answer) from each public module-level function with a docstring."""
    yield from _qa_pairs()


@lru_cache(maxsize=1)
def _qa_pairs() -> tuple[tuple[str, str], ...]:
    """Parsed once per process (about a second: every stdlib module's syntax tree); a recipe's
    sft, rm, dpo and rl stages all read it."""
    return tuple(_each_qa_pair())


def _each_qa_pair() -> Iterator[tuple[str, str]]:
    for module, tree in _stdlib_modules():
        if any(part.startswith("_") for part in module.split(".")):
            continue
        for node in tree.body:
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            match = _FIRST_SENTENCE.match(doc.strip()) if doc else None
            if match:
                answer = " ".join(match.group(1).split())
                yield f"What does `{module}.{node.name}({ast.unparse(node.args)})` do?", answer


def qa() -> Iterator[str]:
    for question, answer in qa_pairs():
        yield f"Question: {question}\nAnswer: {answer}"


def documents(part: str | None) -> Iterator[str]:
    """Documents of one part, or of docstrings then reference when `part` is None."""
    if part is None:
        yield from docstrings()
        yield from reference()
    else:
        yield from {"docstrings": docstrings, "reference": reference, "qa": qa}[part]()
