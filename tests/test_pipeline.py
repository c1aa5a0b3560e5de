"""Pipeline parallelism: the annotation, stage cuts, stage modules, and 2-process gloo runs.

Every pipelined result is compared with the single-process run of the same rewritten model
(same mHC parameters) in float64: loss and every gradient.
"""

import importlib
import itertools
import random
import socket
import warnings
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import mhc_compile
from mhc_compile import cli, spec
from mhc_compile.examples import gpt, llama, resnet
from mhc_compile.pipeline import (
    PipelineError, build_stage_modules, post_res_mix_on_side_stream, schedule_names, stage_indices)
from mhc_compile.passes.annotate_pipeline import CUT_KEY, OVERLAP_KEY
from mhc_compile.pipeline_plan import balance, capture, plan_pipeline
from mhc_compile.options import MHCOptions
from single_process import (
    attention_that_compiles_in_float64, example_model, loss_of, single_process_run,
)

# The module, not mhc_compile.pipeline the function, which shadows it as an attribute.
pipeline_module = importlib.import_module("mhc_compile.pipeline")


def _assert_grads(modules, expected, rtol=1e-9):
    for module in modules:
        for name, param in module.named_parameters():
            assert param.grad is not None, name
            assert not torch.isnan(param.grad).any(), name
            torch.testing.assert_close(param.grad, expected[name], rtol=rtol, atol=1e-12, msg=name)


# --- the annotation -------------------------------------------------------------------------------


def test_annotation_marks_blocks_cuts_costs_and_overlappable_mixes():
    torch._dynamo.reset()
    model, (ids,) = llama(depth=2, width=128, heads=4, batch=2, seq=16)
    captured = capture(model, (ids,), MHCOptions())
    annotation, graph = captured.annotation, captured.graph_module.graph
    assert [b.key for b in annotation.blocks] == [
        "layers.0.attention.wq", "layers.0.feed_forward.w1",
        "layers.1.attention.wq", "layers.1.feed_forward.w1"]
    assert [cut.before for cut in annotation.cuts] == [1, 2, 3] and all(c.legal for c in annotation.cuts)
    # the rotary tables cross every cut that has an attention block after it; nothing else does
    assert [cut.pass_through for cut in annotation.cuts] == [("cos", "sin"), ("cos", "sin"), ()]
    tokens, width, n = 2 * 16, 128, 4
    assert {cut.stream_bytes for cut in annotation.cuts} == {tokens * n * width * 4}
    torch._dynamo.reset()
    half = capture(model, (ids,), MHCOptions(stream_dtype="bfloat16")).annotation
    assert {cut.stream_bytes for cut in half.cuts} == {tokens * n * width * 2}
    mixes = [node for node in graph.nodes if node.meta.get(OVERLAP_KEY)]
    assert [node.name for node in mixes] == [b.post_res_mix for b in annotation.blocks]
    assert all(node.target is torch.ops.mhc.post_res_mix.default for node in mixes)
    cut_nodes = [node for node in graph.nodes if CUT_KEY in node.meta]
    assert [node.meta[CUT_KEY] for node in cut_nodes] == annotation.cuts
    # block flops: f counted independently by torch's FlopCounterMode, plus the mHC ops
    x = torch.randn(2, 16, width)
    cos, sin = model.cos[:16], model.sin[:16]
    layer = model.layers[0]
    for block, f in zip(annotation.blocks[:2], (
            lambda: layer.attention(layer.attention_norm(x), cos, sin),
            lambda: layer.feed_forward(layer.ffn_norm(x)))):
        with FlopCounterMode(display=False) as counter:
            f()
        mhc = tokens * sum(op.forward_flops(n, width, 20) for op in spec.FORWARD_OPS)
        matmuls = counter.get_total_flops() + mhc
        assert matmuls <= block.cost.flops <= 1.1 * matmuls, (block.key, block.cost.flops, matmuls)
        assert block.cost.bytes > 0 and block.cost.cost >= block.cost.flops


def test_balance_matches_brute_force_on_random_costs():
    rng = random.Random(0)
    for _ in range(200):
        count = rng.randint(1, 8)
        block_costs = [rng.randint(1, 20) for _ in range(count)]
        legal = {i for i in range(1, count) if rng.random() < 0.7}
        stages = rng.randint(1, count)
        splits = [c for c in itertools.combinations(sorted(legal), stages - 1)]
        worst = [max(sum(block_costs[a:b]) for a, b in zip((0, *c), (*c, count))) for c in splits]
        got = balance(block_costs, legal, stages)
        if not splits:
            assert got is None
            continue
        bounds = (0, *got, count)
        assert set(got) <= legal and list(got) == sorted(got)
        assert max(sum(block_costs[a:b]) for a, b in zip(bounds, bounds[1:])) == min(worst)


