"""passes/fuse_sublayers.py on hand-built forward graphs: which post/res mixes it fuses with the next
block's coefficients and pre-mix, and that the fused graph computes what the two ops computed (end
to end under Inductor: tests/test_recompute.py)."""

import operator

import pytest
import torch
from torch import fx

from mhc_compile import ops, spec  # noqa: F401  (registers the mhc:: ops)
from mhc_compile.options import MHCOptions
from mhc_compile.passes import PassContext
from mhc_compile.passes.fuse_sublayers import _next_coefficients, fuse_sublayers

MIX = torch.ops.mhc.post_res_mix_opaque.default
COEFFICIENTS = torch.ops.mhc.coefficients_pre_mix_opaque.default
FUSED = torch.ops.mhc.post_res_mix_coefficients_pre_mix_opaque.default


def _inputs(n, channels, tokens, dtype):
    """Fresh streams, F's output, block l's H_post and H_res, block l+1's parameters."""
    streams = torch.randn(tokens, n, channels, dtype=dtype)
    y = torch.randn(tokens, channels, dtype=dtype)
    coefficient_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    h_post = torch.rand(tokens, n, dtype=coefficient_dtype) * 2
    h_res = torch.softmax(torch.randn(tokens, n, n, dtype=coefficient_dtype), dim=-1)
    parameters = [torch.randn(shape, dtype=coefficient_dtype) / 4
                  for shape in spec.parameter_shapes(n, channels)]
    return [streams, y, h_post, h_res, *parameters]


def _graph(inputs, early_reader=False, relu_between=False):
    """inputs -> post/res mix -> [relu] -> coefficients and pre-mix -> next block's post/res mix;
    outputs: every coefficient output and the next mix. `early_reader`: the mix's streams are also
    an input of a node placed before the coefficient op."""
    graph = fx.Graph()
    placeholders = []
    for index, value in enumerate(inputs):
        placeholders.append(graph.placeholder(f"input_{index}"))
        placeholders[-1].meta["val"] = value
    streams, y, h_post, h_res, *parameters = placeholders
    mix = graph.call_function(MIX, (streams, y, h_post, h_res))
    mix.meta["val"] = inputs[0]
    read = mix
    outputs = []
    if early_reader:
        outputs.append(graph.call_function(torch.ops.aten.neg.default, (mix,)))
    if relu_between:
        read = graph.call_function(torch.ops.aten.relu.default, (mix,))
    coefficients = graph.call_function(COEFFICIENTS, (read, *parameters, 20, "sinkhorn"))
    coefficients.meta["val"] = ops.coefficients_pre_mix(inputs[0], *inputs[4:], 20, "sinkhorn")
    results = [graph.call_function(operator.getitem, (coefficients, index)) for index in range(6)]
    next_mix = graph.call_function(MIX, (read, results[3], results[1], results[2]))
    graph.output([*outputs, *results, next_mix])
    return graph, mix


@pytest.mark.parametrize("n, channels, tokens, dtype", [
    (4, 16, 6, torch.float32), (3, 9, 5, torch.float64), (2, 8, 7, torch.bfloat16),
])
def test_fuses_the_mix_with_the_next_coefficients_and_computes_the_same(n, channels, tokens, dtype):
    inputs = _inputs(n, channels, tokens, dtype)
    graph, _ = _graph(inputs)
    expected = fx.GraphModule(torch.nn.Module(), graph)(*inputs)
    assert fuse_sublayers(graph, PassContext(MHCOptions())) == 1
    graph.lint()
    targets = [node.target for node in graph.nodes if node.op == "call_function"]
    assert targets.count(FUSED) == 1 and COEFFICIENTS not in targets
    assert targets.count(MIX) == 1  # the next block's: nothing after it reads its streams
    fused = fx.GraphModule(torch.nn.Module(), graph)(*inputs)
    for actual, wanted in zip(fused, expected, strict=True):
        torch.testing.assert_close(actual, wanted, rtol=0, atol=0)


@pytest.mark.parametrize("case, reason", [
    (dict(early_reader=True), "its streams are read before the coefficient op, where the fused op "
                              "is not yet"),
    (dict(relu_between=True), "no coefficient op reads its streams (a chain's tail, or a "
                              "stream-wise op between)"),
], ids=["read-before-the-coefficients", "stream-wise-op-between"])
def test_leaves_mixes_it_cannot_fuse(case, reason):
    graph, mix = _graph(_inputs(4, 16, 6, torch.float32), **case)
    before = [(node.name, node.args) for node in graph.nodes]
    position = {node: index for index, node in enumerate(graph.nodes)}
    assert _next_coefficients(mix, position) == reason
    assert fuse_sublayers(graph, PassContext(MHCOptions())) == 0
    assert [(node.name, node.args) for node in graph.nodes] == before
