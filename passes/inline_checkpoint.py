"""Inline the user's torch.utils.checkpoint regions, so residual blocks inside them are rewritten.

Dynamo turns `checkpoint(layer, x, use_reentrant=False)` into one call of a higher-order op whose
body is a subgraph: the residual adds of a checkpointed transformer layer live in that body, out
of the analysis' sight. A plain checkpoint region means "run the body, keep its inputs, recompute
the rest in backward", which torch expresses by tagging every op of the body PREFER_RECOMPUTE with
one ac_graph_id per region and leaving the rest to the partitioner. The body is copied into the
graph with exactly those tags; they travel on each node (and on the mHC ops the rewrite puts in
place of a block, rewrite_mhc._KEPT_META) into AOT autograd's joint graph, where the recompute
policy leaves tagged nodes alone. So the user's regions recompute as they asked, mHC ops
included, and each region keeps its output streams.

Regions with a context_fn (selective checkpointing: a policy decided op by op while tracing) stay
as they are; residual blocks inside them are not rewritten (logged).
"""

from __future__ import annotations

import logging
import operator

from torch import fx
from torch.utils.checkpoint import CheckpointPolicy

from mhc_compile import private_apis
from mhc_compile.passes.context import PassContext

log = logging.getLogger(__name__)

_TAGGED_OPS = ("call_function", "call_method", "call_module")


def inline_checkpoint_regions(graph_module: fx.GraphModule, context: PassContext) -> int:
    """Copy every plain checkpoint region's body into the graph, tagged; returns how many."""
    inlined = 0
    while True:  # an inlined body may hold nested regions
        regions = [
            (node, body) for node in graph_module.graph.nodes
            if (body := private_apis.checkpoint_region_body(graph_module, node)) is not None
            and _can_inline(node, body)
        ]
        if not regions:
            break
        for node, body in regions:
            _inline(graph_module, node, body, private_apis.new_checkpoint_region_id())
        inlined += len(regions)
    selective = sum(
        private_apis.is_selective_checkpoint_region(graph_module, node)
        for node in graph_module.graph.nodes
    )
    if selective:
        log.warning("mhc: %d selective activation checkpoint region(s) (checkpoint with a "
                    "context_fn) left as they are; residual blocks inside them are not rewritten",
                    selective)
    if inlined:
        graph_module.graph.lint()
        graph_module.recompile()
        log.debug("mhc: inlined %d activation checkpoint regions", inlined)
    return inlined


def _can_inline(call: fx.Node, body: fx.GraphModule) -> bool:
    """The body's inputs are the call's operands, and only getitems read its outputs."""
    placeholders = [node for node in body.graph.nodes if node.op == "placeholder"]
    readers_ok = all(
        user.op == "call_function" and user.target is operator.getitem for user in call.users
    )
    return len(placeholders) == len(call.args) - 1 and readers_ok


def _inline(graph_module: fx.GraphModule, call: fx.Node, body: fx.GraphModule,
            region_id: int) -> None:
    graph = graph_module.graph
    placeholders = [node for node in body.graph.nodes if node.op == "placeholder"]
    env = dict(zip(placeholders, call.args[1:]))
    outputs = None
    with graph.inserting_before(call):
        for inner in body.graph.nodes:
            if inner.op == "placeholder":
                continue
            if inner.op == "output":
                outputs = fx.map_arg(inner.args[0], env.__getitem__)
                continue
            if inner.op == "get_attr":  # a nested region's body: move the submodule over
                name = _free_attribute(graph_module, inner.target)
                setattr(graph_module, name, getattr(body, inner.target))
                copied = graph.get_attr(name)
                copied.meta = dict(inner.meta)
            else:
                copied = graph.node_copy(inner, env.__getitem__)
            if inner.op in _TAGGED_OPS:
                private_apis.tag_for_partitioner(copied, CheckpointPolicy.PREFER_RECOMPUTE, region_id)
            env[inner] = copied
    for user in list(call.users):  # getitems (_can_inline)
        user.replace_all_uses_with(outputs[user.args[1]])
        graph.erase_node(user)
    body_attribute = call.args[0]
    graph.erase_node(call)
    if not body_attribute.users:
        graph.erase_node(body_attribute)
        delattr(graph_module, body_attribute.target)


def _free_attribute(graph_module: fx.GraphModule, name: str) -> str:
    candidate, index = name, 0
    while hasattr(graph_module, candidate):
        index += 1
        candidate = f"{name}_inlined_{index}"
    return candidate
