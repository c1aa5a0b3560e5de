"""Every private PyTorch (and Triton) API mhc_compile touches, in one place, each with the reason.

Checked against torch 2.11 and 2.13 (Triton 3.6). If one of these breaks on a new release, this is
the only module to fix.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import itertools
import os
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


def inductor_compile(graph_module: fx.GraphModule, example_inputs: Sequence[Any],
                     config_patches: dict[str, Any]) -> Callable:
    """Inductor's entry point for a Dynamo graph (what backend="inductor" calls): AOT autograd,
    partitioning and code generation, under these torch._inductor.config patches. compile_fx has
    no public alias (torch 2.11, 2.13)."""
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(graph_module, _static_unless_traced(example_inputs),
                      config_patches=config_patches)


def cudagraph_skips() -> int:
    """How many graphs Inductor has declined to replay as CUDA graphs in this process although
    they asked for it (an input mutation, a CPU tensor, ...). Inductor counts them in the private
    torch._dynamo.utils.counters and logs the reason only under TORCH_LOGS=cudagraphs; no public
    API reports it (torch 2.11, 2.13)."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["cudagraph_skips"]


def called_like(wrapper: Callable, compiled: Callable) -> Callable:
    """`wrapper` (which passes its arguments on to `compiled` unchanged), called by Dynamo the way
    `compiled` is: with one list of arguments where `compiled` has a true `_boxed_call`, Dynamo's
    private calling convention for compiled graphs (torch 2.11, 2.13), which an attribute of the
    class rather than of the instance would not pass through functools.wraps."""
    if getattr(compiled, "_boxed_call", False):
        wrapper._boxed_call = True
    return wrapper


def inductor_mode_options(mode: str) -> dict[str, Any]:
    """The Inductor config one of torch.compile's modes sets, from the private module
    torch._inductor.list_mode_options (torch.compile's documentation points to it as the list of
    what each mode sets)."""
    from torch._inductor import list_mode_options

    return dict(list_mode_options(mode))


def cacheable_functions(functions: Sequence[Callable], key: str) -> dict[str, Any]:
    """The Inductor config patch that lets AOT autograd's cache store graphs calling `functions`
    (plain Python functions our passes put in the Dynamo graph), keyed by `key`.

    Why: AOT autograd caches a graph only if it calls torch's own functions and ops; any other
    function makes it bypass the cache, so every restart (and every recompile) traced the joint
    graph and partitioned it again. Its only opt-in is the private config
    torch._inductor.config.unsafe_marked_cacheable_functions (name -> a value mixed into the cache
    key; torch 2.11, 2.13). "Unsafe" because the key does not see the functions' code: `key` must
    change whenever they do."""
    from torch._inductor import config

    names = {f"{function.__module__}.{function.__name__}": key for function in functions}
    return {"unsafe_marked_cacheable_functions": {**config.unsafe_marked_cacheable_functions, **names}}


def users_graph_pass(config_key: str) -> Callable | None:
    """The user's own Inductor custom pass at `config_key` ("joint_custom_pre_pass",
    "post_grad_custom_post_pass"), read from torch._inductor.config, where Inductor's documented
    custom-pass hooks live (torch 2.11, 2.13)."""
    from torch._inductor import config

    return getattr(config, config_key)


def graphs_replayed() -> bool:
    """Whether the graph Inductor is compiling will be replayed as CUDA graphs: its config
    triton.cudagraphs, as cudagraphs=True, mode="reduce-overhead" or the user's own setting left
    it. Read from the private torch._inductor.config, the only place Inductor keeps it (torch 2.11,
    2.13); inside a compile it holds that compile's patches."""
    from torch._inductor import config

    return bool(config.triton.cudagraphs)


