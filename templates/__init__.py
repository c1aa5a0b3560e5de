"""Triton kernels for the mHC ops and their autotune configs (installed as mhc_compile.templates).

One module per op stage: `coefficients` (RMS + projection + gates + Sinkhorn, forward and backward),
`pre_mix`, `post_res_mix`; `configs` holds the autotune configs (MHC_TRITON_CONFIG forces one) and
`tiles` the addressing they share.

`register_cuda_kernels()` makes the six mhc:: ops run these kernels on CUDA tensors (the CPU and
every other device keep the PyTorch reference). The kernel modules are imported on the first CUDA
call, not at registration: Triton decides when a kernel module is imported whether its kernels are
interpreted (TRITON_INTERPRET), so tests can still choose after importing mhc_compile. They are
opaque custom ops to Inductor (it does not fuse into them), the same as the reference ops.

How to tell the kernels are used: `kernels_active("cuda")`, a DEBUG line from the logger
"mhc_compile.templates" at registration and at the first launch of each op, and INFO lines
whenever a kernel is autotuned for a new (n, C, dtype).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from collections.abc import Callable

import torch

log = logging.getLogger("mhc_compile.templates")

# Kernels cover bf16/fp16/fp32 streams with fp32 coefficients and n up to 8 (a constexpr); other
# inputs (float64 checks, wider n) keep the reference implementation on CUDA too.
MAX_STREAMS = 8
STREAM_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# op -> (kernel module, launcher, position of the `streams` argument)
_LAUNCHERS: dict[str, tuple[str, str, int]] = {
    "mhc::coefficients": ("coefficients", "mhc_coefficients_fwd", 0),
    "mhc::coefficients_backward": ("coefficients", "mhc_coefficients_bwd", 3),
    "mhc::pre_mix": ("pre_mix", "mhc_pre_mix_fwd", 0),
    "mhc::pre_mix_backward": ("pre_mix", "mhc_pre_mix_bwd", 1),
    "mhc::post_res_mix": ("post_res_mix", "mhc_post_res_mix_fwd", 0),
    "mhc::post_res_mix_backward": ("post_res_mix", "mhc_post_res_mix_bwd", 1),
}

_registered = False


def triton_available() -> bool:
    """Whether Triton is installed (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def kernels_active(device: torch.device | str) -> bool:
    """Whether the mhc:: ops run the Triton kernels for tensors on `device`."""
    return _registered and torch.device(device).type == "cuda" and torch.cuda.is_available()


def _supported(streams: torch.Tensor, args: tuple) -> bool:
    """Non-empty streams of a kernel dtype with n <= MAX_STREAMS, and no float64 coefficients."""
    return (
        streams.numel() > 0
        and streams.shape[-2] <= MAX_STREAMS
        and all(a.dtype in STREAM_DTYPES for a in args if isinstance(a, torch.Tensor))
    )


def _cuda_kernel(
    op_name: str, module: str, launcher: str, streams_at: int, fallback: Callable
) -> Callable:
    """The CUDA implementation of `op_name`: the Triton launcher, imported on first use."""
    loaded: list[Callable] = []

    def run(*args):
        if not _supported(args[streams_at], args):
            return fallback(*args)
        if not loaded:
            loaded.append(getattr(importlib.import_module(f"{__name__}.{module}"), launcher))
            log.debug("%s: first launch of Triton kernel %s.%s", op_name, module, launcher)
        return loaded[0](*args)

    return run


def register_cuda_kernels() -> None:
    """Make the mhc:: ops use the Triton kernels on CUDA tensors; a no-op without Triton."""
    global _registered
    if _registered:
        return
    if not triton_available():
        log.debug("Triton is not installed: the mhc:: ops keep the PyTorch reference on CUDA")
        return
    from mhc_compile import ops

    for op_name, (module, launcher, streams_at) in _LAUNCHERS.items():
        # CustomOpDef._init_fn is the op's default (reference) implementation: the one private
        # PyTorch attribute we touch, and the same one torch.library itself calls for an op whose
        # device kernel is disabled. Unsupported inputs fall back to it.
        fallback = getattr(ops, op_name.split("::")[1])._init_fn
        kernel = _cuda_kernel(op_name, module, launcher, streams_at, fallback)
        torch.library.register_kernel(op_name, "cuda", kernel)
    _registered = True
    log.debug("registered Triton kernels on CUDA for %s", ", ".join(_LAUNCHERS))
