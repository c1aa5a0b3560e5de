"""What each mHC op takes, returns, moves and computes: the one description of the ops.

The custom ops (ops.py) take their schemas from here, the backend its parameter placeholders, the
report its per-block costs, the pipeline annotation its mHC node costs and the benches their byte
counts and floors. Shapes per token follow the mHC paper (arXiv 2512.24880):

    streams  [..., n, C]    the n residual streams x_l
    phi      [n*C, n*n+2n]  the projection (RMSNorm weight folded in), paper Eq. 7
    alpha    [3]            gates (alpha_pre, alpha_post, alpha_res)
    b_pre    [n], b_post [n], b_res [n, n]

Traffic is counted in stream elements per token, as `a*n + b` times C ("reads (2, 1)" is (2n+1)C):
what each kernel pass issues, and the floor an ideal kernel of the op would move (every tensor
read or written once). Coefficient-sized traffic (about n^2+2n floats a token per tensor) is
counted apart (`coefficient_bytes_per_token`).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable, Generic, NamedTuple, TypeVar

from torch import Tensor

COEFFICIENT_BYTES = 4  # the kernels keep H_pre, H_post, H_res and the projection in fp32

Item = TypeVar("Item")


class BlockParameters(NamedTuple, Generic[Item]):
    """One block's mHC parameters, in the order every op and placeholder list takes them:
    tensors, graph nodes, or shapes (`parameter_shapes`)."""

    phi: Item
    alpha: Item
    b_pre: Item
    b_post: Item
    b_res: Item


PARAMETER_NAMES = BlockParameters._fields


def coefficient_count(n: int) -> int:
    """n^2 + 2n: the projection's width (H_pre, H_post, H_res logits)."""
    return n * n + 2 * n


def parameter_shapes(n: int, channels: int) -> BlockParameters[tuple[int, ...]]:
    return BlockParameters((n * channels, coefficient_count(n)), (3,), (n,), (n,), (n, n))


def parameter_count(n: int, channels: int) -> int:
    return sum(math.prod(shape) for shape in parameter_shapes(n, channels))


@dataclass(frozen=True)
class Traffic:
    """Stream elements per token, `per_stream * n + extra`, in units of C."""

    per_stream: int
    extra: int = 0

    def elements(self, n: int) -> int:
        return self.per_stream * n + self.extra


@dataclass(frozen=True)
class KernelPass:
    """One pass of an op's kernels over the streams (one launch, or a few launches that split the
    work): its name in profiles and benches, and what it issues."""

    name: str
    reads: Traffic
    writes: Traffic
    why: str

    def elements(self, n: int) -> int:
        return self.reads.elements(n) + self.writes.elements(n)


@dataclass(frozen=True)
class OpSpec:
    """One mhc:: op: `torch.ops.mhc.<name>`, its arguments (name, schema type), its outputs, where
    its streams are, its kernel passes and the floor of its traffic, and for a forward op its flops
    per token as forward_flops(n, C, sinkhorn_iters). An optional tensor ("Tensor?") defaults to
    None."""

    name: str
    arguments: tuple[tuple[str, str], ...]
    outputs: tuple[str, ...]
    kernel_passes: tuple[KernelPass, ...]
    floor: Traffic
    forward_flops: Callable[[int, int, int], int] | None = None

    @property
    def argument_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.arguments)

    def bind(self, args: tuple) -> dict[str, object]:
        """The op's positional arguments by name, an omitted optional one as None."""
        return {name: args[index] if index < len(args) else None
                for index, name in enumerate(self.argument_names)}

    @property
    def streams_at(self) -> int:
        return self.argument_names.index("streams")

    def signature(self) -> inspect.Signature:
        """The Python signature torch.library infers the op's schema from (custom_op and
        triton_op both read annotations; torch 2.13's triton_op ignores an explicit schema)."""
        parameters = [
            inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                              annotation=_ANNOTATIONS[kind],
                              default=None if kind.endswith("?") else inspect.Parameter.empty)
            for name, kind in self.arguments
        ]
        returns = Tensor if len(self.outputs) == 1 else tuple[(Tensor,) * len(self.outputs)]
        return inspect.Signature(parameters, return_annotation=returns)

    def stream_elements(self, n: int) -> int:
        """Stream elements per token its kernels issue, all passes (times C)."""
        return sum(kernel.elements(n) for kernel in self.kernel_passes)


