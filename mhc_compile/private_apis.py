"""Every private PyTorch (and Triton) API mhc_compile touches, in one place, each with the reason.

Checked against torch 2.11 and 2.13 (Triton 3.6). If one of these breaks on a new release, this is
the only module to fix.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import itertools
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import fx, nn
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch._subclasses.fake_tensor import FakeTensor


def copy_graph_module(graph_module: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule we may mutate. Dynamo's own must stay untouched (adding placeholders to it
    raises KeyError 'grapharg'); a plain deepcopy loses the placeholders' `_dynamo_source` and the
    module's `_param_name_to_source`, which compile_fx reads back (no public accessor exists)."""
    graph = copy.deepcopy(graph_module.graph)
    for old, new in zip(graph_module.graph.nodes, graph.nodes):
        if hasattr(old, "_dynamo_source"):
            new._dynamo_source = old._dynamo_source
    copied = fx.GraphModule(graph_module, graph)
    copied.meta = dict(graph_module.meta)
    if hasattr(graph_module, "_param_name_to_source"):
        copied._param_name_to_source = graph_module._param_name_to_source
    return copied


def compile_with_inductor(
    graph_module: fx.GraphModule, example_inputs: Sequence[Any], recompute: str | int | bool = False,
    cudagraphs: bool = False, mode: str | None = None,
) -> Callable:
    """Inductor's entry point for a Dynamo graph (what backend="inductor" calls): AOT autograd,
    partitioning and code generation. It has no public alias.

    passes/fuse_grad_streams.py and then passes/inline_kernels.py run as the post-grad custom
    pass (after the user's own, if set). Inductor's FX graph cache keys on the graph, not on what
    our custom ops do: after an upgrade of mhc_compile it would serve code compiled against the old
    ops (stale stride assertions were seen). The pass's uuid() hashes our sources, which keys the
    cache on them.

    `recompute` (MHCOptions.recompute) installs the recompute policy as a joint-graph pass, the
    only stage that sees forward and backward before the partitioner. Its uuid() holds the
    setting: the AOT autograd cache keys on the graph's code, not on node tags.

    `cudagraphs` turns on Inductor's cudagraph trees for this graph (what mode="reduce-overhead"
    sets through the same config key). `mode` applies the config of one of torch.compile's modes,
    read from torch._inductor.list_mode_options (private module; torch.compile's documentation
    points to it as the list of what each mode sets).
    """
    from torch._inductor import config, list_mode_options
    from torch._inductor.compile_fx import compile_fx

    patches = dict(list_mode_options(mode)) if mode is not None else {}
    post_grad, user_post_grad = _PostGradPass(), config.post_grad_custom_post_pass
    patches["post_grad_custom_post_pass"] = (
        post_grad if user_post_grad is None else _Sequence(user_post_grad, post_grad))
    if recompute is not False:
        policy = _RecomputePolicyPass(recompute)
        user_pass = config.joint_custom_pre_pass
        patches["joint_custom_pre_pass"] = policy if user_pass is None else _Sequence(user_pass, policy)
    if cudagraphs:
        patches["triton.cudagraphs"] = True
    return compile_fx(graph_module, _static_unless_traced(example_inputs), config_patches=patches)


def _source_files() -> list[Path]:
    package = Path(__file__).parent
    from mhc_compile import passes, templates

    folders = [package, Path(passes.__file__).parent, Path(templates.__file__).parent]
    return sorted(path for folder in folders for path in folder.glob("*.py"))


def _sources_hash() -> bytes:
    return get_hash_for_files(tuple(str(path) for path in _source_files()))


class _PostGradPass(CustomGraphPass):
    """passes/fuse_grad_streams.py, then passes/inline_kernels.py (which needs the fold done: it
    takes the whole ops apart) on Inductor's post-grad graphs, keyed on our sources."""

    def __call__(self, graph: fx.Graph) -> None:
        from mhc_compile.passes.fuse_grad_streams import fuse_grad_streams
        from mhc_compile.passes.inline_kernels import inline_kernels

        fuse_grad_streams(graph)
        inline_kernels(graph)

    def uuid(self) -> bytes:
        return _sources_hash()


class _RecomputePolicyPass(CustomGraphPass):
    """passes/recompute_policy.py on Inductor's joint graph, keyed on our sources and the setting."""

    def __init__(self, setting: str | int | bool):
        self.setting = setting

    def __call__(self, graph: fx.Graph) -> None:
        from mhc_compile.passes.recompute_policy import tag_recompute

        tag_recompute(graph, self.setting)

    def uuid(self) -> bytes:
        return _sources_hash() + repr(("recompute", self.setting)).encode()


