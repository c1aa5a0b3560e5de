"""The `mhc` torch.compile backend: analyse, create parameters, rewrite, hand to Inductor.

`torch.compile(model, backend="mhc")` finds `mhc_backend` through the `torch_dynamo_backends`
entry point; do not also register the name here (the entry point would then fail as a duplicate).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import fx, nn
from torch.utils.weak import WeakIdKeyDictionary

from mhc_compile import _dynamo_compat, costs, ops, reference, templates
from mhc_compile.options import MHCOptions
from mhc_compile.parameters import MHCParameters, parameters_of
from mhc_compile.passes import graph_facts
from mhc_compile.passes.annotate_pipeline import annotate_pipeline
from mhc_compile.passes.find_residual_blocks import ResidualAnalysis, find_residual_chains
from mhc_compile.passes.inline_checkpoint import inline_checkpoint_regions
from mhc_compile.passes.rewrite_mhc import BlockParameterNodes, rewrite_mhc
from mhc_compile.report import BlockReport, Report, SkipReason

log = logging.getLogger("mhc_compile")


class MHCBackend:
    """A configured backend. Each call compiles one Dynamo graph and adds its blocks to `report`.

    analyze_only: find and report blocks, create nothing, run the graph unchanged (for `report`).
    run_unchanged: rewrite (creating the parameters, raising what a compile would raise) but run
        the graph as Dynamo traced it (for `prepare`): at init its outputs are the rewritten
        graph's, and no mHC kernel is launched, so nothing is autotuned for dtypes that training
        (under autocast, say) may not use.
    warn_late: warn when parameters appear after a compiled step of the model ran (off in
        `prepare`, whose purpose is creating them; a graph break runs graph 1 before graph 2).
    instrument: called as `instrument(graph_module, graph_index, chains, parameter_nodes)` on
        each rewritten graph before it is compiled; it may add nodes (gain.py taps the
        coefficients of every block this way).
    """

    def __init__(self, options: MHCOptions, analyze_only: bool = False,
                 top_module: nn.Module | None = None, warn_late: bool = True,
                 instrument: Callable | None = None, run_unchanged: bool = False):
        self.options = options
        self.analyze_only = analyze_only
        self.run_unchanged = run_unchanged
        self.warn_late = warn_late
        self.top_module = top_module  # where instances of a reused frame's owner are found
        self.instrument = instrument
        self.report = Report(n=options.n, constraint=options.constraint)
        self.traced_graphs = 0  # graphs Dynamo handed to this backend

    def __call__(self, graph_module: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        graph_index, self.traced_graphs = self.traced_graphs, self.traced_graphs + 1
        traced = graph_module
        graph_module = _dynamo_compat.copy_graph_module(graph_module)
        inline_checkpoint_regions(graph_module)  # blocks inside the user's checkpointed layers
        placeholders = [n for n in graph_module.graph.nodes if n.op == "placeholder"]
        weights = {n for n, v in zip(placeholders, example_inputs) if isinstance(v, nn.Parameter)}
        analysis = find_residual_chains(graph_module, self.options, weights)
        owners = _owners(analysis, example_inputs, self.top_module, create=not self.analyze_only)
        self.report.blocks.extend(_block_reports(analysis, graph_index, self.options))
        log.info("%s (graph %d)", self.report.summary(), graph_index)
        blocks = [block for chain in analysis.chains for block in chain.blocks]
        if self.analyze_only:
            return graph_module
        if not blocks:
            return self._compile(graph_module, example_inputs)
        parameters = _bind_parameters(blocks, owners, example_inputs, self.options, self.warn_late)
        nodes = _add_parameter_placeholders(graph_module, blocks, parameters)
        rewrite_mhc(graph_module, analysis, nodes, self.options)
        annotate_pipeline(graph_module, analysis, self.options)
        if self.instrument is not None:
            self.instrument(graph_module, graph_index, analysis.chains, nodes)
        compiled = (_ignoring_parameters(traced) if self.run_unchanged
                    else self._compile(graph_module, [*parameters, *example_inputs]))
        bound = WeakIdKeyDictionary()  # first owner's store -> (stores, flat parameters)

        # One frame may serve several instances of its module: each call binds the calling
        # instance's parameters, creating them at that instance's first call.
        def run_rewritten(*args):
            stores = [owner.store_for(args) for owner in owners.values()]
            cached = bound.get(stores[0])
            if cached is None or any(a is not b for a, b in zip(cached[0], stores)):
                flat = _bind_parameters(blocks, owners, args, self.options, self.warn_late)
                cached = bound[stores[0]] = (stores, flat)
            outputs = compiled(*cached[1], *args)
            for store in stores:
                store.ran_compiled_step = True
            return outputs

        return run_rewritten

    def _compile(self, graph_module: fx.GraphModule, example_inputs) -> Callable:
        if self.options.eager:
            return graph_module
        return compile_whole_ops(graph_module, example_inputs, recompute=self.options.recompute,
                                 cudagraphs=self.options.cudagraphs, mode=self.options.mode)


def compile_whole_ops(graph_module: fx.GraphModule, example_inputs, *,
                      recompute: str | int | bool = False, cudagraphs: bool = False,
                      mode: str | None = None) -> Callable:
    """Inductor on a graph that calls the mhc:: ops, as backend="mhc" compiles it: AOT autograd
    traces the ops whole, so the recompute policy and the grad-streams fold work on whole ops, and
    passes/inline_kernels.py then opens them for Inductor."""
    with ops.keep_ops_whole():
        return _dynamo_compat.compile_with_inductor(
            graph_module, example_inputs, recompute=recompute, cudagraphs=cudagraphs, mode=mode)


def _ignoring_parameters(traced: fx.GraphModule) -> Callable:
    """The graph as Dynamo traced it, called like the rewritten one (mHC parameters first)."""
    count = sum(node.op == "placeholder" for node in traced.graph.nodes)

    def run(*args):
        return traced(*args[len(args) - count:])

    return run


@dataclass(eq=False)
class _Owner:
    """The module holding a graph's mHC parameters, recognised at run time by one of its weights.

    Dynamo may run one compiled frame for many instances of the owner's class; `anchor_index`
    points at an owner weight among the graph inputs, so each instance finds its own store.
    """

    module: nn.Module
    anchor_index: int
    anchor_name: str  # the anchor weight's path below the owner
    top_module: nn.Module | None
    stores: WeakIdKeyDictionary = field(default_factory=WeakIdKeyDictionary)

    def store_for(self, args: Sequence[Any]) -> MHCParameters:
        anchor = args[self.anchor_index]
        store = self.stores.get(anchor)
        if store is None:
            store = parameters_of(self._instance_owning(anchor))
            self.stores[anchor] = store
        return store

    def _instance_owning(self, anchor: torch.Tensor) -> nn.Module:
        if any(p is anchor for p in self.module.parameters()):
            return self.module
        for name, parameter in (self.top_module.named_parameters() if self.top_module else ()):
            if parameter is anchor and name.endswith(self.anchor_name):
                return self.top_module.get_submodule(name[: -len(self.anchor_name)].rstrip("."))
        raise RuntimeError(
            f"mhc: a compiled graph of {type(self.module).__name__} ran for another instance whose "
            "module could not be found. Compile the top-level model (torch.compile(model, "
            "backend='mhc')) or call mhc_compile.prepare(model, *example_args) first."
        )


def _owners(analysis, example_inputs, top_module, create: bool) -> dict[str, _Owner]:
    """The owner of each module root holding rewritten blocks; blocks without one are skipped."""
    owners: dict[str, _Owner] = {}
    for block in analysis.blocks:
        if block.skip_reason is not None or block.root in owners:
            continue
        module = _dynamo_compat.owner_module(block.root)
        anchor = None if module is None else _anchor(module, example_inputs)
        if anchor is None:
            block.skip_reason = SkipReason.NO_OWNER_MODULE
            continue
        top = top_module or _dynamo_compat.calling_top_module()
        owners[block.root] = _Owner(module, *anchor, top_module=top)
    for block in analysis.blocks:
        if block.skip_reason is None and block.root not in owners:
            block.skip_reason = SkipReason.NO_OWNER_MODULE
    analysis.chains = [c for c in analysis.chains if c.blocks[0].root in owners]
    return owners if create else {}


def _anchor(module: nn.Module, example_inputs) -> tuple[int, str] | None:
    names = {id(p): name for name, p in module.named_parameters()}
    for index, value in enumerate(example_inputs):
        if isinstance(value, nn.Parameter) and id(value) in names:
            return index, names[id(value)]
    return None


def _bind_parameters(blocks, owners: dict[str, _Owner], args, options, warn_late: bool):
    """Every block's (phi, alpha, b_pre, b_post, b_res), from the store of the running instance."""
    stores = {root: owner.store_for(args) for root, owner in owners.items()}
    created, flat = [], []
    for block in blocks:
        params, is_new = stores[block.root].get_or_create(
            block.key, options.n, block.channels, block.position, options,
            reference.coefficient_dtype(block.value.dtype), block.value.device,
        )
        flat.extend(_flat(params))
        if is_new:
            created.append(block.key or "<root>")
    if warn_late:
        for store in stores.values():
            store.warn_if_late(created)
    return flat


