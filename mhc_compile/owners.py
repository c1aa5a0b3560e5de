"""Which module holds a block's mHC parameters, and under which key, found by identity.

A backend receives a graph and its inputs; with Dynamo's default inlining of nn.Modules, the
inputs are the model's real `nn.Parameter` objects. A block's site is its f's first weight: the
module that owns that Parameter (its `named_parameters()` yields the very object) holds the mHC
parameters in its `mhc` submodule, under the key that names the weight's module below it
("layers.3.attn.q_proj"). Nothing here reads Dynamo's source names ("L['self']"), so decorated
forwards (transformers 5 wraps `forward` and the model arrives as `args[0]`), hooks,
`Module.compile()` and per-block compiles all resolve the same way.

Which module owns a weight, among all that do (the block, its layer, the model, a DDP wrapper):
1. the module `prepare`, `report` or `gain` was given;
2. else the outermost module that already holds mHC parameters (a prepared model, or one a
   compile created them on), so a recompile, a graph break or a compiled submodule finds them;
3. else the innermost module on the call stack: the one the user compiled (torch.compile(model),
   model.compile(), or each block compiled on its own).

Containers (nn.Sequential, nn.ModuleList, nn.ModuleDict) never hold the store: nn.Sequential
calls every child, the store would be one more. The child on the weight's path holds it instead.

A weight used at several places (tied layers, ALBERT's one layer applied at every depth) is one
site: its residuals share one set of mHC parameters, as they share the weight.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn

from mhc_compile import private_apis
from mhc_compile.optimizers import install_step_check
from mhc_compile.parameters import SUBMODULE, MHCParameters, parameters_of

# Modules that hold an mHC store: rule 2's candidates, also when they are not on the call stack
# (a prepared model called from a compiled function that reaches it as a global).
_HOLDERS: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


@dataclass(frozen=True)
class Site:
    """Where one block's mHC parameters live: `owner.mhc`, under `key`."""

    owner: nn.Module
    key: str

    def has_parameters(self) -> bool:
        """Whether mHC parameters exist for this site already (nothing is created)."""
        store = getattr(self.owner, SUBMODULE, None)
        return isinstance(store, MHCParameters) and MHCParameters.module_name(self.key) in store.blocks

    def store(self) -> MHCParameters:
        store = parameters_of(self.owner)
        _HOLDERS.add(self.owner)
        install_step_check()  # refuse optimizer steps that leave mHC parameters untrained
        return store


class Owners:
    """Resolves weights to sites. One instance per compile or per rebinding: it caches each
    candidate module's parameter names, which do not change while one graph is being bound."""

    def __init__(self, top_module: nn.Module | None = None):
        self.top_module = top_module
        self._names: dict[int, dict[int, str]] = {}
        self._stack: list[nn.Module] | None = None

    def site(self, weight: torch.Tensor) -> Site | None:
        """The site of the block whose f's first weight is `weight`, or None if no module this
        compile can see owns it (a Parameter passed to a compiled function as an argument)."""
        if self.top_module is not None:
            found = self._site_in(self.top_module, weight)
            if found is not None:
                return found
        holders = [*_HOLDERS, *(m for m in self._call_stack() if _holds_store(m))]
        in_holders = [site for site in map(lambda m: self._site_in(m, weight), holders) if site]
        if in_holders:
            return max(in_holders, key=lambda site: len(site.key))  # the outermost holder
        for module in self._call_stack():
            found = self._site_in(module, weight)
            if found is not None:
                return found
        return None

    def compiled_module(self) -> nn.Module | None:
        """The module whose call is being compiled: the one given, else the innermost running."""
        stack = self._call_stack()
        return self.top_module or (stack[0] if stack else None)

    def _site_in(self, module: nn.Module, weight: torch.Tensor) -> Site | None:
        names = self._names.get(id(module))
        if names is None:  # a shared weight is named where named_parameters() first meets it
            names = {id(p): name for name, p in reversed(list(module.named_parameters()))}
            self._names[id(module)] = names
        name = names.get(id(weight))
        if name is None:
            return None
        if isinstance(module, _CONTAINERS) and "." in name:
            # A container's forward (nn.Sequential's) runs every child: one more would be called.
            return self._site_in(module.get_submodule(name.partition(".")[0]), weight)
        return Site(module, name.rpartition(".")[0])

    def _call_stack(self) -> list[nn.Module]:
        if self._stack is None:
            self._stack = private_apis.modules_on_call_stack()
        return self._stack


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _holds_store(module: nn.Module) -> bool:
    return isinstance(getattr(module, SUBMODULE, None), MHCParameters)