class _Sequence(CustomGraphPass):
    """The user's own graph pass, then ours (torch 2.11 takes a single pass per stage)."""

    def __init__(self, first: Callable, second: CustomGraphPass):
        self.first, self.second = first, second

    def __call__(self, graph: fx.Graph) -> None:
        self.first(graph)
        self.second(graph)

    def uuid(self) -> bytes | None:
        first = self.first.uuid() if isinstance(self.first, CustomGraphPass) else None
        return None if first is None else repr(first).encode() + self.second.uuid()


def replace_with_functional_trace(
    node: fx.Node, function: Callable, traces: dict | None = None
) -> None:
    """Replace `node`, a custom-op call in an Inductor post-grad graph, by the functional trace of
    `function(*node.args, **node.kwargs)` on the nodes' example values: what AOT autograd makes of
    a triton_op's body (wrap_triton launches become triton_kernel_wrapper_functional nodes,
    allocations and views aten ops), so Inductor lowers it as it lowers a traced triton_op.

    `traces`, when given, keeps each trace under what it depends on (`_trace_key`) for the next
    call with the same signature: the blocks of a model repeat the same calls, and each trace took
    about 57 ms (0.1 s per sublayer on the H100 host, 5.5 s of a 12-layer model's cold compile).
    The pattern matcher copies a trace into the graph without changing it, so one trace serves
    every call of one graph; the copied nodes then get example values of their own
    (`_fresh_values`).

    Private because nothing public splices a traced function into a post-grad graph: Inductor's
    pattern matcher does (Match.replace_by_example, as Inductor's own
    decompose_triton_kernel_wrapper_functional uses it: example values, meta, multi-output
    getitems), and the functional trace is FunctionalTensorMode's dispatch_functionalize under
    make_fx with Inductor's decompositions (the pattern matcher's default trace does not
    functionalize, and a kernel writing a buffer in place would leave its readers unordered)."""
    from torch._inductor.pattern_matcher import CallFunctionVarArgs
    from torch.utils import _pytree as pytree

    reuse_mhc_kernel_ttir()
    match = CallFunctionVarArgs(node.target).match(node)
    if not match:
        raise RuntimeError(f"mhc: cannot replace {node.format_node()}: {match}")
    leaves, spec = pytree.tree_flatten((list(node.args), dict(node.kwargs)))
    traced_at = [i for i, leaf in enumerate(leaves) if isinstance(leaf, fx.Node)]

    def call(*values):
        filled = list(leaves)  # constants (ints, strings) stay in the closure, out of the trace
        for position, value in zip(traced_at, values):
            filled[position] = value
        args, kwargs = pytree.tree_unflatten(filled, spec)
        return function(*args, **kwargs)

    key = None if traces is None else _trace_key(function, leaves, spec)

    def trace(traced_function: Callable, example_values: Sequence[Any]) -> fx.GraphModule:
        if key is None:
            return _functional_trace(traced_function, example_values)
        if key not in traces:
            traces[key] = _functional_trace(traced_function, example_values)
        return traces[key]

    graph = node.graph
    before = set(graph.nodes)  # what replace_by_example returns differs between torch versions
    match.replace_by_example(call, [leaves[i] for i in traced_at], trace_fn=trace)
    _fresh_values([spliced for spliced in graph.nodes if spliced not in before])


def _fresh_values(nodes: list[fx.Node]) -> None:
    """Recompute the example values ("val") of spliced nodes from their inputs' values.

    The pattern matcher gives each copied node the value its trace node holds, so two splices of
    one trace would share fake tensors, and with them storages. Inductor's reinplace pass reads
    aliasing from those storages: a buffer that shares one with a later splice's buffer is never
    written in place, and its kernel gets a clone of it (a copy of every output buffer). Fake
    tensors are cheap to recompute (each kernel wrapper's fake clones its outputs)."""
    from torch._guards import detect_fake_mode

    values = [node.meta.get("val") for node in nodes]
    fake_mode = detect_fake_mode([v for v in values if isinstance(v, torch.Tensor)])
    with fake_mode if fake_mode is not None else contextlib.nullcontext():
        for node in nodes:
            if node.op != "call_function" or "val" not in node.meta:
                continue
            args, kwargs = fx.map_arg((node.args, node.kwargs), lambda arg: arg.meta["val"])
            node.meta["val"] = node.target(*args, **kwargs)