def _flat(params) -> tuple[torch.Tensor, ...]:
    return (params.phi, params.alpha, params.b_pre, params.b_post, params.b_res)


def _add_parameter_placeholders(graph_module: fx.GraphModule, blocks, parameters) -> dict:
    """New leading placeholders, one per mHC parameter, in the order the wrapper passes them."""
    graph = graph_module.graph
    first = next(iter(graph.nodes))
    nodes = {}
    names = ("phi", "alpha", "b_pre", "b_post", "b_res")
    with graph.inserting_before(first):
        for index, block in enumerate(blocks):
            placeholders = [graph.placeholder(f"mhc_{index}_{name}") for name in names]
            tensors = parameters[len(names) * index : len(names) * (index + 1)]
            for node, tensor in zip(placeholders, tensors):
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
        streams_dtype = options.streams_dtype_for(value.dtype)
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
                options.n, channels, streams_dtype.itemsize) if rewritten and fixed else 0,
            extra_flops_per_token=costs.extra_flops_per_token(
                options.n, channels, options.sinkhorn_iters) if rewritten and fixed else 0,
            ops=(templates.implementation(value.device, streams_dtype, options.n)
                 if rewritten else ""),
        )


def mhc_backend(
    graph_module: fx.GraphModule,
    example_inputs: Sequence[Any],
    options: Mapping[str, Any] | None = None,
    mode: str | None = None,
) -> Callable:
    """The entry-point backend: `torch.compile(model, backend="mhc", options={"n": 2})`, or
    `torch.compile(model, backend="mhc", mode="reduce-overhead")`: Inductor runs in that mode
    (torch.compile passes one of options= and mode=, never both)."""
    chosen = MHCOptions.from_kwargs(options, **({} if mode is None else {"mode": mode}))
    return MHCBackend(chosen)(graph_module, example_inputs)
