"""Reliability: behaviour that already works, pinned against plain PyTorch on fresh random inputs.

Bad option values, NaN/Inf inputs and extreme Sinkhorn logits, no_grad/inference_mode, deepcopy,
weight tying, a dtype matrix, determinism and state_dict round trips. Every value is compared
against the plain model (at init the rewrite must compute what it computed before) or against
`_reference_*`, an mHC forward written out here in plain PyTorch from the paper's equations
(independent of mhc_compile.reference), mostly in float64. Most compiles use the eager backend
(`mhc_compile.backend(eager=True)`); two tests run Inductor, on small float32 models.
"""

import copy
import io
import math
import re

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn

import mhc_compile
from mhc_compile import reference
from mhc_compile.examples import GPT, Block
from zoo import resnet

N, ITERS = 4, 20  # the default options, which the hand-written reference below assumes


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each prepare/compile below adds a Dynamo cache entry for its model class's forward."""
    torch._dynamo.reset()


# --- small models ---------------------------------------------------------------------------------


class MLPStack(nn.Module):
    """x_{k+1} = x_k + fc2_k(gelu(fc1_k(ln_k(x_k)))) for `depth` blocks (keys `layers.k.fc1`), then
    a head: every op is per token, so a non-finite input token stays in its token."""

    def __init__(self, width=16, depth=3, out=5):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleDict({"ln": nn.LayerNorm(width), "fc1": nn.Linear(width, 2 * width),
                           "fc2": nn.Linear(2 * width, width)})
            for _ in range(depth))
        self.head = nn.Linear(width, out)

    def forward(self, x):
        for layer in self.layers:
            x = x + layer["fc2"](F.gelu(layer["fc1"](layer["ln"](x))))
        return self.head(x)


class AttentionStack(nn.Module):
    """Pre-LN causal transformer blocks on float features [batch, seq, width], then a head."""

    def __init__(self, width=16, depth=2, heads=2, out=5):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.head = nn.Linear(width, out)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class TiedGPT(GPT):
    """GPT-2 with the LM head tied to the token embedding (both [vocab, width])."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lm_head.weight = self.tok_emb.weight


class DropoutBlock(Block):
    """Pre-LN block with dropout on both branches: consumes the global RNG inside f."""

    def __init__(self, width, heads):
        super().__init__(width, heads)
        self.drop = nn.Dropout(0.2)

    def forward(self, x):
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.mlp(self.ln2(x)))


VOCAB, SEQ, WIDTH = 50, 16, 32


def _gpt(seed, cls=GPT, dtype=torch.float64, **kwargs):
    torch.manual_seed(seed)
    return cls(VOCAB, SEQ, WIDTH, 2, 4, **kwargs).to(dtype)


def _ids(seed, batch=2):
    return torch.randint(0, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(seed))


def _features(seed, shape=(3, 6, 16), dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _compile(model, **options):
    return torch.compile(model, backend=mhc_compile.backend(eager=True, **options))


def _lm_loss(logits, ids):
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def _randomize_mhc(model, seed=1, scale=0.3):
    """Random mHC parameters around their init, so that the streams diverge and H_res is far
    from the identity: then they change what the model computes."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.mhc.parameters():
            noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float64)
            parameter.add_(scale * noise.to(parameter.dtype))


# --- the hand-written mHC forward (paper Eq. 3, 7, 8), plain PyTorch ------------------------------


def _sinkhorn(logits, iters=ITERS):
    """Sinkhorn-Knopp on exp(logits), in log space: columns then rows, `iters` times."""
    for _ in range(iters):
        logits = logits - logits.logsumexp(dim=-2, keepdim=True)
        logits = logits - logits.logsumexp(dim=-1, keepdim=True)
    return logits.exp()