def _trace_key(function: Callable, leaves: list, spec) -> tuple | None:
    """What the functional trace of `function` on these argument leaves depends on: the function,
    the constants, each tensor's shape, strides, storage offset, dtype and device, and which
    arguments are the same node (make_fx traces a tensor passed twice as one input). None where a
    size is symbolic or a constant is unhashable: such calls are traced afresh."""
    described = []
    first_position: dict[fx.Node, int] = {}
    for position, leaf in enumerate(leaves):
        if not isinstance(leaf, fx.Node):
            try:
                hash(leaf)
            except TypeError:
                return None
            described.append(("constant", type(leaf), leaf))
            continue
        value = leaf.meta.get("val")
        if not isinstance(value, torch.Tensor):
            return None
        layout = (*value.shape, *value.stride(), value.storage_offset())
        if any(isinstance(size, torch.SymInt) for size in layout):
            return None
        same_as = first_position.setdefault(leaf, position)
        described.append(("tensor", tuple(layout), value.dim(), value.dtype, value.device, same_as))
    return function, str(spec), tuple(described)


def _functional_trace(function: Callable, example_values: Sequence[Any]) -> fx.GraphModule:
    from torch._dispatch.python import enable_python_dispatcher
    from torch._inductor.decomposition import select_decomp_table
    from torch._subclasses.functional_tensor import dispatch_functionalize
    from torch.fx.experimental.proxy_tensor import make_fx

    with enable_python_dispatcher():
        traced = make_fx(dispatch_functionalize(function), select_decomp_table(),
                         tracing_mode="real")(*example_values)
    traced.recompile()
    return traced


def reuse_mhc_kernel_ttir() -> None:
    """Make torch's TTIR generation for our kernels happen once per kernel and signature.

    Tracing a kernel launch (wrap_triton under make_fx), functionalizing it and lowering it in
    Inductor each compile the kernel to Triton IR to find which tensors it writes
    (torch._higher_order_ops.triton_kernel_wrap.generate_ttir, uncached in torch 2.11-2.13): three
    times per launch, for ~19 launches per block. With the kernels handed to Inductor
    (passes/inline_kernels.py), that was 14 of the 19 extra seconds of a 4-block model's cold
    compile on the H100 (bench/RESULTS.md, compile profile of 2026-11-23). The IR depends only on
    the kernel, its tensors' dtypes (every tensor becomes torch.empty(2, dtype) there) and its
    other arguments' values (symbolic ones become 2), which is the key here. Only kernels from
    mhc_compile.templates are cached, so nobody else's kernels see a change. Idempotent."""
    from torch._higher_order_ops import triton_kernel_wrap

    generate = triton_kernel_wrap.generate_ttir
    if getattr(generate, "_mhc_original", None) is not None:
        return
    cache: dict[tuple, Any] = {}

    def generate_once(kernel, kwargs, *rest):
        key = _ttir_key(kernel, kwargs) if not any(rest) else None
        if key is None:
            return generate(kernel, kwargs, *rest)
        if key not in cache:
            cache[key] = generate(kernel, kwargs, *rest)
        return cache[key]

    generate_once._mhc_original = generate
    triton_kernel_wrap.generate_ttir = generate_once


def _ttir_key(kernel, kwargs: dict) -> tuple | None:
    """What generate_ttir's result depends on, or None for kernels that are not ours or arguments
    it treats in ways this key does not mirror."""
    import sympy
    from torch._inductor.ir import TensorBox

    # Tracing hands torch a new Autotuner per launch (its configs pruned for the arguments), so the
    # key holds what generate_ttir reads of it: the JITFunction and the first config's values.
    configs = getattr(kernel, "configs", None)
    jit_function = kernel.fn if configs is not None else kernel
    first_config = tuple(sorted(configs[0].kwargs.items())) if configs else ()
    function = getattr(jit_function, "fn", None)
    if not getattr(function, "__module__", "").startswith("mhc_compile.templates"):
        return None
    values = []
    for name, value in sorted(kwargs.items()):
        if isinstance(value, (torch.Tensor, TensorBox)):
            value = ("tensor", value.dtype)
        elif isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool, sympy.Expr)):
            value = ("symbolic",)
        else:
            try:
                hash(value)
            except TypeError:
                return None
            value = (type(value), value)  # 1 and 1.0 are equal but compile to different IR
        values.append((name, value))
    return jit_function, first_config, _current_triton_target(), tuple(values)