def graph_pass(run: Callable[[fx.Graph], None], uuid: Callable[[], bytes | None]) -> Callable:
    """An Inductor custom graph pass calling `run(graph)`, keyed in Inductor's caches by `uuid()`
    (None: not cacheable). Inductor's documented hook class, CustomGraphPass, lives in the
    private torch._inductor.custom_graph_pass (torch 2.11, 2.13)."""

    class _Pass(CustomGraphPass):
        def __call__(self, graph: fx.Graph) -> None:
            run(graph)

        def uuid(self) -> bytes | None:
            return uuid()

    return _Pass()


def graph_pass_uuid(graph_pass_object: Callable) -> bytes | None:
    """A custom pass's cache key: CustomGraphPass.uuid(), None for a plain function (the class is
    private to torch._inductor, as `graph_pass` says; torch 2.11, 2.13)."""
    return graph_pass_object.uuid() if isinstance(graph_pass_object, CustomGraphPass) else None


def hash_files(paths: Sequence[Path]) -> bytes:
    """Inductor's own hash of source files, for custom-pass uuids (torch 2.11, 2.13)."""
    return get_hash_for_files(tuple(str(path) for path in paths))


def replace_by_trace(node: fx.Node, call: Callable, example_nodes: list[fx.Node],
                     trace: Callable) -> list[fx.Node]:
    """Replace `node`, a custom-op call in an Inductor post-grad graph, by `trace(call, values)`
    (a traced GraphModule of `call` on the example values of `example_nodes`); returns the nodes
    spliced in. Nothing public splices a traced function into a post-grad graph: Inductor's
    pattern matcher does (Match.replace_by_example, as Inductor's own
    decompose_triton_kernel_wrapper_functional uses it: example values, meta, multi-output
    getitems). Checked on torch 2.11 and 2.13."""
    from torch._inductor.pattern_matcher import CallFunctionVarArgs

    reuse_mhc_kernel_ttir()
    match = CallFunctionVarArgs(node.target).match(node)
    if not match:
        raise RuntimeError(f"mhc: cannot replace {node.format_node()}: {match}")
    graph = node.graph
    before = set(graph.nodes)  # what replace_by_example returns differs between torch versions
    match.replace_by_example(call, example_nodes, trace_fn=trace)
    return [spliced for spliced in graph.nodes if spliced not in before]


def fake_mode_of(values: Sequence[Any]):
    """The fake mode the fake tensors among these example values belong to (FakeTensor.fake_mode,
    private), or None. Not torch._guards.detect_fake_mode: it prefers the tracing context's mode,
    and Dynamo calls a backend under a fresh mode of its own, not the one its graph's example
    values were made in (torch 2.11, 2.13)."""
    return next((value.fake_mode for value in values if isinstance(value, FakeTensor)), None)


def in_fake_mode(values: Sequence[Any]):
    """A context computing in the fake mode of these example values (`fake_mode_of`: private, as
    it says); a null context when they hold no fake tensor."""
    mode = fake_mode_of(values)
    return mode if mode is not None else contextlib.nullcontext()


def in_tracing_fake_mode(values: Sequence[Any]):
    """A context computing in the fake mode Inductor compiles a graph in: the tracing context's,
    else that of these values (torch._guards.detect_fake_mode, no public alias; torch 2.11,
    2.13). Inductor's post-grad graphs hold values of that mode."""
    from torch._guards import detect_fake_mode

    mode = detect_fake_mode([value for value in values if isinstance(value, torch.Tensor)])
    return mode if mode is not None else contextlib.nullcontext()


