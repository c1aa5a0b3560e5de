"""Mutation: rewrite each residual chain found by find_residual_blocks into n-stream mHC.

For a chain of blocks x_{k+1} = x_k + f_k(x_k):
    streams = replicate(x_0)                                   (chain head)
    _, h_post, h_res, mixed = mhc::coefficients_pre_mix(streams, params)  (paper Eq. 7-8, 3)
    f_k reads mixed = H_pre x_k instead of x_k
    streams = mhc::post_res_mix(streams, f_k(...), h_post, h_res)  (paper Eq. 3)
and every other reader of an x_k (the chain's output, hidden states returned on the side) reads
the mean of the streams. The ops carry their own autograd, so this runs before AOT autograd.
Every node added carries its example value (meta "example_value" as Dynamo's nodes, and "val"),
computed in the trace's fake mode.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from mhc_compile import ops, private_apis
from mhc_compile.options import MHCOptions
from mhc_compile.passes import graph_facts, stream_layout
from mhc_compile.passes.context import PassContext
from mhc_compile.passes.find_residual_blocks import ResidualChain
from mhc_compile.spec import BlockParameters


# What a new node takes from the node it stands for: its module path (reports, pipeline cuts) and
# the user's activation-checkpoint tags (mHC ops inside a checkpointed region recompute with it).
_KEPT_META = ("nn_module_stack", "stack_trace", *private_apis.PARTITIONER_META_KEYS)


def rewrite_mhc(graph_module: fx.GraphModule, context: PassContext) -> int:
    """Rewrite every chain of `context.analysis`, each block reading its mHC parameters from
    `context.parameter_nodes`; returns the number of chains rewritten."""
    analysis, parameters, options = context.analysis, context.parameter_nodes, context.options
    # A chain may start where another ends (their blocks differ in layout or device): its head
    # then reads the earlier chain's output, which that chain's rewrite replaced by the mean.
    reduced: dict[fx.Node, fx.Node] = {}
    for chain in analysis.chains:
        head = chain.blocks[0]
        head.skip = reduced.get(head.skip, head.skip)
        reduced.update(_rewrite_chain(graph_module.graph, chain, parameters, options))
    graph_module.graph.lint()
    graph_module.recompile()
    return len(analysis.chains)


def _rewrite_chain(graph: fx.Graph, chain: ResidualChain, parameters,
                   options: MHCOptions) -> dict[fx.Node, fx.Node]:
    """Rewrite one chain; returns what each erased x_k's other readers now read instead."""
    channel_dim = chain.blocks[0].channel_dim
    residual_dtype = chain.blocks[0].value.dtype
    with graph.inserting_before(chain.blocks[0].body[0]):
        streams = call_like(graph, stream_layout.enter_streams, chain.blocks[0].skip, options.n,
                        channel_dim, options.streams_dtype_for(residual_dtype),
                        like=chain.blocks[0].add)
    stream_of: dict[fx.Node, fx.Node] = {}
    for index, block in enumerate(chain.blocks):
        if index:
            streams = stream_of[block.skip]
        stream_of[block.add] = _rewrite_block(graph, block, streams, parameters[block], options)
        for link_node in chain.links[index] if index < len(chain.links) else []:
            stream_of[link_node] = _lift(graph, link_node, stream_of[link_node.args[0]])
    return _reduce_other_readers(graph, chain, stream_of, channel_dim, residual_dtype)


