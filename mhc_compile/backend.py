"""The `mhc` torch.compile backend: analyse, create parameters, rewrite, hand to Inductor.

`torch.compile(model, backend="mhc")` finds `mhc_backend` through the `torch_dynamo_backends`
entry point; do not also register the name here (the entry point would then fail as a duplicate).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import fx, nn

from mhc_compile import _dynamo_compat, costs, reference
from mhc_compile.options import MHCOptions
from mhc_compile.parameters import MHCParameters, parameters_of
from mhc_compile.passes import graph_facts
from mhc_compile.passes.find_residual_blocks import ResidualAnalysis, find_residual_chains
from mhc_compile.passes.rewrite_mhc import BlockParameterNodes, rewrite_mhc
from mhc_compile.report import BlockReport, Report, SkipReason

log = logging.getLogger("mhc_compile")


class MHCBackend:
    """A configured backend. Each call compiles one Dynamo graph and adds its blocks to `report`.

    analyze_only: find and report blocks, create nothing, run the graph unchanged (for `report`).
    """

    def __init__(self, options: MHCOptions, analyze_only: bool = False):
        self.options = options
        self.analyze_only = analyze_only
        self.report = Report(n=options.n, constraint=options.constraint)
        self._graphs = 0

    def __call__(self, graph_module: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        graph_index, self._graphs = self._graphs, self._graphs + 1
        graph_module = _dynamo_compat.copy_graph_module(graph_module)
        placeholders = [n for n in graph_module.graph.nodes if n.op == "placeholder"]
        weights = {n for n, v in zip(placeholders, example_inputs) if isinstance(v, nn.Parameter)}
        analysis = find_residual_chains(graph_module, self.options, weights)
        stores = _owner_stores(analysis, create=not self.analyze_only)
        blocks, created = self._block_parameters(analysis, stores)
        self.report.blocks.extend(_block_reports(analysis, graph_index, self.options))
        log.info("%s (graph %d)", self.report.summary(), graph_index)
        for store in stores.values():
            store.warn_if_late(created)
        if self.analyze_only:
            return graph_module
        if not blocks:
            return self._compile(graph_module, example_inputs)
        parameters = [p for block in blocks.values() for p in _flat(block)]
        nodes = _add_parameter_placeholders(graph_module, blocks)
        rewrite_mhc(graph_module, analysis, nodes, self.options)
        compiled = self._compile(graph_module, [*parameters, *example_inputs])
        owners = list(stores.values())

        def run_rewritten(*args):
            for store in owners:
                store.ran_compiled_step = True
            return compiled(*parameters, *args)

        return run_rewritten

    def _compile(self, graph_module: fx.GraphModule, example_inputs) -> Callable:
        if self.options.eager:
            return graph_module
        return _dynamo_compat.compile_with_inductor(graph_module, example_inputs)

    def _block_parameters(self, analysis: ResidualAnalysis, stores):
        """Get or create every rewritten block's parameters, keyed by its site key."""
        blocks, created = {}, []
        for chain in analysis.chains:
            for position, block in enumerate(chain.blocks):
                if block.root not in stores:
                    continue
                value = block.value
                params, is_new = stores[block.root].get_or_create(
                    block.key, self.options.n, block.channels, position, self.options,
                    reference.coefficient_dtype(value.dtype), value.device,
                )
                blocks[block] = params
                if is_new:
                    created.append(block.key or "<root>")
        return blocks, created


def _owner_stores(analysis: ResidualAnalysis, create: bool) -> dict[str, MHCParameters]:
    """The parameter store of each module that owns rewritten blocks; blocks without one skip."""
    stores = {}
    for block in analysis.blocks:
        if block.skip_reason is not None or block.root in stores:
            continue
        owner = _dynamo_compat.owner_module(block.root)
        if owner is None:
            block.skip_reason = SkipReason.NO_OWNER_MODULE
        elif create:
            stores[block.root] = parameters_of(owner)
    if not create:
        return {}
    analysis.chains = [c for c in analysis.chains if c.blocks[0].root in stores]
    return stores


def _flat(params) -> tuple[torch.Tensor, ...]:
    return (params.phi, params.alpha, params.b_pre, params.b_post, params.b_res)


def _add_parameter_placeholders(graph_module: fx.GraphModule, blocks) -> dict:
    """New leading placeholders, one per mHC parameter, in the order the wrapper passes them."""
    graph = graph_module.graph
    first = next(iter(graph.nodes))
    nodes = {}
    with graph.inserting_before(first):
        for index, (block, params) in enumerate(blocks.items()):
            names = ("phi", "alpha", "b_pre", "b_post", "b_res")
            placeholders = [graph.placeholder(f"mhc_{index}_{name}") for name in names]
            for node, tensor in zip(placeholders, _flat(params)):
                node.meta["example_value"] = tensor
                _dynamo_compat.mark_parameter_input(node)
            nodes[block] = BlockParameterNodes(*placeholders)
    return nodes


def _block_reports(analysis: ResidualAnalysis, graph_index: int, options: MHCOptions):
    located = {
        block: (chain_index, position)
        for chain_index, chain in enumerate(analysis.chains)
        for position, block in enumerate(chain.blocks)
    }
    for block in analysis.blocks:
        value = block.value
        chain, position = located.get(block, (None, None))
        rewritten = chain is not None and block.skip_reason is None
        channels = value.shape[block.channel_dim] if value.dim() else 1
        fixed = isinstance(channels, int)
        yield BlockReport(
            path=block.path,
            key=block.key,
            status="rewritten" if rewritten else "skipped",
            reason="" if rewritten else (block.skip_reason or SkipReason.NO_OWNER_MODULE).value,
            graph=graph_index,
            chain=chain if rewritten else None,
            position=position if rewritten else None,
            shape=tuple(s if isinstance(s, int) else str(s) for s in value.shape),
            dtype=str(value.dtype).removeprefix("torch."),
            pattern=block.pattern,
            contains=graph_facts.kinds_of(block.body, block.add.graph.owning_module),
            params_added=costs.parameter_count(options.n, channels) if rewritten else 0,
            extra_bytes_per_token=costs.extra_bytes_per_token(
                options.n, channels, value.element_size()) if rewritten and fixed else 0,
            extra_flops_per_token=costs.extra_flops_per_token(
                options.n, channels, options.sinkhorn_iters) if rewritten and fixed else 0,
        )


def mhc_backend(
    graph_module: fx.GraphModule,
    example_inputs: Sequence[Any],
    options: Mapping[str, Any] | None = None,
    mode: str | None = None,
) -> Callable:
    """The entry-point backend: `torch.compile(model, backend="mhc", options={"n": 2})`.

    `mode` is accepted for torch.compile's signature and ignored: Inductor runs with its defaults.
    """
    return MHCBackend(MHCOptions.from_kwargs(options))(graph_module, example_inputs)
