"""mhc::coefficients_pre_mix on CUDA: the coefficients (paper Eq. 7-8) and F's input H_pre x_l
(Eq. 3) by the kernels of `coefficients` and `pre_mix`, and the backward with one grad streams.

Forward: projection, coefficient math with Sinkhorn, then the pre-mix, which reads the streams a
second time (a one-launch design that re-reads them from L2 is slower, 0.33 against 0.14 ms at
C = 1024 on an H100: docs/design.md, Kernels); the projection and the sums of squares are outputs
too, saved for the backward.
Backward, two passes over the streams: the pre-mix's reduction <grad_mixed, x_j> (H_pre's gradient
through the pre-mix; it only reads), then the coefficient backward with the total grad H_pre, whose
last kernel writes the block's whole grad streams: the coefficients' share, the pre-mix's
h_pre_j * grad_mixed, and `accumulate`, the streams' gradient from the post/res mix
(passes/fuse_grad_streams.py hands it over in compiled backward graphs). So grad streams is written
once, and no pass writes a partial one for another to read back.
"""

from __future__ import annotations

import torch

from mhc_compile import spec
from mhc_compile.templates.coefficients import mhc_coefficients_bwd, mhc_coefficients_fwd
from mhc_compile.templates.pre_mix import mhc_pre_mix_fwd, mhc_pre_mix_grad_h_pre


def mhc_coefficients_pre_mix_fwd(streams: torch.Tensor, *parameters_and_settings) -> tuple:
    """mhc::coefficients_pre_mix's kernels, called with its arguments (spec.COEFFICIENTS_PRE_MIX):
    streams [..., n, C] (bf16/fp16/fp32), the block's parameters, sinkhorn_iters, constraint ->
    h_pre [..., n], h_post [..., n], h_res [..., n, n] (fp32), mixed [..., C] in the stream dtype,
    and the projection [..., n*n+2n] and sums of squares [...] (fp32) that the backward takes."""
    h_pre, h_post, h_res, proj, sumsq = mhc_coefficients_fwd(streams, *parameters_and_settings)
    return h_pre, h_post, h_res, mhc_pre_mix_fwd(streams, h_pre), proj, sumsq


def mhc_coefficients_pre_mix_bwd(*args) -> tuple:
    """mhc::coefficients_pre_mix_backward's kernels, called with its arguments
    (spec.COEFFICIENTS_PRE_MIX_BACKWARD): gradients of streams and the parameters from the
    gradients of the first four outputs, `accumulate` [..., n, C] added to grad streams when
    given; h_pre, the projection and the sums of squares are the forward's (saved, so the
    projection is not recomputed)."""
    named = spec.COEFFICIENTS_PRE_MIX_BACKWARD.bind(args)
    streams, grad_mixed = named["streams"], named["grad_mixed"]
    grad_h_pre_mix = mhc_pre_mix_grad_h_pre(grad_mixed, streams).view(named["h_pre"].shape)
    return mhc_coefficients_bwd(
        named["grad_h_pre"] + grad_h_pre_mix, named["grad_h_post"], named["grad_h_res"],
        named["projection"], named["sum_squares"], streams,
        *(named[name] for name in spec.PARAMETER_NAMES), named["sinkhorn_iters"],
        named["constraint"], grad_mixed, named["h_pre"], named["accumulate"],
    )
