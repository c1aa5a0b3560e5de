"""The mhc backend on specific patterns, options and bad inputs (small inline models)."""

import re
import warnings

import pytest
import torch
import torch._dynamo.testing
import torch.nn.functional as F
from torch import nn

import mhc_compile
from mhc_compile import SkipReason, reference
from hand_mhc import fused_forward_bytes
from zoo import ZOO


class MLPResidual(nn.Module):
    """x_{k+1} = x_k + fc2(gelu(fc1(norm(x_k)))) for `depth` blocks, then a head."""

    def __init__(self, width=8, depth=3, inplace=False):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(depth))
        self.fc1 = nn.ModuleList(nn.Linear(width, 2 * width) for _ in range(depth))
        self.fc2 = nn.ModuleList(nn.Linear(2 * width, width) for _ in range(depth))
        self.head = nn.Linear(width, 3)
        self.inplace = inplace

    def forward(self, x):
        for norm, fc1, fc2 in zip(self.norms, self.fc1, self.fc2):
            update = fc2(F.gelu(fc1(norm(x))))
            if self.inplace:
                x += update
            else:
                x = x + update
        return self.head(x)


def _eager_backend(**options):
    return mhc_compile.backend(eager=True, **options)


def _compile(model, **options):
    torch._dynamo.reset()
    return torch.compile(model, backend=_eager_backend(**options))


def test_string_backend_with_options_dict_uses_the_entry_point():
    torch.manual_seed(0)
    model, x = MLPResidual(), torch.randn(2, 5, 8)
    expected = model(x)
    torch._dynamo.reset()
    out = torch.compile(model, backend="mhc", options={"n": 2, "eager": True})(x)
    torch.testing.assert_close(out, expected)
    assert [b.n for b in model.mhc.blocks.values()] == [2, 2, 2]


def test_second_call_does_not_recompile_and_new_shapes_reuse_parameters():
    torch.manual_seed(0)
    model = MLPResidual()
    counter = torch._dynamo.testing.CompileCounterWithBackend(_eager_backend())
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=counter)
    for _ in range(3):
        compiled(torch.randn(2, 5, 8))
    assert counter.frame_count == 1
    parameters = {name: p for name, p in model.mhc.named_parameters()}
    compiled(torch.randn(3, 7, 8))
    assert {name: p for name, p in model.mhc.named_parameters()} == parameters


def test_dynamic_shapes_rewrite_and_match_eager():
    torch.manual_seed(0)
    model = MLPResidual()
    compiled = torch.compile(model, backend=_eager_backend(), dynamic=True)
    torch._dynamo.reset()
    for tokens in (3, 6):
        x = torch.randn(2, tokens, 8)
        torch.testing.assert_close(compiled(x), model(x))
    assert len(model.mhc.blocks) == 3


def test_inplace_residuals_that_mutate_the_input_are_skipped_and_the_mutation_kept():
    torch.manual_seed(0)
    model, x = MLPResidual(inplace=True), torch.randn(2, 5, 8)
    eager_input, compiled_input = x.clone(), x.clone()
    expected = model(eager_input)
    report = mhc_compile.prepare(model, x.clone())
    # x += ... on the input makes every later x += ... mutate the caller's tensor too.
    assert [(b.status, b.reason) for b in report.blocks] == [
        ("skipped", SkipReason.INPLACE_INPUT.value)
    ] * 3
    assert {b.pattern for b in report.blocks} == {"in-place residual"}
    torch.testing.assert_close(_compile(model)(compiled_input), expected)
    torch.testing.assert_close(compiled_input, eager_input)