def _coefficients(streams, p):
    """H_pre [..., n], H_post [..., n], H_res [..., n, n] of streams [..., n, C]."""
    n = streams.shape[-2]
    flat = streams.flatten(-2)
    h = (flat @ p.phi) / torch.sqrt(flat.square().mean(dim=-1, keepdim=True) + 1e-6)
    h_pre = torch.sigmoid(p.alpha[0] * h[..., :n] + p.b_pre)
    h_post = 2 * torch.sigmoid(p.alpha[1] * h[..., n:2 * n] + p.b_post)
    h_res = _sinkhorn(p.alpha[2] * h[..., 2 * n:].unflatten(-1, (n, n)) + p.b_res)
    return h_pre, h_post, h_res


def _sublayer(streams, p, f):
    """x_{l+1} = H_res x_l + H_post^T f(H_pre x_l)."""
    h_pre, h_post, h_res = _coefficients(streams, p)
    y = f((h_pre.unsqueeze(-1) * streams).sum(dim=-2))
    return h_res @ streams + h_post.unsqueeze(-1) * y.unsqueeze(-2)


def _expand(x, n=N):
    return x.unsqueeze(-2).expand(*x.shape[:-1], n, x.shape[-1])


def _block(model, key):
    """The mHC parameters of the block whose site key is `key` (`blocks.0.attn.qkv`)."""
    return {block.key: block for block in model.mhc.blocks.values()}[key]


def _reference_gpt(model, idx):
    """GPT (or TiedGPT) with every residual add as an mHC sublayer; one chain, mean at its tail."""
    positions = torch.arange(idx.shape[1])
    streams = _expand(model.tok_emb(idx) + model.pos_emb(positions))
    for i, block in enumerate(model.blocks):
        streams = _sublayer(streams, _block(model, f"blocks.{i}.attn.qkv"),
                            lambda h, b=block: b.attn(b.ln1(h)))
        streams = _sublayer(streams, _block(model, f"blocks.{i}.mlp.fc"),
                            lambda h, b=block: b.mlp(b.ln2(h)))
    return model.lm_head(model.ln_f(streams.mean(dim=-2)))


def _reference_mlp(model, x):
    streams = _expand(x)
    for i, layer in enumerate(model.layers):
        streams = _sublayer(streams, _block(model, f"layers.{i}.fc1"),
                            lambda h, l=layer: l["fc2"](F.gelu(l["fc1"](l["ln"](h)))))
    return model.head(streams.mean(dim=-2))


def test_the_hand_written_reference_is_the_plain_model_at_init():
    """The reference itself: at init (phi = 0, row-stochastic H_res, H_post = 1, sum H_pre = 1)
    it computes the plain model; with random mHC parameters it does not."""
    model, ids = _gpt(0), _ids(1)
    plain = model(ids)
    mhc_compile.prepare(model, _ids(0))
    torch.testing.assert_close(_reference_gpt(model, ids), plain, rtol=1e-12, atol=1e-12)
    _randomize_mhc(model)
    assert (_reference_gpt(model, ids) - plain).abs().amax() > 1e-3


# --- 1. bad option values -------------------------------------------------------------------------

_UNKNOWN = ("; valid options are: alpha_init, constraint, cudagraphs, eager, exclude, include, "
            "mode, n, recompute, sinkhorn_iters, stream_dtype")
_RECOMPUTE = ("mhc option recompute must be 'auto', a group size L_r >= 1 (blocks per kept "
              "stream) or False (keep every block's streams), got ")
_STREAM_DTYPE = ("mhc option stream_dtype must be None (the residual's dtype) or one of "
                 "'bfloat16', 'float16', 'float32', got ")
_MODE = ("mhc option mode must be None or one of 'default', 'reduce-overhead', "
         "'max-autotune-no-cudagraphs', 'max-autotune', got ")
_CONSTRAINT = "mhc option constraint must be one of 'sinkhorn', 'none', got "


def _bad(options, error, message, id, marks=()):
    return pytest.param(options, error, message, id=id, marks=marks)


