"""Run a model once for what the run reveals (a trace, recorded coefficients), not for its effects.

`prepare`, `report` and the gain diagnostics all call a model outside the user's training loop;
that call must not move BatchNorm statistics or consume random numbers. prepare and report trace
with grad enabled, as the training step they prepare for does: some modules take another path
under no_grad (nn.TransformerEncoderLayer's fused fast path, which hides its residuals); the
autograd graph goes with the outputs they drop.
They take the model's own keyword arguments (attention_mask, pixel_values, labels) as keywords and
the mHC options as one `options=` mapping; `split_keywords` also accepts the deprecated form,
with options as keywords too.
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from mhc_compile.options import MHCOptions

OPTION_NAMES = frozenset(field.name for field in dataclasses.fields(MHCOptions))


def run_without_side_effects(model: nn.Module, call: Callable[..., Any], args: Sequence[Any],
                             kwargs: Mapping[str, Any] | None = None, grad: bool = False) -> Any:
    """`call(*args, **kwargs)` under no_grad (enable_grad if `grad`) with the RNG state forked;
    `model`'s buffers restored after."""
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    try:
        with torch.set_grad_enabled(grad), torch.random.fork_rng(devices=_cuda_devices(model)):
            return call(*args, **(kwargs or {}))
    finally:
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                if name in buffers:
                    buffer.copy_(buffers[name])


def _cuda_devices(model: nn.Module) -> list[int]:
    return sorted({p.device.index or 0 for p in model.parameters() if p.is_cuda})


def split_keywords(caller: str, model: nn.Module, options: Mapping[str, Any] | None,
                   keywords: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(mHC options, the model's keyword arguments) of a `caller(model, *args, options=...,
    **keywords)` call (caller: "prepare", "report", "gain").

    Every keyword goes to the model, except, for the deprecated form with options as keywords,
    one that names an MHCOptions field and that model.forward does not declare as a parameter:
    that is taken as an option, with a FutureWarning. A name that is both goes to the model; when
    no options= was passed (the call may be of the deprecated form), a FutureWarning says so. A
    keyword that is neither an option nor accepted by forward (no such parameter, no **kwargs) is
    a TypeError here rather than deep inside the trace: it is most likely a misspelt option.
    """
    if options is None:
        chosen: dict[str, Any] = {}
    elif isinstance(options, Mapping):
        chosen = dict(options)
    else:
        raise TypeError(
            f"mhc_compile.{caller}: options= takes a mapping of mHC options, such as "
            f"{{'n': 2, 'constraint': 'none'}}, got {type(options).__name__}"
        )
    owner = f"{type(model).__name__}.forward"
    named, takes_any = _keyword_parameters(model)
    legacy = {name: value for name, value in keywords.items()
              if name in OPTION_NAMES and name not in named}
    model_kwargs = {name: value for name, value in keywords.items() if name not in legacy}
    both = sorted(name for name in model_kwargs if name in OPTION_NAMES)
    unknown = sorted(name for name in model_kwargs if name not in named and not takes_any)
    if unknown:
        raise TypeError(
            f"mhc_compile.{caller}: {owner} takes no keyword argument(s) "
            f"{', '.join(map(repr, unknown))} (its keyword parameters: "
            f"{', '.join(sorted(named)) or 'none'}). mHC options go in options=; valid options "
            f"are: {', '.join(sorted(OPTION_NAMES))}"
        )
    if legacy:
        twice = sorted(set(legacy) & set(chosen))
        if twice:
            raise TypeError(
                f"mhc_compile.{caller}: mHC option(s) {', '.join(map(repr, twice))} given both "
                "in options= and as keywords; give them in options= only"
            )
        warnings.warn(
            f"mhc_compile.{caller}: passing mHC options as keywords is deprecated, since keywords "
            f"now go to the model: {', '.join(map(repr, sorted(legacy)))} "
            f"{'is taken as an mHC option' if len(legacy) == 1 else 'are taken as mHC options'} "
            f"because {owner} does not declare {'it' if len(legacy) == 1 else 'them'}. Pass "
            f"options={dict(sorted(legacy.items()))!r} instead.",
            FutureWarning,
            stacklevel=3,
        )
        chosen.update(legacy)
    if both and options is None:
        warnings.warn(
            f"mhc_compile.{caller}: {', '.join(map(repr, both))} "
            f"{'is' if len(both) == 1 else 'are'} both a parameter of {owner} and an mHC option; "
            "passed to the model, not taken as "
            f"the option. To set the option, pass options={{{both[0]!r}: ...}} (passing options= "
            "also silences this warning).",
            FutureWarning,
            stacklevel=3,
        )
    return chosen, model_kwargs


def _keyword_parameters(model: nn.Module) -> tuple[set[str], bool]:
    """The names model.forward accepts as keywords, and whether it takes **kwargs too."""
    try:
        signature = inspect.signature(model.forward)
    except (AttributeError, TypeError, ValueError):  # not a module, or no signature to read:
        return set(), True  # the caller's own checks and the model judge
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    named = {p.name for p in signature.parameters.values() if p.kind in kinds}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())
    return named, takes_any
