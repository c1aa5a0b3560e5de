"""The `mhc` torch.compile backend: analyse, bind parameters, rewrite, compile.

Each Dynamo graph goes through plain functions of one GraphRecord, in this order:

    analyse          copy Dynamo's graph, run passes.ANALYSIS_PASSES, make the report's rows
    bind_parameters  every rewritten block's mHC parameters for the call (created where missing),
                     as new leading placeholders
    rewrite          passes.REWRITE_PASSES
    compile_graph    Inductor, with passes.JOINT_PASSES and passes.POST_GRAD_PASSES installed

`GraphTracer` is the torch.compile backend that runs `analyse` and hands the record to a finishing
function; `MHCBackend` (backend="mhc") finishes with `compile_for_training`. prepare and report
(mhc_compile/__init__.py), gain (gain.py) and pipeline (pipeline_plan.py) compose the steps they
need the same way.

`torch.compile(model, backend="mhc")` finds `mhc_backend` through the `torch_dynamo_backends`
entry point; do not also register the name here (the entry point would then fail as a duplicate).
"""

from __future__ import annotations

import collections
import functools
import logging
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import fx, nn

from mhc_compile import ops, private_apis, reference, spec, templates
from mhc_compile.quiet import run_without_side_effects
from mhc_compile.options import MHCOptions
from mhc_compile.owners import Owners, Site
from mhc_compile.passes import PassContext, graph_facts, run_passes
from mhc_compile.passes.find_residual_blocks import ResidualAnalysis, ResidualBlock
from mhc_compile.passes.match_hyper_connections import DeepseekV4Site
from mhc_compile.report import BlockReport, Report, SkipReason

log = logging.getLogger("mhc_compile")


@dataclass
class GraphRecord:
    """One Dynamo graph on its way through the backend's steps."""

    index: int  # which graph of the trace (a graph break makes several)
    traced: fx.GraphModule  # as Dynamo traced it; never changed
    graph_module: fx.GraphModule  # our copy, rewritten in place
    example_inputs: list[Any]  # Dynamo's, aligned with traced's placeholders
    context: PassContext
    blocks: list[BlockReport]  # the report's rows for this graph
    owners: Owners
    weights: "_Weights"
    sites: dict[fx.Node, Site | None]  # each block's first weight -> where its parameters live
    binding: "_Binding | None" = None
    parameters: list[torch.Tensor] = field(default_factory=list)  # bound, placeholder order

    @property
    def analysis(self) -> ResidualAnalysis:
        return self.context.analysis

    @property
    def rewritten(self) -> list[ResidualBlock]:
        return [block for chain in self.analysis.chains for block in chain.blocks]

    @property
    def lowered(self) -> list[ResidualBlock]:
        """The model's own hyper-connections that the rewrite lowers onto the mhc:: ops."""
        return [block for block, site in self.context.hyper_connections.items()
                if isinstance(site, DeepseekV4Site)]


def analyse(graph_module: fx.GraphModule, example_inputs: Sequence[Any], options: MHCOptions,
            owners: Owners, index: int = 0) -> GraphRecord:
    """Find the graph's residual blocks (passes.ANALYSIS_PASSES) on a copy of it; nothing is
    created. `owners` says which module holds each block's mHC parameters."""
    copied = private_apis.copy_graph_module(graph_module)
    placeholders = [node for node in copied.graph.nodes if node.op == "placeholder"]
    weights = _Weights(copied, placeholders)
    sites: dict[fx.Node, Site | None] = {}

    def site_key(weight: fx.Node) -> str | None:
        sites[weight] = owners.site(weights.of(weight, example_inputs))
        return None if sites[weight] is None else sites[weight].key

    context = PassContext(
        options,
        parameter_inputs={n for n, v in zip(placeholders, example_inputs)
                          if isinstance(v, nn.Parameter)},
        site_key=site_key,
    )
    run_passes("analysis", copied, context)
    return GraphRecord(index, graph_module, copied, list(example_inputs), context,
                       list(_block_reports(context.analysis, index, options,
                                           context.hyper_connections)), owners, weights,
                       sites)


