"""mhc-compile: rewrite the residual chains of unmodified models into n-stream mHC.

    cmodel = torch.compile(model, backend="mhc")          # no import needed
    mhc_compile.prepare(model, *example_args)             # create the mHC parameters eagerly
    opt = torch.optim.AdamW(model.parameters())           # now includes them
    mhc_compile.report(model, *example_args).print()      # which blocks were rewritten, and why not
    mhc_compile.gain(model, *example_args).print()        # Amax gain of H_res across depth (paper)
    run = mhc_compile.pipeline(model, example_args, num_stages=2, loss_fn=loss)   # under torchrun

prepare, report and gain pass keywords on to the model and take the mHC options as one mapping:

    mhc_compile.prepare(model, ids, attention_mask=mask, options={"n": 2, "constraint": "none"})
"""

from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from mhc_compile.backend import (
    GraphRecord, GraphTracer, MHCBackend, bind_and_rewrite, run_as_traced, trace,
)
from mhc_compile.gain import GainLogger, GainProbe, GainReport, gain
from mhc_compile.options import MHCOptions
from mhc_compile.parameters import MHCParameters
from mhc_compile.pipeline import Pipeline, PipelinePlan, pipeline, plan_pipeline
from mhc_compile.quiet import split_keywords
from mhc_compile.report import BlockReport, Report, SkipReason
from mhc_compile.sharding import FSDPUnits, fsdp_units

__all__ = [
    "MHCOptions", "MHCParameters", "Report", "BlockReport", "SkipReason",
    "GainReport", "GainProbe", "GainLogger", "Pipeline", "PipelinePlan", "FSDPUnits",
    "backend", "prepare", "report", "gain", "pipeline", "plan_pipeline", "fsdp_units",
]
__version__ = "0.1.0"


def backend(**options: Any) -> MHCBackend:
    """A configured backend: `torch.compile(model, backend=mhc_compile.backend(n=2))`.

    Options (see MHCOptions): n, sinkhorn_iters, alpha_init, constraint, include, exclude, eager,
    recompute, stream_dtype, cudagraphs, mode.
    Its `.report` collects the blocks of every graph it compiled.
    """
    return MHCBackend(MHCOptions.from_kwargs(**options))


def prepare(model: nn.Module, /, *example_args: Any, options: Mapping[str, Any] | None = None,
            **model_kwargs: Any) -> Report:
    """Do the first compilation's work now, so optimizers, checkpoint loading and DDP come after.

        mhc_compile.prepare(model, input_ids, attention_mask=mask, options={"n": 2})

    example_args and model_kwargs are the model's forward arguments (its keywords too:
    attention_mask, pixel_values, labels); options is a mapping of mHC options (MHCOptions: n,
    constraint, sinkhorn_iters, include, exclude, ...), which the blocks' parameters are created
    with and which a checkpoint's blocks must match when loaded (their state_dict records n,
    constraint and sinkhorn_iters). Options as keywords are deprecated: a keyword that names an
    option and that model.forward does not declare is taken as one, with a FutureWarning.

    Traces `model(*example_args, **model_kwargs)` once through the mhc backend with grad enabled,
    which creates the parameters, and runs the traced graph unchanged (the mHC ops would compute
    the same at init, and would autotune their kernels for these arguments' dtypes, which autocast
    may change), restoring buffers (BatchNorm statistics) and the RNG state afterwards, so the
    model's state is as before except for the new `model.mhc` parameters. Returns the report of
    that trace.
    """
    chosen, model_kwargs = split_keywords("prepare", model, options, model_kwargs)
    chosen = MHCOptions.from_kwargs(chosen)
    return trace(model, example_args, GraphTracer(chosen, _create_parameters, top_module=model),
                  model_kwargs=model_kwargs)


def _create_parameters(record: GraphRecord):
    """prepare's step: bind (creating the parameters) and rewrite, raising what a compile would,
    then run the graph as traced."""
    bind_and_rewrite(record)
    return run_as_traced(record)


def report(model: nn.Module, /, *example_args: Any, options: Mapping[str, Any] | None = None,
           **model_kwargs: Any) -> Report:
    """Which residual blocks the backend rewrites or skips, and why, without changing the model.

    Called as `prepare` is: the model's forward arguments, its keywords included, and the mHC
    options in `options=`.
    """
    chosen, model_kwargs = split_keywords("report", model, options, model_kwargs)
    return trace(model, example_args,
                  GraphTracer(MHCOptions.from_kwargs(chosen), _run_unchanged, top_module=model),
                  model_kwargs=model_kwargs)


def _run_unchanged(record: GraphRecord):
    """report's step: the analysis alone; the graph runs as traced."""
    return record.traced