def _rewrite_block(graph, block, streams, params: BlockParameters[fx.Node], options: MHCOptions):
    channel_dim = block.channel_dim
    with graph.inserting_before(block.body[0]):
        coefficients = call_like(
            graph, torch.ops.mhc.coefficients_pre_mix.default, streams, *params,
            options.sinkhorn_iters, options.constraint, like=block.add,
        )
        # Output 0, h_pre, is only read inside the op (by the pre-mix), and outputs 4 and 5 (the
        # projection and the sums of squares) by its backward.
        h_post, h_res, mixed = (
            call_like(graph, operator.getitem, coefficients, i, like=block.add) for i in (1, 2, 3)
        )
        block_input = call_like(graph, stream_layout.read_streams, mixed, channel_dim,
                            block.value.dtype, like=block.add)
    for node in block.body:
        node.replace_input_with(block.skip, block_input)
    with graph.inserting_before(block.add):
        written = block.branches[0]
        for branch in block.branches[1:]:
            written = call_like(graph, operator.add, written, branch, like=block.add)
        written = call_like(graph, stream_layout.to_channels_last, written, channel_dim, like=block.add)
        return call_like(graph, torch.ops.mhc.post_res_mix.default, streams, written, h_post, h_res,
                     like=block.add)


def _lift(graph: fx.Graph, node: fx.Node, streams: fx.Node) -> fx.Node:
    """Apply a stream-wise op (relu, a norm over C) to every stream, out of place: the streams
    are a custom op's output, which autograd forbids modifying in place (torch 2.11)."""
    target, kwargs = node.target, dict(node.kwargs)
    if node.op == "call_method" and target.endswith("_"):
        target = target[:-1]
    if kwargs.get("inplace"):
        kwargs["inplace"] = False
    with graph.inserting_before(node):
        lifted = graph.create_node(node.op, target, (streams, *node.args[1:]), kwargs)
    lifted.meta.update({k: v for k, v in node.meta.items() if k in _KEPT_META})
    _set_value(lifted, _lifted_value(node, graph_facts.example_value(streams)))
    return lifted


def _lifted_value(node: fx.Node, streams):
    """A stream-wise op keeps the streams' shape; it keeps their dtype too unless the original
    op changed its input's (a norm computing in float32, say). Computed from that rule, not by
    running the op: a module's real weights cannot meet fake streams."""
    before = graph_facts.example_value(node.args[0])
    after = graph_facts.example_value(node)
    dtype = streams.dtype if after.dtype == before.dtype else after.dtype
    with private_apis.in_fake_mode([streams]):
        return torch.empty_like(streams, dtype=dtype)


def _reduce_other_readers(graph, chain: ResidualChain, stream_of, channel_dim: int,
                          residual_dtype: torch.dtype) -> dict[fx.Node, fx.Node]:
    """Readers of an x_k outside the chain get the streams' mean; the originals are then erased."""
    replaced = set(stream_of) | {b.inner_add for b in chain.blocks if b.inner_add is not None}
    means: dict[fx.Node, fx.Node] = {}
    for original, streams in stream_of.items():
        readers = [user for user in original.users if user not in replaced]
        if not readers:
            continue
        with graph.inserting_before(original):
            means[original] = call_like(graph, stream_layout.leave_streams, streams, channel_dim,
                                    residual_dtype, like=original)
        for reader in readers:
            reader.replace_input_with(original, means[original])
    for node in sorted(replaced, key=_graph_position(graph), reverse=True):
        graph.erase_node(node)
    return means


def _graph_position(graph: fx.Graph):
    order = {node: index for index, node in enumerate(graph.nodes)}
    return order.__getitem__


def call_like(graph: fx.Graph, target, *args, like: fx.Node) -> fx.Node:
    """A call_function node that keeps the module path (reports, pipeline cuts) of `like`, with
    its example value (the other rewrites add their nodes through it too)."""
    node = graph.call_function(target, args)
    for key in _KEPT_META:
        if key in like.meta:
            node.meta[key] = like.meta[key]
    values = fx.map_arg(args, graph_facts.example_value)
    # Whole ops: their fake implementation, not the kernels' glue, gives the value. Values
    # describe shape, dtype, device and strides; no autograd graph is recorded for them (so they
    # do not require grad, unlike Dynamo's own).
    with private_apis.in_fake_mode(list(values)), ops.keep_ops_whole(), torch.no_grad():
        _set_value(node, target(*values))
    return node


def _set_value(node: fx.Node, value) -> None:
    node.meta["example_value"] = node.meta["val"] = value
