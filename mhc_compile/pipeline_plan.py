"""Where to cut the rewritten model into pipeline stages: legal cuts, cost balance, the plan's report.

The rewrite pass annotates the graph (passes/annotate_pipeline.py); this module traces the model
through the backend once, reads that annotation, and chooses stage cuts at mHC block boundaries:
either balanced by the cost estimate or named by the user as module paths.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import fx, nn

from mhc_compile import private_apis
from mhc_compile.backend import (
    GraphRecord, GraphTracer, bind_and_rewrite, trace, with_parameters,
)
from mhc_compile.options import MHCOptions
from mhc_compile.passes import graph_facts
from mhc_compile.passes import run_passes
from mhc_compile.passes.annotate_pipeline import (
    ANNOTATION_KEY, BLOCK_KEY, CutPoint, PipelineAnnotation,
)


class PipelineError(ValueError):
    """A pipeline configuration that cannot work (stages, cuts, world size, schedule)."""


@dataclass
class CapturedGraph:
    """The rewritten graph of one trace and the real object behind each of its placeholders."""

    graph_module: fx.GraphModule
    inputs: list[Any]  # aligned with the placeholders: mHC parameters, then Dynamo's inputs
    args: tuple = ()  # the example arguments the model was called with
    model: nn.Module | None = None  # the traced model (names its parameters and buffers)
    options: MHCOptions | None = None  # what it was rewritten with (the stages compile with them)

    @property
    def annotation(self) -> PipelineAnnotation:
        return self.graph_module.meta[ANNOTATION_KEY]

    def placeholders(self) -> dict[fx.Node, tuple[str, Any]]:
        """Each placeholder -> (kind, value). Kinds: "parameter" (a weight: lives in the stage
        that reads it), "input" (one of the caller's arguments: stage 0 receives it, later
        stages get it passed on), "constant" (a buffer or other tensor the model holds)."""
        nodes = [node for node in self.graph_module.graph.nodes if node.op == "placeholder"]
        kinds = {}
        for node, value in zip(nodes, self.inputs):
            if isinstance(value, nn.Parameter):
                kinds[node] = ("parameter", value)
            elif any(value is arg for arg in self.args):
                kinds[node] = ("input", value)
            else:
                kinds[node] = ("constant", value)
        return kinds


@dataclass
class StagePlan:
    """One stage: blocks [first_block, last_block], its estimated cost, what it sends on."""

    index: int
    first_block: int
    last_block: int
    cost: int  # roofline flop-equivalents: its blocks, plus prologue (stage 0), epilogue (last)
    sends: tuple[str, ...]  # graph values sent to the next stage (streams first); () for the last
    bytes_sent: int  # forward bytes sent per traced batch (the backward sends the same back)


@dataclass
class PipelinePlan:
    """Stage cuts for `num_stages` stages of one model. Data first; `print()` renders it."""

    num_stages: int
    n: int
    blocks: list = field(default_factory=list)  # PipelineBlock, graph order
    cuts: list[CutPoint] = field(default_factory=list)  # every block boundary, legal or not
    stages: list[StagePlan] = field(default_factory=list)
    captured: CapturedGraph | None = field(default=None, repr=False)

    @property
    def starts(self) -> list[int]:
        """Index of the first block of every stage."""
        return [stage.first_block for stage in self.stages]

    def summary(self) -> str:
        costs = [stage.cost for stage in self.stages]
        imbalance = max(costs) / (sum(costs) / len(costs)) if costs and sum(costs) else 1.0
        return (f"pipeline: {self.num_stages} stages over {len(self.blocks)} mHC blocks "
                f"(n={self.n}); max/mean stage cost {imbalance:.2f}")

    def __rich__(self):
        from rich.table import Table

        table = Table(title=self.summary(), title_justify="left")
        for column in ("stage", "blocks", "first block", "last block", "cost (GFLOP-eq)",
                       "share", "sends", "bytes sent/batch"):
            table.add_column(column, overflow="fold")
        total = sum(stage.cost for stage in self.stages) or 1
        for stage in self.stages:
            first, last = self.blocks[stage.first_block], self.blocks[stage.last_block]
            table.add_row(
                str(stage.index), f"{stage.first_block}-{stage.last_block}", first.key, last.key,
                f"{stage.cost / 1e9:.3f}", f"{stage.cost / total:.0%}", ", ".join(stage.sends),
                f"{stage.bytes_sent:,}",
            )
        return table

    def print(self, file=None) -> None:
        import sys

        from rich.console import Console

        stream = file or sys.stdout
        Console(file=stream, width=None if stream.isatty() else 180).print(self)


def plan_pipeline(model: nn.Module, example_args: Sequence[Any], num_stages: int,
                  cuts: Sequence[str] | None = None, **options: Any) -> PipelinePlan:
    """Trace `model(*example_args)` through the mhc rewrite and choose stage cuts.

    example_args: what one call of the model takes (for a pipeline: one microbatch, because the
        traced graph is specialised to these shapes). The model gets its mHC parameters (as
        `prepare` would) if it has none yet; nothing else about it changes.
    cuts: module paths where stages 1..num_stages-1 begin ("layers.4", or a block's site key such
        as "layers.4.feed_forward.w1"); by default the cuts balance the cost estimate.
    """
    _check_stage_count(num_stages)
    captured = capture(model, tuple(example_args), MHCOptions.from_kwargs(**options))
    return plan_captured(captured, num_stages, cuts)


def plan_captured(captured: CapturedGraph, num_stages: int,
                  cuts: Sequence[str] | None = None) -> PipelinePlan:
    """plan_pipeline's choice of cuts on a graph captured already."""
    _check_stage_count(num_stages)
    annotation = captured.annotation
    _check_enough_blocks(annotation, num_stages)
    block_costs = [block.cost.cost for block in annotation.blocks]
    block_costs[0] += annotation.prologue.cost
    block_costs[-1] += annotation.epilogue.cost
    if cuts is None:
        starts = balance(block_costs, _legal_starts(annotation), num_stages)
        if starts is None:
            raise PipelineError(_too_few_legal_cuts(annotation, num_stages))
    else:
        starts = resolve_cuts(captured, cuts, num_stages)
    plan = PipelinePlan(num_stages, captured.options.n, annotation.blocks, annotation.cuts,
                        captured=captured)
    bounds = [0, *starts, len(annotation.blocks)]
    for index in range(num_stages):
        first, last = bounds[index], bounds[index + 1] - 1
        cut = annotation.cuts[last] if index + 1 < num_stages else None
        plan.stages.append(StagePlan(
            index=index, first_block=first, last_block=last,
            cost=sum(block_costs[first : last + 1]),
            sends=_sends(captured, cut) if cut else (),
            bytes_sent=_bytes_sent(captured, cut) if cut else 0,
        ))
    return plan


