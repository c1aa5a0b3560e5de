"""Triton kernels for the mHC ops and their autotune configs (installed as mhc_compile.templates).

One module per kernel stage: `coefficients` (RMS, projection, gates, Sinkhorn, forward and
backward), `pre_mix` and `post_res_mix`; `coefficients_pre_mix` composes the first two into the
op mhc::coefficients_pre_mix; `configs` holds the autotune configs (MHC_TRITON_CONFIG forces one)
and `tiles` the addressing.

The mhc:: ops (mhc_compile/ops.py) call `launcher(name)` when `kernels_apply(...)`: CUDA tensors
of a kernel dtype with n <= 8; the CPU and everything else keep the PyTorch reference. The kernel
modules are imported on the first CUDA call, not here: Triton decides when a kernel module is
imported whether its kernels are interpreted (TRITON_INTERPRET), so tests can still choose after
importing mhc_compile.

How to tell the kernels are used: the report's "ops" column (per rewritten block), a DEBUG line from the logger
"mhc_compile.templates" at the first launch of each op, INFO lines whenever a kernel is autotuned
for a new (n, C, dtype) (`mhc-compile autotune` prints them), and the kernels' names (`_mhc_...`)
in a profile.
"""

from __future__ import annotations

import functools
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

# launcher name -> (kernel module, function)
_LAUNCHERS: dict[str, tuple[str, str]] = {
    "coefficients_pre_mix": ("coefficients_pre_mix", "mhc_coefficients_pre_mix_fwd"),
    "coefficients_pre_mix_backward": ("coefficients_pre_mix", "mhc_coefficients_pre_mix_bwd"),
    "post_res_mix": ("post_res_mix", "mhc_post_res_mix_fwd"),
    "post_res_mix_backward": ("post_res_mix", "mhc_post_res_mix_bwd"),
}
_loaded: dict[str, Callable] = {}


@functools.cache
def triton_available() -> bool:
    """Whether Triton is installed (checked without importing it; once: every op call asks)."""
    return importlib.util.find_spec("triton") is not None


KERNELS = "triton kernels"


def implementation(device: torch.device | str, dtype: torch.dtype, n: int) -> str:
    """What the mhc:: ops run for streams of this device, dtype and n: KERNELS, or "reference"
    and why (the report shows it per block)."""
    reason = _reference_reason(torch.device(device), dtype, n)
    return KERNELS if reason is None else f"reference ({reason})"


def _reference_reason(device: torch.device, dtype: torch.dtype, n: int) -> str | None:
    """Why streams of this device, dtype and n keep the reference, or None: they take the kernels."""
    if not kernels_active(device):
        return "Triton not installed" if device.type == "cuda" and not triton_available() else device.type
    if n > MAX_STREAMS:
        return f"n > {MAX_STREAMS}"
    if dtype not in STREAM_DTYPES:
        return str(dtype).removeprefix("torch.")
    return None


def kernels_active(device: torch.device | str) -> bool:
    """Whether the mhc:: ops run the Triton kernels for tensors on `device`."""
    return torch.device(device).type == "cuda" and torch.cuda.is_available() and triton_available()


def kernels_apply(streams: torch.Tensor, args: tuple) -> bool:
    """Whether the kernels take these op arguments: CUDA, non-empty streams of a kernel dtype with
    n <= MAX_STREAMS, and no float64 coefficients (those keep the reference)."""
    return (
        _reference_reason(streams.device, streams.dtype, streams.shape[-2]) is None
        and streams.numel() > 0
        and all(a.dtype in STREAM_DTYPES for a in args if isinstance(a, torch.Tensor))
    )


def launcher(name: str) -> Callable:
    """The Triton launcher of op `name` ("coefficients_pre_mix", ...), imported on first use."""
    if name not in _loaded:
        module, function = _LAUNCHERS[name]
        _loaded[name] = getattr(importlib.import_module(f"{__name__}.{module}"), function)
        log.debug("mhc::%s: first launch of Triton kernel %s.%s", name, module, function)
    return _loaded[name]


def tune_sublayer(
    n: int, channels: int, tokens: int, dtype: torch.dtype, sinkhorn_iters: int = 20
) -> dict[str, str]:
    """Autotune every kernel of one sublayer (forward and backward, f = identity) for streams
    [tokens, n, C] of `dtype` on the current CUDA device; returns the config each kernel chose.

    Progress goes to the "mhc_compile.templates" logger at INFO. Choices are kept in memory and in
    Triton's cache directory, so later processes reuse them.
    """
    from mhc_compile import ops, spec

    device = torch.device("cuda")
    streams = torch.randn(tokens, n, channels, device=device).to(dtype).requires_grad_()
    parameters = [torch.randn(shape, device=device) for shape in spec.parameter_shapes(n, channels)]
    parameters[0] /= (n * channels) ** 0.5  # phi: unit-scale projections
    parameters[1] = parameters[1].abs() + 0.5  # alpha: positive gates
    parameters = [p.requires_grad_() for p in parameters]
    _, h_post, h_res, mixed, *_ = ops.coefficients_pre_mix(
        streams, *parameters, sinkhorn_iters, "sinkhorn"
    )
    out = ops.post_res_mix(streams, mixed, h_post, h_res)
    out.backward(torch.randn_like(out))
    torch.cuda.synchronize()
    from mhc_compile.templates import configs

    return configs.chosen_configs()
