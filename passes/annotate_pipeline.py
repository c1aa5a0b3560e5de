"""Analysis of a rewritten graph for pipeline parallelism: block boundaries, costs, overlappable work.

Runs after rewrite_mhc and changes no node; it only writes node.meta (and graph_module.meta):

    node.meta[BLOCK_KEY]      index of the mHC block whose span holds the node (coefficients of
                              block i up to, not including, the coefficients of block i+1)
    node.meta[OVERLAP_KEY]    True on every post/res mix (paper Eq. 3): work that may run on a
                              dedicated high-priority stream so stage-boundary traffic overlaps it
    node.meta[CUT_KEY]        on the coefficients node of block i+1: the CutPoint just before it
    graph_module.meta[ANNOTATION_KEY]   the PipelineAnnotation with all of the above and the costs

A cut before block i+1 is legal when everything that crosses it is the n-stream tensor plus
pass-through values that do not depend on the streams (rotary tables, masks, positions, graph
inputs): then a stage's whole state is exactly what PipelineStage sends.
"""

from __future__ import annotations

import enum
import logging
import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx

from mhc_compile import ops, spec
from mhc_compile.options import MHCOptions
from mhc_compile.passes import graph_facts, stream_layout
from mhc_compile.passes.context import PassContext
from mhc_compile.passes.find_residual_blocks import ResidualAnalysis

log = logging.getLogger(__name__)

ANNOTATION_KEY = "mhc_pipeline"
BLOCK_KEY = "mhc_block"
OVERLAP_KEY = "mhc_overlap"
CUT_KEY = "mhc_cut"


class CutProblem(enum.Enum):
    """Why a block boundary is not a legal stage cut. The value is the sentence the report prints."""

    STREAM_VALUE = "{name} is computed from the residual streams before the cut and read after it"
    NOT_A_TENSOR = "{name} crosses the cut but is not a tensor"


@dataclass(frozen=True)
class BlockCost:
    """Forward estimate of a span of the graph: flops, bytes moved, and the roofline cost
    (flop-equivalents, summed node by node; spec.roofline_cost) that balancing uses."""

    flops: int = 0
    bytes: int = 0
    cost: int = 0

    def __add__(self, other: "BlockCost") -> "BlockCost":
        return BlockCost(self.flops + other.flops, self.bytes + other.bytes, self.cost + other.cost)


@dataclass(frozen=True)
class CutPoint:
    """The boundary just before block `before` (between blocks before-1 and before)."""

    before: int
    node: str  # the coefficients node of block `before`: the first node of the next stage
    streams: str  # the n-stream tensor that crosses
    pass_through: tuple[str, ...]  # every other value crossing (parameters excluded)
    stream_bytes: int  # size of the n-stream tensor for the traced batch
    problem: str = ""  # "" when legal, else why not (a CutProblem sentence)

    @property
    def legal(self) -> bool:
        return not self.problem


@dataclass(frozen=True)
class PipelineBlock:
    """One mHC block of the rewritten graph, in graph order."""

    index: int
    path: str  # module path of the residual add ("layers.3")
    key: str  # site key: module path of f's first weight ("layers.3.attention.wq")
    first: str  # its coefficients node
    post_res_mix: str  # its post/res mix node (marked overlappable)
    cost: BlockCost


@dataclass
class PipelineAnnotation:
    """What pipelining needs to know about one rewritten graph."""

    blocks: list[PipelineBlock] = field(default_factory=list)
    cuts: list[CutPoint] = field(default_factory=list)  # cuts[i] is before blocks[i + 1]
    prologue: BlockCost = BlockCost()  # before the first block (embeddings)
    epilogue: BlockCost = BlockCost()  # after the last block (final norm, head)


