"""The new trainable mHC parameters, registered on the user's model as one submodule, `mhc`.

Parameters are keyed by a block's stable site key, so a recompile (new shapes, graph breaks,
guard failures) finds and reuses them: `model.parameters()`, `state_dict()` and
`load_state_dict()` carry them like any other weights.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from mhc_compile import costs
from mhc_compile.options import MHCOptions

SUBMODULE = "mhc"
_SATURATED_LOGIT = 40.0  # sigmoid(40) rounds to exactly 1 even in float64


class MHCBlockParameters(nn.Module):
    """phi [n*C, n^2+2n], alpha [3] (pre, post, res), b_pre [n], b_post [n], b_res [n, n].

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
        width = costs.coefficient_count(n)
        self.n, self.channels = n, channels
        # What the block's coefficients depend on besides its tensors: read back by the gain
        # diagnostics (gain.py), so they measure the mapping the model really computes.
        self.constraint, self.sinkhorn_iters = options.constraint, options.sinkhorn_iters
        self.phi = nn.Parameter(torch.zeros(n * channels, width, **factory))
        self.alpha = nn.Parameter(torch.full((3,), float(options.alpha_init), **factory))
        self.b_pre = nn.Parameter(_pre_bias(n, position % n).to(**factory))
        self.b_post = nn.Parameter(torch.zeros(n, **factory))
        identity = torch.eye(n, **factory)
        # Sinkhorn of 4*I is near identity yet lets every stream mix a little; without the
        # constraint, the identity itself keeps rows summing to 1.
        self.b_res = nn.Parameter(4.0 * identity if options.constraint == "sinkhorn" else identity)

    def extra_repr(self) -> str:
        return (f"n={self.n}, channels={self.channels}, constraint={self.constraint}, "
                f"sinkhorn_iters={self.sinkhorn_iters}")


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
            return block, False
        block = MHCBlockParameters(n, channels, position, options, dtype, device)
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