def capture(model: nn.Module, example_args: tuple, options: MHCOptions) -> CapturedGraph:
    """The rewritten graph (rewrite + annotation, no Inductor) of `model(*example_args)`."""
    captured: list[CapturedGraph] = []

    def capture_rewritten(record: GraphRecord):
        """Bind, rewrite and annotate (passes.PIPELINE_PASSES); keep the graph and its inputs."""
        bind_and_rewrite(record)
        if record.rewritten:
            run_passes("pipeline", record.graph_module, record.context)
        captured.append(CapturedGraph(record.graph_module,
                                      [*record.parameters, *record.example_inputs],
                                      example_args, model, options))
        return with_parameters(record, record.graph_module)

    backend = GraphTracer(options, capture_rewritten, top_module=model)
    try:
        trace(model, example_args, backend, fullgraph=True)
    except private_apis.dynamo_unsupported_error() as error:
        raise PipelineError(
            "mhc pipeline: the model must trace as one graph to be split into stages, but "
            f"torch.compile(fullgraph=True) stopped: {str(error).splitlines()[0]}"
        ) from error
    last = captured[-1]
    if ANNOTATION_KEY not in last.graph_module.meta:
        raise PipelineError(
            "mhc pipeline: no residual block of the model was rewritten, so there is no stage cut; "
            "mhc_compile.report(model, *example_args) says why"
        )
    return last


def balance(costs: Sequence[int], legal_starts: set[int], num_stages: int) -> list[int] | None:
    """First block of stages 1..num_stages-1 that minimises the largest stage cost (contiguous
    stages of at least one block, each starting at a legal cut). None if no such split exists.
    Dynamic programming over (stages, blocks): O(num_stages * blocks^2)."""
    count = len(costs)
    prefix = [0]
    for cost in costs:
        prefix.append(prefix[-1] + cost)
    infinity = float("inf")
    # best[k][i]: smallest max-cost splitting blocks [0, i) into k stages; start[k][i]: last start
    best = [[infinity] * (count + 1) for _ in range(num_stages + 1)]
    start = [[0] * (count + 1) for _ in range(num_stages + 1)]
    for end in range(1, count + 1):
        best[1][end] = prefix[end]
    for stages in range(2, num_stages + 1):
        for end in range(stages, count + 1):
            for first in range(stages - 1, end):
                if first not in legal_starts or best[stages - 1][first] == infinity:
                    continue
                candidate = max(best[stages - 1][first], prefix[end] - prefix[first])
                if candidate < best[stages][end]:
                    best[stages][end], start[stages][end] = candidate, first
    if best[num_stages][count] == infinity:
        return None
    starts, end = [], count
    for stages in range(num_stages, 1, -1):
        end = start[stages][end]
        starts.append(end)
    return starts[::-1]