# --- stage modules in one process -----------------------------------------------------------------


def _chain(modules, ids):
    outputs = modules[0](ids)
    for module in modules[1:]:
        outputs = module(*outputs)
    return outputs


@pytest.mark.parametrize("build,cuts", [
    pytest.param(gpt, None, id="gpt-3-balanced"),
    pytest.param(llama, ["layers.0.feed_forward", "layers.2"], id="llama-3-named-cuts"),
])
def test_stage_modules_chained_equal_the_rewritten_model(build, cuts):
    model, ids, target = example_model(build, depth=3, batch=2, seq=8, width=32, heads=2)
    expected_loss, expected_grads = single_process_run(model, ids, target)
    plan = plan_pipeline(model, (ids,), 3, cuts=cuts)
    if cuts:
        assert plan.starts == [0, 1, 4]
    modules = build_stage_modules(plan, range(3))
    names = [name for module in modules for name, _ in module.named_parameters()]
    assert sorted(names) == sorted(name for name, _ in model.named_parameters())
    loss = loss_of(_chain(modules, ids), target)
    loss.backward()
    torch.testing.assert_close(loss, expected_loss, rtol=1e-12, atol=0)
    _assert_grads(modules, expected_grads)


def test_overlap_puts_only_each_sent_mix_on_the_side_stream_and_compiled_stages_match():
    model, ids, target = example_model(gpt, depth=2, batch=2, seq=8, width=32, heads=2)
    expected_loss, expected_grads = single_process_run(model, ids, target)
    plan = plan_pipeline(model, (ids,), 3)
    modules = build_stage_modules(plan, range(3), overlap=True)
    side_stream_mix = torch.ops.mhc.post_res_mix_on_side_stream.default
    mixes = 0
    for index, module in enumerate(modules):
        nodes = list(module.graph.nodes)
        on_side = [n for n in nodes if n.target is side_stream_mix]
        mixes += sum(n.target in (side_stream_mix, torch.ops.mhc.post_res_mix.default) for n in nodes)
        if index + 1 < len(modules):  # the mix whose streams the stage sends, and no other
            assert len(on_side) == 1 and nodes[-1].args[0][0] is on_side[0], index
        else:
            assert not on_side
    assert mixes == len(plan.blocks) == 4
    pipeline_module.compile_stage_modules(modules, plan.captured.options)
    loss = loss_of(_chain(modules, ids), target)
    loss.backward()
    torch.testing.assert_close(loss, expected_loss, rtol=1e-12, atol=0)
    _assert_grads(modules, expected_grads)


