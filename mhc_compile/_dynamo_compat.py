"""Every private PyTorch API mhc_compile touches, in one place, each with the reason.

Checked against torch 2.11 and 2.13. If one of these breaks on a new release, this is the only
module to fix.
"""

from __future__ import annotations

import copy
import re
from typing import Any, Callable, Sequence

import torch
from torch import fx, nn

_ROOT = re.compile(r"^(L|G)\[['\"]([^'\"]+)['\"]\]$")


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


def owner_module(root: str) -> nn.Module | None:
    """The nn.Module Dynamo calls `root` ("L['self']", "G['model']") in the frame being compiled.

    A backend only receives the graph and its inputs; the module whose parameters those are lives
    in the frame's locals or globals, reachable only through Dynamo's current translator.
    """
    match = _ROOT.match(root)
    if match is None:
        return None
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        translator = InstructionTranslator.current_tx()
    except (ImportError, AttributeError, AssertionError):
        return None
    if translator is None:
        return None
    frame = translator.output.root_tx
    scope = frame.f_locals if match.group(1) == "L" else frame.f_globals
    owner = scope.get(match.group(2))
    return owner if isinstance(owner, nn.Module) else None


def compile_with_inductor(graph_module: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
    """Inductor's entry point for a Dynamo graph (what backend="inductor" calls): AOT autograd,
    partitioning and code generation. It has no public alias."""
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(graph_module, list(example_inputs))


def mark_parameter_input(placeholder: fx.Node) -> None:
    """A placeholder we add for an mHC parameter. AOT autograd asserts every placeholder of a
    Dynamo graph has `_dynamo_source` (None is allowed, as DDP's graph splitter does), and reads
    the static-input mark (as Dynamo sets for parameters) to keep CUDA graphs from copying it."""
    placeholder._dynamo_source = None
    placeholder.meta["tensor_dict"] = {"_dynamo_static_input_type": "unguarded"}
