import importlib
import os
import sys
import weakref
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run on CPU tensors under Triton's interpreter. Triton reads
# TRITON_INTERPRET when it is first imported (importing mhc_compile imports torch._inductor, which
# imports triton), so it is set here, before any test module imports either.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The zoo of test models lives beside the tests; make `import zoo` work from any directory.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def attention_compiles_in_float64():
    """Every test traces attention in a form Inductor compiles in float64 on every supported torch
    (single_process.attention_that_compiles_in_float64; spawned workers enter it themselves)."""
    from single_process import attention_that_compiles_in_float64

    with attention_that_compiles_in_float64():
        yield


@pytest.fixture(autouse=True)
def fresh_mhc_warnings(monkeypatch):
    """Each test sees the backend's once-per-process warnings afresh."""
    backend = importlib.import_module("mhc_compile.backend")  # mhc_compile.backend is a function
    monkeypatch.setattr(backend, "_WARNED", weakref.WeakKeyDictionary())