def _tensors(*names: str) -> tuple[tuple[str, str], ...]:
    return tuple((name, "Tensor") for name in names)


_PARAMETERS = _tensors(*PARAMETER_NAMES)
_SETTINGS = (("sinkhorn_iters", "int"), ("constraint", "str"))
_ACCUMULATE = (("accumulate", "Tensor?"),)
_ANNOTATIONS = {"Tensor": Tensor, "Tensor?": Tensor | None, "int": int, "str": str}

def _coefficients_pre_mix_flops(n: int, channels: int, sinkhorn_iters: int) -> int:
    """RMS, projection v @ phi, gates, Sinkhorn in log space, then the pre-mix."""
    rms = 2 * n * channels
    projection = 2 * n * channels * coefficient_count(n)
    sinkhorn = sinkhorn_iters * 2 * 3 * n * n
    return rms + projection + 4 * coefficient_count(n) + sinkhorn + 2 * n * channels


def _post_res_mix_flops(n: int, channels: int, sinkhorn_iters: int) -> int:
    """H_res x (n x n per channel) and H_post^T y."""
    return 2 * n * n * channels + 2 * n * channels


COEFFICIENTS_PRE_MIX = OpSpec(
    name="coefficients_pre_mix",
    arguments=(*_tensors("streams"), *_PARAMETERS, *_SETTINGS),
    outputs=("h_pre", "h_post", "h_res", "mixed", "projection", "sum_squares"),
    kernel_passes=(
        KernelPass("coefficients_fwd", Traffic(1), Traffic(0),
                   "read x: RMS and projection v @ phi, gates, Sinkhorn"),
        KernelPass("pre_mix_fwd", Traffic(1), Traffic(0, 1), "read x again, write u = H_pre x"),
    ),
    floor=Traffic(1, 1),  # x once, u: the kernels read x twice (passes above), the floor once
    forward_flops=_coefficients_pre_mix_flops,
)
POST_RES_MIX = OpSpec(
    name="post_res_mix",
    arguments=_tensors("streams", "y", "h_post", "h_res"),
    outputs=("streams_out",),
    kernel_passes=(KernelPass("post_res_mix_fwd", Traffic(1, 1), Traffic(1),
                       "read x and y, write x' = H_res x + H_post^T y"),),
    floor=Traffic(2, 1),
    forward_flops=_post_res_mix_flops,
)
COEFFICIENTS_PRE_MIX_BACKWARD = OpSpec(
    name="coefficients_pre_mix_backward",
    arguments=(*_tensors("grad_h_pre", "grad_h_post", "grad_h_res", "grad_mixed", "h_pre",
                         "projection", "sum_squares", "streams"),
               *_PARAMETERS, *_SETTINGS, *_ACCUMULATE),
    outputs=("grad_streams", *(f"grad_{name}" for name in PARAMETER_NAMES)),
    kernel_passes=(
        KernelPass("pre_mix_grad_h_pre", Traffic(1, 1), Traffic(0),
                   "read x and du: H_pre's gradient through the pre-mix"),
        KernelPass("coefficients_bwd", Traffic(2, 1), Traffic(1),
                   "read x, du and the other reader's dx (accumulate); write the whole dx"),
    ),
    floor=Traffic(3, 1),  # read du, x and the other reader's dx; write dx
)
POST_RES_MIX_BACKWARD = OpSpec(
    name="post_res_mix_backward",
    arguments=_tensors("grad_out", "streams", "y", "h_post", "h_res"),
    outputs=("grad_streams", "grad_y", "grad_h_post", "grad_h_res"),
    kernel_passes=(KernelPass("post_res_mix_bwd", Traffic(2, 1), Traffic(1, 1),
                       "read dx', x and y; write dx and dy"),),
    floor=Traffic(3, 2),
)
OPS = (COEFFICIENTS_PRE_MIX, POST_RES_MIX, COEFFICIENTS_PRE_MIX_BACKWARD, POST_RES_MIX_BACKWARD)
FORWARD_OPS = (COEFFICIENTS_PRE_MIX, POST_RES_MIX)