def _current_triton_target() -> str:
    import triton

    return repr(triton.runtime.driver.active.get_current_target())


def append_argument(node: fx.Node, argument: fx.Node) -> None:
    """Give a custom-op call in a post-grad graph one more positional argument. Inductor lowers
    such a call against the example inputs it recorded at trace time, in the private
    node.meta["eager_input_vals"] (it zips them with the arguments, so they must match in number):
    the new argument's example value joins them."""
    node.args = (*node.args, argument)
    if "eager_input_vals" in node.meta:
        example_args, example_kwargs = node.meta["eager_input_vals"]
        node.meta["eager_input_vals"] = ((*example_args, argument.meta["val"]), example_kwargs)


def _static_unless_traced(example_inputs: Sequence[Any]) -> list[Any]:
    """The example inputs with every real tensor Dynamo did not trace (the mHC parameters the
    backend adds) as a fake tensor of static shape in Dynamo's fake mode. AOT autograd gives such an
    input symbolic sizes, finding no symbolic context for it in the private
    TracingContext.tensor_to_context: phi would be [s0, s1], which keeps the ops' kernels from
    Inductor (passes/inline_kernels.py takes static shapes only) and adds guards nobody needs."""
    context = torch._guards.TracingContext.try_get()
    if context is None or context.fake_mode is None:
        return list(example_inputs)
    return [
        context.fake_mode.from_tensor(value, static_shapes=True)
        if isinstance(value, torch.Tensor) and not isinstance(value, FakeTensor)
        and value not in context.tensor_to_context else value
        for value in example_inputs
    ]


def mark_parameter_input(placeholder: fx.Node) -> None:
    """A placeholder we add for an mHC parameter. AOT autograd asserts every placeholder of a
    Dynamo graph has `_dynamo_source` (None is allowed, as DDP's graph splitter does), and reads
    the static-input mark (as Dynamo sets for parameters) to keep CUDA graphs from copying it."""
    placeholder._dynamo_source = None
    placeholder.meta["tensor_dict"] = {"_dynamo_static_input_type": "unguarded"}


def modules_on_call_stack() -> list[nn.Module]:
    """The nn.Modules whose methods are running in this thread, innermost first, each
    torch.compile wrapper (OptimizedModule) given as the module it wraps.

    Why frames: a backend receives a graph and its inputs, never the module the user compiled,
    and a compiled frame that Dynamo reuses for another instance of the same class calls our
    compiled function with that instance's Parameters only. The module whose call runs the graph
    is on the stack as `self` of Module._call_impl (or of the wrapper Module.compile() installs);
    no public API names it. Checked on torch 2.11 and 2.13 (CPython 3.10-3.13 frames).
    """
    from torch._dynamo.eval_frame import OptimizedModule

    modules: list[nn.Module] = []
    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, OptimizedModule):
            candidate = candidate._orig_mod
        if isinstance(candidate, nn.Module) and all(candidate is not m for m in modules):
            modules.append(candidate)
        frame = frame.f_back
    return modules


def fail_past_recompile_limit() -> None:
    """Make Dynamo raise, instead of running the frame eagerly, once a code object passes its
    recompile limit: for a model we rewrote, eager is the plain model without its mHC
    parameters, a silent change of function. torch.compile has no per-backend switch for this
    (torch 2.13's per-call `recompile_limit=` argument does not change the fallback), so the
    process-wide torch._dynamo.config.fail_on_recompile_limit_hit is set; Dynamo refuses it
    together with suppress_errors, which then keeps its meaning. Checked on torch 2.11 and 2.13."""
    config = torch._dynamo.config
    if not config.suppress_errors:
        config.fail_on_recompile_limit_hit = True


def falling_back_past_recompile_limit():
    """A context in which Dynamo runs a frame eagerly past its recompile limit (its default), for
    our own traces (prepare, report, gain): they detect that no graph reached their backend and
    raise their own error, which says what to do, where Dynamo's would not."""
    return torch._dynamo.config.patch(fail_on_recompile_limit_hit=False)


def is_compiled_module(module: nn.Module) -> bool:
    """Whether `module` is the wrapper torch.compile returns (an OptimizedModule): the gain
    diagnostics must compile the model itself, and torch has no public name for the wrapper."""
    from torch._dynamo.eval_frame import OptimizedModule

    return isinstance(module, OptimizedModule)


