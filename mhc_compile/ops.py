"""The mHC computations as torch.library custom ops: what the rewritten graph calls.

Each forward op has a backward op. The default implementations (every device) are the plain-PyTorch
reference in ``reference.py``; the backward ones differentiate it by recomputing the forward from
the op's inputs, so nothing but those inputs is saved (the stream ``x_l`` is saved anyway).
GPU kernels replace an implementation with ``torch.library.register_kernel(op, "cuda")``; the
graph, the fake implementations and the autograd wiring stay as they are.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from mhc_compile import reference


def _reference_vjp(
    forward: Callable[..., object], inputs: Sequence[Tensor], grads: Sequence[Tensor]
) -> tuple[Tensor, ...]:
    """Gradients of `forward(*inputs)` against `grads`, recomputing the forward (nothing stored).

    torch.func.vjp, not autograd.grad: a custom op's implementation runs below the Autograd
    dispatch key, where tensors cannot record a graph, but functorch's transform still can.
    """
    _, pullback = torch.func.vjp(forward, *inputs)
    outputs = pullback(tuple(grads) if len(grads) > 1 else grads[0])
    return _dense(*outputs, avoid=(*inputs, *grads))


def _dense(*tensors: Tensor, avoid: Sequence[Tensor] = ()) -> tuple[Tensor, ...]:
    """Outputs are contiguous, whatever the inputs' strides (streams may be expanded or permuted
    views): the fake implementations promise exactly that, and kernels write dense buffers. A
    custom op may not return a tensor sharing storage with an input or another output (torch
    2.11 checks it), so such an output is copied."""
    taken = {t.untyped_storage().data_ptr() for t in avoid}
    dense = []
    for tensor in tensors:
        if tensor.untyped_storage().data_ptr() in taken:
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        dense.append(tensor.contiguous())
        taken.add(dense[-1].untyped_storage().data_ptr())
    return tuple(dense)


def _dense_like(*tensors: Tensor) -> tuple[Tensor, ...]:
    return tuple(t.new_empty(t.shape) for t in tensors)


# --- coefficients: RMS, projection, gates, Sinkhorn (paper Eq. 7-8) -------------------------------


@torch.library.custom_op("mhc::coefficients", mutates_args=())
def coefficients(
    streams: Tensor,
    phi: Tensor,
    alpha: Tensor,
    b_pre: Tensor,
    b_post: Tensor,
    b_res: Tensor,
    sinkhorn_iters: int,
    constraint: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """streams [..., n, C] -> h_pre [..., n], h_post [..., n], h_res [..., n, n] (fp32 or fp64)."""
    return _dense(
        *reference.coefficients(streams, phi, alpha, b_pre, b_post, b_res, sinkhorn_iters, constraint)
    )


@coefficients.register_fake
def _(streams, phi, alpha, b_pre, b_post, b_res, sinkhorn_iters, constraint):
    *lead, n, _ = streams.shape
    dtype = reference.coefficient_dtype(streams.dtype)
    gate = streams.new_empty((*lead, n), dtype=dtype)
    return gate, torch.empty_like(gate), streams.new_empty((*lead, n, n), dtype=dtype)


@torch.library.custom_op("mhc::coefficients_backward", mutates_args=())
def coefficients_backward(
    grad_h_pre: Tensor,
    grad_h_post: Tensor,
    grad_h_res: Tensor,
    streams: Tensor,
    phi: Tensor,
    alpha: Tensor,
    b_pre: Tensor,
    b_post: Tensor,
    b_res: Tensor,
    sinkhorn_iters: int,
    constraint: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Exact gradients of all six inputs; Sinkhorn's iterates are recomputed, never stored."""

    def forward(*tensors):
        return reference.coefficients(*tensors, sinkhorn_iters, constraint)

    return _reference_vjp(
        forward, (streams, phi, alpha, b_pre, b_post, b_res), (grad_h_pre, grad_h_post, grad_h_res)
    )


@coefficients_backward.register_fake
def _(grad_h_pre, grad_h_post, grad_h_res, streams, phi, alpha, b_pre, b_post, b_res, *_):
    return _dense_like(streams, phi, alpha, b_pre, b_post, b_res)


def _save_inputs(ctx, inputs, output):
    ctx.save_for_backward(*(t for t in inputs if isinstance(t, Tensor)))
    ctx.static_args = tuple(a for a in inputs if not isinstance(a, Tensor))


def _coefficients_grad(ctx, grad_h_pre, grad_h_post, grad_h_res):
    # Autograd may hand stride-0 grads (from .sum()); kernels want them dense.
    grads = coefficients_backward(
        *(g.contiguous() for g in (grad_h_pre, grad_h_post, grad_h_res)),
        *ctx.saved_tensors,
        *ctx.static_args,
    )
    return (*grads, None, None)


coefficients.register_autograd(_coefficients_grad, setup_context=_save_inputs)


# --- pre-mix: F_pre = H_pre x_l -----------------------------------------------------------------


@torch.library.custom_op("mhc::pre_mix", mutates_args=())
def pre_mix(streams: Tensor, h_pre: Tensor) -> Tensor:
    """streams [..., n, C], h_pre [..., n] -> [..., C] in the stream dtype."""
    return reference.pre_mix(streams, h_pre).contiguous()


@pre_mix.register_fake
def _(streams, h_pre):
    return streams.new_empty(streams.shape[:-2] + streams.shape[-1:])


@torch.library.custom_op("mhc::pre_mix_backward", mutates_args=())
def pre_mix_backward(grad_mixed: Tensor, streams: Tensor, h_pre: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients of streams and h_pre."""
    return _reference_vjp(reference.pre_mix, (streams, h_pre), (grad_mixed,))


@pre_mix_backward.register_fake
def _(grad_mixed, streams, h_pre):
    return _dense_like(streams, h_pre)


def _pre_mix_grad(ctx, grad_mixed):
    return pre_mix_backward(grad_mixed.contiguous(), *ctx.saved_tensors)


pre_mix.register_autograd(_pre_mix_grad, setup_context=_save_inputs)


# --- post/res mix: x_{l+1} = H_res x_l + H_post^T y (paper Eq. 3) ---------------------------------


@torch.library.custom_op("mhc::post_res_mix", mutates_args=())
def post_res_mix(streams: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor) -> Tensor:
    """streams [..., n, C], y [..., C], h_post [..., n], h_res [..., n, n] -> [..., n, C]."""
    return reference.post_res_mix(streams, y, h_post, h_res).contiguous()


@post_res_mix.register_fake
def _(streams, y, h_post, h_res):
    return streams.new_empty(streams.shape)


@torch.library.custom_op("mhc::post_res_mix_backward", mutates_args=())
def post_res_mix_backward(
    grad_out: Tensor, streams: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of streams, y, h_post and h_res."""
    return _reference_vjp(reference.post_res_mix, (streams, y, h_post, h_res), (grad_out,))


@post_res_mix_backward.register_fake
def _(grad_out, streams, y, h_post, h_res):
    return _dense_like(streams, y, h_post, h_res)


def _post_res_mix_grad(ctx, grad_out):
    return post_res_mix_backward(grad_out.contiguous(), *ctx.saved_tensors)


post_res_mix.register_autograd(_post_res_mix_grad, setup_context=_save_inputs)


# GPU kernels (templates/) replace the reference implementations on CUDA.
from mhc_compile.templates import register_cuda_kernels  # noqa: E402

register_cuda_kernels()