# A plain residual add reads x and F(x) and writes their sum.
PLAIN_ADD = Traffic(0, 3)
# Autograd's sum of a block's two grad streams, where passes/fuse_grad_streams.py cannot fold it.
GRAD_STREAMS_ADD = KernelPass("grad_accumulate_add", Traffic(2), Traffic(1),
                              "read both readers' dx, write their sum")


def forward_floor_elements(n: int) -> int:
    """Stream elements per token the forward of one sublayer must move: (3n+2) times C."""
    return sum(op.floor.elements(n) for op in FORWARD_OPS)


def training_floor_elements(n: int, recompute: bool = True) -> int:
    """Stream elements per token one sublayer's training step must move with these ops (times C):
    the forward, both backwards, and the post/res mix the recompute policy runs again to rebuild
    the streams it did not keep. docs/design.md derives it."""
    recomputed = POST_RES_MIX.floor.elements(n) if recompute else 0
    return forward_floor_elements(n) + recomputed + sum(
        op.floor.elements(n) for op in (COEFFICIENTS_PRE_MIX_BACKWARD, POST_RES_MIX_BACKWARD))


def coefficient_bytes_per_token(n: int) -> int:
    """Forward coefficient traffic: H_pre, H_post and H_res (n^2+2n floats) written once and read
    once (by the pre-mix and the post/res mix), the projection (n^2+2n) and the sum of squares
    written for the backward. The projection's split-K partial sums, whose count depends on the
    autotuned config, are left out: a lower bound."""
    return (3 * coefficient_count(n) + 1) * COEFFICIENT_BYTES


def extra_bytes_per_token(n: int, channels: int, element_bytes: int) -> int:
    """Forward bytes per token the block's kernels move beyond the plain add they replace, as
    their passes issue them (the report's +B/tok)."""
    issued = sum(op.stream_elements(n) for op in FORWARD_OPS) - PLAIN_ADD.elements(n)
    return issued * channels * element_bytes + coefficient_bytes_per_token(n)


def extra_flops_per_token(n: int, channels: int, sinkhorn_iters: int) -> int:
    """The block's forward flops less the plain add's."""
    return sum(op.forward_flops(n, channels, sinkhorn_iters) for op in FORWARD_OPS) - channels


# --- Whole-graph estimates for pipeline balancing (passes/annotate_pipeline.py) --------------------

# Flops one byte of memory traffic is worth: an H100/H200's dense bf16 peak over its HBM bandwidth
# (about 990 TFLOP/s / 3.35 TB/s). A node's roofline cost is max(flops, bytes * this).
MACHINE_BALANCE_FLOPS_PER_BYTE = 300


def matmul_flops(output_numel: int, reduced: int) -> int:
    """2 * (output elements) * (length of the reduced dimension): linear, matmul, bmm."""
    return 2 * output_numel * reduced


def attention_flops(query_shape, key_shape, value_shape) -> int:
    """scaled_dot_product_attention, q [..., L, E], k [..., S, E], v [..., S, Ev]: QK^T and PV."""
    lead = 1
    for size in query_shape[:-2]:
        lead *= size
    queries, keys = query_shape[-2], key_shape[-2]
    return 2 * lead * queries * keys * (query_shape[-1] + value_shape[-1])


def roofline_cost(flops: int, bytes_moved: int) -> int:
    """A node's cost in flop-equivalents: bound by compute or by memory traffic, whichever is larger."""
    return max(flops, bytes_moved * MACHINE_BALANCE_FLOPS_PER_BYTE)
