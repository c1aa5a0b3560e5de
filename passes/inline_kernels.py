"""Hand the mHC kernels to Inductor once the graphs no longer need whole ops (post-grad pass).

The backend traces every mhc:: op as its opaque twin (ops.keep_ops_whole): the recompute policy
tags whole ops in the joint graph for the partitioner, and passes/fuse_grad_streams.py folds an add
into a whole coefficient backward. Left opaque, each twin is an Inductor fallback whose Python
launcher runs at every call (allocations, views, partial sums, launches): about 2 ms of host time
per sublayer forward and backward on the H100 machine, which kept the C=1024 training step
host-bound at 82 ms with 43 ms of GPU work (bench/RESULTS.md, e2e run 5).

After both passes, each twin whose kernels apply with static shapes is replaced by the functional
trace of its launcher: the kernels as triton_kernel_wrapper_functional nodes, the glue as aten ops,
which is what AOT autograd makes of the public triton_op. Inductor compiles them and launches them
from its generated code, and fuses the glue with its neighbours. The partitioner's decisions and
the fold stay: this runs on the forward and backward graphs it produced. Symbolic shapes and other
devices keep the twin (mhc_compile/ops.py says why).
"""

from __future__ import annotations

import logging

from torch import fx

from mhc_compile import private_apis, ops, templates

log = logging.getLogger(__name__)


def inline_kernels(graph: fx.Graph) -> int:
    """Replace every call of an opaque mhc:: op whose kernels Inductor may trace by the trace of
    its launcher; returns the number of calls replaced."""
    inlined = 0
    traces: dict = {}  # one trace per launcher and signature: a model's blocks repeat them
    for node in list(graph.nodes):
        kernels = _traceable_kernels(node)
        if kernels is not None:
            private_apis.replace_with_functional_trace(
                node, templates.launcher(kernels.launcher), traces
            )
            inlined += 1
    if inlined:
        log.info("mhc: handed the kernels of %d ops to Inductor", inlined)
    return inlined


def _traceable_kernels(node: fx.Node) -> ops.OpaqueKernels | None:
    if node.op != "call_function" or (kernels := ops.OPAQUE_KERNELS.get(node.target)) is None:
        return None
    values = [_example(arg) for arg in (*node.args, *node.kwargs.values())]
    return kernels if ops.kernels_traceable(values[kernels.streams_at], values) else None


def _example(argument):
    return argument.meta["val"] if isinstance(argument, fx.Node) else argument
