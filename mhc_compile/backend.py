"""The `mhc` torch.compile backend: analyse, create parameters, rewrite, hand to Inductor.

`torch.compile(model, backend="mhc")` finds `mhc_backend` through the `torch_dynamo_backends`
entry point; do not also register the name here (the entry point would then fail as a duplicate).
"""

from __future__ import annotations

import collections
import logging
import warnings
import weakref
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import fx, nn
from torch.utils.weak import WeakIdKeyDictionary

from mhc_compile import private_apis, costs, ops, reference, templates
from mhc_compile.options import MHCOptions
from mhc_compile.owners import Owners, Site
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
        self.top_module = top_module  # owns the mHC parameters of every block whose weights it owns
        self.instrument = instrument
        self.report = Report(n=options.n, constraint=options.constraint)
        self.traced_graphs = 0  # graphs Dynamo handed to this backend

    def __call__(self, graph_module: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        graph_index, self.traced_graphs = self.traced_graphs, self.traced_graphs + 1
        traced = graph_module
        graph_module = private_apis.copy_graph_module(graph_module)
        inline_checkpoint_regions(graph_module)  # blocks inside the user's checkpointed layers
        placeholders = [n for n in graph_module.graph.nodes if n.op == "placeholder"]
        weights = _Weights(graph_module, placeholders)
        owners = Owners(self.top_module)
        sites: dict[fx.Node, Site | None] = {}

        def site_key(weight: fx.Node) -> str | None:
            sites[weight] = owners.site(weights.of(weight, example_inputs))
            return None if sites[weight] is None else sites[weight].key

        parameters = {n for n, v in zip(placeholders, example_inputs) if isinstance(v, nn.Parameter)}
        analysis = find_residual_chains(graph_module, self.options, parameters, site_key)
        graph_blocks = list(_block_reports(analysis, graph_index, self.options))
        self.report.blocks.extend(graph_blocks)
        log.info("%s (graph %d)", self.report.summary(), graph_index)
        blocks = [block for chain in analysis.chains for block in chain.blocks]
        if self.analyze_only:
            return graph_module
        if self.warn_late:  # a compile the user asked for, not prepare/gain's own traces
            rewritten_sites = {sites[block.weight] for block in blocks}
            warn_if_incomplete(graph_blocks, bool(parameters), owners.compiled_module(),
                               _without_their_mhc(placeholders, parameters, rewritten_sites,
                                                  example_inputs, owners))
            if blocks:
                private_apis.fail_past_recompile_limit()
        if not blocks:
            return self._compile(graph_module, example_inputs)
        binding = _Binding(blocks, weights, self.options, self.warn_late)
        parameters = binding.bind(example_inputs, [sites[block.weight] for block in blocks])
        nodes = _add_parameter_placeholders(graph_module, blocks, parameters)
        rewrite_mhc(graph_module, analysis, nodes, self.options)
        annotate_pipeline(graph_module, analysis, self.options)
        if self.instrument is not None:
            self.instrument(graph_module, graph_index, analysis.chains, nodes)
        compiled = (_ignoring_parameters(traced) if self.run_unchanged
                    else self._compile(graph_module, [*parameters, *example_inputs]))

        def run_rewritten(*args):
            return compiled(*binding.parameters_for(args), *args)

        return run_rewritten

    def _compile(self, graph_module: fx.GraphModule, example_inputs) -> Callable:
        if self.options.eager:
            return graph_module
        return compile_whole_ops(graph_module, example_inputs, recompute=self.options.recompute,
                                 cudagraphs=self.options.cudagraphs, mode=self.options.mode)


# Each distinct warning once per compiled module, however many recompiles and graphs it has.
_WARNED: "weakref.WeakKeyDictionary[Any, set[str]]" = weakref.WeakKeyDictionary()


def _without_their_mhc(placeholders, parameters, rewritten_sites: set[Site], example_inputs,
                       owners: Owners) -> int:
    """How many sites with mHC parameters existing already this graph reads the weights of
    without rewriting their block: it computes those blocks without their trained mHC (a
    module's other code path, such as nn.TransformerEncoderLayer's fused no_grad fast path)."""
    orphaned = set()
    for node, value in zip(placeholders, example_inputs):
        if node in parameters:
            site = owners.site(value)
            if site is not None and site not in rewritten_sites and site.has_parameters():
                orphaned.add(site)
    return len(orphaned)


def warn_if_incomplete(blocks: list[BlockReport], holds_weights: bool,
                       module: nn.Module | None, without_mhc: int = 0) -> None:
    """Say once, loudly, that a compiled graph of `module` kept residual blocks plain, rewrote
    nothing, or runs the weights of existing mHC blocks without their mHC parameters."""
    skipped = [block for block in blocks if block.status == "skipped"]
    rewritten = len(blocks) - len(skipped)
    name = "a compiled graph" if module is None else f"a compiled graph of {type(module).__name__}"
    if without_mhc:
        message = (
            f"mhc: {name} runs the weights of {without_mhc} block(s) that have mHC parameters "
            "without them, so it computes another function than the rewritten model (for "
            "nn.TransformerEncoderLayer in eval mode under no_grad, PyTorch's fused fast path; "
            "torch.backends.mha.set_fastpath_enabled(False) turns it off)"
        )
    elif skipped:
        reasons = collections.Counter(block.reason for block in skipped).most_common(3)
        message = (
            f"mhc: {len(skipped)} residual block(s) of {name} stay plain residuals "
            f"({rewritten} rewritten). Main reasons: "
            + "; ".join(f"{count} x {reason}" for reason, count in reasons)
        )
    elif not blocks and holds_weights:
        message = (
            f"mhc: {name} holds weights but no residual block x + f(x) was found, so it "
            "runs unchanged (no mHC). If the residual add is split from f by a graph break, "
            "TORCH_LOGS=graph_breaks shows where"
        )
    else:
        return
    message += ". mhc_compile.report(model, *example_args).print() lists every block and why."
    warned = _WARNED.setdefault(warn_if_incomplete if module is None else module, set())
    if message not in warned:
        warned.add(message)
        warnings.warn(message, stacklevel=2)


def compile_whole_ops(graph_module: fx.GraphModule, example_inputs, *,
                      recompute: str | int | bool = False, cudagraphs: bool = False,
                      mode: str | None = None) -> Callable:
    """Inductor on a graph that calls the mhc:: ops, as backend="mhc" compiles it: AOT autograd
    traces the ops whole, so the recompute policy and the grad-streams fold work on whole ops, and
    passes/inline_kernels.py then opens them for Inductor."""
    with ops.keep_ops_whole():
        return private_apis.compile_with_inductor(
            graph_module, example_inputs, recompute=recompute, cudagraphs=cudagraphs, mode=mode)


def _ignoring_parameters(traced: fx.GraphModule) -> Callable:
    """The graph as Dynamo traced it, called like the rewritten one (mHC parameters first)."""
    count = sum(node.op == "placeholder" for node in traced.graph.nodes)

    def run(*args):
        return traced(*args[len(args) - count:])

    return run


class _Weights:
    """The Parameter each block's site weight is, in the call at hand: a placeholder's argument,
    or the first parameter of a module Dynamo kept as a call_module."""

    def __init__(self, graph_module: fx.GraphModule, placeholders: list[fx.Node]):
        self.graph_module = graph_module
        self.index = {node: position for position, node in enumerate(placeholders)}

    def of(self, weight: fx.Node, args: Sequence[Any]) -> torch.Tensor:
        if weight.op == "placeholder":
            return args[self.index[weight]]
        return next(self.graph_module.get_submodule(weight.target).parameters())


class _Binding:
    """Each block's mHC parameters for the instance a call runs for.

    Dynamo may run one compiled frame for several instances of a module class (a graph break in
    a loop over layers compiles each layer's forward once; so does compiling blocks one by one):
    the blocks' weights among the call's arguments say which instance it is, and each instance
    binds its own parameters once, creating them at its first call.
    """

    def __init__(self, blocks, weights: _Weights, options: MHCOptions, warn_late: bool):
        self.blocks, self.weights, self.options, self.warn_late = blocks, weights, options, warn_late
        # first block's weight -> (weak references to every block's weight, stores, parameters)
        self.bound = WeakIdKeyDictionary()

    def bind(self, args: Sequence[Any], sites: list[Site | None] | None = None) -> list[torch.Tensor]:
        """Every block's (phi, alpha, b_pre, b_post, b_res) for the instance `args` call,
        created where missing; `sites` when the caller resolved them already."""
        return self._bound(args, sites)[2]

    def parameters_for(self, args: Sequence[Any]) -> list[torch.Tensor]:
        """`bind` for a compiled step, which marks the stores as having run one (warn_late)."""
        _, stores, flat = self._bound(args)
        for store in stores:
            store.ran_compiled_step = True
        return flat

    def _bound(self, args: Sequence[Any], sites: list[Site | None] | None = None) -> tuple:
        """(weak references to every block's weight, stores, flat parameters) of this instance."""
        current = [self.weights.of(block.weight, args) for block in self.blocks]
        cached = self.bound.get(current[0])
        if cached is None or any(ref() is not w for ref, w in zip(cached[0], current)):
            stores, flat = self._create(sites or self._sites(current))
            cached = self.bound[current[0]] = ([weakref.ref(w) for w in current], stores, flat)
        return cached

    def _create(self, sites: list[Site]) -> tuple[list, list[torch.Tensor]]:
        created, flat, stores = [], [], []
        for block, site in zip(self.blocks, sites):
            store = site.store()
            params, is_new = store.get_or_create(
                site.key, self.options.n, block.channels, block.position, self.options,
                reference.coefficient_dtype(block.value.dtype), block.value.device,
            )
            flat.extend(_flat(params))
            if all(store is not known for known in stores):
                stores.append(store)
            if is_new:
                created.append(site.key or "<root>")
        if self.warn_late:
            for store in stores:
                store.warn_if_late(created)
        return stores, flat

    def _sites(self, weights: list[torch.Tensor]) -> list[Site]:
        owners = Owners()
        sites = [owners.site(weight) for weight in weights]
        if any(site is None for site in sites):
            raise RuntimeError(
                f"mhc: a compiled graph of {len(self.blocks)} mHC block(s) ran for weights that no "
                "module on the call stack or prepared by mhc_compile owns, so their mHC parameters "
                "cannot be found. Compile the module itself (torch.compile(model, backend='mhc') "
                "or model.compile(backend='mhc')), or call mhc_compile.prepare(model, "
                "*example_args) first."
            )
        return sites


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
                private_apis.mark_parameter_input(node)
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
            key=block.key or "",
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
            where=graph_facts.source_line(block.add),
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
