"""mhc-compile: rewrite the residual chains of unmodified models into n-stream mHC.

    cmodel = torch.compile(model, backend="mhc")          # no import needed
    mhc_compile.prepare(model, *example_args)             # create the mHC parameters eagerly
    opt = torch.optim.AdamW(model.parameters())           # now includes them
    mhc_compile.report(model, *example_args).print()      # which blocks were rewritten, and why not
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mhc_compile.backend import MHCBackend
from mhc_compile.options import MHCOptions
from mhc_compile.parameters import MHCParameters
from mhc_compile.report import BlockReport, Report, SkipReason

__all__ = [
    "MHCOptions", "MHCParameters", "Report", "BlockReport", "SkipReason",
    "backend", "prepare", "report",
]
__version__ = "0.1.0"


def backend(**options: Any) -> MHCBackend:
    """A configured backend: `torch.compile(model, backend=mhc_compile.backend(n=2))`.

    Options (see MHCOptions): n, sinkhorn_iters, alpha_init, constraint, include, exclude, eager,
    recompute.
    Its `.report` collects the blocks of every graph it compiled.
    """
    return MHCBackend(MHCOptions.from_kwargs(**options))


def prepare(model: nn.Module, *example_args: Any, **options: Any) -> Report:
    """Do the first compilation's work now, so optimizers, checkpoint loading and FSDP come after.

    Runs `model(*example_args)` once through the mhc backend (without Inductor) under no_grad,
    restoring buffers (BatchNorm statistics) and the RNG state afterwards, so the model's state
    is as before except for the new `model.mhc` parameters. Returns the report of that trace.
    """
    options = MHCOptions.from_kwargs(**options).replace(eager=True)
    return _trace(model, example_args, MHCBackend(options, top_module=model, warn_late=False))


def report(model: nn.Module, *example_args: Any, **options: Any) -> Report:
    """Which residual blocks the backend rewrites or skips, and why, without changing the model."""
    options = MHCOptions.from_kwargs(**options)
    return _trace(model, example_args, MHCBackend(options, analyze_only=True, top_module=model))


def _trace(model: nn.Module, example_args: tuple, configured: MHCBackend) -> Report:
    if not isinstance(model, nn.Module):
        raise TypeError(f"mhc_compile expects an nn.Module, got {type(model).__name__}")
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    compiled = torch.compile(model, backend=configured, dynamic=False)
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=_cuda_devices(model)):
            compiled(*example_args)
    finally:
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                if name in buffers:
                    buffer.copy_(buffers[name])
    return configured.report


def _cuda_devices(model: nn.Module) -> list[int]:
    return sorted({p.device.index or 0 for p in model.parameters() if p.is_cuda})
