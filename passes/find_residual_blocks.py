"""Analysis: find the residual blocks `x + f(x)` of a Dynamo graph and link them into chains.

A residual block is an add of x and y where y depends on x through a subgraph f (its body) that
holds at least one parameterised matmul, linear or convolution. Elementwise-only f (GELU's
`x + 0.044715 * x**3`) is not one. Chains: the output of one block, possibly through stream-wise
ops (relu, a per-channel norm), is the skip input of the next. Nothing here mutates the graph.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field
from typing import Callable

from torch import fx

from mhc_compile.options import MHCOptions
from mhc_compile.passes import graph_facts
from mhc_compile.passes.context import PassContext
from mhc_compile.report import SkipReason

log = logging.getLogger(__name__)


@dataclass(eq=False)
class ResidualBlock:
    """One `x + f(x)`; for a parallel residual `x + f1(x) + f2(x)`, `branches` holds both."""

    add: fx.Node
    skip: fx.Node
    branches: list[fx.Node]
    body: list[fx.Node]  # f's nodes in graph order
    weight: fx.Node | None  # f's first weight: a parameter placeholder, or a call_module node
    path: str
    key: str | None  # module path of that weight below its owner; None when no module owns it
    pattern: str
    inner_add: fx.Node | None = None
    channel_dim: int = -1
    position: int = 0  # index in its chain: which stream the block's H_pre favours at init
    skip_reason: SkipReason | None = None

    @property
    def value(self):
        return graph_facts.example_value(self.add)

    @property
    def channels(self) -> int:
        return self.value.shape[self.channel_dim]


@dataclass
class ResidualChain:
    """Blocks whose streams flow one into the next; `links[i]` are the stream-wise ops after i."""

    blocks: list[ResidualBlock]
    links: list[list[fx.Node]] = field(default_factory=list)


@dataclass
class ResidualAnalysis:
    blocks: list[ResidualBlock]
    chains: list[ResidualChain]


class _Reachability:
    """Ancestor sets of every node as bitsets (one int per node): cheap on graphs of thousands."""

    def __init__(self, graph: fx.Graph):
        self.order = {node: index for index, node in enumerate(graph.nodes)}
        self.ancestors: dict[fx.Node, int] = {}
        for node in graph.nodes:
            mask = 0
            for source in node.all_input_nodes:
                mask |= self.ancestors[source] | (1 << self.order[source])
            self.ancestors[node] = mask

    def depends_on(self, node: fx.Node, source: fx.Node) -> bool:
        return bool(self.ancestors[node] >> self.order[source] & 1)

    def body(self, skip: fx.Node, outputs: list[fx.Node]) -> list[fx.Node]:
        """Nodes on a path from `skip` to any of `outputs` (outputs included, skip excluded)."""
        wanted = 0
        for output in outputs:
            wanted |= self.ancestors[output] | (1 << self.order[output])
        start, stop = self.order[skip], max(self.order[o] for o in outputs)
        nodes = list(self.order)
        return [
            node for node in nodes[start + 1 : stop + 1]
            if wanted >> self.order[node] & 1 and self.depends_on(node, skip)
        ]


SiteKey = Callable[[fx.Node], "str | None"]


def find_residual_chains(graph_module: fx.GraphModule, context: PassContext) -> int:
    """Find every residual block and chain into `context.analysis`; returns how many blocks.
    The context's parameter_inputs are the placeholders holding weights; its `site_key(weight)`
    names the module of a block's first weight (a parameter placeholder or a call_module node)
    below the module that will hold its mHC parameters, None if none can."""
    options, parameters, site_key = context.options, context.parameter_inputs, context.site_key
    reach = _Reachability(graph_module.graph)
    weights = _weight_derived(graph_module.graph, parameters)
    site = _Site(graph_module, parameters, weights, site_key)
    blocks = []
    claimed: set[fx.Node] = set()  # outer adds already merged into a parallel residual
    for node in graph_module.graph.nodes:
        if node in claimed or not graph_facts.is_add(node):
            continue
        block = (_match_block(node, reach, site) or _match_projection_shortcut(node, reach, site)
                 or _match_hyper_connection(node, reach, site)
                 or _match_split_by_graph_break(node, parameters))
        if block is None:
            continue
        _merge_parallel_branch(block, reach, site)
        if block.inner_add is not None:
            claimed.add(block.add)
        blocks.append(block)
    _check_blocks(blocks, options, reach.order)
    chains = _link_chains(blocks)
    log.debug("mhc: %d residual blocks, %d chains", len(blocks), len(chains))
    context.analysis = ResidualAnalysis(blocks, chains)
    return len(blocks)


def _weight_derived(graph: fx.Graph, parameters: set[fx.Node]) -> set[fx.Node]:
    """Nodes computed from parameters alone (a weight, its transpose, an expert's slice)."""
    derived = set()
    for node in graph.nodes:
        if node in parameters or node.op == "get_attr":
            derived.add(node)
        elif node.op != "placeholder" and node.all_input_nodes and all(
            source in derived for source in node.all_input_nodes
        ):
            derived.add(node)
    return derived


class _Site:
    """Finds the weighted ops of a body and names where their weights live."""

    def __init__(self, graph_module: fx.GraphModule, parameters: set[fx.Node],
                 weights: set[fx.Node], site_key: SiteKey):
        self.graph_module, self.parameters, self.weights = graph_module, parameters, weights
        self.site_key = site_key

    def weighted(self, body: list[fx.Node]) -> list[fx.Node]:
        """The matmuls, linears and convolutions of `body` that read a parameter."""
        return [
            node for node in body
            if graph_facts.is_weighted(node, self.graph_module)
            and (node.op == "call_module" or any(s in self.weights for s in node.all_input_nodes))
        ]

    def of(self, add: fx.Node, body: list[fx.Node]) -> tuple[fx.Node | None, str | None, str]:
        """(first weight, its site key, the add's module path) of a block: the weight is the
        one the body's first weighted op reads. The path is the frame's (graph_facts.module_path)
        moved below the owner the key is relative to, so that both name modules alike."""
        weighted = self.weighted(body)
        weight = self._parameter_of(weighted[0]) if weighted else None
        key = None if weight is None else self.site_key(weight)
        path = graph_facts.module_path(add) or ""
        op_path = graph_facts.module_path(weighted[0]) if weighted else None
        if key is not None and op_path and key.endswith(op_path):
            owner_prefix = key[: len(key) - len(op_path)]
            path = (owner_prefix + path).rstrip(".")
        return weight, key, path

    def _parameter_of(self, op: fx.Node) -> fx.Node | None:
        """The parameter placeholder a weighted op reads (through transposes, slices), or the op
        itself where Dynamo kept the module as a call_module."""
        if op.op == "call_module":
            return op
        frontier = [s for s in op.all_input_nodes if s in self.weights]
        while frontier:
            node = frontier.pop(0)
            if node in self.parameters:
                return node
            frontier.extend(s for s in node.all_input_nodes if s in self.weights)
        return None


def _match_block(add, reach, site: _Site) -> ResidualBlock | None:
    operands = graph_facts.add_operands(add)
    if operands is None:
        return None
    skip_and_branch = _skip_and_branch(*operands, reach)
    if skip_and_branch is None:
        return None
    skip, branch = skip_and_branch
    body = reach.body(skip, [branch])
    if not site.weighted(body):
        return None
    weight, key, path = site.of(add, body)
    pattern = "residual"
    if graph_facts.is_inplace(add):
        pattern = "in-place residual"
    elif graph_facts.is_mul(branch):
        pattern = "scaled residual"
    return ResidualBlock(add, skip, [branch], body, weight, path, key, pattern)


def _skip_and_branch(left: fx.Node, right: fx.Node, reach) -> tuple[fx.Node, fx.Node] | None:
    """(x, f(x)) of an add's operands: x is the one the other depends on, possibly through a
    dtype cast on the skip side (`x.to(float32) + f(x)`; a no-op cast where dtypes agree, and a
    dtype mismatch the checks report where they do not)."""
    for skip, branch in ((left, right), (right, left)):
        if reach.depends_on(branch, skip):
            return skip, branch
    for cast, branch in ((left, right), (right, left)):
        source = graph_facts.cast_source(cast)
        if source is not cast and reach.depends_on(branch, source):
            return source, branch
    return None


def _match_projection_shortcut(add, reach, site: _Site) -> ResidualBlock | None:
    """`f(x) + norm(conv(x))` (ResNet's downsampling blocks): reported, never rewritten."""
    operands = graph_facts.add_operands(add)
    if operands is None:
        return None
    for shortcut, branch in (operands, operands[::-1]):
        source = graph_facts.projection_source(shortcut)
        if source is None or not reach.depends_on(branch, source):
            continue
        body = reach.body(source, [branch])
        if site.weighted(body):
            return _left_plain(add, source, branch, body, site, "projection shortcut",
                               SkipReason.PROJECTION_SHORTCUT)
    return None


def _left_plain(add, skip, branch, body, site: _Site, pattern: str,
                reason: SkipReason) -> ResidualBlock:
    """A block found only to be reported: rejected when matched, with its reason."""
    weight, key, path = site.of(add, body)
    block = ResidualBlock(add, skip, [branch], body, weight, path, key, pattern)
    block.skip_reason = reason
    return block


def _match_hyper_connection(add, reach, site: _Site) -> ResidualBlock | None:
    """`H_res^T @ streams + H_post f(H_pre streams)` written by the model itself (DeepSeek-V4,
    hand-written HC/mHC): one operand multiplies the n streams [..., n, C] by an n x n matrix,
    the other is a parameterised f of the same streams. Reported, never rewritten again."""
    operands = graph_facts.add_operands(add)
    if operands is None:
        return None
    output = graph_facts.example_value(add)
    for mix, update in (operands, operands[::-1]):
        if not graph_facts.is_matmul(mix) or len(mix.all_input_nodes) != 2:
            continue
        for streams, matrix in (mix.all_input_nodes, mix.all_input_nodes[::-1]):
            value, matrix_value = map(graph_facts.example_value, (streams, matrix))
            if (value is None or matrix_value is None or value.dim() < 3
                    or tuple(value.shape) != tuple(output.shape)
                    or not 2 <= value.shape[-2] <= _MAX_STREAMS
                    or tuple(matrix_value.shape[-2:]) != (value.shape[-2],) * 2):
                continue
            body = reach.body(streams, [update]) if reach.depends_on(update, streams) else []
            if site.weighted(body):
                return _left_plain(add, streams, update, body, site, "existing hyper-connection",
                                   SkipReason.HYPER_CONNECTION)
    return None


def _match_split_by_graph_break(add, parameters: set[fx.Node]) -> ResidualBlock | None:
    """`x + h` where both are inputs of the graph: after a graph break between `h = f(x)` and
    the add, Dynamo starts a new graph that receives x and f(x) as inputs. Reported: f ran in
    another graph, so there is no f here to read the streams."""
    operands = graph_facts.add_operands(add)
    if operands is None or graph_facts.is_inplace(add):
        return None
    left, right = operands
    if any(graph_facts.view_source(o).op != "placeholder" or graph_facts.view_source(o) in parameters
           for o in operands):
        return None
    left_value, right_value = graph_facts.example_value(left), graph_facts.example_value(right)
    if (left_value is None or right_value is None or left_value.dim() == 0
            or tuple(left_value.shape) != tuple(right_value.shape)
            or left_value.dtype != right_value.dtype or not left_value.is_floating_point()):
        return None
    block = ResidualBlock(add, left, [right], [], None, graph_facts.module_path(add) or "", None,
                          "residual split by a graph break")
    block.skip_reason = SkipReason.GRAPH_BREAK
    return block


_MAX_STREAMS = 16  # hyper-connection models use 2-8 streams; wider is an ordinary batch dim


def _merge_parallel_branch(block, reach, site: _Site) -> None:
    """`x + f1(x) + f2(x)` (GPT-NeoX, Phi): the outer add's other operand also reads x."""
    users = list(block.add.users)
    if len(users) != 1 or not graph_facts.is_add(users[0]) or graph_facts.is_inplace(block.add):
        return
    outer = users[0]
    operands = graph_facts.add_operands(outer)
    if operands is None:
        return
    other = operands[1] if operands[0] is block.add else operands[0]
    if not reach.depends_on(other, block.skip) or reach.depends_on(other, block.add):
        return
    second_body = reach.body(block.skip, [other])
    if not site.weighted(second_body):
        return
    block.branches.append(other)
    block.body = reach.body(block.skip, block.branches)
    block.inner_add, block.add = block.add, outer
    block.pattern = "parallel residual"


def _check_blocks(blocks: list[ResidualBlock], options: MHCOptions, order) -> None:
    """Give each block that cannot be rewritten its reason; the graph is not touched."""
    # Blocks rejected when matched (projection shortcuts, the model's own hyper-connections)
    # stay plain, so an add around them is no nesting.
    candidates = [block for block in blocks if block.skip_reason is None]
    adds = {block.add: block for block in candidates} | {b.inner_add: b for b in candidates if b.inner_add}
    owned: dict[fx.Node, ResidualBlock] = {}
    for block in blocks:
        # A block whose f holds another block is left alone; the inner one is rewritten.
        if block.skip_reason is not None:  # decided when matched (projection shortcuts)
            continue
        nested = any(node in adds and adds[node] is not block for node in block.body)
        block.skip_reason = SkipReason.NESTED if nested else _skip_reason(block, owned, options, order)
        if block.skip_reason is None:
            owned.update((node, block) for node in block.body)
            block.channel_dim = (1 if block.value.dim() >= 3
                                 and graph_facts.convolves_channels_first(block.body, block.value)
                                 else -1)
            if not isinstance(block.channels, int):
                block.skip_reason = SkipReason.DYNAMIC_CHANNELS


def _skip_reason(block, owned, options: MHCOptions, order) -> SkipReason | None:
    skip_value = graph_facts.example_value(block.skip)
    branch_values = [graph_facts.example_value(b) for b in block.branches]
    if not _matches_patterns(block, options):
        return SkipReason.EXCLUDED
    if skip_value.dim() == 0:
        return SkipReason.SCALAR_SHAPE
    if any(tuple(v.shape) != tuple(skip_value.shape) for v in branch_values):
        return SkipReason.BROADCAST
    # Under autocast f(x) is often bf16 while x stays float32: the add promotes to x's dtype,
    # and so does the post/res mix (it returns the streams' dtype), so only the result must match.
    if graph_facts.example_value(block.add).dtype != skip_value.dtype:
        return SkipReason.DTYPE_MISMATCH
    if graph_facts.is_inplace(block.add) or (
        block.inner_add is not None and graph_facts.is_inplace(block.inner_add)
    ):
        if graph_facts.aliases_graph_input(block.skip):
            return SkipReason.INPLACE_INPUT
        if any(order[user] > order[block.add] for user in block.skip.users):
            return SkipReason.INPLACE_ALIAS
    if any(node in owned for node in block.body):
        return SkipReason.SHARED_BODY
    if block.key is None:
        return SkipReason.NO_OWNER_MODULE
    return None


def _matches_patterns(block: ResidualBlock, options: MHCOptions) -> bool:
    names = (block.path, block.key or "")
    matches = lambda patterns: any(fnmatch.fnmatchcase(n, p) for n in names for p in patterns)
    if options.include and not matches(options.include):
        return False
    return not matches(options.exclude)


def _link_chains(blocks: list[ResidualBlock]) -> list[ResidualChain]:
    """Follow each rewritable block's output, through stream-wise ops, to the next block's skip."""
    by_skip: dict[fx.Node, ResidualBlock] = {}
    for block in blocks:
        if block.skip_reason is None:
            by_skip.setdefault(block.skip, block)
    successors: dict[ResidualBlock, tuple[ResidualBlock, list[fx.Node]]] = {}
    for block in blocks:
        if block.skip_reason is None:
            found = _next_block(block, by_skip)
            if found is not None and found[0] not in {s for s, _ in successors.values()}:
                successors[block] = found
    has_predecessor = {successor for successor, _ in successors.values()}
    chains = []
    for block in blocks:
        if block.skip_reason is not None or block in has_predecessor:
            continue
        chain = ResidualChain([block])
        while chain.blocks[-1] in successors:
            successor, link = successors[chain.blocks[-1]]
            successor.position = len(chain.blocks)
            chain.links.append(link)
            chain.blocks.append(successor)
        chains.append(chain)
    return chains


def _next_block(block: ResidualBlock, by_skip) -> tuple[ResidualBlock, list[fx.Node]] | None:
    """Breadth over stream-wise single-input ops from the block's output to a compatible block."""
    channels_last = block.channel_dim == -1
    frontier = [(block.add, [])]
    while frontier:
        node, link = frontier.pop(0)
        successor = by_skip.get(node)
        if successor is not None and successor is not block and _compatible(block, successor):
            return successor, link
        for user in node.users:
            if graph_facts.is_streamwise(user, channels_last, block.channels) and (
                user.args and user.args[0] is node
            ):
                frontier.append((user, [*link, user]))
    return None


def _compatible(block: ResidualBlock, successor: ResidualBlock) -> bool:
    a, b = block.value, successor.value
    return (
        tuple(a.shape) == tuple(b.shape)
        and a.dtype == b.dtype
        and a.device == b.device
        and block.channel_dim == successor.channel_dim
    )