class InputMutation(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        x += self.fc(x)
        return x * 2


def test_inplace_add_on_a_graph_input_is_skipped_and_the_mutation_kept():
    torch.manual_seed(0)
    model = InputMutation()
    eager_input = torch.randn(3, 4)
    compiled_input = eager_input.clone()
    expected = model(eager_input)
    report = mhc_compile.report(model, compiled_input.clone())
    assert [(b.status, b.reason) for b in report.blocks] == [("skipped", SkipReason.INPLACE_INPUT.value)]
    torch.testing.assert_close(_compile(model)(compiled_input), expected)
    torch.testing.assert_close(compiled_input, eager_input)


def test_include_and_exclude_select_blocks_by_module_path():
    torch.manual_seed(0)
    model, x = MLPResidual(), torch.randn(2, 5, 8)
    report = mhc_compile.report(model, x, options={"exclude": ["fc1.0"]})
    assert [b.status for b in report.blocks] == ["skipped", "rewritten", "rewritten"]
    assert report.blocks[0].reason == SkipReason.EXCLUDED.value
    report = mhc_compile.report(model, x, options={"include": ["fc1.2"]})
    assert [b.status for b in report.blocks] == ["skipped", "skipped", "rewritten"]
    assert not hasattr(model, "mhc"), "report() must not change the model"


class Nested(nn.Module):
    """A long skip around a residual stack: only the inner blocks are rewritten."""

    def __init__(self):
        super().__init__()
        self.stack = MLPResidual()
        self.stack.head = nn.Identity()

    def forward(self, x):
        return x + self.stack(x)


def test_outer_residual_around_residual_blocks_is_skipped_as_nested():
    torch.manual_seed(0)
    model, x = Nested(), torch.randn(2, 5, 8)
    expected = model(x)
    report = mhc_compile.prepare(model, x)
    outer = [b for b in report.blocks if b.path == ""]
    assert [(b.status, b.reason) for b in outer] == [("skipped", SkipReason.NESTED.value)]
    assert sum(b.status == "rewritten" for b in report.blocks) == 3
    torch.testing.assert_close(_compile(model)(x), expected)


def test_functional_weights_without_an_owner_module_are_skipped():
    weight = nn.Parameter(torch.randn(4, 4))

    def residual(x, w):
        return x + torch.tanh(x @ w)

    x = torch.randn(3, 4)
    backend = _eager_backend()
    torch._dynamo.reset()
    out = torch.compile(residual, backend=backend)(x, weight)
    torch.testing.assert_close(out, residual(x, weight))
    assert [b.reason for b in backend.report.blocks] == [SkipReason.NO_OWNER_MODULE.value]


def test_invalid_options_fail_at_once_with_the_name():
    with pytest.raises(ValueError, match=re.escape("mhc option n must be >= 1, got 0")):
        mhc_compile.backend(n=0)
    with pytest.raises(ValueError, match=re.escape("mhc option sinkhorn_iters must be >= 1, got 0")):
        mhc_compile.backend(sinkhorn_iters=0)
    with pytest.raises(TypeError, match=re.escape("mhc option n must be an integer, got 2.5")):
        mhc_compile.backend(n=2.5)
    with pytest.raises(ValueError, match=re.escape("mhc option constraint must be one of 'sinkhorn', 'none', got 'ortho'")):
        mhc_compile.backend(constraint="ortho")
    with pytest.raises(ValueError, match=re.escape(
            "mhc option stream_dtype must be None (the residual's dtype) or one of 'bfloat16', "
            "'float16', 'float32', got 'bf16'")):
        mhc_compile.backend(stream_dtype="bf16")
    with pytest.raises(TypeError, match=re.escape("mhc option cudagraphs must be True or False, got 'yes'")):
        mhc_compile.backend(cudagraphs="yes")
    with pytest.raises(TypeError, match=re.escape("unknown mhc option(s) 'streams'; valid options are: alpha_init, ")):
        mhc_compile.backend(streams=4)
    # torch.compile hands a string backend its options at the first call, inside Dynamo.
    with pytest.raises(Exception, match="unknown mhc option"):
        torch.compile(MLPResidual(), backend="mhc", options={"iters": 3})(torch.randn(1, 2, 8))


def test_attribute_named_mhc_on_the_model_is_a_clear_error():
    model = MLPResidual()
    model.mhc = nn.Linear(2, 2)
    with pytest.raises(Exception, match=re.escape("MLPResidual already has an attribute 'mhc' (Linear)")):
        mhc_compile.prepare(model, torch.randn(1, 2, 8))


def test_recompiling_with_another_n_is_a_clear_error():
    model, x = MLPResidual(), torch.randn(1, 2, 8)
    mhc_compile.prepare(model, x, options={"n": 4})
    torch._dynamo.reset()
    with pytest.raises(Exception, match=re.escape("block 'fc1.0' already has mHC parameters for n=4, C=8, but this compilation needs n=2, C=8")):
        torch.compile(model, backend=_eager_backend(n=2))(x)


class Optional(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = MLPResidual(depth=1)
        self.body.head = nn.Identity()
        self.extra = nn.Linear(8, 8)

    def forward(self, x, extra: bool):
        x = self.body(x)
        return x + self.extra(x) if extra else x


def test_parameters_created_after_a_compiled_step_warn():
    model, x = Optional(), torch.randn(1, 2, 8)
    compiled = _compile(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compiled(x, False)
    with pytest.warns(UserWarning, match=re.escape("created mHC parameters for 1 new block(s) (extra) after this model already ran a compiled step")):
        compiled(x, True)


def test_prepare_keeps_buffers_and_rng_state():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3))
    residual = _ConvResidual(model)
    before = {k: v.clone() for k, v in residual.state_dict().items()}
    x = torch.randn(2, 3, 4, 4)
    rng = torch.random.get_rng_state()
    mhc_compile.prepare(residual, x)
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert all(p.grad is None for p in residual.parameters())  # its autograd graph is dropped
    for key, value in before.items():
        assert torch.equal(residual.state_dict()[key], value), key


def test_prepare_creates_parameters_without_running_the_mhc_ops(monkeypatch):
    """prepare's run is the traced graph unchanged: no mHC op runs (on a GPU, none autotunes for
    the example's dtypes); the compiled model then runs them with the parameters prepare made."""
    from mhc_compile import reference

    calls = []

    def counted(name):
        original = getattr(reference, name)
        monkeypatch.setattr(reference, name, lambda *args: calls.append(name) or original(*args))

    counted("coefficients_of_projection")  # the forward of mhc::coefficients_pre_mix
    counted("post_res_mix")
    torch.manual_seed(0)
    model, x = MLPResidual(depth=3), torch.randn(2, 5, 8)
    report = mhc_compile.prepare(model, x)
    assert len(report.rewritten) == 3 and not calls
    created = list(model.mhc.parameters())
    _compile(model)(x)
    assert calls.count("coefficients_of_projection") == 3 and calls.count("post_res_mix") == 3
    assert list(model.mhc.parameters()) == created


class _ConvResidual(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, x):
        return torch.relu(x + self.body(x))


def _hand_written_mhc(model: MLPResidual, x: torch.Tensor, n: int):
    """MLPResidual's mHC forward written out with the reference ops: the rewrite's ground truth."""
    streams = reference.expand_streams(x, n)
    coefficients = []
    for index, (norm, fc1, fc2) in enumerate(zip(model.norms, model.fc1, model.fc2)):
        params = model.mhc.blocks[f"fc1-{index}"]
        h_pre, h_post, h_res = reference.coefficients(
            streams, params.phi, params.alpha, params.b_pre, params.b_post, params.b_res, 20
        )
        update = fc2(F.gelu(fc1(norm(reference.pre_mix(streams, h_pre)))))
        streams = reference.post_res_mix(streams, update, h_post, h_res)
        coefficients.append(h_res)
    return model.head(reference.reduce_streams(streams)), streams, coefficients


def test_training_breaks_stream_symmetry_and_matches_the_hand_written_mhc():
    torch.manual_seed(0)
    model, x = MLPResidual(), torch.randn(4, 6, 8)
    target = torch.randn(4, 6, 3)
    mhc_compile.prepare(model, x)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    compiled = _compile(model)
    for _ in range(5):
        F.mse_loss(compiled(x), target).backward()
        optimizer.step()
        optimizer.zero_grad()
    expected, streams, h_res = _hand_written_mhc(model, x, n=4)
    torch.testing.assert_close(compiled(x), expected)
    spread = (streams - streams.mean(dim=-2, keepdim=True)).abs().amax()
    assert spread > 1e-4, "the n streams stayed identical"
    asymmetry = max((h - h.transpose(-1, -2)).abs().amax() for h in h_res)
    assert asymmetry > 1e-6, "H_res stayed symmetric"


def test_prepare_past_the_recompile_limit_fails_loudly():
    """Dynamo stops calling backends for a forward past its recompile limit; prepare must say so
    instead of returning without parameters."""
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=2):
        for seed in range(2):
            model, args = ZOO["gpt"].factory(seed=seed)
            assert mhc_compile.prepare(model, *args).rewritten
        model, args = ZOO["gpt"].factory(seed=2)
        with pytest.raises(RuntimeError, match="torch.compile did not trace GPT.forward"):
            mhc_compile.prepare(model, *args)
    assert not hasattr(model, "mhc")
    torch._dynamo.reset()


