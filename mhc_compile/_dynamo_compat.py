"""Every private PyTorch API mhc_compile touches, in one place, each with the reason.

Checked against torch 2.11 and 2.13. If one of these breaks on a new release, this is the only
module to fix.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
import re
from typing import Any, Callable, Sequence

import torch
from torch import fx, nn
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

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
    partitioning and code generation. It has no public alias.

    Inductor's FX graph cache keys on the graph, not on what our custom ops do: after an upgrade
    of mhc_compile it would serve code compiled against the old ops (stale stride assertions were
    seen). A pass that changes nothing but whose uuid() hashes our sources keys the cache on them.
    """
    from torch._inductor import config
    from torch._inductor.compile_fx import compile_fx

    patches = {}
    if config.post_grad_custom_post_pass is None:
        patches["post_grad_custom_post_pass"] = _SourceStamp()
    return compile_fx(graph_module, list(example_inputs), config_patches=patches)


def _source_files() -> list[Path]:
    package = Path(__file__).parent
    from mhc_compile import passes, templates

    folders = [package, Path(passes.__file__).parent, Path(templates.__file__).parent]
    return sorted(path for folder in folders for path in folder.glob("*.py"))


class _SourceStamp(CustomGraphPass):
    """A no-op post-grad pass whose uuid() is the hash of mhc_compile's sources (cache key)."""

    def __call__(self, graph: fx.Graph) -> None:
        return None

    def uuid(self) -> bytes:
        return get_hash_for_files(tuple(str(path) for path in _source_files()))


def mark_parameter_input(placeholder: fx.Node) -> None:
    """A placeholder we add for an mHC parameter. AOT autograd asserts every placeholder of a
    Dynamo graph has `_dynamo_source` (None is allowed, as DDP's graph splitter does), and reads
    the static-input mark (as Dynamo sets for parameters) to keep CUDA graphs from copying it."""
    placeholder._dynamo_source = None
    placeholder.meta["tensor_dict"] = {"_dynamo_static_input_type": "unguarded"}


def calling_top_module() -> nn.Module | None:
    """The module a user compiled, found as the `OptimizedModule` whose forward is on the stack.

    Dynamo reuses one compiled frame for every instance of a module class (a graph break inside a
    loop compiles each block's forward as a frame; so does compiling blocks one by one). The
    rewritten graph must then find each instance's own mHC parameters, and that instance lives
    below the module the user compiled; nothing public names it.
    """
    from torch._dynamo.eval_frame import OptimizedModule

    frame = sys._getframe(1)
    outermost = None
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, OptimizedModule):
            outermost = candidate._orig_mod
        frame = frame.f_back
    return outermost


def is_compiled_module(module: nn.Module) -> bool:
    """Whether `module` is the wrapper torch.compile returns (an OptimizedModule): the gain
    diagnostics must compile the model itself, and torch has no public name for the wrapper."""
    from torch._dynamo.eval_frame import OptimizedModule

    return isinstance(module, OptimizedModule)