BAD_OPTIONS = [
    _bad({"n": 0}, ValueError, "mhc option n must be >= 1, got 0", "n-zero"),
    _bad({"n": -3}, ValueError, "mhc option n must be >= 1, got -3", "n-negative"),
    _bad({"n": 2.5}, TypeError, "mhc option n must be an integer, got 2.5", "n-float"),
    _bad({"n": True}, TypeError, "mhc option n must be an integer, got True", "n-bool"),
    _bad({"n": "4"}, TypeError, "mhc option n must be an integer, got '4'", "n-str"),
    _bad({"sinkhorn_iters": 0}, ValueError, "mhc option sinkhorn_iters must be >= 1, got 0",
         "sinkhorn_iters-zero"),
    _bad({"sinkhorn_iters": 1.0}, TypeError,
         "mhc option sinkhorn_iters must be an integer, got 1.0", "sinkhorn_iters-float"),
    _bad({"alpha_init": "0.1"}, TypeError, "mhc option alpha_init must be a number, got '0.1'",
         "alpha_init-str"),
    _bad({"alpha_init": None}, TypeError, "mhc option alpha_init must be a number, got None",
         "alpha_init-none"),
    _bad({"alpha_init": math.nan}, ValueError, "mhc option alpha_init must be finite, got nan",
         "alpha_init-nan"),
    _bad({"alpha_init": -math.inf}, ValueError, "mhc option alpha_init must be finite, got -inf",
         "alpha_init-inf"),
    _bad({"constraint": "ortho"}, ValueError, _CONSTRAINT + "'ortho'", "constraint-unknown"),
    _bad({"constraint": None}, ValueError, _CONSTRAINT + "None", "constraint-none"),
    _bad({"include": [1]}, TypeError, "mhc option include takes module-path glob patterns, got 1",
         "include-int-pattern"),
    _bad({"exclude": ["layers.*", None]}, TypeError,
         "mhc option exclude takes module-path glob patterns, got None", "exclude-none-pattern"),
    _bad({"include": 3}, TypeError, "mhc option include takes module-path glob patterns, got 3",
         "include-not-iterable"),
    _bad({"exclude": None}, TypeError,
         "mhc option exclude takes module-path glob patterns, got None", "exclude-none"),
    _bad({"eager": "yes"}, TypeError, "mhc option eager must be True or False, got 'yes'",
         "eager-str"),
    _bad({"eager": 1}, TypeError, "mhc option eager must be True or False, got 1", "eager-int"),
    _bad({"cudagraphs": None}, TypeError, "mhc option cudagraphs must be True or False, got None",
         "cudagraphs-none"),
    _bad({"recompute": 0}, ValueError, _RECOMPUTE + "0", "recompute-zero"),
    _bad({"recompute": True}, ValueError, _RECOMPUTE + "True", "recompute-true"),
    _bad({"recompute": "none"}, ValueError, _RECOMPUTE + "'none'", "recompute-str"),
    _bad({"recompute": 1.5}, ValueError, _RECOMPUTE + "1.5", "recompute-float"),
    _bad({"stream_dtype": "bf16"}, ValueError, _STREAM_DTYPE + "'bf16'", "stream_dtype-alias"),
    _bad({"stream_dtype": torch.int8}, ValueError, _STREAM_DTYPE + "torch.int8",
         "stream_dtype-int8"),
    _bad({"stream_dtype": torch.float64}, ValueError, _STREAM_DTYPE + "torch.float64",
         "stream_dtype-float64"),
    _bad({"mode": "fast"}, ValueError, _MODE + "'fast'", "mode-unknown"),
    _bad({"mode": "lite"}, ValueError, _MODE + "'lite' (it turns off Inductor's graph passes, "
         "which the recompute policy runs in)", "mode-lite"),
    _bad({"streams": 4}, TypeError, "unknown mhc option(s) 'streams'" + _UNKNOWN, "unknown-name"),
    _bad({"n": 2, "streams": 4, "iters": 3}, TypeError,
         "unknown mhc option(s) 'iters', 'streams'" + _UNKNOWN, "unknown-names"),
]


