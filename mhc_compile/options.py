"""Options of the mhc backend: one frozen dataclass, validated once when it is built."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

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
    """

    n: int = 4
    sinkhorn_iters: int = 20
    alpha_init: float = 0.01
    constraint: str = "sinkhorn"
    include: tuple[str, ...] = field(default_factory=tuple)
    exclude: tuple[str, ...] = field(default_factory=tuple)
    eager: bool = False
    recompute: str | int | bool = "auto"

    def __post_init__(self) -> None:
        _require_int("n", self.n, minimum=1)
        _require_int("sinkhorn_iters", self.sinkhorn_iters, minimum=1)
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
        if not isinstance(self.eager, bool):
            raise TypeError(f"mhc option eager must be True or False, got {self.eager!r}")
        _check_recompute(self.recompute)

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
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"mhc option {name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"mhc option {name} must be >= {minimum}, got {value}")


def _check_recompute(value: Any) -> None:
    if value == "auto" or value is False:
        return
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return
    raise ValueError(
        "mhc option recompute must be 'auto', a group size L_r >= 1 (blocks per kept stream) "
        f"or False (keep every block's streams), got {value!r}"
    )


def _patterns(name: str, value: Any) -> tuple[str, ...]:
    patterns = (value,) if isinstance(value, str) else tuple(value)
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            raise TypeError(f"mhc option {name} takes module-path glob patterns, got {pattern!r}")
    return patterns