@pytest.mark.parametrize("dtype, n, kernels_on, expected", [
    (torch.float32, 4, False, "reference (cpu)"),
    (torch.float32, 4, True, "triton kernels"),
    (torch.float32, 9, True, "reference (n > 8)"),
    (torch.float64, 4, True, "reference (float64)"),
])
def test_report_says_what_the_mhc_ops_run(monkeypatch, dtype, n, kernels_on, expected):
    """The report's `ops` column is how a user tells the Triton kernels will run (kernels forced
    on for CPU tensors stand in for a CUDA machine)."""
    from mhc_compile import templates

    monkeypatch.setattr(templates, "kernels_active", lambda device: kernels_on)
    model = MLPResidual().to(dtype)
    torch._dynamo.reset()
    report = mhc_compile.report(model, torch.randn(2, 5, 8, dtype=dtype), options={"n": n})
    assert [block.ops for block in report.blocks] == [expected] * 3
    assert expected in _rendered(report)


def _rendered(report):
    import io

    buffer = io.StringIO()
    report.print(file=buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("stream_dtype", [torch.bfloat16, torch.float16])
def test_half_precision_streams_between_float32_blocks(monkeypatch, stream_dtype):
    """stream_dtype stores the streams in half precision while F reads and the model returns
    float32: at init the output agrees with the plain model to the streams' rounding, gradients
    reach the mHC parameters, and the report counts 2-byte stream elements."""
    seen = {"streams": set(), "f_input": set()}
    post_res_mix = reference.post_res_mix
    monkeypatch.setattr(reference, "post_res_mix", lambda streams, *rest: (
        seen["streams"].add(streams.dtype) or post_res_mix(streams, *rest)))
    torch.manual_seed(1)
    model, x = MLPResidual(width=16), torch.randn(3, 7, 16)
    for norm in model.norms:
        norm.register_forward_pre_hook(lambda module, args: seen["f_input"].add(args[0].dtype))
    expected = model(x)
    name = str(stream_dtype).removeprefix("torch.")
    out = _compile(model, stream_dtype=name)(x)
    assert out.dtype == torch.float32
    assert seen == {"streams": {stream_dtype}, "f_input": {torch.float32}}
    rounding = torch.finfo(stream_dtype).eps
    torch.testing.assert_close(out, expected, rtol=4 * rounding, atol=4 * rounding)
    out.square().sum().backward()
    grads = {name: p.grad for name, p in model.mhc.named_parameters()}
    assert all(g is not None and g.isfinite().all() for g in grads.values())
    # alpha's gradient is 0 at init (phi = 0 projects to 0); phi's and the biases' are not.
    assert all(g.abs().sum() > 0 for name, g in grads.items() if not name.endswith("alpha"))

    def bytes_per_token(**options):
        torch._dynamo.reset()
        return [b.extra_bytes_per_token for b in mhc_compile.report(model, x, options=options).blocks]

    assert bytes_per_token() == [fused_forward_bytes(4, 16, 4)] * 3
    assert bytes_per_token(stream_dtype=name) == [fused_forward_bytes(4, 16, 2)] * 3


INDUCTOR_KEYS = ("triton.cudagraphs", "max_autotune", "coordinate_descent_tuning")


@pytest.mark.parametrize("backend, mode, expected", [
    (lambda: mhc_compile.backend(), None, {}),
    (lambda: mhc_compile.backend(cudagraphs=True), None, {"triton.cudagraphs": True}),
    (lambda: "mhc", "reduce-overhead", {"triton.cudagraphs": True}),
    (lambda: "mhc", "max-autotune-no-cudagraphs", {"max_autotune": True,
                                                   "coordinate_descent_tuning": True}),
], ids=["default", "cudagraphs-option", "mode-reduce-overhead", "mode-max-autotune-no-cudagraphs"])
def test_inductor_settings_reach_inductor(monkeypatch, backend, mode, expected):
    """cudagraphs=True compiles with Inductor's cudagraph trees (its "triton.cudagraphs" config);
    torch.compile's mode= reaches Inductor as that mode's config; the default leaves Inductor's
    settings alone. The GPU run is tests/test_gpu.py::test_cudagraphs_replay_the_same_training."""
    import torch._inductor.compile_fx as compile_fx_module

    patches = []

    def compile_fx(graph_module, example_inputs, config_patches=None):
        patches.append(config_patches or {})
        return graph_module.forward

    monkeypatch.setattr(compile_fx_module, "compile_fx", compile_fx)
    torch.manual_seed(0)
    model, x = MLPResidual(), torch.randn(2, 5, 8)
    expected_output = model(x)
    torch._dynamo.reset()
    out = torch.compile(model, backend=backend(), **({"mode": mode} if mode else {}))(x)
    torch.testing.assert_close(out, expected_output)
    assert patches
    for patch in patches:
        assert {key: patch[key] for key in INDUCTOR_KEYS if key in patch} == expected
        assert "post_grad_custom_post_pass" in patch


def test_mode_lite_is_refused_with_the_reason():
    with pytest.raises(ValueError, match=re.escape(
            "mhc option mode must be None or one of 'default', 'reduce-overhead', "
            "'max-autotune-no-cudagraphs', 'max-autotune', got 'lite' (it turns off Inductor's "
            "graph passes, which the recompute policy runs in)")):
        mhc_compile.backend(mode="lite")


class ConvThenLinear(nn.Module):
    """On [B, C, L]: a convolution residual (streams over C, dim 1), then a linear residual over
    the last dim (L): two chains, the second starting where the first ends."""

    def __init__(self, channels=4, length=6):
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, 3, padding=1)
        self.fc = nn.Linear(length, length)

    def forward(self, x):
        x = x + torch.tanh(self.conv(x))
        return x + torch.tanh(self.fc(x))