def _through_backend(options, model, x):
    mhc_compile.backend(**options)


def _through_torch_compile(options, model, x):
    """torch.compile hands a string backend its options at the first call, inside Dynamo, which
    wraps the error in BackendCompilerFailed (its message quotes ours); the original is kept."""
    compiled = torch.compile(model, backend="mhc", options=options)
    try:
        compiled(x)
    except torch._dynamo.exc.BackendCompilerFailed as failure:
        assert str(failure.inner_exception) in str(failure)
        raise failure.inner_exception from None


def _through_prepare(options, model, x):
    mhc_compile.prepare(model, x, options=options)


ROUTES = [pytest.param(_through_backend, id="backend"),
          pytest.param(_through_torch_compile, id="torch.compile"),
          pytest.param(_through_prepare, id="prepare")]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("options, error, message", BAD_OPTIONS)
def test_bad_option_values_are_refused_naming_the_option_and_what_it_takes(
        route, options, error, message):
    torch.manual_seed(0)
    model, x = MLPStack(), _features(0)
    with pytest.raises(error, match=re.escape(message)):
        route(options, model, x)
    assert not hasattr(model, "mhc"), "a refused option must leave the model unchanged"


def test_bad_mode_through_torch_compiles_mode_argument():
    torch.manual_seed(0)
    compiled = torch.compile(MLPStack(), backend="mhc", mode="fast")
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match=re.escape(_MODE + "'fast'")):
        compiled(_features(0))


def test_numpy_integers_are_integers():
    import numpy as np  # a dependency of mhc-compile
    backend = mhc_compile.backend(n=np.int64(2), sinkhorn_iters=np.int32(5), eager=True)
    assert (backend.options.n, backend.options.sinkhorn_iters) == (2, 5)
    model, x = MLPStack().double(), _features(0)
    mhc_compile.prepare(model, x, options={"n": np.int64(2), "sinkhorn_iters": np.int32(5)})
    assert {block.n for block in model.mhc.blocks.values()} == {2}


# --- 2. NaN / Inf inputs and extreme logits -------------------------------------------------------


def _mlp_case(dtype):
    torch.manual_seed(0)
    return MLPStack().to(dtype), (4, 6, 16)


def _attention_case(dtype):
    torch.manual_seed(0)
    return AttentionStack().to(dtype), (4, 6, 16)


def _resnet_case(dtype):
    model, _ = resnet(seed=0, batch=4, image=8, width=8)
    return model.to(dtype).eval(), (4, 3, 8, 8)


