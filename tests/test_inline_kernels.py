"""passes/inline_kernels.py: which opaque op calls of a post-grad graph are handed to Inductor.

Splicing the traced kernels in needs real (not interpreted) Triton kernels, so that part runs on
the GPU (tests/test_kernels.py, test_backend_hands_the_kernels_to_inductor). Here, on any machine:
the choice of calls, against graphs traced with static and with symbolic shapes."""

from __future__ import annotations

import pytest
import torch
from torch._functorch import config as functorch_config
from torch._inductor import config as inductor_config
from torch.fx.experimental.proxy_tensor import make_fx

import mhc_compile
from mhc_compile import _dynamo_compat, ops, templates
from mhc_compile.examples import llama
from mhc_compile.passes import inline_kernels

N, C, TOKENS = 4, 24, 6


def _sublayer_through_opaque_ops(streams, y, phi, alpha, b_pre, b_post, b_res, grad_out):
    _, h_post, h_res, _ = ops.coefficients_pre_mix_opaque(
        streams, phi, alpha, b_pre, b_post, b_res, 20, "sinkhorn")
    out = ops.post_res_mix_opaque(streams, y, h_post, h_res)
    return out, ops.post_res_mix_backward_opaque(grad_out, streams, y, h_post, h_res)


def _graph(tracing_mode: str, n: int = N) -> torch.fx.Graph:
    inputs = (torch.randn(TOKENS, n, C), torch.randn(TOKENS, C), torch.randn(n * C, n * n + 2 * n),
              torch.rand(3), torch.randn(n), torch.randn(n), torch.randn(n, n),
              torch.randn(TOKENS, n, C))
    return make_fx(_sublayer_through_opaque_ops, tracing_mode=tracing_mode)(*inputs).graph


@pytest.fixture
def replaced(monkeypatch):
    """The launcher names inline_kernels would splice in, in graph order (nothing is spliced)."""
    names = []
    monkeypatch.setattr(templates, "launcher", lambda name: name)
    monkeypatch.setattr(_dynamo_compat, "replace_with_functional_trace",
                        lambda node, launcher: names.append(launcher))
    return names


@pytest.fixture
def kernels_on_cpu(monkeypatch):
    """templates.kernels_apply as on CUDA, for this machine's CPU tensors."""
    monkeypatch.setattr(templates, "kernels_active", lambda device: True)


def test_static_calls_whose_kernels_apply_are_handed_over(kernels_on_cpu, replaced):
    assert inline_kernels.inline_kernels(_graph("fake")) == 3
    assert replaced == ["coefficients_pre_mix", "post_res_mix", "post_res_mix_backward"]


def test_symbolic_shapes_keep_the_opaque_ops(kernels_on_cpu, replaced):
    assert inline_kernels.inline_kernels(_graph("symbolic")) == 0
    assert replaced == []


def test_more_streams_than_the_kernels_take_keep_the_opaque_ops(kernels_on_cpu, replaced):
    assert inline_kernels.inline_kernels(_graph("fake", templates.MAX_STREAMS + 1)) == 0
    assert replaced == []


def test_cpu_streams_keep_the_opaque_ops(replaced):
    assert inline_kernels.inline_kernels(_graph("fake")) == 0
    assert replaced == []


def test_every_op_of_a_static_model_is_handed_over(kernels_on_cpu, replaced):
    """Through backend="mhc": the mHC parameters the backend adds as graph inputs reach AOT
    autograd with static shapes (_dynamo_compat._static_unless_traced); with the symbolic sizes AOT
    autograd gives unseen real inputs, every coefficient op would stay opaque."""
    model, args = llama(seed=0, batch=2, seq=8, width=32, depth=2, vocab=64)
    mhc_compile.prepare(model, *args, n=N)
    torch._dynamo.reset()
    # Inductor's and AOT autograd's caches off: the graphs must be built in this process.
    with inductor_config.patch(fx_graph_cache=False), \
            functorch_config.patch(enable_autograd_cache=False):
        compiled = torch.compile(model, backend="mhc", options={"n": N})
        compiled(*args).sum().backward()
    blocks = len(model.mhc.blocks)
    assert blocks == 4
    for launcher in ("coefficients_pre_mix", "coefficients_pre_mix_backward",
                     "post_res_mix_backward"):
        assert replaced.count(launcher) == blocks, (launcher, replaced)
