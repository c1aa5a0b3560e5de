"""The graph passes of the mhc backend, stage by stage, in the order they run.

Every pass is called as `pass(graph_or_graph_module, context)` with one PassContext and returns how
many things it found or changed (its GraphPass says what), which `run_passes` logs (logger
"mhc_compile.passes", INFO; at DEBUG it also prints the graph after each pass). Inductor's and AOT
autograd's caches serve a compiled graph without running the joint and post-grad passes again:
TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 shows every stage.

    Dynamo graph (mhc_compile/backend.py, one per graph Dynamo hands the backend)
        ANALYSIS_PASSES    inline_checkpoint_regions, find_residual_chains, match_hyper_connections
        -- the backend binds each rewritten block's mHC parameters and adds their placeholders --
        REWRITE_PASSES     rewrite_mhc, lower_hyper_connections
        PIPELINE_PASSES    annotate_pipeline (mhc_compile.pipeline only: stage cuts and costs)
    AOT autograd's joint graph (Inductor's joint_custom_pre_pass)
        JOINT_PASSES       tag_recompute
    Inductor's post-grad graphs, forward and backward (post_grad_custom_post_pass)
        POST_GRAD_PASSES   fuse_grad_streams, inline_kernels
"""

from __future__ import annotations

import logging
from typing import Callable, NamedTuple, Sequence

from torch import fx

from mhc_compile.passes import (
    annotate_pipeline, find_residual_blocks, fuse_grad_streams, inline_checkpoint, inline_kernels,
    lower_hyper_connections, match_hyper_connections, recompute_policy, rewrite_mhc,
)
from mhc_compile.passes.context import PassContext

log = logging.getLogger(__name__)



class GraphPass(NamedTuple):
    """One pass: `run(graph_or_graph_module, context)` returns how many `counts` it found or
    changed."""

    run: Callable[[fx.Graph | fx.GraphModule, PassContext], int]
    counts: str

    @property
    def name(self) -> str:
        return self.run.__name__


# Blocks inside the user's checkpointed layers come into sight, then the blocks are found, then
# the model's own hyper-connections among them are matched for lowering.
ANALYSIS_PASSES = (
    GraphPass(inline_checkpoint.inline_checkpoint_regions, "checkpoint regions inlined"),
    GraphPass(find_residual_blocks.find_residual_chains, "residual blocks found"),
    GraphPass(match_hyper_connections.match_hyper_connections, "existing hyper-connections to lower"),
)
REWRITE_PASSES = (
    GraphPass(rewrite_mhc.rewrite_mhc, "chains rewritten"),
    GraphPass(lower_hyper_connections.lower_hyper_connections, "existing hyper-connections lowered"),
)
PIPELINE_PASSES = (GraphPass(annotate_pipeline.annotate_pipeline, "legal stage cuts"),)
# Before the partitioner: which mHC tensors backward keeps and which it rebuilds.
JOINT_PASSES = (GraphPass(recompute_policy.tag_recompute, "chains tagged for recompute"),)
# The grad-streams fold needs whole ops, so it runs before their kernels are handed to Inductor.
POST_GRAD_PASSES = (
    GraphPass(fuse_grad_streams.fuse_grad_streams, "grad-streams adds folded"),
    GraphPass(inline_kernels.inline_kernels, "ops handed to Inductor as kernels"),
)

STAGES = {"analysis": ANALYSIS_PASSES, "rewrite": REWRITE_PASSES, "pipeline": PIPELINE_PASSES,
          "joint": JOINT_PASSES, "post_grad": POST_GRAD_PASSES}


def run_passes(stage: str, graph: fx.Graph | fx.GraphModule, context: PassContext) -> None:
    """Run `stage`'s passes (a key of STAGES, read at each call) in order on one graph, logging
    what each matched."""
    passes: Sequence[GraphPass] = STAGES[stage]
    for graph_pass in passes:
        count = graph_pass.run(graph, context)
        log.info("mhc %s: %s: %d %s", stage, graph_pass.name, count, graph_pass.counts)
        if log.isEnabledFor(logging.DEBUG):
            shown = graph.graph if isinstance(graph, fx.GraphModule) else graph
            log.debug("mhc %s: graph after %s:\n%s", stage, graph_pass.name, shown)