class CausalConvMixer(nn.Module):
    """A token mixer as Mamba and LFM2 write it: a causal depthwise Conv1d over time on a
    transposed copy of the [B, T, C] residual. The streams widen C (dim -1), never time."""

    def __init__(self, width=8, depth=2):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv1d(width, width, 3, groups=width, padding=2)
                                   for _ in range(depth))
        self.outs = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, x):
        for conv, out in zip(self.convs, self.outs):
            mixed = conv(x.transpose(1, 2))[..., : x.shape[1]].transpose(1, 2)
            x = x + out(torch.tanh(mixed))
        return x


def test_a_chain_starting_where_another_ends_reads_its_mean():
    torch.manual_seed(0)
    model, x = ConvThenLinear().double(), torch.randn(2, 4, 6, dtype=torch.float64)
    expected = model(x)
    backend = _eager_backend()
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(model, backend=backend)(x), expected)
    assert [(b.status, b.chain) for b in backend.report.blocks] == [("rewritten", 0), ("rewritten", 1)]


def test_a_causal_token_conv_keeps_the_streams_on_channels_and_stays_causal():
    torch.manual_seed(0)
    model, x = CausalConvMixer().double(), torch.randn(2, 5, 8, dtype=torch.float64)
    expected = model(x)
    report = mhc_compile.prepare(model, x)
    phi, alpha, b_pre, b_post, b_res = 4 * 8 * 24, 3, 4, 4, 16
    assert [b.params_added for b in report.rewritten] == [phi + alpha + b_pre + b_post + b_res] * 2
    compiled = _compile(model)
    torch.testing.assert_close(compiled(x), expected)
    with torch.no_grad():
        for parameter in model.mhc.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    changed = x.clone()
    changed[:, -1] += 1.0
    torch.testing.assert_close(compiled(changed)[:, :-1], compiled(x)[:, :-1])
