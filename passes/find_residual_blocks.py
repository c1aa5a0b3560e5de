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

from torch import fx

from mhc_compile.options import MHCOptions
from mhc_compile.passes import graph_facts
from mhc_compile.report import SkipReason

log = logging.getLogger(__name__)


@dataclass(eq=False)
class ResidualBlock:
    """One `x + f(x)`; for a parallel residual `x + f1(x) + f2(x)`, `branches` holds both."""

    add: fx.Node
    skip: fx.Node
    branches: list[fx.Node]
    body: list[fx.Node]  # f's nodes in graph order
    root: str  # Dynamo's name of the module the paths start from, e.g. "L['self']"
    path: str
    key: str
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


def find_residual_chains(
    graph_module: fx.GraphModule, options: MHCOptions, parameters: set[fx.Node]
) -> ResidualAnalysis:
    """Find every residual block and chain. `parameters` are the placeholders holding weights."""
    reach = _Reachability(graph_module.graph)
    weights = _weight_derived(graph_module.graph, parameters)
    blocks = []
    claimed: set[fx.Node] = set()  # outer adds already merged into a parallel residual
    for node in graph_module.graph.nodes:
        if node in claimed or not graph_facts.is_add(node):
            continue
        block = _match_block(node, reach, weights, graph_module) or _match_projection_shortcut(
            node, reach, weights, graph_module
        )
        if block is None:
            continue
        _merge_parallel_branch(block, reach, weights, graph_module)
        if block.inner_add is not None:
            claimed.add(block.add)
        blocks.append(block)
    _check_blocks(blocks, options, reach.order)
    chains = _link_chains(blocks)
    log.info("mhc: %d residual blocks, %d chains", len(blocks), len(chains))
    return ResidualAnalysis(blocks, chains)


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


def _is_parameterised(body, weights: set[fx.Node], graph_module: fx.GraphModule) -> bool:
    return any(
        graph_facts.is_weighted(node, graph_module)
        and (node.op == "call_module" or any(s in weights for s in node.all_input_nodes))
        for node in body
    )


def _match_block(add, reach, weights, graph_module) -> ResidualBlock | None:
    operands = graph_facts.add_operands(add)
    if operands is None:
        return None
    left, right = operands
    if reach.depends_on(right, left):
        skip, branch = left, right
    elif reach.depends_on(left, right):
        skip, branch = right, left
    else:
        return None
    body = reach.body(skip, [branch])
    if not _is_parameterised(body, weights, graph_module):
        return None
    _, path = graph_facts.module_path(add) or ("", "")
    root, key = _site(body, graph_module, path)
    pattern = "residual"
    if graph_facts.is_inplace(add):
        pattern = "in-place residual"
    elif graph_facts.is_mul(branch):
        pattern = "scaled residual"
    return ResidualBlock(add, skip, [branch], body, root, path, key, pattern)


def _match_projection_shortcut(add, reach, weights, graph_module) -> ResidualBlock | None:
    """`f(x) + norm(conv(x))` (ResNet's downsampling blocks): reported, never rewritten."""
    operands = graph_facts.add_operands(add)
    if operands is None:
        return None
    for shortcut, branch in (operands, operands[::-1]):
        source = graph_facts.projection_source(shortcut)
        if source is None or not reach.depends_on(branch, source):
            continue
        body = reach.body(source, [branch])
        if _is_parameterised(body, weights, graph_module):
            _, path = graph_facts.module_path(add) or ("", "")
            root, key = _site(body, graph_module, path)
            block = ResidualBlock(add, source, [branch], body, root, path, key, "projection shortcut")
            block.skip_reason = SkipReason.PROJECTION_SHORTCUT
            return block
    return None


def _site(body, graph_module, path: str) -> tuple[str, str]:
    """(owner root, site key): where f's first parameterised op lives. The key is stable across
    recompiles and graph breaks, and distinct for the attention and MLP residuals of one
    transformer block; the root names the module that owns those parameters ("" if none)."""
    for node in body:
        if graph_facts.is_weighted(node, graph_module):
            located = graph_facts.module_path(node)
            if located:
                return located[0], node.target if node.op == "call_module" else located[1]
    return "", path


def _merge_parallel_branch(block, reach, weights, graph_module) -> None:
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
    if not _is_parameterised(second_body, weights, graph_module):
        return
    block.branches.append(other)
    block.body = reach.body(block.skip, block.branches)
    block.inner_add, block.add = block.add, outer
    block.pattern = "parallel residual"


def _check_blocks(blocks: list[ResidualBlock], options: MHCOptions, order) -> None:
    """Give each block that cannot be rewritten its reason; the graph is not touched."""
    adds = {block.add: block for block in blocks} | {b.inner_add: b for b in blocks if b.inner_add}
    owned: dict[fx.Node, ResidualBlock] = {}
    for block in blocks:
        # A block whose f holds another block is left alone; the inner one is rewritten.
        if block.skip_reason is not None:  # decided when matched (projection shortcuts)
            continue
        nested = any(node in adds and adds[node] is not block for node in block.body)
        block.skip_reason = SkipReason.NESTED if nested else _skip_reason(block, owned, options, order)
        if block.skip_reason is None:
            owned.update((node, block) for node in block.body)
            block.channel_dim = 1 if graph_facts.has_conv(block.body) and block.value.dim() >= 3 else -1
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
    if not block.root:
        return SkipReason.NO_OWNER_MODULE
    return None


def _matches_patterns(block: ResidualBlock, options: MHCOptions) -> bool:
    names = (block.path, block.key)
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
        and block.root == successor.root
    )