def bind_parameters(record: GraphRecord, warn_late: bool = True) -> None:
    """Bind every rewritten block's mHC parameters for the traced call (creating the missing ones
    on their owner) and add one leading placeholder per parameter. `warn_late`: warn when
    parameters appear after a compiled step of the model ran (prepare and gain create them on
    purpose)."""
    blocks = record.rewritten
    record.binding = _Binding(blocks, record.weights, record.context.options, warn_late)
    record.parameters = record.binding.bind(record.example_inputs,
                                            [record.sites[block.weight] for block in blocks])
    record.context.parameter_nodes = _add_parameter_placeholders(
        record.graph_module, blocks, record.parameters)


def rewrite(record: GraphRecord) -> None:
    """Rewrite the bound blocks into mHC (passes.REWRITE_PASSES)."""
    run_passes("rewrite", record.graph_module, record.context)


def bind_and_rewrite(record: GraphRecord, warn_late: bool = False) -> None:
    """`bind_parameters` where the graph has blocks to rewrite, then `rewrite` where it has
    those or hyper-connections to lower (which read the model's own parameters)."""
    if record.rewritten:
        bind_parameters(record, warn_late)
    if record.rewritten or record.lowered:
        rewrite(record)


def compile_graph(record: GraphRecord) -> Callable:
    """The record's graph compiled as its options say (Inductor, or the eager graph), called with
    Dynamo's arguments: each call passes the mHC parameters of the instance it runs for."""
    compiled = _compile(record.graph_module, [*record.parameters, *record.example_inputs],
                        record.context.options)
    return with_parameters(record, compiled)


def with_parameters(record: GraphRecord, compiled: Callable) -> Callable:
    """`compiled` (which takes the mHC parameters first) called with Dynamo's arguments only."""
    if record.binding is None:
        return compiled
    binding = record.binding

    def run_rewritten(*args):
        return compiled(*binding.parameters_for(args), *args)

    return run_rewritten


def compile_for_training(record: GraphRecord) -> Callable:
    """What backend="mhc" does with an analysed graph: say what stays plain, then bind, rewrite
    and compile."""
    placeholders = [node for node in record.graph_module.graph.nodes if node.op == "placeholder"]
    rewritten_sites = {record.sites[block.weight] for block in record.rewritten}
    warn_if_incomplete(record.blocks, bool(record.context.parameter_inputs),
                       record.owners.compiled_module(),
                       _without_their_mhc(placeholders, record.context.parameter_inputs,
                                          rewritten_sites, record.example_inputs, record.owners))
    bind_and_rewrite(record, warn_late=True)  # may refuse (DDP): before any global change
    if record.rewritten:
        private_apis.fail_past_recompile_limit()
    return compile_graph(record)


