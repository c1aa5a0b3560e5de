"""Fold autograd's add of a block's two grad streams into the coefficient backward (post-grad pass).

A block's input streams x_l have two readers, mhc::coefficients_pre_mix and mhc::post_res_mix, so
the backward graph sums their gradients with an aten.add over [T, n, C]: a whole extra pass over
the streams (read twice, written once) that Inductor cannot fuse into our kernels. The coefficient
backward already writes grad streams in one kernel pass; handed the other gradient as its
`accumulate` argument, it reads it there and the add disappears (one read instead of three passes).

This runs on Inductor's post-grad graphs (post_grad_custom_post_pass, installed by
`_dynamo_compat.compile_with_inductor`), where the ops are whole: the opaque twins under the
recompute policy, or the public ops where Triton is missing. Where AOT autograd traced into the
kernels (triton_op, recompute off) there is no op node to hand the gradient to, and the add stays.
"""

from __future__ import annotations

import logging
import operator

import torch
from torch import fx

from mhc_compile import _dynamo_compat
from mhc_compile.passes.recompute_policy import op_name

log = logging.getLogger(__name__)

COEFFICIENTS_BACKWARD = "mhc::coefficients_pre_mix_backward"
_ACCUMULATE_AT = 13  # position of `accumulate` in the op's schema (mhc_compile/ops.py)


def fuse_grad_streams(graph: fx.Graph) -> int:
    """Rewrite add(grad streams of a coefficient backward, other) into that backward with
    `accumulate=other`; returns the number of adds removed."""
    position = {node: index for index, node in enumerate(graph.nodes)}
    fused = 0
    for add in list(graph.nodes):
        match = _grad_streams_add(add, position)
        if match is None:
            continue
        grad_streams, other = match
        _dynamo_compat.append_argument(grad_streams.args[0], other)
        add.replace_all_uses_with(grad_streams)
        graph.erase_node(add)
        fused += 1
    if fused:
        log.info("mhc: folded %d grad-streams adds into the coefficient backward", fused)
    return fused


def _grad_streams_add(add: fx.Node, position: dict[fx.Node, int]) -> tuple[fx.Node, fx.Node] | None:
    """(the coefficient backward's grad streams, the other addend) when `add` sums the two and the
    fold is exact: a plain add of equal shapes and dtypes, the grad streams read by nothing else,
    the backward without an accumulate yet, and the other addend computed before the backward (so
    the backward may read it where it stands)."""
    if add.target is not torch.ops.aten.add.Tensor or add.kwargs or len(add.args) != 2:
        return None
    for grad_streams, other in (add.args, add.args[::-1]):
        if not (isinstance(grad_streams, fx.Node) and isinstance(other, fx.Node)):
            return None
        backward = _coefficient_backward_of(grad_streams)
        if (
            backward is not None
            and len(grad_streams.users) == 1
            and len(backward.args) == _ACCUMULATE_AT
            and not backward.kwargs
            and position[other] < position[backward]
            and _same_tensor_type(grad_streams, other, add)
        ):
            return grad_streams, other
    return None


def _coefficient_backward_of(node: fx.Node) -> fx.Node | None:
    """The coefficient backward whose output 0 (grad streams) `node` is, else None."""
    if node.op != "call_function" or node.target is not operator.getitem or node.args[1] != 0:
        return None
    source = node.args[0]
    return source if isinstance(source, fx.Node) and op_name(source) == COEFFICIENTS_BACKWARD else None


def _same_tensor_type(*nodes: fx.Node) -> bool:
    """Equal shapes (symbolic sizes compared by expression, never guarded), dtypes and devices."""
    values = [node.meta.get("val") for node in nodes]
    if not all(isinstance(value, torch.Tensor) for value in values):
        return False
    return len({(tuple(map(str, value.shape)), value.dtype, value.device) for value in values}) == 1