def checkpoint_region_body(graph_module: fx.GraphModule, node: fx.Node) -> fx.GraphModule | None:
    """The body of a plain `torch.utils.checkpoint` region that Dynamo made into a call of the
    `tag_activation_checkpoint` higher-order op, or None (another node, or a region with a
    context_fn: selective checkpointing decides op by op while AOT autograd traces, which a
    static copy of the body cannot reproduce). The op and the `_checkpoint_context_fn` key are
    internal to torch; torch 2.11 and 2.13 spell them the same."""
    hop = getattr(torch.ops.higher_order, "tag_activation_checkpoint", None)
    if hop is None or node.op != "call_function" or node.target is not hop:
        return None
    body_node = node.args[0]
    if not isinstance(body_node, fx.Node) or body_node.op != "get_attr":
        return None
    body = getattr(graph_module, body_node.target, None)
    if not isinstance(body, fx.GraphModule) or "_checkpoint_context_fn" in body.meta:
        return None
    return body


def is_selective_checkpoint_region(graph_module: fx.GraphModule, node: fx.Node) -> bool:
    """A `tag_activation_checkpoint` call whose region has a context_fn (left as it is)."""
    hop = getattr(torch.ops.higher_order, "tag_activation_checkpoint", None)
    return (hop is not None and node.op == "call_function" and node.target is hop
            and checkpoint_region_body(graph_module, node) is None)


def new_checkpoint_region_id() -> int:
    """A fresh ac_graph_id from the counter torch numbers its own checkpoint regions with, so
    regions inlined by us and regions torch traces itself never share an id."""
    from torch._higher_order_ops import wrap

    counter = getattr(wrap, "uid", None)
    return next(counter if counter is not None else _fallback_region_ids)


_fallback_region_ids = itertools.count(1)


def triton_compiles_to(executor) -> Any:
    """A context in which Triton's JIT compiles (a kernel's `warmup`) are submitted to `executor`
    and all finished on exit; None where this Triton has none, or one is active already.

    triton.runtime._async_compile.AsyncCompileMode is private, and the only way Triton 3.6 offers
    to run JIT compiles concurrently (an autotuner that compiles in parallel itself is an open pull
    request, triton-lang/triton#11847). Errors are left for the launch that follows to meet."""
    try:
        from triton.runtime._async_compile import AsyncCompileMode, active_mode
    except ImportError:
        return None
    return None if active_mode.get() is not None else AsyncCompileMode(executor, ignore_errors=True)


def triton_value_parameters(jit_function) -> frozenset[str]:
    """The names of a @triton.jit kernel's constexpr parameters: the compiled binary depends on
    their values. Triton's KernelParam reads them from the annotations (strings or objects) and
    has no public accessor; built here from the signature because the interpreter's functions
    keep no KernelParams."""
    from triton.runtime.jit import KernelParam

    parameters = inspect.signature(jit_function.fn).parameters.values()
    return frozenset(
        parameter.name
        for number, parameter in enumerate(parameters)
        if KernelParam(number, parameter, False, False).is_constexpr
    )


def compiled_triton_launcher(autotuner, grid, args: tuple, kwargs: dict) -> Callable:
    """A launcher of the binary `autotuner` (a triton.autotune'd kernel) has just run for these
    arguments, called as launcher(grid, args, kwargs) with arguments Triton would specialise the
    same way (templates/configs.py keys it so).

    Why: Triton's own launch path costs 80-130 us of host time per launch on the H100 machine's host
    (bench/RESULTS.md, kernel runs 6 and 7): the autotuner's key, the JIT's argument binding and
    specialisation, its cache key. Inductor avoids the same cost for the kernels it generates by
    launching their binaries itself. Private Triton (checked against 3.6): JITFunction.warmup
    returns the CompiledKernel, whose launcher `compiled[grid](*values)` takes every kernel
    parameter in order, constexprs included, as JITFunction.run passes them."""
    config = autotuner.best_config
    jit_function = autotuner.fn
    compiled = jit_function.warmup(*args, grid=grid, **kwargs, **config.all_kwargs())
    compiled = compiled.result() if hasattr(compiled, "result") else compiled  # async compile
    names = jit_function.arg_names
    defaults = {p.name: p.default for p in jit_function.params if p.has_default}

    def launch(grid, args: tuple, kwargs: dict) -> None:
        named = {**defaults, **dict(zip(names, args)), **kwargs, **config.kwargs}
        grid = grid(named) if callable(grid) else grid
        compiled[(*grid, 1, 1)[:3]](*(named[name] for name in names))
        autotuner.best_config = config  # what configs.chosen_configs reports

    return launch