def annotate_pipeline(graph_module: fx.GraphModule, context: PassContext) -> int:
    """Annotate the rewritten graph; returns the number of legal stage cuts."""
    analysis, options = context.analysis, context.options
    graph = graph_module.graph
    nodes = list(graph.nodes)
    position = {node: index for index, node in enumerate(nodes)}
    firsts = [node for node in nodes if ops.spec_of(node.target) is spec.COEFFICIENTS_PRE_MIX]
    blocks_by_first = _blocks_by_first(analysis, firsts)
    annotation = PipelineAnnotation()
    starts = [position[first] for first in firsts] + [len(nodes)]
    node_costs = {node: _node_cost(node, options) for node in nodes}
    in_streams = _stream_dependent(nodes)
    last_use = {node: max((position[user] for user in node.users), default=-1) for node in nodes}
    for index, first in enumerate(firsts):
        mix = _post_res_mix_of(first)
        mix.meta[OVERLAP_KEY] = True
        end = starts[index + 1] if index + 1 < len(firsts) else position[mix] + 1
        for node in nodes[starts[index] : end]:
            node.meta[BLOCK_KEY] = index
        block = blocks_by_first.get(first)
        annotation.blocks.append(PipelineBlock(
            index=index,
            path=block.path if block else "",
            key=block.key if block else "",
            first=first.name,
            post_res_mix=mix.name,
            cost=_sum(node_costs[node] for node in nodes[starts[index] : end]),
        ))
        if index:
            cut = _cut_before(index, first, nodes, position, last_use, in_streams)
            first.meta[CUT_KEY] = cut
            annotation.cuts.append(cut)
    if firsts:
        last_mix = position[_post_res_mix_of(firsts[-1])]
        annotation.prologue = _sum(node_costs[node] for node in nodes[: starts[0]])
        annotation.epilogue = _sum(node_costs[node] for node in nodes[last_mix + 1 :])
    graph_module.meta[ANNOTATION_KEY] = annotation
    legal = sum(cut.legal for cut in annotation.cuts)
    log.debug("mhc: %d pipeline blocks, %d legal stage cuts", len(annotation.blocks), legal)
    return legal


def _blocks_by_first(analysis: ResidualAnalysis, firsts: list[fx.Node]) -> dict:
    """Each coefficients node -> the analysed block it was inserted for (just before body[0])."""
    first_set = set(firsts)
    found = {}
    for chain in analysis.chains:
        for block in chain.blocks:
            node = block.body[0].prev
            while node.op != "root" and node not in first_set:
                node = node.prev
            if node in first_set:
                found[node] = block
    return found


def _post_res_mix_of(coefficients: fx.Node) -> fx.Node:
    """coefficients -> getitem(1) (h_post) -> post_res_mix."""
    for getter in coefficients.users:
        for user in getter.users:
            if ops.spec_of(user.target) is spec.POST_RES_MIX:
                return user
    raise AssertionError(f"mhc: {coefficients.name} feeds no post/res mix")


def _stream_dependent(nodes: list[fx.Node]) -> set[fx.Node]:
    """Nodes computed from the residual streams (everything downstream of a chain's head)."""
    dependent: set[fx.Node] = set()
    for node in nodes:
        if node.target is stream_layout.enter_streams or any(
            source in dependent for source in node.all_input_nodes
        ):
            dependent.add(node)
    return dependent


def _cut_before(index, first, nodes, position, last_use, in_streams) -> CutPoint:
    """What crosses the boundary just before `first` (block `index`'s coefficients), and whether
    that is only the streams plus pass-through values."""
    cut = position[first]
    streams = first.args[0]
    crossing = [
        node for node in nodes[:cut]
        if last_use[node] >= cut and not _is_parameter(node)
    ]
    problem = ""
    for node in crossing:
        if node is streams:
            continue
        value = graph_facts.example_value(node)
        if node in in_streams:
            problem = CutProblem.STREAM_VALUE.value.format(name=node.name)
        elif value is not None and not isinstance(value, torch.Tensor):
            problem = CutProblem.NOT_A_TENSOR.value.format(name=node.name)
        if problem:
            break
    return CutPoint(
        before=index,
        node=first.name,
        streams=streams.name,
        pass_through=tuple(node.name for node in crossing if node is not streams),
        stream_bytes=_stream_bytes(streams),
        problem=problem,
    )