def functional_trace(function: Callable, example_values: Sequence[Any]) -> fx.GraphModule:
    """What AOT autograd makes of `function` (a kernel launcher): FunctionalTensorMode's
    dispatch_functionalize under make_fx with Inductor's decompositions (the pattern matcher's
    default trace does not functionalize, and a kernel writing a buffer in place would leave its
    readers unordered). All private to torch (2.11, 2.13)."""
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
    (passes/inline_kernels.py), it takes most of the extra cold compile of a small model on an H100
    (bench/RESULTS.md, the compile profiles). The IR depends only on
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
    the new argument's example value joins them. No public API edits a post-grad node's
    arguments; checked on torch 2.11 and 2.13."""
    node.args = (*node.args, argument)
    if "eager_input_vals" in node.meta:
        example_args, example_kwargs = node.meta["eager_input_vals"]
        node.meta["eager_input_vals"] = ((*example_args, argument.meta["val"]), example_kwargs)


def _static_unless_traced(example_inputs: Sequence[Any]) -> list[Any]:
    """The example inputs with every real tensor Dynamo did not trace (the mHC parameters the
    backend adds) as a fake tensor of static shape in Dynamo's fake mode. AOT autograd gives such an
    input symbolic sizes, finding no symbolic context for it in the private
    TracingContext.tensor_to_context: phi would be [s0, s1], which keeps the ops' kernels from
    Inductor (passes/inline_kernels.py takes static shapes only) and adds guards nobody needs.
    Checked on torch 2.11 and 2.13."""
    context = torch._guards.TracingContext.try_get()
    if context is None or context.fake_mode is None:
        return list(example_inputs)
    return [
        context.fake_mode.from_tensor(value, static_shapes=True)
        if isinstance(value, torch.Tensor) and not isinstance(value, FakeTensor)
        and value not in context.tensor_to_context else value
        for value in example_inputs
    ]


def mark_parameter_input(placeholder: fx.Node, parameter: torch.Tensor, fake_mode) -> None:
    """A placeholder we add for an mHC parameter. AOT autograd asserts every placeholder of a
    Dynamo graph has `_dynamo_source` (None is allowed, as DDP's graph splitter does), and reads
    the static-input mark (as Dynamo sets for parameters) to keep CUDA graphs from copying it.
    Its example value is the parameter as a static fake tensor of `fake_mode` (the graph's,
    `fake_mode_of`), as Dynamo's own placeholders hold theirs; the parameter itself without one.
    No public API adds an input to a Dynamo graph; checked on torch 2.11 and 2.13."""
    placeholder._dynamo_source = None
    placeholder.meta["tensor_dict"] = {"_dynamo_static_input_type": "unguarded"}
    value = (parameter if fake_mode is None
             else fake_mode.from_tensor(parameter, static_shapes=True))
    placeholder.meta["example_value"] = placeholder.meta["val"] = value


def weak_id_dictionary() -> dict:
    """A dictionary keyed on tensors (or modules) by identity that does not keep its keys alive:
    weakref.WeakKeyDictionary compares keys with ==, which a tensor answers elementwise.
    torch.utils.weak.WeakIdKeyDictionary serves, undocumented (torch 2.11, 2.13)."""
    from torch.utils.weak import WeakIdKeyDictionary

    return WeakIdKeyDictionary()


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
    raise their own error, which says what to do, where Dynamo's would not. The switch is the
    private torch._dynamo.config's, as `fail_past_recompile_limit` says (torch 2.11, 2.13)."""
    return torch._dynamo.config.patch(fail_on_recompile_limit_hit=False)


def is_compiled_module(module: nn.Module) -> bool:
    """Whether `module` is the wrapper torch.compile returns (an OptimizedModule): the gain
    diagnostics must compile the model itself, and torch has no public name for the wrapper
    (torch._dynamo.eval_frame.OptimizedModule; torch 2.11, 2.13)."""
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
    """A `tag_activation_checkpoint` call whose region has a context_fn (left as it is); the op
    is private to torch, as `checkpoint_region_body` says (torch 2.11, 2.13)."""
    hop = getattr(torch.ops.higher_order, "tag_activation_checkpoint", None)
    return (hop is not None and node.op == "call_function" and node.target is hop
            and checkpoint_region_body(graph_module, node) is None)


def new_checkpoint_region_id() -> int:
    """A fresh ac_graph_id from the counter torch numbers its own checkpoint regions with, so
    regions inlined by us and regions torch traces itself never share an id. The counter is
    torch._higher_order_ops.wrap.uid, with no public accessor (torch 2.11, 2.13)."""
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
    keep no KernelParams. Checked against Triton 3.6."""
    from triton.runtime.jit import KernelParam

    parameters = inspect.signature(jit_function.fn).parameters.values()
    return frozenset(
        parameter.name
        for number, parameter in enumerate(parameters)
        if KernelParam(number, parameter, False, False).is_constexpr
    )


def autotune_candidates(autotuner, named_args: dict, kwargs: dict) -> list:
    """The configs a triton.autotune'd kernel benchmarks for these arguments (positional ones by
    name, as Triton passes them), after its prune_configs_by early prune: the Autotuner keeps that
    function as the private attribute early_config_prune (checked against Triton 3.6)."""
    return autotuner.early_config_prune(autotuner.configs, named_args, **kwargs)


def kernel_argument_names(jit_function) -> list[str]:
    """A @triton.jit kernel's parameter names in order (JITFunction.arg_names, no public accessor;
    Triton 3.6)."""
    return jit_function.arg_names


def compile_to_ptx(jit_function, values: dict, num_warps: int, num_stages: int, arch: int) -> str:
    """The PTX Triton makes of a @triton.jit kernel for these argument values and launch options on
    sm_`arch`, without a GPU (bench/registers.py). Triton's ahead-of-time path (ASTSource, its
    signature strings and attribute specs) is private; checked against Triton 3.6."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs = _triton_signature(jit_function, values)
    compiled = triton.compile(ASTSource(jit_function, signature, constexprs, attrs),
                              target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    return compiled.asm["ptx"]


_POINTER_TYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32",
                  torch.int64: "*i64", torch.int32: "*i32"}


