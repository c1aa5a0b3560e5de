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

import warnings
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
    model's names (state_dict keys "units.{i}.{name}").

    Each unit is a graph specialised to what it was traced with: the arguments' shapes, dtypes,
    devices and non-tensor values, train or eval mode, and the parameters' dtypes. A call that
    differs in any of these is refused with what differs (it would run the traced graph anyway)."""

    def __init__(self, units: Sequence[nn.Module], example_args: tuple, training: bool):
        super().__init__()
        self.units = nn.ModuleList(units)
        self.traced_arguments = [_described(arg) for arg in example_args]
        self.train(training)
        self.traced_mode = training
        for unit in self.units:
            # Registered before fully_shard's own pre-forward hook, which FSDP2 prepends: this
            # one runs after the all-gather and sees the parameters the unit computes with.
            unit.register_forward_pre_hook(_check_parameter_dtypes(unit))

    def forward(self, *args: Any) -> Any:
        self._check_call(args)
        outputs = self.units[0](*args)
        for unit in self.units[1:]:
            outputs = unit(*outputs)
        return outputs

    def _check_call(self, args: tuple) -> None:
        called = [_described(arg) for arg in args]
        if called != self.traced_arguments:
            raise ValueError(
                f"mhc fsdp_units: called with arguments {_shown(called)}, but the units were traced "
                f"with {_shown(self.traced_arguments)} and run only those (each unit is a graph "
                "specialised to them); keep every batch the traced shape (DataLoader's "
                "drop_last=True) or build one FSDPUnits per shape"
            )
        if self.training != self.traced_mode:
            mode = "training" if self.traced_mode else "eval"
            raise ValueError(
                f"mhc fsdp_units: the units were traced in {mode} mode and keep its behaviour "
                "(dropout, norms' statistics); build another FSDPUnits from the model in the "
                "other mode for it"
            )


def _check_parameter_dtypes(unit: nn.Module):
    traced = {name: param.dtype for name, param in unit.named_parameters()}

    def check(module, args):
        for name, param in module.named_parameters():
            if param.dtype != traced.get(name, param.dtype):
                raise ValueError(
                    f"mhc fsdp_units: parameter {name!r} computes in {param.dtype}, but the unit "
                    f"was traced with it in {traced[name]}: FSDP2's MixedPrecisionPolicy "
                    "(param_dtype) changes the dtypes a traced graph was specialised to. Cast the "
                    "model to the compute dtype before fsdp_units instead"
                )

    return check


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
    try:
        captured = capture(model, example_args, MHCOptions.from_kwargs(**options))
        if cuts is None:
            cuts = _block_module_starts(captured.annotation)
        plan = plan_captured(captured, len(cuts) + 1, cuts)
        units = build_stage_modules(plan, range(len(plan.stages)))
    except PipelineError as error:  # the pipeline's planner cuts the units: say whose error it is
        raise PipelineError(str(error).replace("mhc pipeline:", "mhc fsdp_units (units are cut "
                                               "as pipeline stages are):", 1)) from None
    compile_stage_modules(units, plan.captured.options)
    return FSDPUnits(units, example_args, model.training)


def _block_module_starts(annotation: PipelineAnnotation) -> list[str]:
    """The module path of every residual add's module after the first, in model order, where a
    unit can begin (a legal cut)."""
    starts, seen = [], set()
    problems = {cut.before: cut.problem for cut in annotation.cuts}
    for block in annotation.blocks:
        if block.path in seen:
            continue
        seen.add(block.path)
        if block.index and problems[block.index]:
            warnings.warn(f"mhc fsdp_units: {block.path} cannot begin a unit "
                          f"({problems[block.index]}); it joins the unit before it", stacklevel=3)
        elif block.index:
            starts.append(block.path)
    if not starts:
        blocked = [problem for problem in problems.values() if problem]
        why = (f"no block boundary can begin a unit ({blocked[0]}; a transformers model's KV "
               "cache, returned at the end, does that: model.config.use_cache = False)"
               if blocked else f"its residual adds all live in "
               f"{annotation.blocks[0].path or 'the model itself'!r}; name the cuts (cuts=[...], "
               "module paths where units begin)")
        raise PipelineError(f"mhc fsdp_units: found no module boundary to cut the model at: {why}")
    return starts


def _described(arg: Any) -> tuple:
    """What a traced graph is specialised to of one argument."""
    if isinstance(arg, torch.Tensor):
        return "tensor", tuple(arg.shape), arg.dtype, arg.device
    return "value", arg


def _shown(described: Sequence[tuple]) -> str:
    shown = [f"{tuple(d[1])} {str(d[2]).removeprefix('torch.')} on {d[3]}" if d[0] == "tensor"
             else repr(d[1]) for d in described]
    return "(" + ", ".join(shown) + ")"
