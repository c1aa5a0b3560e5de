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
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor

from mhc_compile import reference, spec, templates

NAMESPACE = "mhc"
# The opaque twin of op mhc::<name> is mhc::<name>_opaque.
OPAQUE_SUFFIX = "_opaque"


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


# Each opaque twin's overload -> the op it stands for (passes/inline_kernels.py hands its kernels to
# Inductor); every overload, public or opaque, -> its op (`spec_of`).
OPAQUE_OPS: dict[Callable, spec.OpSpec] = {}
_SPEC_OF: dict[Callable, spec.OpSpec] = {}


def spec_of(target: object) -> spec.OpSpec | None:
    """The op a graph node's target calls, whether the public op or its opaque twin, or None."""
    try:
        return _SPEC_OF.get(target)
    except TypeError:  # an unhashable target
        return None


def _define(op: spec.OpSpec, reference_impl: Callable, fake_impl: Callable) -> Callable:
    """The public op `mhc::<name>` and its opaque twin `mhc::<name>_opaque`, both with the spec's
    signature. The twin is a custom op Inductor does not trace: the reference on every device, the
    Triton kernels on CUDA where they apply. The public op is a torch.library.triton_op when
    Triton is installed, else a custom op; its body is its own fake implementation (run on fake
    tensors it takes the same branch)."""
    def opaque_impl(*args):
        return reference_impl(*args)

    def on_cuda(*args):
        if templates.kernels_apply(args[op.streams_at], args):
            return templates.launcher(op.name)(*args)
        return reference_impl(*args)

    opaque_impl.__signature__ = op.signature()
    opaque = torch.library.custom_op(f"{NAMESPACE}::{op.name}{OPAQUE_SUFFIX}", opaque_impl,
                                     mutates_args=())
    opaque.register_fake(fake_impl)
    torch.library.register_kernel(opaque, "cuda", on_cuda)
    namespace = getattr(torch.ops, NAMESPACE)
    opaque_overload = getattr(namespace, f"{op.name}{OPAQUE_SUFFIX}").default
    OPAQUE_OPS[opaque_overload] = _SPEC_OF[opaque_overload] = op

    def body(*args):
        if launches_kernels(args[op.streams_at], args):
            return templates.launcher(op.name)(*args)
        return opaque(*args)

    body.__signature__ = op.signature()
    if templates.triton_available():
        public = torch.library.triton_op(f"{NAMESPACE}::{op.name}", body, mutates_args=())
    else:
        public = torch.library.custom_op(f"{NAMESPACE}::{op.name}", body, mutates_args=())
        public.register_fake(body)
    _SPEC_OF[getattr(namespace, op.name).default] = op
    return public


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
    apply and no size is symbolic. With dynamic shapes, torch 2.11's Inductor fails on the traced
    kernels' glue (a guard on a symbol without source at a recompile), so symbolic shapes keep the
    opaque op, which runs the same kernels."""
    if not templates.kernels_apply(streams, tuple(args)):
        return False
    tensors = [a for a in args if isinstance(a, Tensor)]
    return not any(isinstance(size, torch.SymInt) for t in tensors for size in t.shape)


def launches_kernels(streams: Tensor, args: Sequence) -> bool:
    """Whether a public op's body launches its kernels itself (Inductor then sees them when it
    traces the op): kernels_traceable, and no `keep_ops_whole` is active."""
    return not _ops_kept_whole.get() and kernels_traceable(streams, args)


def _dense_grads(grads) -> list[Tensor]:
    # Autograd may hand stride-0 grads (from .sum()); kernels want them dense.
    return [g.contiguous() for g in grads]


# --- coefficients and pre-mix: RMS, projection, gates, Sinkhorn (Eq. 7-8), then H_pre x_l ---------


def _coefficients_pre_mix_reference(streams, phi, alpha, b_pre, b_post, b_res, sinkhorn_iters,
                                    constraint):
    return _dense(*reference.coefficients_pre_mix_and_projection(
        streams, phi, alpha, b_pre, b_post, b_res, sinkhorn_iters, constraint))


def _coefficients_pre_mix_fake(streams, *_):
    *lead, n, _ = streams.shape
    dtype = reference.coefficient_dtype(streams.dtype)
    gate = streams.new_empty((*lead, n), dtype=dtype)
    mixed = streams.new_empty(streams.shape[:-2] + streams.shape[-1:])
    return (gate, torch.empty_like(gate), streams.new_empty((*lead, n, n), dtype=dtype), mixed,
            streams.new_empty((*lead, spec.coefficient_count(n)), dtype=dtype),
            streams.new_empty(lead, dtype=dtype))


coefficients_pre_mix = _define(spec.COEFFICIENTS_PRE_MIX, _coefficients_pre_mix_reference,
                               _coefficients_pre_mix_fake)
coefficients_pre_mix.__doc__ = """streams [..., n, C] -> h_pre [..., n], h_post [..., n], h_res
[..., n, n] (fp32, fp64 for fp64 streams), mixed = H_pre x_l [..., C] in the stream dtype, and for
the backward the projection v @ phi [..., n*n+2n] and the sums of squares of v [...]
(reference.projection; the coefficient dtype; not differentiable)."""


def _coefficients_pre_mix_backward_reference(*args):
    named = spec.COEFFICIENTS_PRE_MIX_BACKWARD.bind(args)
    iters, constraint = named["sinkhorn_iters"], named["constraint"]

    def forward(*tensors):
        return reference.coefficients_pre_mix(*tensors, iters, constraint)

    # h_pre, the projection and the sums of squares (the forward's, saved for the kernels) are
    # recomputed here with the rest: the reference backward depends on the inputs alone.
    grads = [named[f"grad_{output}"] for output in ("h_pre", "h_post", "h_res", "mixed")]
    inputs = [named["streams"], *(named[name] for name in spec.PARAMETER_NAMES)]
    grad_streams, *grad_parameters = _reference_vjp(forward, inputs, grads)
    if named["accumulate"] is not None:
        grad_streams = grad_streams + named["accumulate"]
    return grad_streams, *grad_parameters


def _coefficients_pre_mix_backward_fake(*args):
    named = spec.COEFFICIENTS_PRE_MIX_BACKWARD.bind(args)
    return _dense_like(named["streams"], *(named[name] for name in spec.PARAMETER_NAMES))


# Exact gradients of streams and the five parameters from those of the four differentiable
# outputs; h_pre, projection and sum_squares are the forward's. The pre-mix's and the
# coefficients' shares of grad streams come as one tensor, with `accumulate` [..., n, C] added when
# given: the streams' gradient from their other reader, which passes/fuse_grad_streams.py hands
# over in compiled backward graphs so that no separate add is left. Sinkhorn's iterates are not
# saved by the forward: the backward recomputes them (the kernel keeps them in a scratch of its own
# while it runs).
coefficients_pre_mix_backward = _define(
    spec.COEFFICIENTS_PRE_MIX_BACKWARD, _coefficients_pre_mix_backward_reference,
    _coefficients_pre_mix_backward_fake)


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


def _post_res_mix_reference(streams, y, h_post, h_res):
    return reference.post_res_mix(streams, y, h_post, h_res).contiguous()


def _post_res_mix_fake(streams, *_):
    return streams.new_empty(streams.shape)


# streams [..., n, C], y [..., C], h_post [..., n], h_res [..., n, n] -> [..., n, C].
post_res_mix = _define(spec.POST_RES_MIX, _post_res_mix_reference, _post_res_mix_fake)


def _post_res_mix_backward_reference(grad_out, streams, y, h_post, h_res):
    return _reference_vjp(reference.post_res_mix, (streams, y, h_post, h_res), (grad_out,))


def _post_res_mix_backward_fake(grad_out, *inputs):
    return _dense_like(*inputs)


# Gradients of streams, y, h_post and h_res.
post_res_mix_backward = _define(spec.POST_RES_MIX_BACKWARD, _post_res_mix_backward_reference,
                                _post_res_mix_backward_fake)


def _save_inputs(ctx, inputs, output):
    ctx.save_for_backward(*(t for t in inputs if isinstance(t, Tensor)))


def _post_res_mix_grad(ctx, grad_out):
    return post_res_mix_backward(*_dense_grads((grad_out,)), *ctx.saved_tensors)


post_res_mix.register_autograd(_post_res_mix_grad, setup_context=_save_inputs)


def register_like_post_res_mix(op) -> None:
    """Give `op`, a custom op computing mhc::post_res_mix (same signature, same function, run
    differently: the pipeline's side-stream mix), post_res_mix's fake implementation and backward."""
    op.register_fake(_post_res_mix_fake)
    op.register_autograd(_post_res_mix_grad, setup_context=_save_inputs)
