"""The mHC computations as torch.library ops: what the rewritten graph calls.

Two forward ops, each with a backward op:
    mhc::coefficients_pre_mix  H_pre, H_post, H_res (paper Eq. 7-8) and F's input H_pre x_l (Eq. 3)
    mhc::post_res_mix          x_{l+1} = H_res x_l + H_post^T F(...) (Eq. 3)
Each is a `torch.library.triton_op`: on CUDA (bf16/fp16/fp32 streams, n <= 8, static shapes)
its body launches the Triton kernels of templates/ through wrap_triton, so Inductor traces into it,
compiles the kernels and the small tensor work around them and launches them from its own code.
Everything else goes to the op's `*_opaque` twin, a custom op Inductor does not trace: the
plain-PyTorch reference of ``reference.py`` (CPU, float64, n > 8; its backward differentiates the
reference by recomputing the forward) and the same kernels on CUDA when shapes are symbolic or
while `keep_ops_whole` is active (the backend's tracing; passes/inline_kernels.py later swaps in
the kernels for Inductor).
Saved for the backward: the op's inputs, and of coefficients_pre_mix's outputs H_pre [..., n], the
projection v @ phi [..., n*n+2n] and the sums of squares [...] (non-differentiable outputs that
exist for the backward: the kernels' backward does not re-read the streams to recompute them).
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor

from mhc_compile import costs, reference, templates


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


@dataclass(frozen=True)
class OpaqueKernels:
    """What an opaque op runs where the kernels apply: templates.launcher(`launcher`), called with
    the op's arguments; the streams are argument `streams_at`."""

    launcher: str
    streams_at: int


# Each opaque twin's overload -> its kernels (passes/inline_kernels.py hands them to Inductor).
OPAQUE_KERNELS: dict[torch._ops.OpOverload, OpaqueKernels] = {}


def _opaque(name: str, launcher: str, streams_at: int) -> Callable:
    """A custom op Inductor treats as opaque: the reference on every device, the Triton kernels on
    CUDA where they apply (`launcher`: templates.launcher's name; the streams are argument
    `streams_at`)."""

    def define(reference_impl: Callable) -> Callable:
        op = torch.library.custom_op(name, reference_impl, mutates_args=())
        namespace, short_name = name.split("::")
        overload = getattr(getattr(torch.ops, namespace), short_name).default
        OPAQUE_KERNELS[overload] = OpaqueKernels(launcher, streams_at)

        def on_cuda(*args):
            if templates.kernels_apply(args[streams_at], args):
                return templates.launcher(launcher)(*args)
            return reference_impl(*args)

        torch.library.register_kernel(op, "cuda", on_cuda)
        return op

    return define


def _traced_op(name: str) -> Callable:
    """The public op: torch.library.triton_op when Triton is installed, else a custom op. Its body
    is its own fake implementation (run on fake tensors it takes the same branch)."""

    def define(body: Callable) -> Callable:
        if templates.triton_available():
            return torch.library.triton_op(name, body, mutates_args=())
        op = torch.library.custom_op(name, body, mutates_args=())
        op.register_fake(body)
        return op

    return define


_ops_kept_whole = contextvars.ContextVar("mhc_ops_kept_whole", default=False)


@contextlib.contextmanager
def keep_ops_whole(enabled: bool = True) -> Iterator[None]:
    """While tracing inside this context, every public op calls its opaque twin, so the traced
    graph holds one node per op. The backend traces this way: the recompute policy
    (passes/recompute_policy.py) finds a block's output streams by op name in the joint graph and
    tags whole ops for the partitioner, and passes/fuse_grad_streams.py hands a gradient to a whole
    backward op, while a traced triton_op is decomposed by AOT autograd into its kernels and glue.
    After both, passes/inline_kernels.py replaces each twin by that decomposition, so Inductor
    still compiles and launches the kernels itself."""
    token = _ops_kept_whole.set(enabled)
    try:
        yield
    finally:
        _ops_kept_whole.reset(token)


def kernels_traceable(streams: Tensor, args: Sequence) -> bool:
    """Whether Inductor may trace the kernels of an op with these arguments (real or fake): they
    apply and no size is symbolic. With dynamic shapes, torch 2.11's Inductor failed on the traced
    kernels' glue (a guard on a symbol without source at a recompile; GPU run of 2026-11-23), so
    symbolic shapes keep the opaque op, which runs the same kernels."""
    if not templates.kernels_apply(streams, tuple(args)):
        return False
    tensors = [a for a in args if isinstance(a, Tensor)]
    return not any(isinstance(size, torch.SymInt) for t in tensors for size in t.shape)