def _poisoned(shape, dtype, seed):
    """Random inputs with a NaN in sample 0, +Inf in sample 1, -Inf in sample 2 (one position
    each, drawn at random); sample 3 stays finite."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator, dtype=torch.float64)
    for sample, value in enumerate((math.nan, math.inf, -math.inf)):
        position = tuple(int(torch.randint(0, size, (), generator=generator)) for size in shape[1:])
        x[(sample, *position)] = value
    return x.to(dtype)


def _assert_same_non_finite(got, expected, atol, rtol):
    """Non-finite exactly where the plain model's output is, NaN wherever it is NaN (never a
    finite number or an infinity instead), and the finite values equal."""
    assert torch.equal(got.isfinite(), expected.isfinite()), (
        f"non-finite at {(~got.isfinite()).nonzero().tolist()}, "
        f"plain model at {(~expected.isfinite()).nonzero().tolist()}")
    assert got[expected.isnan()].isnan().all(), "a NaN of the plain model became a number"
    finite = expected.isfinite()
    assert finite.any(), "nothing finite left to compare: the test poisoned too much"
    torch.testing.assert_close(got[finite], expected[finite], atol=atol, rtol=rtol)


@pytest.mark.parametrize("case, backend", [
    pytest.param(_mlp_case, "eager", id="mlp-eager"),
    pytest.param(_attention_case, "eager", id="attention-eager"),
    pytest.param(_resnet_case, "eager", id="resnet-eager", marks=pytest.mark.filterwarnings(
        "ignore:mhc. 2 residual block.s. of a compiled graph stay plain")),  # projection shortcuts
    pytest.param(_mlp_case, "inductor", id="mlp-inductor"),
])
def test_nan_and_inf_inputs_stay_where_the_plain_model_puts_them(case, backend):
    """At init and with random mHC parameters: the rewritten model is non-finite exactly where
    the plain model is (a NaN token stays in its token, a poisoned sample in its sample: the
    coefficients are per token and nothing reduces over the batch), and never raises."""
    dtype = torch.float64 if backend == "eager" else torch.float32
    model, shape = case(dtype)
    example = torch.randn(shape, dtype=dtype)
    x = _poisoned(shape, dtype, seed=3)
    expected = model(x)
    assert not expected.isfinite().all() and expected[-1].isfinite().all()
    mhc_compile.prepare(model, example)
    if backend == "eager":
        compiled = _compile(model)
        tolerance = {"atol": 1e-12, "rtol": 1e-12}
    else:
        compiled = torch.compile(model, backend="mhc")
        tolerance = {"atol": 1e-5, "rtol": 1e-5}
    with torch.no_grad():
        got = compiled(x)
    _assert_same_non_finite(got, expected, **tolerance)
    # Random mHC parameters change the values but not where non-finite numbers go.
    _randomize_mhc(model)
    with torch.no_grad():
        got = compiled(x)
    assert torch.equal(got.isfinite(), expected.isfinite())
    assert got[expected.isnan()].isnan().all()


def _extreme_block(n, channels, generator, dtype=torch.float64):
    """mHC parameters whose Sinkhorn logits are huge: b_res = 1e4 * N(0, 1), random phi and
    alpha = 1e3, biases of H_pre and H_post at +-1e4 (saturated sigmoids)."""
    def randn(*shape):
        return torch.randn(shape, generator=generator, dtype=dtype)

    return dict(phi=randn(n * channels, n * n + 2 * n), alpha=torch.full((3,), 1e3, dtype=dtype),
                b_pre=1e4 * randn(n), b_post=1e4 * randn(n), b_res=1e4 * randn(n, n))


def _set_extreme(model, seed=5):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.mhc.blocks.values():
            values = _extreme_block(block.n, block.channels, generator, block.phi.dtype)
            for name, value in values.items():
                getattr(block, name).copy_(value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_extreme_logits_keep_h_res_finite_and_row_stochastic(dtype):
    """Streams of magnitude 1e4 and logits of magnitude ~1e4 (mhc_compile.reference's math):
    H_res is finite, non-negative and its rows sum to 1; the model's output and gradients are
    finite and equal the hand-written mHC forward's."""
    generator = torch.Generator().manual_seed(4)
    streams = 1e4 * torch.randn(64, N, 16, generator=generator, dtype=torch.float64).to(dtype)
    block = _extreme_block(N, 16, generator)
    h_pre, h_post, h_res = reference.coefficients(streams, **block, sinkhorn_iters=ITERS)
    eps = torch.finfo(dtype).eps
    for h in (h_pre, h_post, h_res):
        assert h.isfinite().all()
    assert (h_res >= 0).all()
    torch.testing.assert_close(h_res.sum(dim=-1), torch.ones_like(h_res[..., 0]),
                               atol=8 * eps, rtol=0)

    torch.manual_seed(0)
    model, x = MLPStack().to(dtype), 1e4 * _features(6, dtype=dtype)
    mhc_compile.prepare(model, x)
    _set_extreme(model)
    out = _compile(model)(x)
    assert out.isfinite().all()
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())
    if dtype == torch.float64:
        torch.testing.assert_close(out, _reference_mlp(model, x), rtol=1e-9, atol=1e-9)
    # The H_res the model computes (read by the gain diagnostics): every row sums to 1.
    torch._dynamo.reset()
    report = mhc_compile.gain(model, x)
    for chain in report.chains:
        for block in chain.blocks:
            assert block.single.forward_max == pytest.approx(1.0, abs=8 * eps)


