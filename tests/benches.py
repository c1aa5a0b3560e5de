"""The bench scripts, imported by the tests without bench/ on sys.path (bench/kernels.py there
would shadow the `kernels` package transformers imports). A bench imports its neighbours by their
plain names (`import common`, `import e2e`: as a script, its folder is on sys.path), so each is
registered under its own name; bench/kernels.py is never loaded here, for the same reason."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).parent.parent / "bench"
_NEIGHBOURS = {"saved_activations": ("common", "e2e"), "e2e": ("common",), "quality": ("common",)}


def load(name: str) -> ModuleType:
    """bench/<name>.py as module `name`, with the neighbours it imports, each imported once."""
    if name == "kernels":
        raise ValueError("bench/kernels.py would shadow the `kernels` package; run it as a script")
    for neighbour in _NEIGHBOURS.get(name, ()):
        load(neighbour)
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
