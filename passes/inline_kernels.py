"""Hand the mHC kernels to Inductor once the graphs no longer need whole ops (post-grad pass).

The backend traces every mhc:: op as its opaque twin (ops.keep_ops_whole): the recompute policy
tags whole ops in the joint graph for the partitioner, and passes/fuse_grad_streams.py folds an add
into a whole coefficient backward. Left opaque, each twin is an Inductor fallback whose Python
launcher runs at every call (allocations, views, partial sums, launches): about 2 ms of host time
per sublayer forward and backward on an H100 host, enough to make the C=1024 training step
host-bound (bench/RESULTS.md).

After both passes, each twin whose kernels apply with static shapes is replaced by the functional
trace of its launcher: the kernels as triton_kernel_wrapper_functional nodes, the glue as aten ops,
which is what AOT autograd makes of the public triton_op. Inductor compiles them and launches them
from its generated code, and fuses the glue with its neighbours. The partitioner's decisions and
the fold stay: this runs on the forward and backward graphs it produced. Symbolic shapes and other
devices keep the twin (mhc_compile/ops.py says why).

Graphs that Inductor replays as CUDA graphs (cudagraphs=True, mode="reduce-overhead") keep every
twin: a replay launches the recorded kernels without running any Python, so the splice would buy
no host time there, and it costs the cold compile most of its extra (Inductor decomposes, lowers
and generates code for each of ~220 kernel launches of a 12-layer model: docs/design.md). There
the twins' kernels start compiling instead (kernel_launch.compile_ahead), beside Inductor's work,
rather than one after the other at the graph's first run.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import fx

from mhc_compile import ops, private_apis, spec, templates
from mhc_compile.passes.context import PassContext



def inline_kernels(graph: fx.Graph, context: PassContext) -> int:
    """Replace every call of an opaque mhc:: op whose kernels Inductor may trace by the functional
    trace of its launcher, unless the graph is replayed as CUDA graphs (then its kernels start
    compiling); returns the number of calls replaced."""
    calls = [(node, op) for node in graph.nodes if (op := _traceable_op(node)) is not None]
    if private_apis.graphs_replayed():
        if not calls:
            return 0
        from mhc_compile import kernel_launch  # imports Triton, which a call here implies

        kernel_launch.compile_ahead(_distinct_calls(calls))
        return 0
    traces: dict = {}  # one trace per launcher and signature: a model's blocks repeat them
    for node, op in calls:
        _splice_launcher(node, templates.launcher(op.name), traces)
    return len(calls)


def _distinct_calls(calls: list[tuple[fx.Node, spec.OpSpec]]) -> list[tuple[Callable, list]]:
    """One (launcher, example arguments) per launcher and signature (_trace_key): running a
    launcher on fake tensors takes milliseconds, and a model's blocks repeat the same calls."""
    distinct: dict = {}
    for node, op in calls:
        launcher = templates.launcher(op.name)
        key = _trace_key(launcher, list(node.args)) or node
        distinct.setdefault(key, (launcher, [_example(arg) for arg in node.args]))
    return list(distinct.values())


def _traceable_op(node: fx.Node) -> spec.OpSpec | None:
    if node.op != "call_function" or (op := ops.OPAQUE_OPS.get(node.target)) is None:
        return None
    if node.kwargs:  # the splice takes positional arguments only; the opaque op stays
        return None
    values = [_example(arg) for arg in node.args]
    return op if ops.kernels_traceable(values[op.streams_at], values) else None


def _example(argument):
    return argument.meta["val"] if isinstance(argument, fx.Node) else argument


def _splice_launcher(node: fx.Node, launcher: Callable, traces: dict) -> None:
    """Replace `node` by the functional trace of `launcher(*node.args)` on its arguments' example
    values: what AOT autograd makes of a triton_op's body, so Inductor lowers it as it lowers a
    traced triton_op.

    `traces` keeps each trace under what it depends on (`_trace_key`) for the next call with the
    same signature: the blocks of a model repeat the same calls, and each trace takes tens of
    milliseconds (seconds of a 12-layer model's cold compile, bench/RESULTS.md). Splicing copies a
    trace into the graph without changing it, so one trace serves every call of one graph; the
    copied nodes then get example values of their own (`_fresh_values`)."""
    arguments = list(node.args)
    traced_at = [i for i, argument in enumerate(arguments) if isinstance(argument, fx.Node)]

    def call(*values):
        filled = list(arguments)  # constants (ints, strings) stay in the closure, out of the trace
        for position, value in zip(traced_at, values):
            filled[position] = value
        return launcher(*filled)

    key = _trace_key(launcher, arguments)

    def trace(function: Callable, example_values) -> fx.GraphModule:
        if key is None:
            return private_apis.functional_trace(function, example_values)
        if key not in traces:
            traces[key] = private_apis.functional_trace(function, example_values)
        return traces[key]

    spliced = private_apis.replace_by_trace(node, call, [arguments[i] for i in traced_at], trace)
    _fresh_values(spliced)


def _fresh_values(nodes: list[fx.Node]) -> None:
    """Recompute the example values ("val") of spliced nodes from their inputs' values.

    Splicing gives each copied node the value its trace node holds, so two splices of one trace
    would share fake tensors, and with them storages. Inductor's reinplace pass reads aliasing from
    those storages: a buffer that shares one with a later splice's buffer is never written in
    place, and its kernel gets a clone of it (a copy of every output buffer). Fake tensors are
    cheap to recompute (each kernel wrapper's fake clones its outputs)."""
    with private_apis.in_tracing_fake_mode([node.meta.get("val") for node in nodes]):
        for node in nodes:
            if node.op != "call_function" or "val" not in node.meta:
                continue
            args, kwargs = fx.map_arg((node.args, node.kwargs), lambda arg: arg.meta["val"])
            node.meta["val"] = node.target(*args, **kwargs)


def _trace_key(launcher: Callable, arguments: list) -> tuple | None:
    """What the functional trace of `launcher` on these arguments depends on: the launcher, the
    constants, each tensor's shape, strides, storage offset, dtype and device, and which arguments
    are the same node (make_fx traces a tensor passed twice as one input). None where a size is
    symbolic or a constant is unhashable: such calls are traced afresh."""
    described: list[Any] = []
    first_position: dict[fx.Node, int] = {}
    for position, argument in enumerate(arguments):
        if not isinstance(argument, fx.Node):
            try:
                hash(argument)
            except TypeError:
                return None
            described.append(("constant", type(argument), argument))
            continue
        value = argument.meta.get("val")
        if not isinstance(value, torch.Tensor):
            return None
        layout = (*value.shape, *value.stride(), value.storage_offset())
        if any(isinstance(size, torch.SymInt) for size in layout):
            return None
        same_as = first_position.setdefault(argument, position)
        described.append(("tensor", tuple(layout), value.dim(), value.dtype, value.device, same_as))
    return launcher, tuple(described)
