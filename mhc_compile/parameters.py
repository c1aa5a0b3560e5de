"""The new trainable mHC parameters, registered on the user's model as one submodule, `mhc`.

Parameters are keyed by a block's stable site key, so a recompile (new shapes, graph breaks,
guard failures) finds and reuses them: `model.parameters()`, `state_dict()` and
`load_state_dict()` carry them like any other weights.

What else decides a block's function travels with it: each block's state_dict holds an
`_extra_state` entry (nn.Module's get_extra_state/set_extra_state), a small int64 tensor of n, the
channel count, constraint and sinkhorn_iters. Loading a checkpoint whose blocks were made with
other settings (a hyper-connections checkpoint, constraint="none", into a model prepared with the
default "sinkhorn") raises and names the options to prepare the model with; compiling a block with
options other than its own raises the same way (MHCParameters.get_or_create). A tensor, not a
dict, so state-dict code that clones, compares or stores tensors only (safetensors) keeps working.
Checkpoints saved before the settings were stored load with a warning: nothing can be checked.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch
from torch import nn

from mhc_compile import spec
from mhc_compile.options import MHCOptions

SUBMODULE = "mhc"
_SATURATED_LOGIT = 40.0  # sigmoid(40) rounds to exactly 1 even in float64

# The extra state of a block: [format version, n, channels, constraint code, sinkhorn_iters].
_SETTINGS_VERSION = 1
_CONSTRAINT_CODES = {"none": 0, "sinkhorn": 1}  # fixed codes: never renumber, only add
_EXTRA_STATE = "_extra_state"  # torch's key suffix for get_extra_state (nn.modules.module)
_NO_SETTINGS = object()  # stands in for the extra state a checkpoint saved before it lacks


class MHCBlockParameters(nn.Module):
    """One block's mHC parameters, shaped as spec.parameter_shapes: phi [n*C, n^2+2n], alpha [3]
    (pre, post, res), b_pre [n], b_post [n], b_res [n, n].

    Initialised so that the rewritten block computes what the plain residual did (paper Table 5
    gates, HC's identity init): phi = 0 silences the dynamic terms; sigmoid(b_pre) sums to 1 over
    the streams; b_post = 0 makes H_post = 1; H_res has rows summing to 1 for any b_res.
    Symmetry breaking: block k reads mostly stream k mod n ((n+1)/2n against 1/2n for the
    others), so streams receive different gradients and diverge, as HC intends.
    """

    def __init__(self, n: int, channels: int, position: int, options: MHCOptions,
                 dtype: torch.dtype, device: torch.device):
        super().__init__()
        factory = {"dtype": dtype, "device": device}
        shapes = spec.parameter_shapes(n, channels)
        self.n, self.channels = n, channels
        self.key = ""  # the block's site key, set by the store that names it
        # What the block's coefficients depend on besides its tensors: read back by the gain
        # diagnostics (gain.py), so they measure the mapping the model really computes.
        self.constraint, self.sinkhorn_iters = options.constraint, options.sinkhorn_iters
        self.phi = nn.Parameter(torch.zeros(shapes.phi, **factory))
        self.alpha = nn.Parameter(torch.full(shapes.alpha, float(options.alpha_init), **factory))
        self.b_pre = nn.Parameter(_pre_bias(n, position % n).to(**factory))
        self.b_post = nn.Parameter(torch.zeros(n, **factory))
        identity = torch.eye(n, **factory)
        # Sinkhorn of 4*I is near identity yet lets every stream mix a little; without the
        # constraint, the identity itself keeps rows summing to 1.
        self.b_res = nn.Parameter(4.0 * identity if options.constraint == "sinkhorn" else identity)
        self.state_key = ""  # this block's prefix in the state_dict being loaded, for messages
        self.register_load_state_dict_pre_hook(_note_state_key)

    def settings(self) -> dict[str, int | str]:
        """What the block's function depends on besides its tensors (C: channels)."""
        return {"n": self.n, "C": self.channels, "constraint": self.constraint,
                "sinkhorn_iters": self.sinkhorn_iters}

    def get_extra_state(self) -> torch.Tensor:
        return torch.tensor([_SETTINGS_VERSION, self.n, self.channels,
                             _CONSTRAINT_CODES[self.constraint], self.sinkhorn_iters],
                            dtype=torch.int64)

    def set_extra_state(self, state: object) -> None:
        """Check a checkpoint's settings against this block's; a block is never changed here."""
        if state is _NO_SETTINGS:  # an older checkpoint: MHCParameters warned once for all blocks
            return
        saved = _decode_settings(state, self._entry())
        if saved != self.settings():
            raise RuntimeError(_mismatch_message(self._entry(), saved, self.settings()))

    def _entry(self) -> str:
        block = f"block {self.key or '<root>'!r}"
        return f"checkpoint entry {self.state_key!r} ({block})" if self.state_key else block

    def extra_repr(self) -> str:
        return (f"n={self.n}, channels={self.channels}, constraint={self.constraint}, "
                f"sinkhorn_iters={self.sinkhorn_iters}")


def _note_state_key(module: MHCBlockParameters, state_dict, prefix: str, *_) -> None:
    module.state_key = prefix.removesuffix(".")


def _decode_settings(state: object, entry: str) -> dict[str, int | str]:
    values = state.tolist() if isinstance(state, torch.Tensor) and state.dim() == 1 else None
    names = {code: name for name, code in _CONSTRAINT_CODES.items()}
    if (values is None or len(values) != 5 or values[0] != _SETTINGS_VERSION
            or values[3] not in names):
        raise RuntimeError(
            f"mhc: {entry} holds mHC settings this version of mhc_compile cannot read "
            f"({state!r}); expected an int64 tensor [{_SETTINGS_VERSION}, n, C, constraint code, "
            "sinkhorn_iters]. Was it saved by a newer mhc_compile?"
        )
    _, n, channels, code, iters = (int(v) for v in values)
    return {"n": n, "C": channels, "constraint": names[code], "sinkhorn_iters": iters}


def _format_settings(settings: dict[str, int | str]) -> str:
    return ", ".join(f"{name}={value!r}" for name, value in settings.items())


def _mismatch_message(entry: str, saved: dict, model: dict) -> str:
    options = {name: value for name, value in saved.items() if name != "C" and model[name] != value}
    remedy = (
        "Prepare the model with the checkpoint's options before loading it: "
        f"mhc_compile.prepare(model, *example_args, options={options!r})."
        if options else "The checkpoint is for a model of another width."
    )
    return (
        f"mhc: {entry} was saved with {_format_settings(saved)}, but this model's block has "
        f"{_format_settings(model)}: loaded, it would compute another function. {remedy}"
    )


def _pre_bias(n: int, favoured: int) -> torch.Tensor:
    if n == 1:
        return torch.full((1,), _SATURATED_LOGIT, dtype=torch.float64)
    weights = torch.full((n,), 1.0 / (2 * n), dtype=torch.float64)
    weights[favoured] = (n + 1) / (2 * n)
    return torch.log(weights) - torch.log1p(-weights)


class MHCParameters(nn.Module):
    """All mHC parameters of a model, one MHCBlockParameters per residual block."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleDict()
        self.ran_compiled_step = False
        self.register_load_state_dict_pre_hook(_accept_checkpoints_without_settings)

    @staticmethod
    def module_name(key: str) -> str:
        return key.replace(".", "-") if key else "<root>"

    def get_or_create(self, key: str, n: int, channels: int, position: int, options: MHCOptions,
                      dtype: torch.dtype, device: torch.device) -> tuple[MHCBlockParameters, bool]:
        name = self.module_name(key)
        if name in self.blocks:
            block = self.blocks[name]
            if (block.n, block.channels) != (n, channels):
                raise ValueError(
                    f"mhc: block '{key}' already has mHC parameters for n={block.n}, "
                    f"C={block.channels}, but this compilation needs n={n}, C={channels}. "
                    f"Compile the model with the options it was prepared with, or build a fresh model."
                )
            stored = {"constraint": block.constraint, "sinkhorn_iters": block.sinkhorn_iters}
            asked = {"constraint": options.constraint, "sinkhorn_iters": options.sinkhorn_iters}
            if stored != asked:
                # The rewrite takes constraint and sinkhorn_iters from the compile's options: with
                # other values than the block's, the model would compute another function.
                differing = {name: value for name, value in stored.items() if asked[name] != value}
                raise ValueError(
                    f"mhc: block '{key or '<root>'}' has mHC parameters made with "
                    f"{_format_settings(stored)}, but this compilation uses "
                    f"{_format_settings(asked)}: the block would compute another function. "
                    "Compile the model with the options it was prepared with (or its checkpoint "
                    f"was saved with): torch.compile(model, backend='mhc', options={differing!r})."
                )
            return block, False
        block = MHCBlockParameters(n, channels, position, options, dtype, device)
        block.key = key
        self.blocks[name] = block
        return block, True

    def warn_if_late(self, created: list[str]) -> None:
        if created and self.ran_compiled_step:
            warnings.warn(
                f"mhc: created mHC parameters for {len(created)} new block(s) ({', '.join(created)}) "
                "after this model already ran a compiled step. An optimizer built before now does "
                "not train them. Call mhc_compile.prepare(model, *example_args) before building "
                "the optimizer.",
                stacklevel=2,
            )


def _accept_checkpoints_without_settings(store: MHCParameters, state_dict, prefix: str, *_) -> None:
    """A checkpoint saved before blocks stored their settings still loads (strict or not): each of
    its blocks gets a stand-in for the missing `_extra_state` entry, and one warning says that
    nothing could be checked. `state_dict` is load_state_dict's own copy (torch documents that
    _load_from_state_dict may modify it), and the blocks read theirs from it."""
    unchecked = []
    for name, block in store.blocks.items():
        entry = f"{prefix}blocks.{name}."
        if (entry + _EXTRA_STATE not in state_dict
                and any(entry + tensor in state_dict for tensor, _ in block.named_parameters())):
            state_dict[entry + _EXTRA_STATE] = _NO_SETTINGS
            unchecked.append(block)
    if not unchecked:
        return
    settings = sorted({_format_settings({k: v for k, v in block.settings().items() if k != "C"})
                       for block in unchecked})
    warnings.warn(
        f"mhc: the checkpoint's mHC parameters for {len(unchecked)} block(s) under "
        f"'{prefix}blocks' carry no settings (saved before mhc_compile stored n, constraint and "
        "sinkhorn_iters with them), so they are loaded unchecked into blocks made with "
        f"{' / '.join(settings)}. If the checkpoint was trained with other options (constraint="
        "'none' for hyper-connections), prepare the model with those: mhc_compile.prepare(model, "
        "*example_args, options=...). Saving the model again stores the settings.",
        UserWarning,
        stacklevel=_caller_stacklevel(),
    )


def _caller_stacklevel() -> int:
    """warnings.warn's stacklevel for the first frame outside torch and this file (the caller of
    load_state_dict), however deep the module tree that the load recursed through."""
    torch_dir = os.path.dirname(torch.__file__) + os.sep
    frame, level = sys._getframe(1), 1
    while frame is not None and (frame.f_code.co_filename == __file__
                                 or frame.f_code.co_filename.startswith(torch_dir)):
        frame, level = frame.f_back, level + 1
    return level


def parameters_of(owner: nn.Module) -> MHCParameters:
    """The model's `mhc` submodule, created on first use."""
    existing = getattr(owner, SUBMODULE, None)
    if isinstance(existing, MHCParameters):
        return existing
    if existing is not None:
        raise ValueError(
            f"mhc: {type(owner).__name__} already has an attribute '{SUBMODULE}' "
            f"({type(existing).__name__}); mhc_compile registers its parameters under that name. "
            "Rename the attribute."
        )
    store = MHCParameters()
    owner.add_module(SUBMODULE, store)
    return store