@pytest.mark.parametrize("scale, column_atol", [(0.5, 1e-9), (1.0, 1e-3), (1e4, None)],
                         ids=["logits-0.5", "logits-1", "logits-1e4"])
def test_sinkhorn_balances_columns_where_twenty_iterations_can(scale, column_atol):
    """Sinkhorn-Knopp with the paper's t_max = 20 ends on a row normalisation, so rows always sum
    to 1; the columns converge geometrically for logits of the scale training sees, and not at
    all once exp(logits) spans more than float64 holds (scale 1e4): no finite iteration count
    balances those, and the column sums stay in [0, n] (docs/design.md, One source of truth)."""
    generator = torch.Generator().manual_seed(5)
    logits = scale * torch.randn(2000, N, N, generator=generator, dtype=torch.float64)
    h_res = reference.sinkhorn(logits, ITERS)
    assert torch.isfinite(h_res).all() and (h_res >= 0).all()
    torch.testing.assert_close(h_res.sum(-1), torch.ones(2000, N, dtype=torch.float64),
                               atol=1e-12, rtol=0)
    columns = h_res.sum(-2)
    if column_atol is None:
        assert columns.min() >= 0 and columns.max() <= N
    else:
        torch.testing.assert_close(columns, torch.ones_like(columns), atol=column_atol, rtol=0)


# --- 3. no_grad and inference_mode ----------------------------------------------------------------


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_no_grad_and_inference_mode_calls_equal_the_grad_mode_call(backend):
    """Each grad mode compiles its own graph (Dynamo guards on it); all three compute the same,
    the hand-written mHC forward's, and training still works after the no-grad calls."""
    dtype = torch.float64 if backend == "eager" else torch.float32
    torch.manual_seed(0)
    model = MLPStack(width=8, depth=2).to(dtype)
    mhc_compile.prepare(model, _features(0, (2, 3, 8), dtype))
    _randomize_mhc(model)
    compiled = _compile(model) if backend == "eager" else torch.compile(model, backend="mhc")
    x = _features(1, (2, 3, 8), dtype)
    graded = compiled(x)
    with torch.no_grad():
        no_grad = compiled(x)
    with torch.inference_mode():
        inference = compiled(x)
    assert graded.requires_grad and not no_grad.requires_grad and inference.is_inference()
    exact = {"atol": 0, "rtol": 0} if backend == "eager" else {"atol": 1e-6, "rtol": 1e-6}
    torch.testing.assert_close(no_grad, graded.detach(), **exact)
    torch.testing.assert_close(inference, graded.detach(), **exact)
    tolerance = {"atol": 1e-12, "rtol": 1e-12} if dtype == torch.float64 else {}
    with torch.no_grad():
        torch.testing.assert_close(graded.detach(), _reference_mlp(model, x), **tolerance)
    compiled(x).square().sum().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.mhc.parameters())


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode],
                         ids=["no_grad", "inference_mode"])
def test_parameters_created_by_a_first_call_without_grad_are_trainable(mode):
    """Unprepared, first called under no_grad/inference_mode: the mHC parameters that call
    creates are ordinary trainable tensors, and a later grad-mode call trains them."""
    torch.manual_seed(0)
    model, x = MLPStack(width=8, depth=2).double(), _features(1, (2, 3, 8))
    plain = model(x)
    compiled = _compile(model)
    with mode():
        torch.testing.assert_close(compiled(x), plain, atol=1e-12, rtol=1e-12)
    parameters = list(model.mhc.parameters())
    assert parameters and all(p.requires_grad and not p.is_inference() for p in parameters)
    compiled(x).square().sum().backward()
    assert all(p.grad is not None for p in parameters)


