"""passes/fuse_grad_streams.py on hand-built post-grad graphs: which adds it folds into the
coefficient backward and which it must leave (end to end under Inductor: tests/test_recompute.py)."""

import operator

import pytest
import torch
from torch import fx

from mhc_compile import ops, reference  # noqa: F401  (registers the mhc:: ops)
from mhc_compile.options import MHCOptions
from mhc_compile.passes import PassContext
from mhc_compile.passes.fuse_grad_streams import _grad_streams_add, fuse_grad_streams

N, C, TOKENS = 4, 8, 6
BACKWARD = torch.ops.mhc.coefficients_pre_mix_backward_opaque.default
STREAMS_SHAPE = (TOKENS, N, C)
# Example values of the backward's inputs, in schema order (the grads of h_pre, h_post, h_res and
# mixed, then h_pre, the projection, the sums of squares, streams and the five parameters).
INPUT_SHAPES = [(TOKENS, N), (TOKENS, N), (TOKENS, N, N), (TOKENS, C), (TOKENS, N),
                (TOKENS, N * N + 2 * N), (TOKENS,), STREAMS_SHAPE, (N * C, N * N + 2 * N), (3,),
                (N,), (N,), (N, N)]
ARGUMENTS = len(INPUT_SHAPES) + 2  # and sinkhorn_iters, constraint


def _placeholder(graph, name, shape, dtype=torch.float32):
    node = graph.placeholder(name)
    node.meta["val"] = torch.empty(shape, dtype=dtype)
    return node


def _backward_graph(other_shape=STREAMS_SHAPE, other_dtype=torch.float32, other_after=False,
                    alpha=None, second_reader=False):
    """inputs -> coefficient backward -> add(its grad streams, other) -> output."""
    graph = fx.Graph()
    inputs = [_placeholder(graph, f"input_{i}", shape) for i, shape in enumerate(INPUT_SHAPES)]
    other_source = _placeholder(graph, "other", other_shape, other_dtype)
    backward = graph.call_function(BACKWARD, (*inputs, 20, "sinkhorn"))
    grad_streams = graph.call_function(operator.getitem, (backward, 0))
    grad_streams.meta["val"] = torch.empty(STREAMS_SHAPE)
    other = other_source
    if other_after:  # computed after the backward: the backward cannot read it where it stands
        other = graph.call_function(torch.ops.aten.neg.default, (other_source,))
        other.meta["val"] = other_source.meta["val"]
    kwargs = {} if alpha is None else {"alpha": alpha}
    add = graph.call_function(torch.ops.aten.add.Tensor, (grad_streams, other), kwargs)
    add.meta["val"] = torch.empty(STREAMS_SHAPE)
    outputs = [add, grad_streams] if second_reader else [add]
    graph.output(outputs)
    return graph, backward


def test_folds_the_add_into_the_backward():
    graph, backward = _backward_graph()
    assert fuse_grad_streams(graph, PassContext(MHCOptions())) == 1
    assert backward.args[-1].name == "other" and len(backward.args) == ARGUMENTS + 1
    assert not [node for node in graph.nodes if node.target is torch.ops.aten.add.Tensor]
    (output,) = graph.output_node().args[0]
    assert output.target is operator.getitem and output.args == (backward, 0)
    graph.lint()


@pytest.mark.parametrize("case, reason", [
    (dict(other_after=True), "the other addend is computed after the backward"),
    (dict(alpha=2), "its grad streams are added with a scale (alpha)"),
    (dict(second_reader=True), "its grad streams are not read by exactly one node"),
    (dict(other_shape=(1, N, C)), "the addends differ in shape, dtype or device (a broadcast or a "
                                  "promotion)"),
    (dict(other_dtype=torch.float16), "the addends differ in shape, dtype or device (a broadcast "
                                      "or a promotion)"),
], ids=["other-computed-later", "alpha", "grad-streams-read-elsewhere", "broadcast", "dtype"])
def test_leaves_adds_it_cannot_fold_exactly(case, reason):
    graph, backward = _backward_graph(**case)
    before = [(node.name, node.args, dict(node.kwargs)) for node in graph.nodes]
    position = {node: index for index, node in enumerate(graph.nodes)}
    assert _grad_streams_add(backward, position) == reason
    assert fuse_grad_streams(graph, PassContext(MHCOptions())) == 0
    assert [(node.name, node.args, dict(node.kwargs)) for node in graph.nodes] == before
    assert len(backward.args) == ARGUMENTS


def test_a_backward_folds_at_most_once():
    graph, backward = _backward_graph()
    fuse_grad_streams(graph, PassContext(MHCOptions()))
    position = {node: index for index, node in enumerate(graph.nodes)}
    assert _grad_streams_add(backward, position) == "it has an accumulate already"


def test_reference_backward_adds_the_accumulated_grad_streams():
    """The CPU op (the plain-PyTorch reference) with `accumulate`, against float64 autograd."""
    generator = torch.Generator().manual_seed(3)
    streams = torch.randn(2, 5, N, C, generator=generator)
    phi = torch.randn(N * C, N * N + 2 * N, generator=generator) / (N * C) ** 0.5
    parameters = [phi, torch.rand(3, generator=generator) + 0.5,
                  *(torch.randn(s, generator=generator) for s in ((N,), (N,), (N, N)))]
    h_pre, *outputs, proj, sum_squares = ops.coefficients_pre_mix(streams, *parameters, 20, "sinkhorn")
    grad_outputs = [torch.randn(t.shape, generator=generator) for t in (h_pre, *outputs)]
    accumulate = torch.randn(streams.shape, generator=generator)
    grads = ops.coefficients_pre_mix_backward(*grad_outputs, h_pre, proj, sum_squares, streams,
                                              *parameters, 20, "sinkhorn", accumulate)

    inputs = [t.double().requires_grad_() for t in (streams, *parameters)]
    expected = torch.autograd.grad(reference.coefficients_pre_mix(*inputs, 20, "sinkhorn"), inputs,
                                   [g.double() for g in grad_outputs])
    expected = (expected[0] + accumulate.double(), *expected[1:])
    for grad, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(grad.double(), want, rtol=1e-4, atol=1e-5)
