"""Pipeline parallelism for the rewritten model, lowered onto torch.distributed.pipelining.

    import torch.distributed as dist, mhc_compile
    dist.init_process_group()                                # torchrun sets rank and world size
    run = mhc_compile.pipeline(model, (ids,), num_stages=2, schedule="1F1B",
                               loss_fn=loss, n_microbatches=4)
    optimizer = torch.optim.AdamW(run.parameters())          # this rank's weights (mHC included)
    losses = []
    run.step(ids, target=targets, losses=losses)             # whole batch; stage 0 takes ids

The model is traced once through the mhc rewrite at the shape of one microbatch; the rewritten
graph is cut at mHC block boundaries (legal cuts: the state crossing is the n-stream tensor plus
pass-through values, passes/annotate_pipeline.py), balanced by the cost estimate, and each stage
becomes an fx.GraphModule holding the model's own Parameter objects, compiled as backend="mhc"
compiles a rewritten graph (Inductor, our kernels, the recompute policy within the stage; not with
eager=True). torch's PipelineStage and schedules do the rest: no runtime of our own.

Overlap (CUDA, opt-in with overlap=True): the post/res mix that makes the streams a stage sends
runs on a dedicated high-priority stream (paper: DualPipe runs F_post,res on one), as one op that
waits and is waited for inside itself, so compiled stages keep it and no other block pays a stream
switch; one-stage-per-rank schedules (GPipe, 1F1B) run on torch's action runtime, which posts
boundary receives early and does not wait for a send before the next compute (Schedule1F1B waits
each send with the next receive). torch's schedules run all compute on one stream, so the priority
only places the mix ahead of other streams' work in flight (NCCL's transfer kernels); the early
receives are the part that can hide traffic.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import fx, nn

from mhc_compile import ops, private_apis
from mhc_compile.backend import compile_whole_ops
from mhc_compile.options import MHCOptions
from mhc_compile.passes.annotate_pipeline import OVERLAP_KEY
from mhc_compile.pipeline_plan import PipelineError, PipelinePlan, plan_pipeline

__all__ = ["Pipeline", "PipelineError", "pipeline", "schedule_names", "stage_indices",
           "build_stage_modules", "compile_stage_modules", "post_res_mix_on_side_stream",
           "splits_backward"]

# Schedule names as torch spells them (get_schedule_class), in the order the docs list them.
_SCHEDULE_CLASSES = {
    "GPipe": "ScheduleGPipe",
    "1F1B": "Schedule1F1B",
    "Interleaved1F1B": "ScheduleInterleaved1F1B",
    "LoopedBFS": "ScheduleLoopedBFS",
    "InterleavedZeroBubble": "ScheduleInterleavedZeroBubble",
    "ZBVZeroBubble": "ScheduleZBVZeroBubble",
    "DualPipeV": "ScheduleDualPipeV",
}
_V_SHAPED = ("ZBVZeroBubble", "DualPipeV")  # two stages per rank: r and 2W-1-r
# Schedules that run a stage's backward in two parts (input, then weight gradients), retaining its
# graph in between: a compiled backward donates its buffers and refuses retain_graph.
_SPLIT_BACKWARD = ("InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV")


def schedule_names() -> list[str]:
    """The schedules the installed torch offers (DualPipeV appeared in torch 2.9)."""
    from torch.distributed import pipelining

    return [name for name, cls in _SCHEDULE_CLASSES.items() if hasattr(pipelining, cls)]


@dataclass
class Pipeline:
    """What this rank runs: its stages, their modules, and the schedule that drives them.

    step(*args, target=, losses=) runs one training step on the whole batch (args go to stage 0,
    target to the last stage's loss_fn, per-microbatch losses are appended to `losses` on the
    rank holding the last stage). Gradients accumulate in the model's own parameters.
    """

    schedule: Any
    stages: list  # torch.distributed.pipelining.PipelineStage, one per local stage
    modules: list[fx.GraphModule]  # their submodules: pieces of the rewritten graph
    stage_indices: list[int]
    plan: PipelinePlan
    overlap: bool
    async_exchange: bool
    n_microbatches: int
    bytes_per_microbatch: dict[int, int] = field(default_factory=dict)  # stage -> forward bytes sent

    def step(self, *args: Any, target: Any = None, losses: list | None = None) -> Any:
        return self.schedule.step(*args, target=target, losses=losses)

    def parameters(self) -> list[nn.Parameter]:
        """This rank's trainable weights (each stage's, mHC parameters included), for optimizers."""
        seen, params = set(), []
        for module in self.modules:
            for param in module.parameters():
                if id(param) not in seen:
                    seen.add(id(param))
                    params.append(param)
        return params


def pipeline(
    model: nn.Module,
    example_args: Sequence[Any],
    num_stages: int,
    schedule: str = "1F1B",
    *,
    loss_fn: Callable[..., torch.Tensor],
    n_microbatches: int | None = None,
    cuts: Sequence[str] | None = None,
    device: torch.device | str | None = None,
    group: dist.ProcessGroup | None = None,
    overlap: bool | None = None,
    async_exchange: bool | None = None,
    scale_grads: bool = True,
    **options: Any,
) -> Pipeline:
    """Split the mHC-rewritten `model` into `num_stages` pipeline stages; build this rank's part.

    example_args: one whole batch as `step` will receive it (tensors [batch, ...]); the model is
        traced at the shape of one microbatch (dimension 0 split in n_microbatches equal parts).
    schedule: a torch.distributed.pipelining schedule name, see schedule_names(). GPipe and 1F1B
        run one stage per rank (num_stages == world size); Interleaved1F1B, LoopedBFS and
        InterleavedZeroBubble run num_stages / world size stages per rank (rank r holds r, r+W,
        ...); ZBVZeroBubble and DualPipeV run two per rank in a V (rank r holds r and 2W-1-r).
    loss_fn: loss_fn(output, target) on each microbatch of the last stage.
    n_microbatches: default num_stages.
    cuts: module paths where stages 1.. begin (see plan_pipeline); default: balanced by cost.
    device: where this rank's stages run; default the model's parameters' device.
    group: the pipeline's process group; default the world.
    overlap: run the post/res mix whose streams each stage sends on a high-priority CUDA stream
        (no effect on CPU); compiled stages keep it. Off by default until a multi-GPU run shows it
        pays: its first form (every block's mix on the side stream, stages uncompiled) made 1F1B
        steps 7-16% slower on 2 H200s, where the boundary transfer is about 1% of the step
        (bench/RESULTS.md). The schedules that split a stage's backward (InterleavedZeroBubble,
        ZBVZeroBubble, DualPipeV) run their stage modules uncompiled, and a warning says so.
    async_exchange: run GPipe/1F1B on torch's action runtime (early receives, sends waited at the
        end of the step); default the same as overlap. Multi-stage schedules always use it.
    scale_grads: divide accumulated gradients by n_microbatches (for a loss_fn that averages).
    options: mhc options (n, sinkhorn_iters, ...), as for torch.compile(backend="mhc").

    The model's mHC parameters are created if it has none (call mhc_compile.prepare first to
    build the optimizer from model.parameters()); this rank's stage parameters move to `device`.
    """
    names = schedule_names()
    canonical = {name.lower(): name for name in names}.get(str(schedule).lower())
    if canonical is None:
        raise PipelineError(
            f"mhc pipeline: unknown schedule {schedule!r}; torch {torch.__version__} offers: "
            f"{', '.join(names)}"
        )
    group_size, rank = _group_layout(group)
    local = stage_indices(canonical, num_stages, group_size, rank)
    n_microbatches = num_stages if n_microbatches is None else n_microbatches
    microbatch = _first_microbatch(tuple(example_args), n_microbatches)
    plan = plan_pipeline(model, microbatch, num_stages, cuts=cuts, **options)
    device = torch.device(device) if device is not None else _model_device(model)
    overlap = False if overlap is None else bool(overlap)
    async_exchange = overlap if async_exchange is None else bool(async_exchange)
    modules = build_stage_modules(plan, local, overlap=overlap)  # off CUDA its op is the plain mix
    why_eager = _why_stages_stay_eager(canonical)
    if why_eager and not plan.captured.options.eager:
        warnings.warn(f"mhc pipeline: the stage modules run eagerly (not compiled): {why_eager}",
                      stacklevel=2)
    else:
        compile_stage_modules(modules, plan.captured.options)
    from torch.distributed.pipelining import PipelineStage

    stages = [
        PipelineStage(module.to(device), index, num_stages, device, group=group)
        for index, module in zip(local, modules)
    ]
    built = private_apis.build_schedule(
        _schedule_class(canonical), stages, n_microbatches, loss_fn=loss_fn,
        scale_grads=scale_grads, async_exchange=async_exchange,
    )
    return Pipeline(
        schedule=built, stages=stages, modules=modules, stage_indices=local, plan=plan,
        overlap=overlap, async_exchange=async_exchange,
        n_microbatches=n_microbatches,
        bytes_per_microbatch={index: plan.stages[index].bytes_sent for index in local},
    )


def splits_backward(schedule: str) -> bool:
    """Whether `schedule` runs each stage's backward in two parts with its graph retained in
    between, which a compiled backward refuses (it donates its buffers): its stages run eager."""
    return schedule in _SPLIT_BACKWARD


def _why_stages_stay_eager(schedule: str) -> str | None:
    if splits_backward(schedule):
        return (f"{schedule} runs each stage's backward in two parts with its graph retained in "
                "between, which a compiled backward refuses (it donates its buffers); 1F1B, GPipe "
                "and Interleaved1F1B run compiled stages")
    return None


def compile_stage_modules(modules: Sequence[fx.GraphModule], options: MHCOptions) -> None:
    """Compile stage modules in place (their names and parameters stay the module's) as
    backend="mhc" compiles a rewritten graph: the graph is rewritten already, so it goes straight
    to Inductor with our passes (compile_whole_ops), not through the rewrite again. Nothing with
    eager=True."""
    if options.eager:
        return
    for module in modules:
        module.compile(backend=functools.partial(compile_whole_ops, options=options),
                       fullgraph=True, dynamic=False)


def stage_indices(schedule: str, num_stages: int, world_size: int, rank: int) -> list[int]:
    """Which stages rank `rank` holds under `schedule` (a name from schedule_names())."""
    if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1:
        raise PipelineError(f"mhc pipeline: num_stages must be an integer >= 1, got {num_stages!r}")
    if schedule in ("GPipe", "1F1B"):
        if num_stages != world_size:
            raise PipelineError(
                f"mhc pipeline: schedule {schedule!r} runs one stage per rank, so num_stages must "
                f"equal the world size; got num_stages={num_stages} with world size {world_size}"
            )
        return [rank]
    if schedule in _V_SHAPED:
        if num_stages != 2 * world_size:
            raise PipelineError(
                f"mhc pipeline: schedule {schedule!r} runs two stages per rank in a V (rank r holds "
                f"stages r and 2W-1-r), so num_stages must be twice the world size; got "
                f"num_stages={num_stages} with world size {world_size}"
            )
        return [rank, 2 * world_size - 1 - rank]
    if num_stages % world_size:
        raise PipelineError(
            f"mhc pipeline: schedule {schedule!r} runs num_stages / world size stages per rank "
            f"(rank r holds r, r+W, ...), so num_stages must be a multiple of the world size; got "
            f"num_stages={num_stages} with world size {world_size}"
        )
    return list(range(rank, num_stages, world_size))


# --- stage modules --------------------------------------------------------------------------------


def build_stage_modules(plan: PipelinePlan, indices: Sequence[int],
                        overlap: bool = False) -> list[fx.GraphModule]:
    """The GraphModules of stages `indices`: stage 0 takes the model's arguments, stage s > 0
    takes what stage s-1 returns (streams first, then pass-through values), the last returns the
    model's output. Parameters and buffers are the model's own objects, under the model's names.
    overlap: the post/res mix of each stage's last block, which makes the streams the stage sends
    (after stream-wise ops such as a ReLU, if any), runs on the high-priority stream
    (post_res_mix_on_side_stream); no other block pays a stream switch."""
    captured = plan.captured
    nodes = list(captured.graph_module.graph.nodes)
    spans = _stage_spans(plan, nodes)
    _check_untied(plan, nodes, spans)
    names = _qualified_names(captured)
    return [_stage_module(plan, index, nodes, spans[index], names, overlap) for index in indices]


def _stage_module(plan, index, nodes, span, names, overlap) -> fx.GraphModule:
    captured = plan.captured
    kinds = captured.placeholders()
    by_name = {node.name: node for node in nodes}
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    attributes: dict[str, torch.Tensor] = {}
    if index == 0:
        arguments = [graph.placeholder(f"arg{i}") for i in range(len(captured.args))]
        for node, (kind, value) in kinds.items():
            if kind == "input":
                env[node] = arguments[next(i for i, a in enumerate(captured.args) if a is value)]
    else:
        for name in plan.stages[index - 1].sends:
            env[by_name[name]] = graph.placeholder(name)

    def lookup(node: fx.Node) -> fx.Node:
        if node not in env:
            kind, value = kinds.get(node, (None, None))
            if kind not in ("parameter", "constant"):
                raise AssertionError(f"mhc pipeline: stage {index} reads {node.name}, never sent to it")
            attributes[names[id(value)]] = value
            env[node] = graph.get_attr(names[id(value)])
        return env[node]

    start, end = span
    stage = plan.stages[index]
    outgoing_mix = plan.blocks[stage.last_block].post_res_mix if stage.sends else None
    for node in nodes[start:end]:
        if node.op in ("placeholder", "output"):
            continue
        copied = graph.node_copy(node, lookup)
        if overlap and node.meta.get(OVERLAP_KEY) and node.name == outgoing_mix:
            copied.target = torch.ops.mhc.post_res_mix_on_side_stream.default
        env[node] = copied
    if index + 1 < len(plan.stages):
        graph.output(tuple(lookup(by_name[name]) for name in plan.stages[index].sends))
    else:
        results = fx.map_arg(nodes[-1].args[0], lookup)
        graph.output(results[0] if isinstance(results, (tuple, list)) and len(results) == 1 else results)
    graph.lint()
    return fx.GraphModule(attributes, graph, class_name=f"MHCPipelineStage{index}")


def _stage_spans(plan: PipelinePlan, nodes: list[fx.Node]) -> list[tuple[int, int]]:
    position = {node.name: index for index, node in enumerate(nodes)}
    starts = [0] + [position[plan.blocks[stage.first_block].first] for stage in plan.stages[1:]]
    return list(zip(starts, [*starts[1:], len(nodes)]))


def _check_untied(plan: PipelinePlan, nodes, spans) -> None:
    """A weight read in two stages would get two partial gradients that nothing adds up."""
    kinds = plan.captured.placeholders()
    readers: dict[fx.Node, set[int]] = {}
    for stage, (start, end) in enumerate(spans):
        for node in nodes[start:end]:
            for source in node.all_input_nodes:
                if kinds.get(source, ("",))[0] == "parameter":
                    readers.setdefault(source, set()).add(stage)
    names = _qualified_names(plan.captured)
    for node, stages in readers.items():
        if len(stages) > 1:
            name = names[id(kinds[node][1])]
            raise PipelineError(
                f"mhc pipeline: parameter {name!r} is read by stages {sorted(stages)} (tied "
                "weights); each weight must live in one stage: untie it, or choose cuts that keep "
                "its readers in one stage"
            )


def _qualified_names(captured) -> dict[int, str]:
    """id(tensor) -> its name in the model ("layers.0.attention.wq.weight", "mhc.blocks.*.phi");
    lifted tensors the model does not register get a "_constant_{i}" name."""
    model = captured.model
    names = {id(p): name for name, p in model.named_parameters(remove_duplicate=True)}
    for name, buffer in model.named_buffers(remove_duplicate=True):
        names.setdefault(id(buffer), name)
    for index, (kind, value) in enumerate(captured.placeholders().values()):
        if kind != "input" and id(value) not in names:
            names[id(value)] = f"_constant_{index}"
    return names


def _group_layout(group) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise PipelineError(
            "mhc pipeline: torch.distributed is not initialised; call "
            "torch.distributed.init_process_group() first (torchrun sets the rank and world size)"
        )
    return dist.get_world_size(group), dist.get_rank(group)


def _first_microbatch(args: tuple, n_microbatches: int) -> tuple:
    """Microbatch 0 of `args`, split as the schedules split them (tensors along dimension 0)."""
    if isinstance(n_microbatches, bool) or not isinstance(n_microbatches, int) or n_microbatches < 1:
        raise PipelineError(
            f"mhc pipeline: n_microbatches must be an integer >= 1, got {n_microbatches!r}")
    first = []
    for position, arg in enumerate(args):
        if isinstance(arg, torch.Tensor):
            if arg.dim() == 0 or arg.shape[0] % n_microbatches:
                size = arg.shape[0] if arg.dim() else "a scalar"
                raise PipelineError(
                    f"mhc pipeline: example_args[{position}] has batch size {size} in dimension 0, "
                    f"which does not split into n_microbatches={n_microbatches} equal microbatches"
                )
            arg = arg.tensor_split(n_microbatches, dim=0)[0]
        first.append(arg)
    return tuple(first)


def _model_device(model: nn.Module) -> torch.device:
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def _schedule_class(name: str):
    from torch.distributed import pipelining

    return getattr(pipelining, _SCHEDULE_CLASSES[name])


# --- overlap: the stage's outgoing post/res mix on a dedicated high-priority stream ---------------


@functools.cache
def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """One high-priority stream per device (priority -1 is the highest CUDA offers)."""
    return torch.cuda.Stream(device=device, priority=-1)


def _on_side_stream(op: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """op(*inputs), computed on the inputs' device's high-priority stream.

    The side stream waits for the current stream (which made the inputs), and the current stream
    waits for the side stream before this returns: to its caller, and so to autograd and to
    Inductor's generated code, this is an ordinary op on the current stream (no stream switch in
    any graph). So it overlaps nothing on the current stream; what the priority buys is the
    kernels' place against work on other streams in flight at the same time, such as NCCL's
    transfer kernels of the boundary traffic. record_stream keeps the caching allocator from
    handing out an input's memory while the side stream still reads it (received buffers come from
    other streams' pools), or the output's while the current stream uses it."""
    device = inputs[0].device
    current = torch.cuda.current_stream(device)
    side = _side_stream(device)
    side.wait_stream(current)
    with torch.cuda.device(device), torch.cuda.stream(side):
        output = op(*inputs)
    for tensor in inputs:
        tensor.record_stream(side)
    current.wait_stream(side)
    output.record_stream(current)
    return output


@torch.library.custom_op("mhc::post_res_mix_on_side_stream", mutates_args=())
def post_res_mix_on_side_stream(streams: torch.Tensor, y: torch.Tensor, h_post: torch.Tensor,
                                h_res: torch.Tensor) -> torch.Tensor:
    """mhc::post_res_mix ([..., n, C], [..., C], [..., n], [..., n, n] -> [..., n, C]) on the
    high-priority stream on CUDA (_on_side_stream), elsewhere the op itself. A custom op that
    Inductor calls as it is, so compiled stages keep it. Its backward is mhc::post_res_mix's, on the
    current stream: the gradient a stage sends back is made by its first block's backward, not by
    this block's."""
    inputs = (streams, y, h_post, h_res)
    if streams.device.type != "cuda":
        return torch.ops.mhc.post_res_mix.default(*inputs)
    return _on_side_stream(torch.ops.mhc.post_res_mix.default, inputs)


ops.register_like_post_res_mix(post_res_mix_on_side_stream)