def _is_parameter(node: fx.Node) -> bool:
    """Weights (the model's and mHC's) live in the stage that reads them; they never cross."""
    return node.op == "placeholder" and isinstance(graph_facts.example_value(node), torch.nn.Parameter)


def _stream_bytes(streams: fx.Node) -> int:
    """Bytes of the [..., n, C] streams a cut sends, for the traced batch."""
    value = graph_facts.example_value(streams)
    return value.numel() * value.element_size() if _is_static(value) else 0


# --- cost of one node -----------------------------------------------------------------------------

_LINEAR = {F.linear}
_MATMUL = {torch.matmul, operator.matmul, torch.bmm, torch.mm}
_MATMUL_METHODS = {"matmul", "bmm", "mm", "__matmul__"}
_CONV = {F.conv1d, F.conv2d, F.conv3d}
_ATTENTION = {F.scaled_dot_product_attention}
_VIEW_METHODS = {"view", "reshape", "transpose", "permute", "expand", "unsqueeze", "squeeze",
                 "chunk", "split", "size", "dim", "flatten", "unflatten", "t"}
_VIEW_FUNCTIONS = {operator.getitem, torch.transpose, torch.reshape, torch.flatten, torch.unsqueeze,
                   torch.squeeze, torch.permute, stream_layout.enter_streams,
                   stream_layout.to_channels_last, stream_layout.from_channels_last,
                   stream_layout.read_streams}


def _node_cost(node: fx.Node, options: MHCOptions) -> BlockCost:
    if node.op not in ("call_function", "call_method", "call_module"):
        return BlockCost()
    if node.target in _VIEW_FUNCTIONS or (node.op == "call_method" and node.target in _VIEW_METHODS):
        return BlockCost()
    op = ops.spec_of(node.target)
    if op is not None:
        return _mhc_op_cost(node, op, options)
    output = graph_facts.example_value(node)
    inputs = [graph_facts.example_value(source) for source in node.all_input_nodes]
    flops = _flops(node, output, inputs)
    moved = sum(_nbytes(value) for value in (*inputs, output))
    return BlockCost(flops, moved, spec.roofline_cost(flops, moved))


def _mhc_op_cost(node: fx.Node, op: spec.OpSpec, options: MHCOptions) -> BlockCost:
    """An mhc:: op's cost from the spec: its kernels' stream traffic and flops per token."""
    streams = graph_facts.example_value(node.args[op.streams_at])
    if not _is_static(streams):
        return BlockCost()
    n, channels = streams.shape[-2:]
    tokens = streams.numel() // (n * channels)
    flops = tokens * op.forward_flops(n, channels, options.sinkhorn_iters)
    moved = tokens * op.stream_elements(n) * channels * streams.element_size()
    return BlockCost(flops, moved, spec.roofline_cost(flops, moved))


def _flops(node: fx.Node, output, inputs) -> int:
    if not _is_static(output) or not all(_is_static(v) for v in inputs if isinstance(v, torch.Tensor)):
        return 0
    target = node.target
    if target in _LINEAR and len(inputs) > 1 and isinstance(inputs[1], torch.Tensor):
        return spec.matmul_flops(output.numel(), inputs[1].shape[-1])
    if (target in _MATMUL or (node.op == "call_method" and target in _MATMUL_METHODS)) and inputs:
        return spec.matmul_flops(output.numel(), inputs[0].shape[-1])
    if target in _CONV and len(inputs) > 1:
        weight = inputs[1]
        return spec.matmul_flops(output.numel(), weight.numel() // weight.shape[0])
    if target in _ATTENTION and len(inputs) >= 3:
        return spec.attention_flops(inputs[0].shape, inputs[1].shape, inputs[2].shape)
    return output.numel()  # elementwise: about one flop per output element


def _is_static(value) -> bool:
    """A tensor whose sizes are plain ints (dynamic shapes give symbolic sizes: no estimate)."""
    return isinstance(value, torch.Tensor) and all(isinstance(size, int) for size in value.shape)


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        if not _is_static(value):
            return 0
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(item) for item in value)
    return 0


def _sum(items) -> BlockCost:
    total = BlockCost()
    for item in items:
        total = total + item
    return total
