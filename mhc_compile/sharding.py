"""FSDP2 per transformer block: the rewritten model as a chain of per-block modules to shard.

    units = mhc_compile.fsdp_units(model, (ids,))           # after prepare, before sharding
    for unit in units.units:
        fully_shard(unit)
    fully_shard(units)
    optimizer = torch.optim.AdamW(units.parameters())       # the model's weights, mHC included
    loss_fn(units(ids), target).backward()

fully_shard on the model's own blocks cannot carry mHC: FSDP2's hooks are Dynamo-disabled, so
Dynamo compiles each sharded block's forward as a graph of its own, and each graph would expand and
reduce its own streams (backend.py refuses it). Here the model is traced once through the rewrite,
as the pipeline traces it, and the rewritten graph is cut at the blocks' boundaries into
fx.GraphModules (pipeline.build_stage_modules): the n-wide streams are what one unit returns and
the next takes, so one chain crosses every unit, and FSDP2 shards and gathers each unit's weights
around its forward and backward. Each unit runs through Inductor with our kernels and the
recompute policy (compile_stage_modules), unless eager=True.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from mhc_compile.options import MHCOptions
from mhc_compile.pipeline import build_stage_modules, compile_stage_modules
from mhc_compile.pipeline_plan import PipelineError, capture, plan_captured
from mhc_compile.passes.annotate_pipeline import PipelineAnnotation

__all__ = ["FSDPUnits", "fsdp_units"]


class FSDPUnits(nn.Module):
    """The rewritten model as `units`, one GraphModule per run of blocks, called in turn: unit 0
    takes the model's arguments, each next one what the previous returns (the streams first), the
    last returns the model's output. The units hold the model's own Parameter objects under the
    model's names (state_dict keys "units.{i}.{name}"). Shapes are those of the traced
    arguments."""

    def __init__(self, units: Sequence[nn.Module], traced_shapes: Sequence[torch.Size | None]):
        super().__init__()
        self.units = nn.ModuleList(units)
        self.traced_shapes = list(traced_shapes)

    def forward(self, *args: Any) -> Any:
        self._check_shapes(args)
        outputs = self.units[0](*args)
        for unit in self.units[1:]:
            outputs = unit(*outputs)
        return outputs

    def _check_shapes(self, args: tuple) -> None:
        shapes = [arg.shape if isinstance(arg, torch.Tensor) else None for arg in args]
        if shapes != self.traced_shapes:
            raise ValueError(
                f"mhc fsdp_units: called with argument shapes {_shown(shapes)}, but the units were "
                f"traced at {_shown(self.traced_shapes)} and run only at those (each unit is a "
                "graph specialised to them); keep every batch the traced shape (DataLoader's "
                "drop_last=True) or build one FSDPUnits per shape"
            )


def fsdp_units(model: nn.Module, example_args: Sequence[Any], cuts: Sequence[str] | None = None,
               **options: Any) -> FSDPUnits:
    """The mHC-rewritten `model` cut into units for fully_shard (FSDP2), one per transformer block.

    example_args: one call's arguments as every step will pass them (this rank's batch): the
        units are traced at these shapes.
    cuts: module paths where units 1.. begin ("layers.4"); by default one unit per module that
        holds residual adds (a transformer block), at the first of its blocks.
    options: mhc options (n, sinkhorn_iters, eager, recompute, ...), as for backend="mhc".

    The model gets its mHC parameters if it has none (call mhc_compile.prepare first to keep the
    init you chose). Train the returned module and not `model`: once the units are sharded their
    parameters are FSDP2's, and `model` keeps the unsharded ones. A weight read by two units (tied
    embeddings) is refused, as for pipeline stages.
    """
    example_args = tuple(example_args)
    captured = capture(model, example_args, MHCOptions.from_kwargs(**options))
    if cuts is None:
        cuts = _block_module_starts(captured.annotation)
    plan = plan_captured(captured, len(cuts) + 1, cuts)
    units = build_stage_modules(plan, range(len(plan.stages)))
    compile_stage_modules(units, plan.captured.options)
    return FSDPUnits(units, [arg.shape if isinstance(arg, torch.Tensor) else None
                             for arg in example_args])


def _block_module_starts(annotation: PipelineAnnotation) -> list[str]:
    """The module path of every residual add's module after the first, in model order, where a
    unit can begin (a legal cut)."""
    starts, seen = [], set()
    legal = {cut.before for cut in annotation.cuts if cut.legal}
    for block in annotation.blocks:
        if block.path in seen:
            continue
        seen.add(block.path)
        if block.index in legal:
            starts.append(block.path)
    if not starts:
        raise PipelineError(
            "mhc fsdp_units: found no module boundary to cut the model at: its residual adds all "
            f"live in {annotation.blocks[0].path or 'the model itself'!r}; name the cuts "
            "(cuts=[...], module paths where units begin)"
        )
    return starts


def _shown(shapes: Sequence[torch.Size | None]) -> str:
    return "(" + ", ".join("non-tensor" if s is None else str(tuple(s)) for s in shapes) + ")"
