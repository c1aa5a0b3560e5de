"""Refuse, loudly, to train a model whose mHC parameters its optimizer never saw.

The backend creates a model's mHC parameters at the first compiled forward. An optimizer built
before that (a plain loop that builds it first, transformers' Trainer, which builds it from
`model.parameters()` before the first step) does not hold them: they get gradients and never
change, and nothing else would say so. `mhc_compile.prepare(model, *example_args)` before
building the optimizer avoids it; this module makes forgetting it an error.

A process-wide optimizer step pre-hook, installed when the first mHC store is created
(`Site.store`), checks at each `optimizer.step()`, for every model holding mHC parameters
(`owners._HOLDERS`):

    for each mHC block whose f's site weights (the parameters of the module that owns f's first
    weight, "layers.3.attn.q_proj") this optimizer holds: that block's mHC parameters that
    require grad, have a gradient, are not in this optimizer, and are not in any other live
    optimizer that has stepped.

An optimizer that trains only part of a model on purpose (the head, the upper layers) holds no
site weight of the blocks it leaves alone, so it is never refused for them. A separate optimizer
for the mHC parameters (another learning rate; Muon for matrices and AdamW for the rest) is
allowed: the first step that finds parameters untrained only notes it, and the error comes at
that optimizer's next step if no other optimizer that stepped meanwhile holds them.

Cost per step: the optimizer's parameter count and the stores' block counts, compared with what
this optimizer's check was built for (rebuilt when either changes); then only the few mHC
parameters found missing are looked at, and those another optimizer holds are dropped for good.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.optimizer import register_optimizer_step_pre_hook

from mhc_compile import private_apis
from mhc_compile.parameters import SUBMODULE, MHCParameters

_handle: torch.utils.hooks.RemovableHandle | None = None


@dataclass
class _Missing:
    """One mHC parameter an optimizer lacks although it trains its block's site weights."""

    parameter: weakref.ref
    block: str  # the block's site key
    model: str  # the holder's class name


@dataclass
class _Check:
    """What one optimizer was checked against: its parameter count and the stores' sizes."""

    key: tuple[int, int]
    missing: list[_Missing] = field(default_factory=list)
    pending: bool = False  # the previous step found parameters untrained


_CHECKS: "weakref.WeakKeyDictionary[Optimizer, _Check]" = weakref.WeakKeyDictionary()
# mHC parameter -> the optimizers that hold it, among those that stepped (by identity: a Tensor's
# == compares values, so no WeakSet of tensors).
_HELD = private_apis.weak_id_dictionary()


def install_step_check() -> None:
    """Install the step pre-hook once per process; later calls do nothing."""
    global _handle
    if _handle is None:
        _handle = register_optimizer_step_pre_hook(_before_step)


def _before_step(optimizer: Optimizer, args, kwargs) -> None:
    if torch.compiler.is_compiling():  # a compiled optimizer step: check outside the graph
        _check_outside_graph(optimizer)
    else:
        check_optimizer(optimizer)


def check_optimizer(optimizer: Optimizer) -> None:
    """Raise if `optimizer` trains blocks whose mHC parameters no optimizer trains (see above)."""
    from mhc_compile.owners import _HOLDERS  # owners imports this module's installer

    if not _HOLDERS:
        return
    key = (sum(len(group["params"]) for group in optimizer.param_groups), _blocks(_HOLDERS))
    check = _CHECKS.get(optimizer)
    if check is None or check.key != key:
        check = _CHECKS[optimizer] = _build(optimizer, key, _HOLDERS)
    if not check.missing:
        return
    untrained, elsewhere = [], []
    for entry in check.missing:
        parameter = entry.parameter()
        if parameter is None or not parameter.requires_grad or parameter.grad is None:
            continue
        others = _HELD.get(parameter)  # live optimizers that hold it; never this one
        (elsewhere if others else untrained).append(entry)
    if elsewhere:  # another optimizer trains these: never look at them again
        dropped = {id(entry) for entry in elsewhere}
        check.missing = [entry for entry in check.missing if id(entry) not in dropped]
    if not untrained:
        check.pending = False
        return
    if not check.pending:  # another optimizer holding them may not have stepped yet
        check.pending = True
        return
    raise RuntimeError(_message(untrained))


_check_outside_graph = torch.compiler.disable(check_optimizer)


def _blocks(holders) -> int:
    return sum(len(store.blocks) for store in map(_store_of, holders) if store is not None)


def _store_of(holder: nn.Module) -> MHCParameters | None:
    store = getattr(holder, SUBMODULE, None)
    return store if isinstance(store, MHCParameters) else None


def _build(optimizer: Optimizer, key: tuple[int, int], holders) -> _Check:
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    check = _Check(key)
    for holder in list(holders):
        store = _store_of(holder)
        if store is None:
            continue
        for block in store.blocks.values():
            parameters = list(block.parameters())
            for parameter in parameters:
                if id(parameter) in held:
                    _HELD.setdefault(parameter, weakref.WeakSet()).add(optimizer)
            site = _site_module(holder, getattr(block, "key", None))
            if site is None or not any(id(p) in held for p in site.parameters(recurse=False)):
                continue  # this optimizer does not train this block's f: not its business
            check.missing.extend(
                _Missing(weakref.ref(p), block.key, type(holder).__name__)
                for p in parameters if id(p) not in held
            )
    return check


def _site_module(holder: nn.Module, key: str | None) -> nn.Module | None:
    if key is None:
        return None
    try:
        return holder.get_submodule(key)
    except AttributeError:  # the model was restructured since: no site to compare with
        return None


def _message(untrained: list[_Missing]) -> str:
    blocks = {(entry.model, entry.block) for entry in untrained}
    models = ", ".join(sorted({entry.model for entry in untrained}))
    return (
        f"mhc: {len(untrained)} mHC parameters of {models} ({len(blocks)} blocks) get gradients "
        "but no optimizer trains them, while this optimizer trains the rest of those blocks: they "
        "were created at the model's first compiled forward, after the optimizer was built. Call "
        "mhc_compile.prepare(model, *example_args) (or mhc_compile.prepare(model, **batch) with "
        "the model's keyword arguments) before building the optimizer, or before creating a "
        "transformers Trainer."
    )
