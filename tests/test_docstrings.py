"""Every public name in supermask/ and kernels/ has a docstring (issue #23), read with ast (no import).

Public: a module-level function or class whose name has no leading underscore (also under a
module-level if/try/with), and every method of a public class, autograd Functions' forward/backward
and properties included, except dunder methods (their meaning is Python's). Each module has a
docstring too.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FILES = sorted([*(ROOT / "supermask").glob("*.py"), *(ROOT / "kernels").glob("*.py")])
DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def _module_level(body: list[ast.stmt]):
    """The definitions of a module body, also those nested in module-level if/try/with blocks."""
    for node in body:
        if isinstance(node, DEFS):
            yield node
        for field in ("body", "orelse", "finalbody"):
            if isinstance(node, ast.If | ast.Try | ast.With) and getattr(node, field, None):
                yield from _module_level(getattr(node, field))
        for handler in getattr(node, "handlers", []) if isinstance(node, ast.Try) else []:
            yield from _module_level(handler.body)


def undocumented(source: str) -> list[str]:
    """Public names of one module's source without a docstring: "name" or "Class.method"."""
    missing = []
    for node in _module_level(ast.parse(source).body):
        if node.name.startswith("_"):
            continue
        if ast.get_docstring(node) is None:
            missing.append(node.name)
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if (isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef) and not item.name.startswith("_")
                        and ast.get_docstring(item) is None):
                    missing.append(f"{node.name}.{item.name}")
    return missing


def test_the_files_are_found():
    names = {f"{p.parent.name}/{p.name}" for p in FILES}
    assert {"supermask/layers.py", "supermask/mask.py", "kernels/masked_linear.py", "kernels/_common.py"} <= names


@pytest.mark.parametrize("path", FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_public_name_has_a_docstring(path):
    missing = undocumented(path.read_text())
    assert not missing, f"{path.parent.name}/{path.name}: public names without a docstring: {', '.join(missing)}"


@pytest.mark.parametrize("path", FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_module_has_a_docstring(path):
    assert ast.get_docstring(ast.parse(path.read_text())), f"{path.parent.name}/{path.name} has no module docstring"


# The scanner itself, on sources whose answer is written out by hand.
SCANNED = '''
import torch

def public(): pass
def _private(): pass
def documented():
    """Yes."""
class Op(torch.autograd.Function):
    """Documented class, undocumented methods."""
    @staticmethod
    def forward(ctx, x): return x
    @staticmethod
    def backward(ctx, g):
        """Yes."""
        return g
    def __init__(self): pass
    def _helper(self): pass
    @property
    def value(self): return 1
class Bare:
    x: int
class _Hidden:
    def forward(self): pass
if True:
    def conditional(): pass
try:
    def in_try(): pass
except ImportError:
    def in_handler(): pass
def outer():
    """Yes."""
    def inner(): pass
'''


def test_scanner_finds_exactly_the_undocumented_public_names():
    assert undocumented(SCANNED) == ["public", "Op.forward", "Op.value", "Bare", "conditional", "in_try",
                                     "in_handler"]
