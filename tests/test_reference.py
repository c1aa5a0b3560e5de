"""The plain-PyTorch mHC ops and their custom-op wrappers against float64 ground truth."""

import pytest
import torch
import torch._dynamo.testing
import torch._inductor.config

from mhc_compile import ops, reference

SHAPES = [
    pytest.param(n, c, t, id=f"n{n}-C{c}-T{t}")
    for n, c, t in [(1, 8, 3), (2, 5, 7), (4, 16, 6), (8, 3, 2)]
]


def _random_parameters(n, channels, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=generator, dtype=dtype)
    return rand(n * channels, n * n + 2 * n) * 0.1, rand(3).abs(), rand(n), rand(n), rand(n, n)


def _naive_sinkhorn(logits, iters):
    """Textbook Sinkhorn-Knopp in float64 with a max shift: the ground truth for moderate logits."""
    matrix = (logits - logits.amax(dim=(-2, -1), keepdim=True)).double().exp()
    for _ in range(iters):
        matrix = matrix / matrix.sum(dim=-2, keepdim=True)
        matrix = matrix / matrix.sum(dim=-1, keepdim=True)
    return matrix


@pytest.mark.parametrize("n", [2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_sinkhorn_is_doubly_stochastic_on_random_logits(n, dtype):
    """Uniform logits in [-1, 1]: 20 iterations reach 1e-6. Wider logits converge more slowly
    (for n=2 the column error shrinks by tanh(d/4)^2 per iteration, d the logits' cross
    difference), a property of Sinkhorn-Knopp itself: see the float64 comparison below."""
    logits = torch.rand(500, n, n, dtype=dtype) * 2 - 1
    result = reference.sinkhorn(logits, 20)
    assert torch.isfinite(result).all() and (result >= 0).all()
    assert (result.sum(-1) - 1).abs().max() < 1e-6
    assert (result.sum(-2) - 1).abs().max() < 1e-6
    torch.testing.assert_close(result.double(), _naive_sinkhorn(logits, 20), atol=1e-6, rtol=0)


@pytest.mark.parametrize("n", [2, 4, 8])
def test_sinkhorn_matches_float64_on_wide_logits(n):
    logits = torch.randn(500, n, n) * 3
    result = reference.sinkhorn(logits, 20)
    assert (result.sum(-1) - 1).abs().max() < 1e-6
    torch.testing.assert_close(result.double(), _naive_sinkhorn(logits, 20), atol=1e-5, rtol=0)


@pytest.mark.parametrize("n", [2, 4, 8])
def test_sinkhorn_on_extreme_logits_has_no_nan_and_converges_where_it_can(n):
    """Logits of +-80: exp underflows in fp32, so a naive port divides 0 by 0.

    On structured extremes (a dominant permutation, a constant matrix) 20 iterations converge. On
    random +-80 logits Sinkhorn-Knopp itself converges slowly (entries span e^160), so there the
    claim is: finite, rows exact (the last step normalises rows), equal to the float64 result.
    """
    permutation = torch.randperm(n)
    dominant = torch.full((n, n), -80.0)
    dominant[torch.arange(n), permutation] = 80.0
    constant = torch.full((n, n), 80.0)
    for logits in (dominant, constant, -constant):
        result = reference.sinkhorn(logits, 20)
        assert (result.sum(-1) - 1).abs().max() < 1e-6
        assert (result.sum(-2) - 1).abs().max() < 1e-6
    random_extreme = (torch.rand(200, n, n) * 2 - 1) * 80
    result = reference.sinkhorn(random_extreme, 20)
    assert torch.isfinite(result).all()
    assert (result.sum(-1) - 1).abs().max() < 1e-6
    torch.testing.assert_close(result.double(), reference.sinkhorn(random_extreme.double(), 20),
                               atol=1e-5, rtol=0)


def test_sinkhorn_gradients_are_finite_on_extreme_logits():
    logits = ((torch.rand(16, 4, 4, dtype=torch.float64) * 2 - 1) * 80).requires_grad_()
    reference.sinkhorn(logits, 20).square().sum().backward()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("n, channels, tokens", SHAPES)
def test_coefficients_and_pre_mix_match_a_hand_computation(n, channels, tokens):
    streams = torch.randn(tokens, n, channels, dtype=torch.float64)
    phi, alpha, b_pre, b_post, b_res = _random_parameters(n, channels)
    h_pre, h_post, h_res, mixed, proj, sum_squares = ops.coefficients_pre_mix(
        streams, phi, alpha, b_pre, b_post, b_res, 20, "sinkhorn"
    )
    flat = streams.reshape(tokens, -1)
    torch.testing.assert_close(proj, flat @ phi)
    torch.testing.assert_close(sum_squares, (flat**2).sum(-1))
    h = flat @ phi / torch.sqrt((flat**2).mean(-1, keepdim=True) + reference.RMS_EPS)
    torch.testing.assert_close(h_pre, torch.sigmoid(alpha[0] * h[:, :n] + b_pre))
    torch.testing.assert_close(h_post, 2 * torch.sigmoid(alpha[1] * h[:, n : 2 * n] + b_post))
    logits = alpha[2] * h[:, 2 * n :].reshape(tokens, n, n) + b_res
    torch.testing.assert_close(h_res, _naive_sinkhorn(logits, 20))
    torch.testing.assert_close(mixed, sum(h_pre[:, j, None] * streams[:, j] for j in range(n)))
    _, _, raw, *_ = ops.coefficients_pre_mix(streams, phi, alpha, b_pre, b_post, b_res, 20, "none")
    torch.testing.assert_close(raw, logits)


@pytest.mark.parametrize("n, channels, tokens", SHAPES)
def test_post_res_mix_matches_a_loop_over_streams(n, channels, tokens):
    streams = torch.randn(tokens, n, channels, dtype=torch.float64)
    y = torch.randn(tokens, channels, dtype=torch.float64)
    h_post = torch.rand(tokens, n, dtype=torch.float64)
    h_res = torch.rand(tokens, n, n, dtype=torch.float64)
    expected_post = torch.stack(
        [sum(h_res[:, i, j, None] * streams[:, j] for j in range(n)) + h_post[:, i, None] * y for i in range(n)],
        dim=1,
    )
    torch.testing.assert_close(ops.post_res_mix(streams, y, h_post, h_res), expected_post)


@pytest.mark.parametrize("n, channels, tokens", SHAPES)
@pytest.mark.parametrize("constraint", ["sinkhorn", "none"])
def test_custom_op_gradients(n, channels, tokens, constraint):
    streams = torch.randn(tokens, n, channels, dtype=torch.float64, requires_grad=True)
    params = [p.requires_grad_() for p in _random_parameters(n, channels)]
    coefficients_pre_mix = lambda *a: ops.coefficients_pre_mix(*a, 20, constraint)
    assert torch.autograd.gradcheck(coefficients_pre_mix, (streams, *params))
    h_post = torch.rand(tokens, n, dtype=torch.float64, requires_grad=True)
    h_res = torch.rand(tokens, n, n, dtype=torch.float64, requires_grad=True)
    y = torch.randn(tokens, channels, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ops.post_res_mix, (streams, y, h_post, h_res))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_custom_ops_pass_opcheck_and_keep_coefficients_fp32(dtype):
    n, channels = 4, 8
    streams = torch.randn(2, 3, n, channels, dtype=dtype)
    params = [p.float() for p in _random_parameters(n, channels)]
    torch.library.opcheck(ops.coefficients_pre_mix, (streams, *params, 20, "sinkhorn"))
    h_pre, h_post, h_res, mixed, proj, sum_squares = ops.coefficients_pre_mix(
        streams, *params, 20, "sinkhorn"
    )
    assert {h.dtype for h in (h_pre, h_post, h_res, proj, sum_squares)} == {torch.float32}
    assert h_res.shape == (2, 3, n, n) and mixed.shape == (2, 3, channels)
    assert proj.shape == (2, 3, n * n + 2 * n) and sum_squares.shape == (2, 3)
    assert mixed.dtype == dtype
    torch.library.opcheck(ops.post_res_mix, (streams, streams[..., 0, :], h_post, h_res))


def _ops_sublayer(streams, phi, alpha, b_pre, b_post, b_res):
    _, h_post, h_res, mixed, *_ = ops.coefficients_pre_mix(
        streams, phi, alpha, b_pre, b_post, b_res, 20, "sinkhorn"
    )
    return ops.post_res_mix(streams, torch.tanh(mixed), h_post, h_res)


def test_sublayer_compiles_fullgraph_with_inductor_and_matches_the_reference():
    # Plain Inductor (not backend="mhc", whose cache key hashes our sources) would serve graphs
    # compiled against an older version of the ops from its on-disk caches: compile afresh.
    patch = torch._inductor.config.patch(force_disable_caches=True)
    with patch:
        _compile_sublayer_with_inductor()


def _compile_sublayer_with_inductor():
    n, channels = 4, 8
    streams = torch.randn(5, n, channels, requires_grad=True)
    params = [p.float().requires_grad_() for p in _random_parameters(n, channels)]
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    out = torch.compile(_ops_sublayer, backend=counter, fullgraph=True)(streams, *params)
    expected = reference.sublayer(streams, *params, torch.tanh, 20)
    torch.testing.assert_close(out, expected)
    grads = torch.autograd.grad(out.square().sum(), [streams, *params])
    expected_grads = torch.autograd.grad(expected.square().sum(), [streams, *params])
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)
    assert counter.frame_count == 1


def _deepseek_v4_hyper_connection(n, channels, iters, eps, seed):
    """transformers' DeepseekV4HyperConnection in float64 with random weights (its own init is
    empty), the ground truth of the "deepseek_v4" formulation."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4HyperConnection

    config = transformers.DeepseekV4Config(hidden_size=channels, hc_mult=n, hc_sinkhorn_iters=iters,
                                           hc_eps=eps, rms_norm_eps=reference.RMS_EPS)
    module = DeepseekV4HyperConnection(config).double()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator, dtype=torch.float64))
        module.fn.mul_(0.3)
    return module


@pytest.mark.parametrize("n, channels, iters, eps", [(4, 8, 20, 1e-6), (2, 5, 3, 1e-2), (3, 4, 1, 1e-3)])
def test_deepseek_v4_formulation_is_transformers_hyper_connection(n, channels, iters, eps, monkeypatch):
    """The reference of DeepSeek-V4's formulation, with its parameters mapped
    (deepseek_v4_parameters), gives the module's pre-mix, post and comb (H_res = comb^T) and the
    same gradients of every module parameter and of the streams, in float64 (the module's
    `.float()` calls, its fp32 upcasts, keep float64 here: fp32 rounding would hide eps)."""
    to_float32 = torch.Tensor.float
    monkeypatch.setattr(torch.Tensor, "float",
                        lambda self: self if self.dtype == torch.float64 else to_float32(self))
    module = _deepseek_v4_hyper_connection(n, channels, iters, eps, seed=n)
    streams = torch.randn(2, 3, n, channels, dtype=torch.float64, requires_grad=True)
    post, comb, collapsed = module(streams)
    constraint = reference.deepseek_v4_constraint(eps)
    h_pre, h_post, h_res, mixed = reference.coefficients_pre_mix(
        streams, *reference.deepseek_v4_parameters(module.fn, module.base, module.scale, n),
        iters, constraint)
    for got, expected in ((h_post, post), (h_res, comb.transpose(-1, -2)), (mixed, collapsed)):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    weights = [torch.randn_like(t) for t in (post, comb, collapsed)]
    expected = torch.autograd.grad(
        sum((w * t).sum() for w, t in zip(weights, (post, comb, collapsed))),
        [streams, *module.parameters()])
    got = torch.autograd.grad(
        sum((w * t).sum() for w, t in zip(weights, (h_post, h_res.transpose(-1, -2), mixed))),
        [streams, *module.parameters()])
    for name, g, e in zip(["streams", *dict(module.named_parameters())], got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12, msg=name)


def test_formulation_names_what_it_accepts():
    assert reference.formulation("sinkhorn") == ("sinkhorn", 0.0)
    assert reference.formulation(reference.deepseek_v4_constraint(1e-6)) == ("deepseek_v4", 1e-6)
    for wrong in ("deepseek_v4", "deepseek_v4:x", "deepseek_v4:nan", "deepseek_v4:inf",
                  "deepseek_v4:-1e-6", "softmax", "sinkhorn:1"):
        with pytest.raises(ValueError, match="deepseek_v4:<eps>"):
            reference.formulation(wrong)