def test_overlap_finds_the_sent_mix_behind_a_stream_wise_op():
    # ResNet's blocks end in a ReLU after the mix: the stage sends relu(mix), not the mix itself.
    model, (images,) = resnet(batch=2, image=8, width=4, depth=2)
    model = model.double().eval()
    images = images.double()
    mhc_compile.prepare(model, images)
    plan = plan_pipeline(model, (images,), 2)
    plain, overlapped = (build_stage_modules(plan, range(2), overlap=on) for on in (False, True))
    side_stream_mix = torch.ops.mhc.post_res_mix_on_side_stream.default
    counts = [sum(n.target is side_stream_mix for n in m.graph.nodes) for m in overlapped]
    assert counts == [1, 0]
    sent = overlapped[0].graph.find_nodes(op="output")[0].args[0][0]
    assert sent.target is not side_stream_mix  # the ReLU after it
    with torch.no_grad():
        torch.testing.assert_close(_chain(overlapped, images), _chain(plain, images), rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the side stream needs CUDA")
def test_side_stream_post_res_mix_matches_the_op_forward_and_backward_on_cuda():
    torch.manual_seed(0)
    shapes = ((64, 4, 256), (64, 256), (64, 4), (64, 4, 4))
    inputs = [torch.randn(s, device="cuda", requires_grad=True) for s in shapes]
    copies = [t.detach().clone().requires_grad_() for t in inputs]
    out = post_res_mix_on_side_stream(*inputs)
    expected = torch.ops.mhc.post_res_mix.default(*copies)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(out, expected)
    for got, want in zip(inputs, copies):
        torch.testing.assert_close(got.grad, want.grad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the side stream needs CUDA")
def test_compiled_stages_with_the_side_stream_mix_match_on_cuda():
    model, ids, target = example_model(gpt, depth=2, batch=2, seq=64, width=64, heads=2)
    model, ids, target = model.float().cuda(), ids.cuda(), target.cuda()
    plan = plan_pipeline(model, (ids,), 2)
    grads = []
    for overlap in (False, True):
        modules = build_stage_modules(plan, range(2), overlap=overlap)
        pipeline_module.compile_stage_modules(modules, plan.captured.options)
        loss_of(_chain(modules, ids), target).backward()
        grads.append({name: p.grad.clone() for m in modules for name, p in m.named_parameters()})
        model.zero_grad(set_to_none=True)
    for name, expected in grads[0].items():
        torch.testing.assert_close(grads[1][name], expected, rtol=1e-5, atol=1e-6, msg=name)


# --- bad configurations: exact messages ------------------------------------------------------------


class SideOutput(nn.Module):
    """Three residual blocks whose first block's output is also read at the very end."""

    def __init__(self, width=8):
        super().__init__()
        self.f = nn.ModuleList(nn.Linear(width, width) for _ in range(3))
        self.head = nn.Linear(width, 2)

    def forward(self, x):
        x = x + self.f[0](x)
        first = x
        x = x + self.f[1](x)
        x = x + self.f[2](x)
        return self.head(x) + first.sum(-1, keepdim=True)


def test_bad_stage_counts_and_cuts_are_clear_errors():
    model, ids, _ = example_model(gpt, depth=2, batch=2, seq=8, width=32, heads=2)
    messages = [
        (5, None, "mhc pipeline: 5 stages need at least 5 mHC blocks (a stage begins only at a block "
                   "boundary), but the model has 4; use at most 4 stages"),
        (2, ["blocks.0.attn.proj"], "mhc pipeline: cut 'blocks.0.attn.proj' falls inside mHC block 0 "
                   "(blocks.0.attn.qkv); a stage can only begin where a block begins: "
                   "blocks.0.mlp.fc, blocks.1.attn.qkv, blocks.1.mlp.fc"),
        (2, ["blocks.0"], "mhc pipeline: cut 'blocks.0' is the first mHC block; every stage needs at "
                   "least one block, so the first stage cannot be empty"),
        (2, ["lm_head"], "mhc pipeline: cut 'lm_head' names no module of the model's mHC blocks; "
                   "stages can begin at: blocks.0.mlp.fc, blocks.1.attn.qkv, blocks.1.mlp.fc"),
        (3, ["blocks.1"], "mhc pipeline: 1 cut(s) make 2 stages, but num_stages is 3; give "
                   "num_stages - 1 cuts"),
        (3, ["blocks.1", "blocks.0.mlp"], "mhc pipeline: cuts must name blocks in model order; "
                   "'blocks.0.mlp' (block 1) does not come after block 2"),
        (0, None, "mhc pipeline: num_stages must be an integer >= 1, got 0"),
    ]
    for stages, cuts, message in messages:
        with pytest.raises(PipelineError) as error:
            plan_pipeline(model, (ids[:1],), stages, cuts=cuts)
        assert str(error.value) == message


def test_a_stream_value_read_after_a_cut_makes_it_illegal():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model, x = SideOutput(), torch.randn(2, 8)
    with pytest.raises(PipelineError) as error:
        plan_pipeline(model, (x,), 2, cuts=["f.1"])
    assert str(error.value) == (
        "mhc pipeline: cannot cut before block 1 (f.1): leave_streams is computed from the residual "
        "streams before the cut and read after it")
    with pytest.raises(PipelineError) as error:
        plan_pipeline(model, (x,), 2)
    assert str(error.value) == (
        "mhc pipeline: 2 stages need 1 legal cuts, but only 0 of the 2 block boundaries are legal; "
        "e.g. before block 1: leave_streams is computed from the residual streams before the cut "
        "and read after it")


def test_stage_layout_per_schedule_and_world_size_errors():
    assert stage_indices("1F1B", 2, 2, 1) == [1]
    assert stage_indices("Interleaved1F1B", 6, 2, 1) == [1, 3, 5]
    assert stage_indices("DualPipeV", 4, 2, 0) == [0, 3]
    with pytest.raises(PipelineError) as error:
        stage_indices("1F1B", 3, 2, 0)
    assert str(error.value) == (
        "mhc pipeline: schedule '1F1B' runs one stage per rank, so num_stages must equal the world "
        "size; got num_stages=3 with world size 2")
    with pytest.raises(PipelineError) as error:
        stage_indices("DualPipeV", 2, 2, 0)
    assert str(error.value) == (
        "mhc pipeline: schedule 'DualPipeV' runs two stages per rank in a V (rank r holds stages r "
        "and 2W-1-r), so num_stages must be twice the world size; got num_stages=2 with world size 2")
    with pytest.raises(PipelineError) as error:
        stage_indices("Interleaved1F1B", 3, 2, 0)
    assert str(error.value) == (
        "mhc pipeline: schedule 'Interleaved1F1B' runs num_stages / world size stages per rank (rank "
        "r holds r, r+W, ...), so num_stages must be a multiple of the world size; got num_stages=3 "
        "with world size 2")


def test_report_cli_proposes_stage_cuts(capsys):
    assert cli.main(["report", "--example", "gpt", "--stages", "2"]) == 0
    out = capsys.readouterr().out
    assert "pipeline: 2 stages over 8 mHC blocks (n=4)" in out
    assert "blocks.2.attn.qkv" in out  # the balanced cut: four blocks a stage
    assert cli.main(["report", "--example", "gpt", "--stages", "9"]) == 2
    assert capsys.readouterr().err.strip() == (
        "mhc-compile: error: mhc pipeline: 9 stages need at least 9 mHC blocks (a stage begins only "
        "at a block boundary), but the model has 8; use at most 8 stages")


# --- two processes, gloo --------------------------------------------------------------------------


def _run_schedule(rank, schedule, num_stages, **kwargs):
    """One step of `schedule` against the single-process run. Stages compile through Inductor
    unless kwargs say eager=True (the schedules' own logic, quickly)."""
    model, ids, target = example_model(gpt, depth=2, batch=4, seq=8, width=32, heads=2)
    expected_loss, expected_grads = single_process_run(model, ids, target)
    compiled, compile_whole_ops = [], pipeline_module.compile_whole_ops

    def counted_compile(graph_module, example_inputs, options):
        compiled.append(options)
        return compile_whole_ops(graph_module, example_inputs, options)

    with mock.patch.object(pipeline_module, "compile_whole_ops", counted_compile), \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = mhc_compile.pipeline(model, (ids,), num_stages, schedule, loss_fn=loss_of,
                                   n_microbatches=4, **kwargs)
        losses = []
        run.step(*((ids,) if 0 in run.stage_indices else ()), target=target, losses=losses)
    # One forward graph per local stage through Inductor with our passes; none when eager, nor
    # (with a warning) under the schedules that split a stage's backward in two parts.
    split_backward = schedule in ("InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV")
    eager = kwargs.get("eager") or split_backward
    assert len(compiled) == (0 if eager else len(run.stage_indices)), schedule
    said = [str(w.message) for w in caught if "run eagerly" in str(w.message)]
    assert len(said) == (split_backward and not kwargs.get("eager")), (schedule, said)
    if num_stages - 1 in run.stage_indices:
        torch.testing.assert_close(torch.stack(losses).mean(), expected_loss, rtol=1e-12, atol=0)
    _assert_grads(run.modules, expected_grads)
    names = [name for module in run.modules for name, _ in module.named_parameters()]
    everyone = [None, None]
    dist.all_gather_object(everyone, names)
    assert sorted(everyone[0] + everyone[1]) == sorted(n for n, _ in model.named_parameters()), schedule


def _worker(rank, port, cases):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        with attention_that_compiles_in_float64():
            for schedule, num_stages, kwargs in cases:
                _run_schedule(rank, schedule, num_stages, **kwargs)
        model, ids, _ = example_model(gpt, depth=2, batch=4, seq=8, width=32, heads=2)
        with pytest.raises(PipelineError) as error:
            mhc_compile.pipeline(model, (ids,), 3, "1F1B", loss_fn=loss_of)
        assert str(error.value) == (
            "mhc pipeline: schedule '1F1B' runs one stage per rank, so num_stages must equal the "
            "world size; got num_stages=3 with world size 2")
        with pytest.raises(PipelineError) as error:
            mhc_compile.pipeline(model, (ids,), 2, "1F1B", loss_fn=loss_of, n_microbatches=3)
        assert str(error.value) == (
            "mhc pipeline: example_args[0] has batch size 4 in dimension 0, which does not split "
            "into n_microbatches=3 equal microbatches")
    finally:
        dist.destroy_process_group()


def test_two_processes_gloo_match_the_single_process_run():
    eager = {"eager": True}
    cases = [("1F1B", 2, {"async_exchange": False}),  # stages through Inductor
             ("1F1B", 2, {"overlap": True}),  # through Inductor, the action runtime, the side op
             ("GPipe", 2, {"async_exchange": False, **eager}),
             ("GPipe", 2, {"async_exchange": True, **eager})]
    if "DualPipeV" in schedule_names():
        cases.append(("DualPipeV", 4, {}))  # stages stay eager, said once
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_worker, args=(port, cases), nprocs=2, join=True)


class GraphBreak(nn.Module):
    """Two residual blocks with a graph break between them."""

    def __init__(self, width=8):
        super().__init__()
        self.f = nn.ModuleList(nn.Linear(width, width) for _ in range(2))

    def forward(self, x):
        x = x + self.f[0](x)
        torch._dynamo.graph_break()
        return x + self.f[1](x)


def test_a_model_with_a_graph_break_is_a_clear_error():
    torch._dynamo.reset()
    with pytest.raises(PipelineError) as error:
        plan_pipeline(GraphBreak(), (torch.randn(2, 8),), 2)
    assert str(error.value).startswith(
        "mhc pipeline: the model must trace as one graph to be split into stages, but "
        "torch.compile(fullgraph=True) stopped: ")