# --- 4. deepcopy ----------------------------------------------------------------------------------


def test_deepcopy_of_a_prepared_model_owns_its_mhc_parameters():
    model = _gpt(0)
    mhc_compile.prepare(model, _ids(0))
    _randomize_mhc(model)
    twin = copy.deepcopy(model)
    originals = dict(model.mhc.named_parameters())
    for name, parameter in twin.mhc.named_parameters():
        assert parameter is not originals[name]
        assert parameter.untyped_storage().data_ptr() != originals[name].untyped_storage().data_ptr()
        assert torch.equal(parameter, originals[name])
    ids = _ids(1)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    compiled, compiled_twin = _compile(model), _compile(twin)
    expected = compiled(ids).detach()
    with torch.no_grad():
        torch.testing.assert_close(expected, _reference_gpt(model, ids), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(compiled_twin(ids), expected, rtol=0, atol=0)

    optimizer = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    for _ in range(3):
        _lm_loss(compiled_twin(ids), ids).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert not torch.equal(twin.mhc.blocks["blocks-0-attn-qkv"].phi,
                           model.mhc.blocks["blocks-0-attn-qkv"].phi)
    torch.testing.assert_close(compiled(ids), expected, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(compiled_twin(ids), _reference_gpt(twin, ids),
                                   rtol=1e-12, atol=1e-12)


# --- 5. weight tying ------------------------------------------------------------------------------


def test_tied_lm_head_is_rewritten_equal_at_init_trains_and_stays_tied():
    model, ids = _gpt(0, TiedGPT), _ids(1)
    twin = _gpt(0, TiedGPT)  # the hand-written reference trains this one
    plain = _gpt(0, TiedGPT)
    report = mhc_compile.prepare(model, _ids(0))
    mhc_compile.prepare(twin, _ids(0))
    assert [block.status for block in report.blocks] == ["rewritten"] * 4
    compiled = _compile(model)

    # At init: the plain model's output and the plain model's gradient of the tied weight (the
    # sum over both its uses).
    out = compiled(ids)
    torch.testing.assert_close(out, plain(ids), rtol=1e-12, atol=1e-12)
    _lm_loss(out, ids).backward()
    _lm_loss(plain(ids), ids).backward()
    torch.testing.assert_close(model.tok_emb.weight.grad, plain.tok_emb.weight.grad,
                               rtol=1e-10, atol=1e-12)
    model.zero_grad(set_to_none=True)

    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (model, twin)]
    losses = []
    for _ in range(4):
        loss = _lm_loss(compiled(ids), ids)
        reference_loss = _lm_loss(_reference_gpt(twin, ids), ids)
        torch.testing.assert_close(loss, reference_loss, rtol=1e-10, atol=1e-12)
        for value, optimizer in zip((loss, reference_loss), optimizers):
            value.backward()
            optimizer.step()
            optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    for m in (model, twin):
        assert m.lm_head.weight is m.tok_emb.weight
    assert len(list(model.parameters())) == len(list(twin.parameters()))
    trained = model.state_dict()
    assert trained["lm_head.weight"].data_ptr() == trained["tok_emb.weight"].data_ptr()
    for name, value in twin.state_dict().items():
        torch.testing.assert_close(trained[name], value, rtol=1e-8, atol=1e-10, msg=name)
    assert not torch.equal(trained["tok_emb.weight"], plain.state_dict()["tok_emb.weight"])


# --- 6. dtypes ------------------------------------------------------------------------------------

# model dtype, stream_dtype option, tolerances of the rewritten model's output against the plain
# model's at init: the plain model's rounding for float32/float64; for half precision (model or
# streams) about two units in the last place of outputs of magnitude ~2.
DTYPES = {
    "fp64": (torch.float64, None, {"atol": 1e-13, "rtol": 1e-13}),
    "fp32": (torch.float32, None, {"atol": 1e-5, "rtol": 1e-5}),
    "bf16": (torch.bfloat16, None, {"atol": 1e-2, "rtol": 2 ** -7}),
    "fp16": (torch.float16, None, {"atol": 2e-3, "rtol": 2 ** -10}),
    "fp32-streams-bf16": (torch.float32, "bfloat16", {"atol": 1e-2, "rtol": 2 ** -7}),
    "fp32-streams-fp16": (torch.float32, "float16", {"atol": 2e-3, "rtol": 2 ** -10}),
    "fp64-streams-fp32": (torch.float64, "float32", {"atol": 1e-5, "rtol": 1e-5}),
}


@pytest.mark.parametrize("name", [pytest.param(name, id=name) for name in DTYPES])
def test_dtype_matrix_equals_the_plain_model_at_init(name):
    dtype, stream_dtype, tolerance = DTYPES[name]
    model = _gpt(0, dtype=dtype)
    ids = _ids(1, batch=3)
    expected = model(ids)
    out = _compile(model, stream_dtype=stream_dtype)(ids)
    assert out.dtype == dtype
    assert len(model.mhc.blocks) == 4
    torch.testing.assert_close(out, expected, **tolerance)


# --- 7. determinism -------------------------------------------------------------------------------


def _training_run(seed):
    """Build (dropout GPT), prepare, compile, three AdamW steps: outputs and every gradient."""
    torch._dynamo.reset()
    model, ids = _gpt(seed, block=DropoutBlock), _ids(seed)
    mhc_compile.prepare(model, ids)
    compiled = _compile(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(seed + 100)
    outputs, gradients = [], []
    for _ in range(3):
        out = compiled(ids)
        _lm_loss(out, ids).backward()
        outputs.append(out.detach())
        gradients.append({name: p.grad.clone() for name, p in model.named_parameters()})
        optimizer.step()
        optimizer.zero_grad()
    return outputs, gradients


def test_two_runs_with_one_seed_are_bitwise_equal():
    first, second = _training_run(0), _training_run(0)
    for a, b in zip(first[0], second[0]):
        assert torch.equal(a, b)
    for a, b in zip(first[1], second[1]):
        assert a.keys() == b.keys() and any("mhc" in name for name in a)
        for name in a:
            assert torch.equal(a[name], b[name]), name
    assert not torch.equal(first[0][0], _training_run(1)[0][0])
    # The first step draws its dropout masks as the plain model does: the same output.
    plain, ids = _gpt(0, block=DropoutBlock), _ids(0)
    torch.manual_seed(100)
    torch.testing.assert_close(first[0][0], plain(ids), rtol=1e-12, atol=1e-12)


# --- 8. state_dict round trip ---------------------------------------------------------------------


def test_compiled_models_state_dict_round_trips_into_a_fresh_prepared_model():
    model, ids = _gpt(0), _ids(0)
    mhc_compile.prepare(model, ids)
    compiled = _compile(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        _lm_loss(compiled(ids), ids).backward()
        optimizer.step()
        optimizer.zero_grad()
    x = _ids(7, batch=3)
    expected = compiled(x).detach()
    with torch.no_grad():
        torch.testing.assert_close(expected, _reference_gpt(model, x), rtol=1e-12, atol=1e-12)

    # The model's own state_dict, through torch.save/load (weights only), into a fresh model.
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = _gpt(1)
    mhc_compile.prepare(fresh, ids)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    torch.testing.assert_close(_compile(fresh)(x), expected, rtol=0, atol=0)

    # The compiled wrapper's state_dict (keys under `_orig_mod.`) into a fresh compiled model.
    other = _gpt(2)
    mhc_compile.prepare(other, ids)
    compiled_other = _compile(other)
    compiled_other.load_state_dict(compiled.state_dict())
    torch.testing.assert_close(compiled_other(x), expected, rtol=0, atol=0)
    for name, value in model.state_dict().items():
        assert torch.equal(other.state_dict()[name], value), name