def _kernels_traced(streams: Tensor, args: tuple) -> bool:
    """Whether the public op's body launches the kernels itself (Inductor then sees them):
    kernels_traceable, and no `keep_ops_whole` is active."""
    return not _ops_kept_whole.get() and kernels_traceable(streams, args)


def _dense_grads(grads) -> list[Tensor]:
    # Autograd may hand stride-0 grads (from .sum()); kernels want them dense.
    return [g.contiguous() for g in grads]


# --- coefficients and pre-mix: RMS, projection, gates, Sinkhorn (Eq. 7-8), then H_pre x_l ---------


@_opaque("mhc::coefficients_pre_mix_opaque", "coefficients_pre_mix", streams_at=0)
def coefficients_pre_mix_opaque(
    streams: Tensor,
    phi: Tensor,
    alpha: Tensor,
    b_pre: Tensor,
    b_post: Tensor,
    b_res: Tensor,
    sinkhorn_iters: int,
    constraint: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _dense(*reference.coefficients_pre_mix_and_projection(
        streams, phi, alpha, b_pre, b_post, b_res, sinkhorn_iters, constraint
    ))


@coefficients_pre_mix_opaque.register_fake
def _(streams, phi, alpha, b_pre, b_post, b_res, sinkhorn_iters, constraint):
    *lead, n, _ = streams.shape
    dtype = reference.coefficient_dtype(streams.dtype)
    gate = streams.new_empty((*lead, n), dtype=dtype)
    mixed = streams.new_empty(streams.shape[:-2] + streams.shape[-1:])
    return (gate, torch.empty_like(gate), streams.new_empty((*lead, n, n), dtype=dtype), mixed,
            streams.new_empty((*lead, costs.coefficient_count(n)), dtype=dtype),
            streams.new_empty(lead, dtype=dtype))


@_traced_op("mhc::coefficients_pre_mix")
def coefficients_pre_mix(
    streams: Tensor,
    phi: Tensor,
    alpha: Tensor,
    b_pre: Tensor,
    b_post: Tensor,
    b_res: Tensor,
    sinkhorn_iters: int,
    constraint: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """streams [..., n, C] -> h_pre [..., n], h_post [..., n], h_res [..., n, n] (fp32, fp64 for
    fp64 streams), mixed = H_pre x_l [..., C] in the stream dtype, and for the backward the
    projection v @ phi [..., n*n+2n] and the sums of squares of v [...] (reference.projection;
    the coefficient dtype; not differentiable)."""
    args = (streams, phi, alpha, b_pre, b_post, b_res, sinkhorn_iters, constraint)
    if _kernels_traced(streams, args):
        return templates.launcher("coefficients_pre_mix")(*args)
    return coefficients_pre_mix_opaque(*args)


@_opaque("mhc::coefficients_pre_mix_backward_opaque", "coefficients_pre_mix_backward", streams_at=7)
def coefficients_pre_mix_backward_opaque(
    grad_h_pre: Tensor,
    grad_h_post: Tensor,
    grad_h_res: Tensor,
    grad_mixed: Tensor,
    h_pre: Tensor,
    projection: Tensor,
    sum_squares: Tensor,
    streams: Tensor,
    phi: Tensor,
    alpha: Tensor,
    b_pre: Tensor,
    b_post: Tensor,
    b_res: Tensor,
    sinkhorn_iters: int,
    constraint: str,
    accumulate: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    def forward(*tensors):
        return reference.coefficients_pre_mix(*tensors, sinkhorn_iters, constraint)

    # h_pre, the projection and the sums of squares (the forward's, saved for the kernels) are
    # recomputed here with the rest: the reference backward depends on the inputs alone.
    grad_streams, *grad_parameters = _reference_vjp(
        forward, (streams, phi, alpha, b_pre, b_post, b_res),
        (grad_h_pre, grad_h_post, grad_h_res, grad_mixed),
    )
    if accumulate is not None:
        grad_streams = grad_streams + accumulate
    return grad_streams, *grad_parameters


@coefficients_pre_mix_backward_opaque.register_fake
def _(grad_h_pre, grad_h_post, grad_h_res, grad_mixed, h_pre, projection, sum_squares, streams, phi,
      alpha, b_pre, b_post, b_res, *_, **__):
    return _dense_like(streams, phi, alpha, b_pre, b_post, b_res)


@_traced_op("mhc::coefficients_pre_mix_backward")
def coefficients_pre_mix_backward(
    grad_h_pre: Tensor,
    grad_h_post: Tensor,
    grad_h_res: Tensor,
    grad_mixed: Tensor,
    h_pre: Tensor,
    projection: Tensor,
    sum_squares: Tensor,
    streams: Tensor,
    phi: Tensor,
    alpha: Tensor,
    b_pre: Tensor,
    b_post: Tensor,
    b_res: Tensor,
    sinkhorn_iters: int,
    constraint: str,
    accumulate: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Exact gradients of streams, phi, alpha, b_pre, b_post, b_res from those of the four
    differentiable outputs; h_pre, projection and sum_squares are the forward's. The pre-mix's and
    the coefficients' shares of grad streams come as one tensor, with `accumulate` [..., n, C]
    added when given: the streams' gradient from their other reader, which
    passes/fuse_grad_streams.py hands over in compiled backward graphs so that no separate add is
    left. Sinkhorn's iterates are recomputed, never stored."""
    args = (grad_h_pre, grad_h_post, grad_h_res, grad_mixed, h_pre, projection, sum_squares, streams,
            phi, alpha, b_pre, b_post, b_res, sinkhorn_iters, constraint, accumulate)
    if _kernels_traced(streams, args):
        return templates.launcher("coefficients_pre_mix_backward")(*args)
    return coefficients_pre_mix_backward_opaque(*args)


def _save_inputs_h_pre_and_projection(ctx, inputs, output):
    h_pre, *_, projection, sum_squares = output
    ctx.mark_non_differentiable(projection, sum_squares)
    ctx.save_for_backward(
        h_pre, projection, sum_squares, *(t for t in inputs if isinstance(t, Tensor))
    )
    ctx.static_args = tuple(a for a in inputs if not isinstance(a, Tensor))


def _coefficients_pre_mix_grad(ctx, grad_h_pre, grad_h_post, grad_h_res, grad_mixed, *_):
    grads = coefficients_pre_mix_backward(
        *_dense_grads((grad_h_pre, grad_h_post, grad_h_res, grad_mixed)),
        *ctx.saved_tensors, *ctx.static_args,
    )
    return (*grads, None, None)


coefficients_pre_mix.register_autograd(
    _coefficients_pre_mix_grad, setup_context=_save_inputs_h_pre_and_projection
)


# --- post/res mix: x_{l+1} = H_res x_l + H_post^T y (paper Eq. 3) ---------------------------------


@_opaque("mhc::post_res_mix_opaque", "post_res_mix", streams_at=0)
def post_res_mix_opaque(streams: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor) -> Tensor:
    return reference.post_res_mix(streams, y, h_post, h_res).contiguous()


@post_res_mix_opaque.register_fake
def _(streams, y, h_post, h_res):
    return streams.new_empty(streams.shape)


@_traced_op("mhc::post_res_mix")
def post_res_mix(streams: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor) -> Tensor:
    """streams [..., n, C], y [..., C], h_post [..., n], h_res [..., n, n] -> [..., n, C]."""
    args = (streams, y, h_post, h_res)
    if _kernels_traced(streams, args):
        return templates.launcher("post_res_mix")(*args)
    return post_res_mix_opaque(*args)


@_opaque("mhc::post_res_mix_backward_opaque", "post_res_mix_backward", streams_at=1)
def post_res_mix_backward_opaque(
    grad_out: Tensor, streams: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _reference_vjp(reference.post_res_mix, (streams, y, h_post, h_res), (grad_out,))


@post_res_mix_backward_opaque.register_fake
def _(grad_out, streams, y, h_post, h_res):
    return _dense_like(streams, y, h_post, h_res)


@_traced_op("mhc::post_res_mix_backward")
def post_res_mix_backward(
    grad_out: Tensor, streams: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of streams, y, h_post and h_res."""
    args = (grad_out, streams, y, h_post, h_res)
    if _kernels_traced(streams, args):
        return templates.launcher("post_res_mix_backward")(*args)
    return post_res_mix_backward_opaque(*args)


def _save_inputs(ctx, inputs, output):
    ctx.save_for_backward(*(t for t in inputs if isinstance(t, Tensor)))


def _post_res_mix_grad(ctx, grad_out):
    return post_res_mix_backward(*_dense_grads((grad_out,)), *ctx.saved_tensors)


post_res_mix.register_autograd(_post_res_mix_grad, setup_context=_save_inputs)