class GraphTracer:
    """A torch.compile backend: `analyse` each graph Dynamo hands it, then `finish(record)`, which
    returns what runs the graph. Its `report` collects the blocks of every graph, `traced_graphs`
    counts them (no record is kept: it holds the call's tensors). `top_module` owns the mHC
    parameters of every block whose weights it owns (prepare, report, gain and pipeline name the
    model they trace)."""

    def __init__(self, options: MHCOptions, finish: Callable[[GraphRecord], Callable],
                 top_module: nn.Module | None = None):
        self.options, self.finish, self.top_module = options, finish, top_module
        self.report = Report(n=options.n, constraint=options.constraint)
        self.traced_graphs = 0

    def __call__(self, graph_module: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        record = analyse(graph_module, example_inputs, self.options, Owners(self.top_module),
                         index=self.traced_graphs)
        self.traced_graphs += 1
        self.report.blocks.extend(record.blocks)
        log.info("%s (graph %d)", self.report.summary(), record.index)
        return self.finish(record)


class MHCBackend(GraphTracer):
    """backend="mhc" with these options (`mhc_compile.backend(**options)`)."""

    def __init__(self, options: MHCOptions):
        super().__init__(options, compile_for_training)

    def __call__(self, graph_module: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        if private_apis.inside_ddp_forward():
            _refuse_ddp_graph_splitting()
        _refuse_fsdp2_modules()
        return super().__call__(graph_module, example_inputs)


def _refuse_ddp_graph_splitting() -> None:
    """Under DDP, Dynamo's default cuts each graph at gradient-bucket boundaries and compiles the
    pieces apart: every piece would expand and reduce its own streams, another model than one
    process trains (and one that changes with the bucket size), so it is refused, not compiled."""
    mode = private_apis.ddp_graph_splitting()
    if mode != "no_optimization":
        raise RuntimeError(
            "mhc: backend='mhc' under DistributedDataParallel needs Dynamo's DDP graph splitting "
            f"off (torch._dynamo.config.optimize_ddp is {mode!r}): it may cut the graph at gradient-"
            "bucket boundaries and compiles each piece apart, which would cut the mHC stream "
            "chain and train another model than one process does. Set "
            "torch._dynamo.config.optimize_ddp = False before the first compiled call; DDP then "
            "all-reduces the gradients after the backward instead of overlapping it."
        )


def _refuse_fsdp2_modules() -> None:
    """fully_shard (FSDP2) on submodules: Dynamo compiles each sharded module's forward as a
    graph of its own, its hooks run between them, so every sharded block would be its own mHC
    chain (streams expanded at its start, reduced at its end), another model than one process
    trains. One unit, the compiled module itself sharded and nothing inside or around it, is one
    graph and one chain (tests/test_data_parallel.py); per block, mhc_compile.fsdp_units cuts the
    rewritten graph into modules that pass the streams on."""
    if not torch.distributed.is_available():
        return
    from torch.distributed.fsdp import FSDPModule

    stack = private_apis.modules_on_call_stack()
    sharded = [module for module in stack if isinstance(module, FSDPModule)]
    if not sharded:
        return
    compiled = stack[0]
    inner = [module for module in compiled.modules()
             if module is not compiled and isinstance(module, FSDPModule)]
    if sharded == [compiled] and not inner:
        return
    raise RuntimeError(
        f"mhc: backend='mhc' is compiling the forward of {type(compiled).__name__} with "
        "fully_shard (FSDP2) applied to submodules: FSDP2 breaks the graph at every sharded "
        "module, so each would get its own mHC chain (streams expanded at its start, reduced at "
        "its end), another model than one process trains. To shard per block, cut the "
        "rewritten model into units and shard those: units = mhc_compile.fsdp_units(model, "
        "(inputs,)); fully_shard(unit) for unit in units.units; fully_shard(units); train "
        "units, uncompiled (its units are compiled). Or shard the compiled model as one unit "
        "(fully_shard(model) alone), or use DistributedDataParallel (README, Several GPUs: data "
        "parallelism)."
    )


def _refuse_late_parameters_under_ddp() -> None:
    """DDP all-reduces the parameters it saw when it was built; mHC parameters created at the
    first compiled call, inside its forward, would train apart on every rank."""
    if private_apis.inside_ddp_forward():
        raise RuntimeError(
            "mhc: the model runs inside DistributedDataParallel, but its mHC parameters did not "
            "exist when DDP was built, so DDP would not all-reduce their gradients and the ranks' "
            "models would drift apart. Call mhc_compile.prepare(model, *example_args) before "
            "wrapping the model in DDP."
        )


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
    rewritten = sum(block.status == "rewritten" for block in blocks)
    lowered = sum(block.status == "lowered" for block in blocks)
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
            f"({rewritten} rewritten"
            + (f", {lowered} existing hyper-connection(s) lowered" if lowered else "")
            + "). Main reasons: "
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


def compile_whole_ops(graph_module: fx.GraphModule, example_inputs: Sequence[Any],
                      options: MHCOptions | None = None) -> Callable:
    """Inductor on a graph that calls the mhc:: ops, as backend="mhc" compiles it: AOT autograd
    traces the ops whole (ops.keep_ops_whole), so the joint and post-grad passes work on whole ops,
    and passes/inline_kernels.py then opens them for Inductor. The user's own Inductor custom
    passes run first. Inductor's FX graph cache keys on the graph, not on what our custom ops do,
    so each pass's cache key hashes our sources (and the joint pass its recompute setting: the AOT
    autograd cache keys on the graph's code, not on node tags). Without options it is a plain
    torch.compile backend for graphs that call the ops, with no recompute policy (a chain's
    replicated input is rebuilt whatever the policy: passes/recompute_policy.py)."""
    options = MHCOptions(recompute=False) if options is None else options  # a bare backend
    patches = private_apis.inductor_mode_options(options.mode) if options.mode is not None else {}
    context = PassContext(options)
    stages = [("post_grad", "post_grad_custom_post_pass", ()),
              ("joint", "joint_custom_pre_pass", (("recompute", options.recompute),))]
    for stage, config_key, setting in stages:
        patches[config_key] = _after_users_pass(
            private_apis.users_graph_pass(config_key),
            lambda graph, stage=stage: run_passes(stage, graph, context),
            lambda setting=setting: _sources_hash() + repr(setting).encode())
    if options.cudagraphs:
        patches["triton.cudagraphs"] = True  # what mode="reduce-overhead" sets
    patches.update(private_apis.cacheable_functions(_our_functions(graph_module),
                                                    _sources_hash().hex()))
    kernel_device = (_mhc_kernel_device(graph_module, example_inputs)
                     if patches.get("triton.cudagraphs", private_apis.graphs_replayed()) else None)
    if kernel_device is not None:  # the ops stay whole and their kernels compile ahead
        from mhc_compile import kernel_launch  # imports Triton, which kernels on CUDA imply

        kernel_launch.start_compile_workers(kernel_device.index)
    skips = private_apis.cudagraph_skips()
    with ops.keep_ops_whole():
        compiled = private_apis.inductor_compile(graph_module, example_inputs, patches)
    if kernel_device is None:
        return compiled
    if private_apis.cudagraph_skips() > skips:
        _warn_not_replayed()
        return compiled
    return _warning_if_not_replayed(compiled)


# Calls of a compiled graph by which Inductor's CUDA-graph trees have decided whether to replay it:
# they warm it up at the first call and record it at the next, and may decline at either (an input
# mutation is found there).
_DECIDING_CALLS = 3


def _warning_if_not_replayed(compiled: Callable) -> Callable:
    """`compiled`, which warns (_warn_not_replayed) if Inductor declines to replay it as CUDA
    graphs during one of its first calls; after them, a call costs one comparison. Inductor counts
    declines per process, so only those counted during this graph's own calls are its own: a
    backward graph's, decided while autograd runs it, is not seen."""
    calls = 0

    @functools.wraps(compiled)
    def run(*args):
        nonlocal calls
        if calls >= _DECIDING_CALLS:
            return compiled(*args)
        calls += 1
        skips = private_apis.cudagraph_skips()
        try:
            return compiled(*args)
        finally:
            if private_apis.cudagraph_skips() > skips:
                _warn_not_replayed()
                calls = _DECIDING_CALLS

    return private_apis.called_like(run, compiled)


def _mhc_kernel_device(graph_module: fx.GraphModule,
                       example_inputs: Sequence[Any]) -> torch.device | None:
    """The CUDA device on which the graph's mhc:: ops launch Triton kernels, or None: the graph
    calls none, or its tensors are not where the kernels run."""
    if not any(node.op == "call_function" and ops.spec_of(node.target) is not None
               for node in graph_module.graph.nodes):
        return None
    return next((value.device for value in example_inputs
                 if isinstance(value, torch.Tensor) and templates.kernels_active(value.device)), None)


def _warn_not_replayed() -> None:
    """Say once that a graph asked to replay as CUDA graphs will not: passes/inline_kernels.py kept
    its mHC ops opaque for the replay, so they run their Python launchers at every call."""
    message = (
        "mhc: Inductor will not replay a compiled graph as CUDA graphs, though cudagraphs=True or "
        "mode='reduce-overhead' asked for it (TORCH_LOGS=cudagraphs shows why: an input mutation, "
        "a CPU tensor, dynamic shapes, ...). Its mHC ops were kept whole for the replay, so they "
        "launch their kernels from Python at every step, and the step may wait on the host. "
        "Remove what Inductor names, or compile without CUDA graphs: then Inductor launches the "
        "mHC kernels itself"
    )
    warned = _WARNED.setdefault(compile_whole_ops, set())
    if message not in warned:
        warned.add(message)
        warnings.warn(message, stacklevel=2)


def _our_functions(graph_module: fx.GraphModule) -> set[Callable]:
    """The functions of ours the rewrite calls in the graph (stream layout helpers): AOT autograd's
    cache keys them by our sources' hash, which changes with their code."""
    return {node.target for node in graph_module.graph.nodes
            if node.op == "call_function"
            and getattr(node.target, "__module__", "").startswith("mhc_compile.")}


def _after_users_pass(users: Callable | None, ours: Callable[[fx.Graph], None],
                      our_uuid: Callable[[], bytes]) -> Callable:
    """Our pass, after the user's own one when set (torch 2.11 takes a single pass per stage);
    not cacheable when the user's pass has no uuid."""
    if users is None:
        return private_apis.graph_pass(ours, our_uuid)

    def both(graph: fx.Graph) -> None:
        users(graph)
        ours(graph)

    def both_uuid() -> bytes | None:
        first = private_apis.graph_pass_uuid(users)
        return None if first is None else repr(first).encode() + our_uuid()

    return private_apis.graph_pass(both, both_uuid)


@functools.cache
def _sources_hash() -> bytes:
    """Our sources, hashed once per process: Inductor asks for every pass's uuid at each compile."""
    from mhc_compile import passes

    folders = [Path(__file__).parent, Path(passes.__file__).parent, Path(templates.__file__).parent]
    sources = sorted(path for folder in folders for path in folder.glob("*.py"))
    return private_apis.hash_files(sources)


def _compile(graph_module: fx.GraphModule, example_inputs, options: MHCOptions) -> Callable:
    return graph_module if options.eager else compile_whole_ops(graph_module, example_inputs,
                                                                  options)


def run_as_traced(record: GraphRecord) -> Callable:
    """The graph as Dynamo traced it, called like the rewritten one (prepare: at init the outputs
    are the rewritten graph's, and no mHC kernel is launched, so nothing is autotuned for dtypes
    that training, under autocast say, may not use)."""
    traced, count = record.traced, len(record.parameters)
    return with_parameters(record, lambda *args: traced(*args[count:]))


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
        self.bound = private_apis.weak_id_dictionary()

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
        if not all(site.has_parameters() for site in sites):
            _refuse_late_parameters_under_ddp()
        created, flat, stores = [], [], []
        for block, site in zip(self.blocks, sites):
            store = site.store()
            params, is_new = store.get_or_create(
                site.key, self.options.n, block.channels, block.position, self.options,
                reference.coefficient_dtype(block.value.dtype), block.value.device,
            )
            flat.extend(getattr(params, name) for name in spec.PARAMETER_NAMES)
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


def _add_parameter_placeholders(graph_module: fx.GraphModule, blocks: list[ResidualBlock],
                               parameters: list[torch.Tensor]) -> dict:
    """New leading placeholders, one per mHC parameter, in the order the wrapper passes them, with
    the static fake values Dynamo would give a parameter."""
    graph = graph_module.graph
    first = next(iter(graph.nodes))
    fake_mode = private_apis.fake_mode_of([graph_facts.example_value(node) for node in graph.nodes])
    nodes = {}
    count = len(spec.PARAMETER_NAMES)
    with graph.inserting_before(first):
        for index, block in enumerate(blocks):
            placeholders = [graph.placeholder(f"mhc_{index}_{name}")
                            for name in spec.PARAMETER_NAMES]
            for node, tensor in zip(placeholders, parameters[count * index : count * (index + 1)]):
                private_apis.mark_parameter_input(node, tensor, fake_mode)
            nodes[block] = spec.BlockParameters(*placeholders)
    return nodes


def _block_reason(block: ResidualBlock, rewritten: bool, hyper_connection) -> str:
    """Why a block stays plain, or what became of the model's own hyper-connection."""
    if rewritten:
        return ""
    if isinstance(hyper_connection, DeepseekV4Site):
        return hyper_connection.describe()
    reason = (block.skip_reason or SkipReason.NO_OWNER_MODULE).value
    return f"{reason}; not lowered: {hyper_connection}" if hyper_connection else reason


def _block_reports(analysis: ResidualAnalysis, graph_index: int, options: MHCOptions,
                   hyper_connections: dict):
    located = {
        block: (chain_index, position)
        for chain_index, chain in enumerate(analysis.chains)
        for position, block in enumerate(chain.blocks)
    }
    for block in analysis.blocks:
        value = block.value
        chain, position = located.get(block, (None, None))
        rewritten = chain is not None and block.skip_reason is None
        hyper_connection = hyper_connections.get(block)
        lowered = isinstance(hyper_connection, DeepseekV4Site)
        channels = value.shape[block.channel_dim] if value.dim() else 1
        fixed = isinstance(channels, int)
        streams_dtype = options.streams_dtype_for(value.dtype)
        yield BlockReport(
            path=block.path,
            key=block.key or "",
            status="rewritten" if rewritten else "lowered" if lowered else "skipped",
            reason=_block_reason(block, rewritten, hyper_connection),
            graph=graph_index,
            chain=chain if rewritten else None,
            position=position if rewritten else None,
            shape=tuple(s if isinstance(s, int) else str(s) for s in value.shape),
            dtype=str(value.dtype).removeprefix("torch."),
            pattern=block.pattern,
            contains=graph_facts.kinds_of(block.body, block.add.graph.owning_module),
            params_added=spec.parameter_count(options.n, channels) if rewritten else 0,
            extra_bytes_per_token=spec.extra_bytes_per_token(
                options.n, channels, streams_dtype.itemsize) if rewritten and fixed else 0,
            extra_flops_per_token=spec.extra_flops_per_token(
                options.n, channels, options.sinkhorn_iters) if rewritten and fixed else 0,
            ops=(templates.implementation(value.device, streams_dtype, options.n) if rewritten
                 else templates.implementation(value.device, value.dtype, value.shape[-2])
                 if lowered else ""),
            where=graph_facts.source_line(block.add),
        )


def trace(model: nn.Module, example_args: tuple, configured: GraphTracer,
          fullgraph: bool = False, model_kwargs: Mapping[str, Any] | None = None) -> Report:
    """Run `model(*example_args, **model_kwargs)` once through torch.compile with `configured`,
    with grad enabled and without side effects on the model's state (buffers, RNG); returns the
    report of the graphs it traced. prepare, report and the pipeline's capture trace this way."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"mhc_compile expects an nn.Module, got {type(model).__name__}")
    compiled = torch.compile(model, backend=configured, dynamic=False, fullgraph=fullgraph)
    with private_apis.falling_back_past_recompile_limit():
        run_without_side_effects(model, compiled, example_args, model_kwargs, grad=True)
    if not configured.traced_graphs:
        # Dynamo ran the model without calling the backend: it gave up on this forward (its
        # recompile limit, 8 entries per code object, counts every prepare/report/gain call).
        raise RuntimeError(
            f"mhc_compile: torch.compile did not trace {type(model).__name__}.forward, so nothing "
            "was analysed or created: it falls back to eager past its recompile limit (each "
            "prepare/report/gain call and each new input shape adds an entry). Call "
            "torch.compiler.reset() before preparing many models of one class in one process."
        )
    return configured.report


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
