"""Options of the mhc backend: one frozen dataclass, validated once when it is built."""

from __future__ import annotations

import dataclasses
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from mhc_compile.reference import CONSTRAINTS


@dataclass(frozen=True)
class MHCOptions:
    """How residual chains are rewritten.

    n: number of residual streams (the paper's expansion rate; 4 by default, 1 is plain residual
        with learned gates).
    sinkhorn_iters: Sinkhorn-Knopp iterations t_max that make H_res doubly stochastic (paper: 20).
    alpha_init: initial gate of the dynamic terms (paper: 0.01). phi starts at zero, so any value
        keeps the model's function at init; 0 also freezes the dynamic terms until alpha moves.
    constraint: "sinkhorn" (mHC) or "none" (unconstrained hyper-connections, the paper's ablation).
    include: glob patterns on block module paths (``"layers.*"``); empty means every block.
    exclude: glob patterns on block module paths whose blocks stay plain residuals.
    eager: run the rewritten graph without Inductor (fast tests, bisecting).
    recompute: which streams backward keeps (paper's recomputation, passes/recompute_policy.py).
        "auto" (default): keep the streams at the first block of every L_r blocks of a chain, with
        L_r = round(sqrt(n L / (n + 2))) for a chain of L blocks (the paper's optimum), and rebuild
        the others in backward from those, the coefficients and F's outputs (which are kept); F is
        never recomputed. An integer sets L_r (1 keeps every block's streams). False turns it off:
        every block's streams are kept. Inductor only: the eager path (eager=True) keeps everything.
    stream_dtype: dtype of the n streams between blocks: None (default) keeps the residual's own
        dtype, so the rewrite is exact at init; "bfloat16" or "float16" store them in half
        precision, as the paper does, halving what the mHC kernels move (under autocast the
        residual is float32). F still reads and writes its usual dtype; the chain's outputs come
        back in the residual's dtype. At init the model then agrees with the original to the
        rounding of the streams.
    cudagraphs: replay the compiled graphs as CUDA graphs (Inductor's cudagraph trees, as
        torch.compile's mode="reduce-overhead" does): removes the host cost of launching the mHC
        kernels, which bounds a step at small widths. Inductor's rules apply: a step's outputs are
        overwritten by the next replay unless cloned; CPU graphs ignore it
        (tests/test_gpu.py::test_cudagraphs_replay_the_same_training checks it on a GPU).
    mode: Inductor's mode, as torch.compile names it: None or "default", "reduce-overhead" (CUDA
        graphs, as cudagraphs=True), "max-autotune-no-cudagraphs" or "max-autotune" (Inductor
        benchmarks its own kernel choices; these do not change how the mHC kernels tune).
        `torch.compile(model, backend="mhc", mode=...)` sets it (torch.compile takes mode= or
        options=, not both). "lite" is refused: it turns off the graph passes mHC relies on.
    """

    n: int = 4
    sinkhorn_iters: int = 20
    alpha_init: float = 0.01
    constraint: str = "sinkhorn"
    include: tuple[str, ...] = field(default_factory=tuple)
    exclude: tuple[str, ...] = field(default_factory=tuple)
    eager: bool = False
    recompute: str | int | bool = "auto"
    stream_dtype: str | None = None
    cudagraphs: bool = False
    mode: str | None = None

    def __post_init__(self) -> None:
        for name in ("n", "sinkhorn_iters"):
            _require_int(name, getattr(self, name), minimum=1)
            object.__setattr__(self, name, operator.index(getattr(self, name)))  # np.int64 -> int
        if isinstance(self.alpha_init, bool) or not isinstance(self.alpha_init, (int, float)):
            raise TypeError(f"mhc option alpha_init must be a number, got {self.alpha_init!r}")
        if not math.isfinite(self.alpha_init):
            raise ValueError(f"mhc option alpha_init must be finite, got {self.alpha_init!r}")
        if self.constraint not in CONSTRAINTS:
            raise ValueError(
                f"mhc option constraint must be one of {', '.join(map(repr, CONSTRAINTS))}, "
                f"got {self.constraint!r}"
            )
        for name in ("include", "exclude"):
            object.__setattr__(self, name, _patterns(name, getattr(self, name)))
        for name in ("eager", "cudagraphs"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"mhc option {name} must be True or False, got {getattr(self, name)!r}")
        _check_recompute(self.recompute)
        if _is_integer(self.recompute):
            object.__setattr__(self, "recompute", operator.index(self.recompute))
        _check_mode(self.mode)
        object.__setattr__(self, "stream_dtype", _stream_dtype_name(self.stream_dtype))

    def streams_dtype_for(self, residual_dtype: torch.dtype) -> torch.dtype:
        """The dtype the streams of a residual of `residual_dtype` are stored in."""
        return residual_dtype if self.stream_dtype is None else getattr(torch, self.stream_dtype)

    @classmethod
    def from_kwargs(cls, options: Mapping[str, Any] | None = None, **kwargs: Any) -> "MHCOptions":
        """Build from keyword arguments (or torch.compile's ``options=`` dict), naming unknown keys."""
        merged = {**(options or {}), **kwargs}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(merged) - known)
        if unknown:
            raise TypeError(
                f"unknown mhc option(s) {', '.join(map(repr, unknown))}; "
                f"valid options are: {', '.join(sorted(known))}"
            )
        return cls(**merged)

    def replace(self, **changes: Any) -> "MHCOptions":
        return dataclasses.replace(self, **changes)


def _require_int(name: str, value: Any, minimum: int) -> None:
    if not _is_integer(value):
        raise TypeError(f"mhc option {name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"mhc option {name} must be >= {minimum}, got {value}")


def _is_integer(value: Any) -> bool:
    """An int or anything that indexes like one (numpy integers), never a bool."""
    if isinstance(value, bool):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def _check_recompute(value: Any) -> None:
    if value == "auto" or value is False:
        return
    if _is_integer(value) and value >= 1:
        return
    raise ValueError(
        "mhc option recompute must be 'auto', a group size L_r >= 1 (blocks per kept stream) "
        f"or False (keep every block's streams), got {value!r}"
    )


# torch.compile's modes that keep Inductor's graph passes (the recompute policy, the grad-streams
# fold); "lite" turns them off.
MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")


def _check_mode(value: Any) -> None:
    if value is None or value in MODES:
        return
    reason = (" (it turns off Inductor's graph passes, which the recompute policy runs in)"
              if value == "lite" else "")
    raise ValueError(f"mhc option mode must be None or one of {', '.join(map(repr, MODES))}, "
                     f"got {value!r}{reason}")


STREAM_DTYPES = ("bfloat16", "float16", "float32")


def _stream_dtype_name(value: Any) -> str | None:
    """None, or the name of a supported stream dtype (given as a name or a torch.dtype)."""
    if value is None:
        return None
    name = str(value).removeprefix("torch.") if isinstance(value, (str, torch.dtype)) else None
    if name not in STREAM_DTYPES:
        raise ValueError(
            f"mhc option stream_dtype must be None (the residual's dtype) or one of "
            f"{', '.join(map(repr, STREAM_DTYPES))}, got {value!r}"
        )
    return name


def _patterns(name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        patterns = (value,)
    elif isinstance(value, (list, tuple, set, frozenset)):
        patterns = tuple(value)
    else:
        raise TypeError(f"mhc option {name} takes module-path glob patterns, got {value!r}")
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            raise TypeError(f"mhc option {name} takes module-path glob patterns, got {pattern!r}")
    return patterns
