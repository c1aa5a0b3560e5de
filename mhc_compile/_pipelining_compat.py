"""The one private torch.distributed.pipelining API mhc_compile touches, with the reason.

Checked against torch 2.11 and 2.13.
"""

from __future__ import annotations

from typing import Any, Callable


def build_schedule(schedule_class: type, stages: list, n_microbatches: int, *,
                   loss_fn: Callable, scale_grads: bool, async_exchange: bool) -> Any:
    """A schedule object for `stages` (this rank's PipelineStages).

    One-stage-per-rank schedules (GPipe, 1F1B) with async_exchange run their own compute order on
    torch's action runtime (`_PipelineScheduleRuntime`, the engine behind Interleaved1F1B and
    DualPipeV): it posts each boundary receive as early as the order allows and waits for sends
    only at the end of the step. Schedule1F1B instead waits for every send together with the next
    receive, so the n-times wider mHC boundary transfer sits on the critical path. No public class
    runs a single-stage order on the runtime; the runtime and its `_prepare_schedule_with_comms`
    (which adds the send/receive actions to a compute-only order) are private.
    """
    from torch.distributed.pipelining.schedules import (
        PipelineScheduleSingle, ScheduleGPipe, _PipelineScheduleRuntime)

    if not issubclass(schedule_class, PipelineScheduleSingle):
        return schedule_class(stages, n_microbatches, loss_fn=loss_fn, scale_grads=scale_grads)
    (stage,) = stages
    single = schedule_class(stage, n_microbatches, loss_fn=loss_fn, scale_grads=scale_grads)
    if not async_exchange:
        return single  # constructed first all the same: its checks (1F1B: microbatches >= stages)
    order_of = fill_drain_order if issubclass(schedule_class, ScheduleGPipe) else one_f_one_b_order
    order = {rank: order_of(rank, stage.num_stages, n_microbatches) for rank in range(stage.num_stages)}
    runtime = _PipelineScheduleRuntime(stages, n_microbatches, loss_fn=loss_fn,
                                       scale_grads=scale_grads)
    runtime.pipeline_order = order
    runtime._prepare_schedule_with_comms(order)
    return runtime


def fill_drain_order(rank: int, num_stages: int, n_microbatches: int) -> list:
    """GPipe on stage `rank`: every forward, then every backward."""
    from torch.distributed.pipelining.schedules import _Action, _ComputationType

    forward, backward = _ComputationType.FORWARD, _ComputationType.FULL_BACKWARD
    return ([_Action(rank, forward, mb) for mb in range(n_microbatches)]
            + [_Action(rank, backward, mb) for mb in range(n_microbatches)])


def one_f_one_b_order(rank: int, num_stages: int, n_microbatches: int) -> list:
    """1F1B on stage `rank` (Schedule1F1B's order): num_stages - rank - 1 warm-up forwards, then
    alternate one forward and one backward, then the remaining backwards."""
    from torch.distributed.pipelining.schedules import _Action, _ComputationType

    forward, backward = _ComputationType.FORWARD, _ComputationType.FULL_BACKWARD
    warmup = min(num_stages - rank - 1, n_microbatches)
    order = [_Action(rank, forward, mb) for mb in range(warmup)]
    for mb in range(n_microbatches - warmup):
        order += [_Action(rank, forward, warmup + mb), _Action(rank, backward, mb)]
    order += [_Action(rank, backward, mb) for mb in range(n_microbatches - warmup, n_microbatches)]
    return order
