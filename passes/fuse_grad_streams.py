"""Fold autograd's add of a block's two grad streams into the coefficient backward (post-grad pass).

A block's input streams x_l have two readers, mhc::coefficients_pre_mix and mhc::post_res_mix, so
the backward graph sums their gradients with an aten.add over [T, n, C]: a whole extra pass over
the streams (read twice, written once) that Inductor cannot fuse into our kernels. The coefficient
backward already writes grad streams in one kernel pass; handed the other gradient as its
`accumulate` argument, it reads it there and the add disappears (one read instead of three passes).

This runs on Inductor's post-grad graphs (post_grad_custom_post_pass, installed by
`backend.compile_whole_ops`), where the backend's ops are whole: the opaque twins (it
traces under ops.keep_ops_whole), or the public ops where Triton is missing; passes/inline_kernels.py
opens them afterwards. Where AOT autograd traced into the kernels (torch.compile of the public ops
without our backend) there is no op node to hand the gradient to, and the add stays.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass

import torch
from torch import fx

from mhc_compile import ops, private_apis, spec
from mhc_compile.passes.context import PassContext

log = logging.getLogger(__name__)

_ACCUMULATE_AT = spec.COEFFICIENTS_PRE_MIX_BACKWARD.argument_names.index("accumulate")


@dataclass
class GradStreamsAdd:
    """An add of a coefficient backward's grad streams and another gradient of the same streams."""

    add: fx.Node
    grad_streams: fx.Node  # getitem 0 of the backward
    other: fx.Node


def fuse_grad_streams(graph: fx.Graph, context: PassContext) -> int:
    """Rewrite add(grad streams of a coefficient backward, other) into that backward with
    `accumulate=other`; returns the number of adds removed. The backwards left as they are are
    logged at DEBUG with the reason."""
    position = {node: index for index, node in enumerate(graph.nodes)}
    fused = 0
    for backward in [node for node in graph.nodes if ops.spec_of(node.target) is spec.COEFFICIENTS_PRE_MIX_BACKWARD]:
        found = _grad_streams_add(backward, position)
        if isinstance(found, str):
            log.debug("mhc: %s keeps its grad-streams add: %s", backward.name, found)
            continue
        private_apis.append_argument(backward, found.other)
        found.add.replace_all_uses_with(found.grad_streams)
        graph.erase_node(found.add)
        fused += 1
    if fused:
        log.debug("mhc: folded %d grad-streams adds into the coefficient backward", fused)
    return fused


def _grad_streams_add(backward: fx.Node, position: dict[fx.Node, int]) -> GradStreamsAdd | str:
    """The add that `backward`'s grad streams feed when folding it is exact, else why not."""
    if len(backward.args) != _ACCUMULATE_AT or backward.kwargs:
        return "it has an accumulate already"
    grad_streams = [user for user in backward.users
                    if user.target is operator.getitem and user.args[1] == 0]
    if len(grad_streams) != 1 or len(grad_streams[0].users) != 1:
        return "its grad streams are not read by exactly one node"
    (add,) = grad_streams[0].users
    if add.target is not torch.ops.aten.add.Tensor:
        return f"its grad streams are read by {add.target}, not an add"
    if add.kwargs or len(add.args) != 2:
        return "its grad streams are added with a scale (alpha)"
    (other,) = [arg for arg in add.args if arg is not grad_streams[0]] or [None]
    if not isinstance(other, fx.Node):
        return "the other addend is not a tensor"
    if position[other] > position[backward]:
        return "the other addend is computed after the backward"
    if not _same_tensor_type(grad_streams[0], other, add):
        return "the addends differ in shape, dtype or device (a broadcast or a promotion)"
    return GradStreamsAdd(add, grad_streams[0], other)


def _same_tensor_type(*nodes: fx.Node) -> bool:
    """Equal shapes (symbolic sizes compared by expression, never guarded), dtypes and devices."""
    values = [node.meta.get("val") for node in nodes]
    if not all(isinstance(value, torch.Tensor) for value in values):
        return False
    return len({(tuple(map(str, value.shape)), value.dtype, value.device) for value in values}) == 1
