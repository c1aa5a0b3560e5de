"""The graph passes of the mhc backend, stage by stage, in the order they run.

Every pass is called as `pass(graph_or_graph_module, context)` with one PassContext and returns how
many things it matched or changed, which `run_passes` logs (logger "mhc_compile.passes", INFO; at
DEBUG it also prints the graph after each pass).

    Dynamo graph (mhc_compile/backend.py, one per graph Dynamo hands the backend)
        ANALYSIS_PASSES    inline_checkpoint_regions, find_residual_chains
        -- the backend binds each rewritten block's mHC parameters and adds their placeholders --
        REWRITE_PASSES     rewrite_mhc
        PIPELINE_PASSES    annotate_pipeline (mhc_compile.pipeline only: stage cuts and costs)
    AOT autograd's joint graph (Inductor's joint_custom_pre_pass)
        JOINT_PASSES       tag_recompute
    Inductor's post-grad graphs, forward and backward (post_grad_custom_post_pass)
        POST_GRAD_PASSES   fuse_grad_streams, inline_kernels
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

from torch import fx

from mhc_compile.passes import (
    annotate_pipeline, find_residual_blocks, fuse_grad_streams, inline_checkpoint, inline_kernels,
    recompute_policy, rewrite_mhc,
)
from mhc_compile.passes.context import PassContext

log = logging.getLogger(__name__)

GraphPass = Callable[[fx.Graph | fx.GraphModule, PassContext], int]

# Blocks inside the user's checkpointed layers come into sight, then the blocks are found.
ANALYSIS_PASSES: tuple[GraphPass, ...] = (inline_checkpoint.inline_checkpoint_regions,
                                          find_residual_blocks.find_residual_chains)
REWRITE_PASSES: tuple[GraphPass, ...] = (rewrite_mhc.rewrite_mhc,)
PIPELINE_PASSES: tuple[GraphPass, ...] = (annotate_pipeline.annotate_pipeline,)
# Before the partitioner: which mHC tensors backward keeps and which it rebuilds.
JOINT_PASSES: tuple[GraphPass, ...] = (recompute_policy.tag_recompute,)
# The grad-streams fold needs whole ops, so it runs before their kernels are handed to Inductor.
POST_GRAD_PASSES: tuple[GraphPass, ...] = (fuse_grad_streams.fuse_grad_streams,
                                           inline_kernels.inline_kernels)

STAGES = {"analysis": ANALYSIS_PASSES, "rewrite": REWRITE_PASSES, "pipeline": PIPELINE_PASSES,
          "joint": JOINT_PASSES, "post_grad": POST_GRAD_PASSES}


def run_passes(stage: str, graph: fx.Graph | fx.GraphModule, context: PassContext) -> None:
    """Run `stage`'s passes (a key of STAGES, read at each call) in order on one graph, logging
    what each matched."""
    passes: Sequence[GraphPass] = STAGES[stage]
    for graph_pass in passes:
        count = graph_pass(graph, context)
        log.info("mhc %s: %s matched %d", stage, graph_pass.__name__, count)
        if log.isEnabledFor(logging.DEBUG):
            shown = graph.graph if isinstance(graph, fx.GraphModule) else graph
            log.debug("mhc %s: graph after %s:\n%s", stage, graph_pass.__name__, shown)