def resolve_cuts(captured: CapturedGraph, cuts: Sequence[str], num_stages: int) -> list[int]:
    """Module paths where stages begin -> block indices, with an error naming what is wrong."""
    annotation = captured.annotation
    cuts = [cuts] if isinstance(cuts, str) else list(cuts)
    if len(cuts) != num_stages - 1:
        raise PipelineError(
            f"mhc pipeline: {len(cuts)} cut(s) make {len(cuts) + 1} stages, but num_stages is "
            f"{num_stages}; give num_stages - 1 cuts"
        )
    starts = []
    for cut in cuts:
        block = _block_starting_at(annotation, cut)
        if block is None:
            inside = _block_containing(captured, cut)
            if inside is not None:
                raise PipelineError(
                    f"mhc pipeline: cut {cut!r} falls inside mHC block {inside} "
                    f"({annotation.blocks[inside].key}); a stage can only begin where a block "
                    f"begins: {_legal_names(annotation)}"
                )
            raise PipelineError(
                f"mhc pipeline: cut {cut!r} names no module of the model's mHC blocks; "
                f"stages can begin at: {_legal_names(annotation)}"
            )
        if block == 0:
            raise PipelineError(
                f"mhc pipeline: cut {cut!r} is the first mHC block; every stage needs at least one "
                "block, so the first stage cannot be empty"
            )
        boundary = annotation.cuts[block - 1]
        if not boundary.legal:
            raise PipelineError(
                f"mhc pipeline: cannot cut before block {block} ({annotation.blocks[block].key}): "
                f"{boundary.problem}"
            )
        if starts and block <= starts[-1]:
            raise PipelineError(
                f"mhc pipeline: cuts must name blocks in model order; {cut!r} (block {block}) "
                f"does not come after block {starts[-1]}"
            )
        starts.append(block)
    return starts


def _block_starting_at(annotation: PipelineAnnotation, cut: str) -> int | None:
    """The first block whose residual add lives in module `cut`, or whose f begins in it."""
    for block in annotation.blocks:
        if block.path == cut or block.key == cut or block.key.startswith(cut + "."):
            return block.index
    return None


def _block_containing(captured: CapturedGraph, cut: str) -> int | None:
    """The block whose span holds a node of module `cut` (a cut that would split a block)."""
    for node in captured.graph_module.graph.nodes:
        path = graph_facts.module_path(node)
        if path is None or BLOCK_KEY not in node.meta:
            continue
        if path == cut or path.startswith(cut + "."):
            return node.meta[BLOCK_KEY]
    return None


def _legal_names(annotation: PipelineAnnotation, shown: int = 6) -> str:
    names = [annotation.blocks[cut.before].key for cut in annotation.cuts if cut.legal]
    more = f", ... ({len(names)} in all)" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more if names else "(none)"


def _legal_starts(annotation: PipelineAnnotation) -> set[int]:
    return {cut.before for cut in annotation.cuts if cut.legal}


def _check_stage_count(num_stages: Any) -> None:
    if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1:
        raise PipelineError(f"mhc pipeline: num_stages must be an integer >= 1, got {num_stages!r}")


def _check_enough_blocks(annotation: PipelineAnnotation, num_stages: int) -> None:
    count = len(annotation.blocks)
    if num_stages > count:
        raise PipelineError(
            f"mhc pipeline: {num_stages} stages need at least {num_stages} mHC blocks (a stage "
            f"begins only at a block boundary), but the model has {count}; use at most {count} stages"
        )


def _too_few_legal_cuts(annotation: PipelineAnnotation, num_stages: int) -> str:
    illegal = [cut for cut in annotation.cuts if not cut.legal]
    example = f"; e.g. before block {illegal[0].before}: {illegal[0].problem}" if illegal else ""
    return (
        f"mhc pipeline: {num_stages} stages need {num_stages - 1} legal cuts, but only "
        f"{len(annotation.cuts) - len(illegal)} of the {len(annotation.cuts)} block boundaries "
        f"are legal{example}"
    )


def _sends(captured: CapturedGraph, cut: CutPoint) -> tuple[str, ...]:
    """What a stage ending at `cut` returns: the streams, then pass-through values except
    constants (a buffer is held by every stage that reads it)."""
    kinds = {node.name: kind for node, (kind, _) in captured.placeholders().items()}
    return (cut.streams, *(name for name in cut.pass_through if kinds.get(name) != "constant"))


def _bytes_sent(captured: CapturedGraph, cut: CutPoint) -> int:
    """Forward bytes crossing `cut` for the traced batch: the streams and every pass-through
    tensor except constants (buffers stay in each stage that reads them)."""
    kinds = captured.placeholders()
    nodes = {node.name: node for node in captured.graph_module.graph.nodes}
    total = cut.stream_bytes
    for name in cut.pass_through:
        node = nodes[name]
        kind, value = kinds.get(node, ("computed", graph_facts.example_value(node)))
        if kind != "constant" and isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
    return total
