"""Run a model once for what the run reveals (a trace, recorded coefficients), not for its effects.

`prepare`, `report` and the gain diagnostics all call a model outside the user's training loop;
that call must not move BatchNorm statistics, consume random numbers or build an autograd graph.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn


def run_without_side_effects(model: nn.Module, call: Callable[..., Any], args: Sequence[Any]) -> Any:
    """`call(*args)` under no_grad with the RNG state forked; `model`'s buffers restored after."""
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=_cuda_devices(model)):
            return call(*args)
    finally:
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                if name in buffers:
                    buffer.copy_(buffers[name])


def _cuda_devices(model: nn.Module) -> list[int]:
    return sorted({p.device.index or 0 for p in model.parameters() if p.is_cuda})
