"""The compiled modules are what runs, and their stubs name what they export."""
import ast
import importlib
from pathlib import Path

import pytest

import fastsip

COMPILED = ["fastsip.core._core", "fastsip.server._io_c"]


@pytest.mark.parametrize("name", COMPILED)
def test_compiled_module_loaded(name):
    mod = importlib.import_module(name)
    assert mod.__file__.endswith((".so", ".pyd")), f"{name} is not the compiled extension"


@pytest.mark.parametrize("name", COMPILED)
def test_stub_matches_module(name):
    mod = importlib.import_module(name)
    stub = Path(mod.__file__).parent / (name.split(".")[-1] + ".pyi")
    tree = ast.parse(stub.read_text())
    stub_names = {n.name for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef))
                  and not n.name.startswith("_")}     # (a private base class, say)
    public = {n for n in dir(mod) if not n.startswith("_") and callable(getattr(mod, n))
              and getattr(getattr(mod, n), "__module__", name) == name}
    assert stub_names == public


def test_public_names_exported():
    for name in fastsip.__all__:
        assert hasattr(fastsip, name), name