def _triton_signature(jit_function, values: dict) -> tuple[dict, dict, dict]:
    """Triton's signature, constexprs and attributes (16-byte aligned pointers, as real buffers
    are) for these argument values."""
    signature, constexprs, attrs = {}, {}, {}
    for index, (name, param) in enumerate(zip(jit_function.arg_names, jit_function.params)):
        value = values[name]
        if param.is_constexpr:
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = _POINTER_TYPES[value.dtype]
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        else:
            signature[name] = "fp32"
    return signature, constexprs, attrs


def ptxas_path(arch: int) -> str:
    """The ptxas binary Triton ships for sm_`arch` (its NVIDIA backend's get_ptxas; Triton 3.6)."""
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(arch).path


def compiled_triton_launcher(autotuner, grid, args: tuple, kwargs: dict) -> Callable:
    """A launcher of the binary `autotuner` (a triton.autotune'd kernel) has just run for these
    arguments, called as launcher(grid, args, kwargs) with arguments Triton would specialise the
    same way (mhc_compile/kernel_launch.py keys it so).

    Why: Triton's own launch path costs 80-130 us of host time per launch on an H100 machine's host
    (bench/RESULTS.md): the autotuner's key, the JIT's argument binding and specialisation, its
    cache key. Inductor avoids the same cost for the kernels it generates by
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


def settle_triton_cache_dir(device_index: int) -> None:
    """Set TRITON_CACHE_DIR, if unset, to the folder Inductor would set it to the first time it
    compiles a kernel in this process (CachingAutotuner does, through the private
    torch._inductor.runtime.cache_dir_utils.triton_cache_dir), so that processes started now and
    this process use one folder. Triton reads the variable at every access; torch 2.11, 2.13."""
    from torch._inductor.runtime.cache_dir_utils import triton_cache_dir

    if not os.environ.get("TRITON_CACHE_DIR"):
        os.environ["TRITON_CACHE_DIR"] = triton_cache_dir(device_index)


def load_compiled_kernel(compiled) -> None:
    """Load what JITFunction.warmup compiled (CompiledKernel: its GPU module, and its host launcher,
    which Triton builds with the C compiler unless cached on disk) as its first launch would: about
    0.3 s of each of our kernels' first launches on the H100 host (bench/RESULTS.md, session 16),
    which kernel_launch.compile_ahead moves off the critical path. Triton loads them lazily at the
    first launch (CompiledKernel._init_handles), with no public way to do it earlier; checked
    against Triton 3.6 and 3.9."""
    _completed(compiled)._init_handles()


def build_host_launcher(compiled) -> None:
    """Build a compiled kernel's host launcher without loading its GPU module (which would open a
    CUDA context): Triton 3.6 compiles each launcher's C source into its disk cache, where a later
    load in another process finds it (kernel_launch's compile workers); Triton 3.9's launcher is
    generic and costs nothing. CompiledKernel._init_handles builds it and loads the module in one
    go, with no public way to do only the first; driver.active.launcher_cls(src, metadata) is how
    it builds it, checked against Triton 3.6 and 3.9."""
    import triton

    compiled = _completed(compiled)
    triton.runtime.driver.active.launcher_cls(compiled.src, compiled.metadata)


def _completed(compiled):
    """JITFunction.warmup's result: a CompiledKernel, or a future of one under async compiles."""
    return compiled.result() if hasattr(compiled, "result") else compiled


# --- The min-cut partitioner's recompute tags -----------------------------------------------------
# Selective activation checkpointing steers AOT autograd's partitioner through two node.meta keys,
# a CheckpointPolicy under "recompute" and a region id under "ac_graph_id"; torch has no public
# API to set them on a joint graph. Checked on torch 2.11 and 2.13.

PARTITIONER_META_KEYS = ("recompute", "ac_graph_id")


def partitioner_tagged(node: fx.Node) -> bool:
    """Whether a user's checkpoint region (or an earlier rule) decided this node's fate (the
    section's private meta keys)."""
    return "recompute" in node.meta


def tag_for_partitioner(node: fx.Node, policy, region_id: int | None = None) -> None:
    """Tell the partitioner to save or recompute `node` (a CheckpointPolicy), in region
    `region_id` when given (the section's private meta keys)."""
    node.meta["recompute"] = policy
    if region_id is not None:
        node.meta["ac_graph_id"] = region_id


def is_tangent(node: fx.Node) -> bool:
    """A joint graph's backward input: AOT autograd names those placeholders tangents_<i>, and
    says so nowhere public (torch 2.11, 2.13)."""
    return node.op == "placeholder" and str(node.target).startswith("tangents")


# --- Dynamo's errors ------------------------------------------------------------------------------


def dynamo_unsupported_error() -> type[Exception]:
    """What Dynamo raises where fullgraph=True meets a graph break: torch._dynamo.exc.Unsupported,
    with no public alias (torch 2.11, 2.13)."""
    return torch._dynamo.exc.Unsupported


# --- DistributedDataParallel under Dynamo (checked on torch 2.13) ---------------------------------


def inside_ddp_forward() -> bool:
    """Whether this runs inside a DistributedDataParallel forward (compiling a frame, or running
    a compiled one): DDP's class-level record of its active module, which Dynamo's own DDP
    handling reads (convert_frame); no public accessor exists."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel._get_active_ddp_module() is not None


def ddp_graph_splitting() -> str:
    """Dynamo's handling of DDP graphs, torch._dynamo.config.optimize_ddp normalised to its mode
    name ("ddp_optimizer" splits graphs at gradient-bucket boundaries, "no_optimization" does not);
    the config is documented for DDP users but has no public accessor."""
    return torch._dynamo.utils.get_optimize_ddp_mode()


# --- torch.distributed.pipelining's action runtime (checked on torch 2.11 and 2.13) ---------------


def build_schedule(schedule_class: type, stages: list, n_microbatches: int, *,
                   loss_fn: Callable, scale_grads: bool, async_exchange: bool) -> Any:
    """A schedule object for `stages` (this rank's PipelineStages).

    One-stage-per-rank schedules (GPipe, 1F1B) with async_exchange run their own compute order on
    torch's action runtime (`_PipelineScheduleRuntime`, the engine behind Interleaved1F1B and
    DualPipeV): it posts each boundary receive as early as the order allows and waits for sends
    only at the end of the step. Schedule1F1B instead waits for every send together with the next
    receive, so the n-times wider mHC boundary transfer sits on the critical path. No public class
    runs a single-stage order on the runtime; the runtime and its `_prepare_schedule_with_comms`
    (which adds the send/receive actions to a compute-only order) are private.
    """
    from torch.distributed.pipelining.schedules import (
        PipelineScheduleSingle, ScheduleGPipe, _PipelineScheduleRuntime)

    if not issubclass(schedule_class, PipelineScheduleSingle):
        return schedule_class(stages, n_microbatches, loss_fn=loss_fn, scale_grads=scale_grads)
    (stage,) = stages
    single = schedule_class(stage, n_microbatches, loss_fn=loss_fn, scale_grads=scale_grads)
    if not async_exchange:
        return single  # constructed first all the same: its checks (1F1B: microbatches >= stages)
    order_of = fill_drain_order if issubclass(schedule_class, ScheduleGPipe) else one_f_one_b_order
    order = {rank: order_of(rank, stage.num_stages, n_microbatches) for rank in range(stage.num_stages)}
    runtime = _PipelineScheduleRuntime(stages, n_microbatches, loss_fn=loss_fn,
                                       scale_grads=scale_grads)
    runtime.pipeline_order = order
    runtime._prepare_schedule_with_comms(order)
    return runtime


def fill_drain_order(rank: int, num_stages: int, n_microbatches: int) -> list:
    """GPipe on stage `rank`: every forward, then every backward."""
    from torch.distributed.pipelining.schedules import _Action, _ComputationType

    forward, backward = _ComputationType.FORWARD, _ComputationType.FULL_BACKWARD
    return ([_Action(rank, forward, mb) for mb in range(n_microbatches)]
            + [_Action(rank, backward, mb) for mb in range(n_microbatches)])


def one_f_one_b_order(rank: int, num_stages: int, n_microbatches: int) -> list:
    """1F1B on stage `rank` (Schedule1F1B's order): num_stages - rank - 1 warm-up forwards, then
    alternate one forward and one backward, then the remaining backwards."""
    from torch.distributed.pipelining.schedules import _Action, _ComputationType

    forward, backward = _ComputationType.FORWARD, _ComputationType.FULL_BACKWARD
    warmup = min(num_stages - rank - 1, n_microbatches)
    order = [_Action(rank, forward, mb) for mb in range(warmup)]
    for mb in range(n_microbatches - warmup):
        order += [_Action(rank, forward, warmup + mb), _Action(rank, backward, mb)]
    order += [_Action(rank, backward, mb) for mb in range(n_microbatches - warmup, n_microbatches)]
    return order


# --- What the benchmarks read or set (checked on torch 2.11 and 2.13) ------------------------------


def raise_recompile_limit(at_least: int) -> None:
    """Let Dynamo keep at least `at_least` compiled entries per code object: the benches compile
    one model class many times (variants, probes, per-layer compiles). The limit lives in the
    private torch._dynamo.config, as recompile_limit (cache_size_limit before torch 2.12)."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(at_least, getattr(config, name)))


def compile_phase_seconds() -> dict[str, float]:
    """Seconds per compile phase in this process so far, summed over calls, from Dynamo's own
    timers (torch._dynamo.utils.compile_times; no public accessor)."""
    names, seconds = torch._dynamo.utils.compile_times(repr="csv", aggregate=True)
    return {name: float(value) for name, value in zip(names, seconds)}


def mark_static_address(tensor: torch.Tensor) -> None:
    """Tell cudagraph trees a tensor keeps its address between replays, so it is not copied in;
    torch._dynamo.mark_static_address has no torch.compiler alias."""
    torch._dynamo.mark_static_address(tensor)
