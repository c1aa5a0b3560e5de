"""The pass pipeline: one list per stage, one signature, a logged count per pass, and example
values on every node the rewrite adds."""

from __future__ import annotations

import inspect
import logging
import re

import pytest
import torch
from torch import fx
from torch._functorch import config as functorch_config
from torch._inductor import config as inductor_config

import mhc_compile
from mhc_compile import passes
from mhc_compile.backend import GraphTracer, bind_and_rewrite, trace, with_parameters
from mhc_compile.options import MHCOptions
from zoo import ZOO


def test_every_pass_takes_a_graph_and_the_context():
    for stage, stage_passes in passes.STAGES.items():
        assert stage_passes, stage
        for graph_pass in stage_passes:
            parameters = list(inspect.signature(graph_pass.run).parameters.values())
            assert [p.annotation for p in parameters] == [
                "fx.GraphModule" if stage in ("analysis", "rewrite", "pipeline") else "fx.Graph",
                "PassContext"], (stage, graph_pass.name)


def test_a_compile_logs_every_stage_in_order(caplog):
    """backend="mhc" runs the analysis, rewrite, joint and post-grad passes, each logged with its
    count; the pipeline's annotation runs only for mhc_compile.pipeline."""
    model, args = ZOO["gpt"].factory(depth=2)
    torch.compiler.reset()
    # Inductor's and AOT autograd's caches off: a cached graph skips the passes.
    with caplog.at_level(logging.INFO, logger="mhc_compile.passes"), \
            inductor_config.patch(fx_graph_cache=False), \
            functorch_config.patch(enable_autograd_cache=False):
        compiled = torch.compile(model, backend="mhc")
        ZOO["gpt"].loss(compiled(*args), args).backward()
    ran = [record.getMessage() for record in caplog.records if record.name == "mhc_compile.passes"]
    pattern = re.compile(r"mhc (\w+): (\w+): (\d+) (.+)")
    parsed = [pattern.fullmatch(message).groups() for message in ran]
    expected = [(stage, graph_pass.name, graph_pass.counts)
                for stage in ("analysis", "rewrite", "joint", "post_grad", "post_grad")
                for graph_pass in passes.STAGES[stage]]
    assert [(stage, name, counts) for stage, name, _, counts in parsed] == expected, ran
    count = {(stage, name): int(number) for stage, name, number, _ in parsed}
    assert count["analysis", "find_residual_chains"] == 2 * 2  # attention and MLP
    assert count["rewrite", "rewrite_mhc"] == 1  # one chain
    assert count["joint", "tag_recompute"] == 1


def test_debug_level_prints_the_graph_after_each_pass(caplog):
    model, args = ZOO["gpt"].factory(depth=1)
    torch.compiler.reset()
    with caplog.at_level(logging.DEBUG, logger="mhc_compile.passes"):
        mhc_compile.report(model, *args)
    dumps = [r.getMessage() for r in caplog.records if "graph after" in r.getMessage()]
    assert [dump.splitlines()[0] for dump in dumps] == [
        "mhc analysis: graph after inline_checkpoint_regions:",
        "mhc analysis: graph after find_residual_chains:",
        "mhc analysis: graph after match_hyper_connections:"]
    assert all("graph():" in dump for dump in dumps)


def _rewritten_graph(name: str, options: MHCOptions):
    """The rewritten graph of a zoo model, its inputs (mHC parameters first) and its output."""
    model, args = ZOO[name].factory()
    captured = []

    def keep_rewritten(record):
        bind_and_rewrite(record)
        captured.append((record.graph_module, [*record.parameters, *record.example_inputs]))
        return with_parameters(record, record.graph_module)

    torch.compiler.reset()
    trace(model, args, GraphTracer(options, keep_rewritten, top_module=model), fullgraph=True)
    (graph_module, inputs), = captured
    return graph_module, inputs


class _Values(fx.Interpreter):
    """Each node's real output on real inputs."""

    def __init__(self, graph_module):
        super().__init__(graph_module)
        self.values = {}

    def run_node(self, node):
        self.values[node] = super().run_node(node)
        return self.values[node]


def _described(value):
    if isinstance(value, torch.Tensor):
        return tuple(value.shape), value.dtype, value.device.type
    if isinstance(value, (tuple, list)):
        return tuple(_described(item) for item in value)
    return value


@pytest.mark.parametrize("name, options", [
    ("llama", {}),
    ("resnet", {"n": 2}),  # channels-first streams [B, H, W, n, C], links through ReLU
    ("resnet", {"stream_dtype": "bfloat16"}),  # ReLU links on bf16 streams of float32 blocks
    ("gpt", {"stream_dtype": "bfloat16", "n": 3}),
], ids=["llama", "resnet-n2", "resnet-bf16", "gpt-bf16-n3"])
def test_every_node_the_rewrite_adds_carries_its_value(name, options):
    """meta["val"] (and Dynamo's "example_value") of every node matches what the node computes
    on the real inputs: shape, dtype, device."""
    graph_module, inputs = _rewritten_graph(name, MHCOptions.from_kwargs(options))
    interpreter = _Values(graph_module)
    with torch.no_grad():
        interpreter.run(*inputs)
    added = [node for node in graph_module.graph.nodes
             if node.op == "call_function" and "val" in node.meta
             and "example_value" in node.meta and node.meta["val"] is node.meta["example_value"]]
    assert any(str(node.target).startswith("mhc.") for node in added)
    for node in graph_module.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        value = node.meta.get("val", node.meta.get("example_value"))
        assert value is not None, f"{node.format_node()} has no example value"
        assert _described(value) == _described(interpreter.values[node]), node.format_node()
