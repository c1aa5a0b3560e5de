"""The Triton kernels against the float64 reference: every output and every gradient of the ops.

Without a GPU the kernels run eagerly on CPU tensors under Triton's interpreter. Triton decides
when it is first imported whether its own library (tl.sum, tl.zeros, ...) is interpreted, so
conftest.py sets TRITON_INTERPRET before anything imports Triton. With a GPU they run natively on CUDA,
and the CUDA-only tests check that the mhc:: ops dispatch to them, also under torch.compile.
Every check draws fresh random inputs, fills the kernels' output buffers with NaN first, and
compares ||kernel - reference|| / ||reference|| against the per-dtype table below.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys


import pytest
import torch

ON_GPU = torch.cuda.is_available()

# Triton comes with the `test` extra: a missing Triton fails here rather than skipping the kernels.
import triton.language as triton_language
from triton.runtime.jit import JITFunction

import benches
from mhc_compile import kernel_launch, ops, reference
from mhc_compile.templates import configs, kernels_active

if not ON_GPU and isinstance(triton_language.zeros, JITFunction):
    raise RuntimeError(
        "Triton was imported without TRITON_INTERPRET=1 on a machine without CUDA: run the kernel "
        "tests through pytest from the repository (tests/conftest.py sets it) or set it yourself"
    )
from mhc_compile.templates import coefficients_pre_mix, post_res_mix  # noqa: E402

# NaN-poisoned buffers and the relative error: bench/common.py's, which bench/kernels.py checks with.
_common = benches.load("common")
poisoned_allocations, relative_error = _common.poisoned_allocations, _common.relative_error

DEVICE = torch.device("cuda" if ON_GPU else "cpu")

# ||kernel - reference|| / ||reference|| allowed per stream dtype. Outputs in the stream dtype are
# rounded once (fp16 2^-11, bf16 2^-8). On the GPU the grad-streams product is tf32 for every dtype
# (errors of ~3e-4 that sums with cancellation, such as grad alpha, lift to ~3e-3); the projection of
# fp32 streams is exact. The interpreter computes in fp32 (fresh inputs whose gradients cancel,
# such as grad b_res at n = 2, reach ~2e-5).
TOLERANCE = {
    torch.float32: 5e-3 if ON_GPU else 1e-4,
    torch.float16: 5e-3 if ON_GPU else 3e-3,
    torch.bfloat16: 2e-2,
}
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _case(n, channels, tokens, dtype, iters=20, constraint="sinkhorn", lead=()):
    name = f"n{n}-C{channels}-T{tokens}-{DTYPE_NAMES[dtype]}"
    kind, eps = reference.formulation(constraint)
    name += "-unconstrained" if kind == "none" else f"-it{iters}"
    name += f"-{kind}-eps{eps:g}" if kind == reference.DEEPSEEK_V4 else ""
    name += "-lead" if lead else ""
    return pytest.param(n, channels, (*lead, tokens), dtype, iters, constraint, id=name)


# Small shapes for the interpreter: odd C, n not a power of two, token counts that leave partial
# blocks, Sinkhorn iteration counts from 1 (one stored iterate) up, leading dims. DeepSeek-V4's
# formulation with its eps, with a large one (a missing eps shows over the tolerance), with none,
# and with one iteration (none after its first step: no stored iterate).
CASES = [
    _case(1, 7, 5, torch.float32),
    _case(2, 33, 37, torch.float16),
    _case(3, 16, 20, torch.float32, iters=7),
    _case(4, 33, 37, torch.float32),
    _case(4, 64, 21, torch.float16, iters=3),
    _case(4, 9, 6, torch.float32, constraint="none", lead=(2,)),
    _case(5, 20, 40, torch.float16, iters=1),
    _case(4, 300, 9, torch.float32),  # several channel blocks, two column splits in the backward
    _case(6, 11, 66, torch.float32, lead=(3,)),  # several token blocks, grad phi splits
    _case(8, 7, 19, torch.float16),
    _case(8, 24, 17, torch.float32, iters=9),
    _case(3, 10, 7, torch.float16, constraint=reference.deepseek_v4_constraint(1e-6), lead=(2,)),
    _case(5, 12, 9, torch.float32, iters=4, constraint=reference.deepseek_v4_constraint(0.01)),
    _case(4, 9, 10, torch.float32, iters=1, constraint=reference.deepseek_v4_constraint(0.01)),
    # eps = 0 with a partial token block: the tokens past T must not make NaN.
    _case(4, 9, 10, torch.float32, iters=3, constraint=reference.deepseek_v4_constraint(0.0)),
]
if ON_GPU:
    CASES += [_case(4, 1024, 300, torch.bfloat16), _case(8, 33, 77, torch.bfloat16, iters=5),
              _case(4, 1024, 300, torch.bfloat16, constraint=reference.deepseek_v4_constraint(1e-6))]


@pytest.fixture(scope="module", autouse=True)
def _interpreter_scalar_index():
    """Triton 3.6's interpreter turns loop bounds into ints with int() of a 1-element array, which
    NumPy >= 2.4 rejects (triton-lang/triton#9171, fixed upstream after 3.6): apply that fix here."""
    if not configs.INTERPRETING:
        yield
        return
    from triton.runtime import interpreter

    patch_lang_tensor = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        patch_lang_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(())))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(interpreter, "_patch_lang_tensor", patched)
        yield


@pytest.fixture
def poisoned():
    """Every float buffer the launchers allocate with torch.empty(_like) starts as NaN, so an
    element a kernel fails to write cannot pass as a plausible value."""
    with poisoned_allocations():
        yield


def _assert_close(names, actual, expected, dtype):
    errors = {name: relative_error(a, e) for name, a, e in zip(names, actual, expected, strict=True)}
    print(f"relative errors ({DTYPE_NAMES[dtype]}):", {k: f"{v:.1e}" for k, v in errors.items()})
    bad = {k: v for k, v in errors.items() if not v <= TOLERANCE[dtype]}  # NaN fails too
    assert not bad, f"over tolerance {TOLERANCE[dtype]:.0e}: {bad}"


def _assert_alias_free(outputs, inputs):
    """A custom op's outputs may alias neither its inputs nor one another (torch.library checks)."""
    storages = [t.untyped_storage().data_ptr() for t in outputs]
    assert len(set(storages)) == len(storages), "outputs share storage"
    assert not set(storages) & {t.untyped_storage().data_ptr() for t in inputs}, "output aliases an input"


def _float64_vjp(function, inputs, grads):
    """Outputs and input gradients of `function` in float64 on the CPU (the reference)."""
    inputs = [t.detach().double().cpu().requires_grad_() for t in inputs]
    outputs = function(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    input_grads = torch.autograd.grad(outputs, inputs, [g.double().cpu() for g in grads])
    return outputs, input_grads


def _mhc_inputs(n, channels, shape, dtype):
    """Fresh random streams [*shape, n, C] and parameters with logits of order 1."""
    streams = torch.randn(*shape, n, channels, device=DEVICE).to(dtype)
    n_phi = n * n + 2 * n
    phi = torch.randn(n * channels, n_phi, device=DEVICE) / (n * channels) ** 0.5
    alpha = torch.rand(3, device=DEVICE) + 0.5
    b_pre, b_post, b_res = (torch.randn(s, device=DEVICE) for s in ((n,), (n,), (n, n)))
    return streams, phi, alpha, b_pre, b_post, b_res


CASE_ARGS = "n, channels, shape, dtype, iters, constraint"


def _coefficients_pre_mix_reference(iters, constraint):
    def forward(*tensors):
        return reference.coefficients_pre_mix(*tensors, iters, constraint)

    return forward


COEFFICIENT_GRADS = ["grad_streams", "grad_phi", "grad_alpha", "grad_b_pre", "grad_b_post", "grad_b_res"]


def _check_coefficients_pre_mix(n, channels, shape, dtype, iters, constraint, accumulated=False):
    """`accumulated`: the backward also gets the streams' gradient from their other reader."""
    inputs = _mhc_inputs(n, channels, shape, dtype)
    outputs = coefficients_pre_mix.mhc_coefficients_pre_mix_fwd(*inputs, iters, constraint)
    *differentiable, proj, sum_squares = outputs
    grad_outputs = [torch.randn_like(t) for t in differentiable]
    accumulate = torch.randn_like(inputs[0]) if accumulated else None
    grads = coefficients_pre_mix.mhc_coefficients_pre_mix_bwd(
        *grad_outputs, outputs[0], proj, sum_squares, *inputs, iters, constraint, accumulate
    )
    forward = _coefficients_pre_mix_reference(iters, constraint)
    ref_outputs, ref_grads = _float64_vjp(forward, inputs, grad_outputs)
    if accumulated:
        ref_grads = (ref_grads[0] + accumulate.double().cpu(), *ref_grads[1:])
    _assert_close(["h_pre", "h_post", "h_res", "mixed"], differentiable, ref_outputs, dtype)
    ref_projection = reference.projection(*(t.detach().double().cpu() for t in inputs[:2]))
    _assert_close(["projection", "sum_squares"], (proj, sum_squares), ref_projection, dtype)
    _assert_close(COEFFICIENT_GRADS, grads, ref_grads, dtype)
    expected = reference.coefficients_pre_mix_and_projection(*inputs, iters, constraint)
    assert [(t.shape, t.dtype) for t in outputs] == [(t.shape, t.dtype) for t in expected]
    for grad, tensor in zip(grads, inputs, strict=True):
        assert (grad.shape, grad.dtype) == (tensor.shape, tensor.dtype)
    _assert_alias_free(outputs, inputs)
    _assert_alias_free(grads, [*grad_outputs, *inputs, *([accumulate] if accumulated else [])])


@pytest.mark.parametrize(CASE_ARGS, CASES)
def test_coefficients_pre_mix(n, channels, shape, dtype, iters, constraint, poisoned):
    _check_coefficients_pre_mix(n, channels, shape, dtype, iters, constraint)


@pytest.mark.parametrize("n, channels, tokens, dtype", [
    (4, 33, 37, torch.float16), (2, 64, 9, torch.float16), (3, 20, 11, torch.float32),
    *([(4, 1024, 300, torch.bfloat16), (8, 40, 70, torch.bfloat16)] if ON_GPU else []),
])
def test_the_projection_keeps_phi_finer_than_the_stream_dtype(n, channels, tokens, dtype, poisoned):
    """16-bit streams are multiplied as stored against phi's high and low halves in their dtype:
    the projection's error against float64 is a tenth of what phi rounded once to that dtype gives,
    or less; fp32 streams are multiplied exactly."""
    streams, phi, *parameters = _mhc_inputs(n, channels, (tokens,), dtype)
    *_, projection, _ = coefficients_pre_mix.mhc_coefficients_pre_mix_fwd(
        streams, phi, *parameters, 3, "sinkhorn")  # ..., v @ phi, sums of squares
    flat = streams.detach().double().cpu().reshape(tokens, n * channels)
    expected = flat @ phi.double().cpu()
    error = relative_error(projection, expected)
    if dtype == torch.float32:
        assert error < 1e-6, error
    else:
        phi_rounded_once = flat @ phi.to(dtype).double().cpu()
        assert error < relative_error(phi_rounded_once, expected) / 10, error


@pytest.mark.parametrize("constraint", ["ortho", reference.DEEPSEEK_V4])
def test_coefficient_kernels_refuse_an_unknown_constraint(constraint):
    inputs = _mhc_inputs(2, 8, (3,), torch.float32)
    with pytest.raises(ValueError, match="constraint must be one of"):
        coefficients_pre_mix.mhc_coefficients_pre_mix_fwd(*inputs, 20, constraint)


ACCUMULATE_CASES = [
    _case(4, 33, 37, torch.float32), _case(2, 33, 37, torch.float16),
    _case(8, 7, 19, torch.float16, lead=(2,)),
    *([_case(4, 1024, 300, torch.bfloat16)] if ON_GPU else []),
]


@pytest.mark.parametrize(CASE_ARGS, ACCUMULATE_CASES)
def test_coefficients_pre_mix_backward_adds_the_other_grad_streams(
        n, channels, shape, dtype, iters, constraint, poisoned):
    _check_coefficients_pre_mix(n, channels, shape, dtype, iters, constraint, accumulated=True)


def _check_post_res_mix(n, channels, shape, dtype, iters, constraint, y_dtype):
    streams, *parameters = _mhc_inputs(n, channels, shape, dtype)
    _, h_post, h_res = reference.coefficients(streams, *parameters, iters, constraint)
    y = torch.randn(*shape, channels, device=DEVICE).to(y_dtype)
    out = post_res_mix.mhc_post_res_mix_fwd(streams, y, h_post, h_res)
    grad_out = torch.randn_like(out)
    grads = post_res_mix.mhc_post_res_mix_bwd(grad_out, streams, y, h_post, h_res)
    inputs = (streams, y, h_post, h_res)
    (ref_out,), ref_grads = _float64_vjp(reference.post_res_mix, inputs, (grad_out,))
    coarser = max(dtype, y_dtype, key=TOLERANCE.get)
    _assert_close(["out"], [out], [ref_out], coarser)
    _assert_close(["grad_streams", "grad_y", "grad_h_post", "grad_h_res"], grads, ref_grads, coarser)
    grad_dtypes = [grad.dtype for grad in grads]
    assert out.dtype == dtype
    assert grad_dtypes == [tensor.dtype for tensor in inputs]
    _assert_alias_free(grads, [grad_out, *inputs])


@pytest.mark.parametrize(CASE_ARGS, CASES)
def test_post_res_mix(n, channels, shape, dtype, iters, constraint, poisoned):
    _check_post_res_mix(n, channels, shape, dtype, iters, constraint, y_dtype=dtype)


@pytest.mark.parametrize("dtype, y_dtype", [
    (torch.bfloat16, torch.float32),  # stream_dtype="bfloat16" in a float32 model
    (torch.float32, torch.bfloat16),  # float32 residual, F under bf16 autocast
])
def test_post_res_mix_with_f_output_in_another_dtype(dtype, y_dtype, poisoned):
    _check_post_res_mix(4, 40, (2, 9), dtype, 20, "sinkhorn", y_dtype=y_dtype)


def test_backward_is_deterministic(poisoned):
    """grad phi and the parameter gradients are reduced per split and summed in a fixed order:
    two runs agree bit for bit."""
    inputs = _mhc_inputs(4, 33, (37,), torch.float32)
    outputs = coefficients_pre_mix.mhc_coefficients_pre_mix_fwd(*inputs, 20, "sinkhorn")
    grad_outputs = [torch.randn_like(t) for t in outputs[:4]]
    first, second = (
        coefficients_pre_mix.mhc_coefficients_pre_mix_bwd(
            *grad_outputs, outputs[0], *outputs[4:], *inputs, 20, "sinkhorn"
        )
        for _ in range(2)
    )
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_coefficients_backward_does_not_depend_on_what_autotuning_left_in_its_buffers(
        monkeypatch, poisoned):
    """An autotuner runs every candidate on the launch's own buffers before the winner's run, and
    under Inductor without restore_value (torch rebuilds a traced launch's autotuner from its
    pruned configs alone). Here the coefficient backward's launch runs BLOCK_T=16, then
    BLOCK_T=64 (the winner, which covers the tokens with fewer programs) on the same buffers: the
    parameter gradients must still match the float64 reference."""
    tuned = configs.TUNED["mhc_coefficients_bwd"]
    narrow, wide = (
        configs._overridden(configs._STAGE_CONFIGS["coefficients"][0], {"BLOCK_T": block_t, "num_warps": 4})
        for block_t in (16, 64)
    )
    monkeypatch.setattr(tuned, "configs", [narrow, wide])
    launch, ran = kernel_launch.launch, []

    def candidates_then_winner(kernel_name, grid, *args, **kwargs):
        if kernel_name != "mhc_coefficients_bwd":
            return launch(kernel_name, grid, *args, **kwargs)
        for config in (narrow, wide):
            meta = {**kwargs, **config.all_kwargs()}
            tuned.fn[grid(meta)](*args, **meta)
            ran.append(config)
        return None

    monkeypatch.setattr(kernel_launch, "launch", candidates_then_winner)
    _check_coefficients_pre_mix(4, 33, (2, 37), torch.float32, 20, "sinkhorn")
    assert ran == [narrow, wide]


def _jit_functions(module):
    """The @triton.jit functions defined in `module`'s source, as AST nodes."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(module))
    return [
        node for node in tree.body if isinstance(node, ast.FunctionDef)
        and any(ast.unparse(d).startswith("triton.jit") for d in node.decorator_list)
    ]


def test_kernels_name_their_helpers_plainly_for_inductor():
    """Under torch.compile Inductor compiles these kernels itself from a copy of their source plus
    the JIT functions they name (by plain name, in co_names): a helper reached as module.attr,
    or whose name a local variable shadows, is missing from that copy (NameError on the GPU)."""
    import ast
    import types

    from mhc_compile.templates import coefficients, pre_mix, tiles

    modules = (coefficients, pre_mix, post_res_mix, tiles)
    helper_names = {node.name for module in modules for node in _jit_functions(module)}
    for module in modules:
        helpers = helper_names & set(vars(module))  # the helpers this module's kernels can name
        for function in _jit_functions(module):
            body = ast.Module(body=function.body, type_ignores=[])  # not the decorators
            for node in ast.walk(body):
                if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                    assert node.id not in helpers, f"{function.name}: local {node.id} shadows a helper"
                if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                    bound = vars(module).get(node.value.id)
                    assert not isinstance(bound, types.ModuleType) or node.value.id in ("tl", "triton"), (
                        f"{function.name} calls {node.value.id}.{node.attr}: import it by name"
                    )


# --- configs ----------------------------------------------------------------------------------------


def test_forced_configs():
    assert configs.forced_configs("") == {} == configs.forced_configs("autotune")
    default = configs.forced_configs("default")
    assert set(default) == set(configs.STAGES)
    everywhere = configs.forced_configs("BLOCK_C=128,num_warps=2")
    assert everywhere["pre_mix_fwd"].kwargs["BLOCK_C"] == 128
    assert everywhere["coefficients"].num_warps == 2
    assert "BLOCK_C" not in everywhere["coefficients"].kwargs
    assert "BLOCK_C" not in everywhere["coefficients_bwd_streams"].kwargs
    one = configs.forced_configs("post_res_mix_bwd:BLOCK_T=2,num_stages=3")
    assert set(one) == {"post_res_mix_bwd"} and one["post_res_mix_bwd"].kwargs["BLOCK_T"] == 2
    for wrong in ("BLOCK_Q=1", "nonexistent:BLOCK_C=1", "coefficients:BLOCK_C=64", "BLOCK_C"):
        with pytest.raises(ValueError, match=configs.ENV_VAR):
            configs.forced_configs(wrong)


_KERNEL_STAGES = {"mhc_projection": "projection", "mhc_coefficients_fwd": "coefficients",
                  "mhc_coefficients_bwd": "coefficients",
                  "mhc_coefficients_bwd_streams": "coefficients_bwd_streams",
                  **{f"mhc_{stage}": stage for stage in
                     ("pre_mix_fwd", "pre_mix_grad_h_pre", "post_res_mix_fwd", "post_res_mix_bwd")}}


@pytest.fixture
def sm90_device(monkeypatch):
    """select_device as on an H100 (compute capability 9.0), without one. No table is selected
    until it is called: on a GPU an earlier launch has selected the real one."""
    configs._table_of.cache_clear()
    monkeypatch.setattr(configs, "AUTOTUNE_ALL", False)
    configs.select_device(torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    yield lambda: configs.select_device(torch.device("cuda", 0))
    configs._table_of.cache_clear()
    configs.select_device(torch.device("cpu"))


def _candidates(kernel, n, channels, candidates=None, dtype=torch.bfloat16):
    stage = _KERNEL_STAGES[kernel]
    prune = configs._prune(stage, kernel)
    streams = torch.empty(0, dtype=dtype)  # what the table reads of the tensors: their dtypes
    return [configs.describe(c) for c in
            prune(candidates or configs._STAGE_CONFIGS[stage], {"x": streams, "n": n, "C": channels})]


def test_the_autotuning_table_compiles_one_config_where_it_applies(sm90_device, monkeypatch):
    """On a GPU the table covers, for the (n, C) it holds with bf16 streams, a tabled kernel gets
    the tabled config alone (one compile, no benchmark), and so do the coefficient kernels, which
    take fp32 tensors only (they never read the streams); every other kernel, n, C, stream dtype,
    GPU or an explicit autotune keeps the candidates it has without the table, and a forced config
    is never replaced."""
    assert set(_KERNEL_STAGES) == set(configs.TUNED)
    table = configs._TUNED_TABLES[(9, 0)]
    for (kernel, _, _), tabled in table.items():  # choosable: among its stage's candidates
        assert configs.describe(tabled) in map(configs.describe, configs._STAGE_CONFIGS[_KERNEL_STAGES[kernel]])
    cases = [(kernel, n, channels) for kernel in _KERNEL_STAGES
             for n, channels in ((4, 1024), (4, 2048), (4, 4096), (8, 2048), (2, 2048), (4, 512),
                                 (4, 3072), (4, 8192))]
    without = {case: _candidates(*case) for case in cases}  # no table selected (CPU)
    sm90_device()
    for case in cases:
        if case in table:
            assert _candidates(*case) == [configs.describe(table[case])], case
            assert len(without[case]) > 1, f"the table saved nothing at {case}"
            fp32_tensors = _candidates(*case, dtype=torch.float32)
            if case[0] in ("mhc_coefficients_fwd", "mhc_coefficients_bwd"):
                assert fp32_tensors == [configs.describe(table[case])], case
            else:
                assert fp32_tensors == without[case], f"fp32 streams tabled at {case}"
        else:
            assert _candidates(*case) == without[case], case
    assert ("mhc_projection", 4, 3072) not in table  # never measured
    forced = configs._STAGE_CONFIGS["projection"][0]
    assert _candidates("mhc_projection", 4, 2048, [forced]) == [configs.describe(forced)]
    monkeypatch.setattr(configs, "AUTOTUNE_ALL", True)
    sm90_device()
    assert _candidates("mhc_projection", 4, 2048) == without["mhc_projection", 4, 2048]
    monkeypatch.setattr(configs, "AUTOTUNE_ALL", False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (8, 0))
    configs._table_of.cache_clear()
    sm90_device()
    assert _candidates("mhc_projection", 4, 2048) == without["mhc_projection", 4, 2048]


def test_a_new_key_compiles_its_candidates_in_parallel_first():
    """Before the autotuner's serial benchmarking loop, every surviving candidate is compiled
    (JIT warmup) with the launch's own arguments, inside Triton's AsyncCompileMode, so the
    compiles go to a thread pool; the mode is left again afterwards."""
    from triton.runtime._async_compile import active_mode

    warmed = []

    class Kernel:
        def warmup(self, *args, grid, **kwargs):
            warmed.append((args, grid, kwargs, active_mode.get() is not None))

    class Tuned:
        fn = Kernel()

    candidates = [configs._config(4, 3, BLOCK_T=16), configs._config(8, 2, BLOCK_T=64)]
    streams = torch.randn(3, 4, 5)
    kernel_launch._compile_in_parallel(Tuned(), candidates, "grid", (streams, 3), {"n": 4, "C": 5})
    assert [(args[1], grid, in_mode) for args, grid, _, in_mode in warmed] == [(3, "grid", True)] * 2
    assert all(args[0] is streams for args, *_ in warmed)
    assert [kwargs for *_, kwargs, _ in warmed] == [
        {"n": 4, "C": 5, **config.all_kwargs()} for config in candidates]
    assert active_mode.get() is None
    warmed.clear()
    kernel_launch._compile_in_parallel(Tuned(), candidates[:1], "grid", (streams, 3), {"n": 4, "C": 5})
    assert not warmed  # one candidate: the autotuner does not benchmark, nothing to overlap


def test_a_failing_parallel_compile_leaves_the_launch_to_compile():
    class Kernel:
        def warmup(self, *args, grid, **kwargs):
            raise RuntimeError("no driver")

    class Tuned:
        fn = Kernel()

    candidates = [configs._config(4, 3, BLOCK_T=16), configs._config(8, 2, BLOCK_T=64)]
    messages = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    kernel_launch.log.addHandler(handler)
    try:
        kernel_launch._compile_in_parallel(Tuned(), candidates, "grid", (), {})  # does not raise
    finally:
        kernel_launch.log.removeHandler(handler)
    assert messages == ["compiling 2 autotune candidates in parallel failed (RuntimeError: no "
                        "driver); the autotuner compiles them one by one"]


def test_every_kernel_times_its_candidates_with_the_short_windows():
    """Triton's autotuner times candidates with the benchmark each kernel was given: ours, with the
    short windows (configs._time_candidate), not Triton's default."""
    import mhc_compile.templates.coefficients  # noqa: F401 (defines the kernels it tunes)
    import mhc_compile.templates.post_res_mix  # noqa: F401
    import mhc_compile.templates.pre_mix  # noqa: F401

    assert {f"_{name}_kernel" for name in configs.TUNED} == KERNELS
    for name, tuned in configs.TUNED.items():
        assert tuned.do_bench is configs._time_candidate, name


def test_first_configs_fit_every_n():
    """The first config of each stage (interpreter, MHC_TRITON_CONFIG=default) survives pruning."""
    for stage in configs.STAGES:
        first = configs._STAGE_CONFIGS[stage][0]
        for n in range(1, 9):
            assert first in configs._prune(stage)(configs._STAGE_CONFIGS[stage], {"n": n, "C": 4096})


def test_eager_launches_skip_the_tracing_path():
    """Only a tracer's tensors send a launch through wrap_triton (whose eager implementation
    re-benchmarked every autotuned call: 21 s a training step on the H100); the user's
    parameters, which reach the kernels unchanged, launch directly."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    plain, parameter = torch.zeros(2), torch.nn.Parameter(torch.zeros(2))
    assert not kernel_launch._traced((plain, parameter, 3, "sinkhorn"))
    with FakeTensorMode() as fake_mode:
        fake = fake_mode.from_tensor(plain)
    assert kernel_launch._traced((plain, fake))


def test_launch_specialisation_separates_what_triton_specialises(monkeypatch):
    """A later launch reuses a binary only for arguments Triton would compile the same way and the
    autotuner would key the same way: every value of n, C and the constexprs, each tensor's dtype
    and 16-byte alignment, and whether an integer is 1, divides by 16 or needs 64 bits."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    storage = torch.zeros(4096, dtype=torch.bfloat16)

    def specialisation(tokens=32, channels=96, n=4, dtype=torch.bfloat16, offset=0):
        streams = storage[offset:].to(dtype)[: tokens * n * channels]
        return kernel_launch._specialisation(
            "mhc_post_res_mix_fwd", (streams, streams, storage.float(), storage.float(), streams),
            {"T": tokens, "C": channels, "n": n, "NP": configs.padded_streams(n)})

    reference_case = specialisation()
    assert specialisation(tokens=48) == reference_case  # both divide by 16: one binary
    assert specialisation(tokens=33) == specialisation(tokens=35)
    for other in (specialisation(tokens=33), specialisation(tokens=1), specialisation(tokens=2**31),
                  specialisation(channels=112), specialisation(n=3), specialisation(offset=1),
                  specialisation(dtype=torch.float16)):
        assert other != reference_case


# --- dispatch through the mhc:: ops (CUDA only) -----------------------------------------------------


def test_cpu_keeps_the_reference():
    assert not kernels_active("cpu")
    inputs = [t.cpu() for t in _mhc_inputs(2, 8, (3,), torch.float32)]
    outputs = ops.coefficients_pre_mix(*inputs, 20, "sinkhorn")
    expected = reference.coefficients_pre_mix_and_projection(*inputs, 20, "sinkhorn")
    assert all(torch.equal(a, b) for a, b in zip(outputs, expected, strict=True))


def _check_sublayer_against_float64(sublayer, shape, dtype=torch.float32):
    """`sublayer(*inputs, 20)` on fresh inputs of (n, C, token shape) with streams of `dtype`:
    output and every input gradient against the float64 reference."""
    inputs = [t.requires_grad_() for t in _mhc_inputs(*shape, dtype)]
    out = sublayer(*inputs, 20)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, grad_out)

    def forward(*tensors):
        return reference.sublayer(*tensors, lambda u: u, 20)

    (ref_out,), ref_grads = _float64_vjp(forward, inputs, (grad_out,))
    _assert_close(["out"], [out], [ref_out], dtype)
    _assert_close(COEFFICIENT_GRADS, grads, ref_grads, dtype)


def test_ops_dispatch_to_the_kernels_with_autograd(monkeypatch, poisoned):
    """The ops' kernel branch and their autograd wiring, eagerly: on CPU under the interpreter
    (kernels forced on for CPU tensors), on CUDA as they are. Sublayer output and every input
    gradient against the float64 reference."""
    from mhc_compile import templates

    if not ON_GPU:
        monkeypatch.setattr(templates, "kernels_active", lambda device: True)
    used, launcher = [], templates.launcher
    monkeypatch.setattr(templates, "launcher", lambda name: used.append(name) or launcher(name))
    _check_sublayer_against_float64(_sublayer_through_ops, (3, 40, (2, 9)))
    assert sorted(set(used)) == sorted(templates._LAUNCHERS), "an op did not run its kernel"


def _recorded_launches(monkeypatch) -> list[tuple[str, bool]]:
    """Every call of an op launcher (templates.launcher) from now on: its name, and whether a
    tracer made it (fake or functional tensors among its arguments) rather than a run."""
    from mhc_compile import templates

    launches, launcher = [], templates.launcher

    def recording_launcher(name):
        launch = launcher(name)

        def recorded(*args):
            launches.append((name, any(type(a) not in (torch.Tensor, torch.nn.Parameter)
                                       for a in args if isinstance(a, torch.Tensor))))
            return launch(*args)

        return recorded

    monkeypatch.setattr(templates, "launcher", recording_launcher)
    return launches


def test_symbolic_shapes_take_the_opaque_op(monkeypatch):
    """With symbolic sizes the ops do not trace their kernels (Inductor on torch 2.11 failed on
    that glue) but call the *_opaque ops: no kernel is launched on a tracer's tensors. At
    run time the opaque twins launch the kernels on CUDA and run the reference on CPU. Kernels
    forced on for CPU tensors, so that a traced branch would be seen there too."""
    from mhc_compile import templates

    monkeypatch.setattr(templates, "kernels_active", lambda device: True)
    launches = _recorded_launches(monkeypatch)
    torch._dynamo.reset()
    compiled = torch.compile(_sublayer_through_ops, backend="aot_eager", dynamic=True, fullgraph=True)
    _check_sublayer_against_float64(compiled, (2, 12, (5,)))
    traced = [name for name, by_tracer in launches if by_tracer]
    assert traced == [], f"a traced body launched kernels with symbolic shapes: {traced}"
    ran = {name for name, _ in launches}
    assert ran == (set(templates._LAUNCHERS) if ON_GPU else set()), ran


cuda_only = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
# Every kernel of a sublayer's forward and backward.
KERNELS = {
    "_mhc_projection_kernel", "_mhc_coefficients_fwd_kernel", "_mhc_pre_mix_fwd_kernel",
    "_mhc_post_res_mix_fwd_kernel", "_mhc_post_res_mix_bwd_kernel", "_mhc_pre_mix_grad_h_pre_kernel",
    "_mhc_coefficients_bwd_kernel", "_mhc_coefficients_bwd_streams_kernel",
}


def _sublayer_through_ops(streams, phi, alpha, b_pre, b_post, b_res, iters):
    _, h_post, h_res, mixed, *_ = ops.coefficients_pre_mix(
        streams, phi, alpha, b_pre, b_post, b_res, iters, "sinkhorn"
    )
    return ops.post_res_mix(streams, mixed, h_post, h_res)


@cuda_only
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_ops_run_the_kernels_on_cuda(compiled):
    """The ops launch every kernel, eagerly and under Inductor (which launches them itself, since
    the ops are triton_ops), and the sublayer matches the float64 reference."""
    assert kernels_active("cuda")
    inputs = [t.requires_grad_() for t in _mhc_inputs(4, 96, (2, 33), torch.bfloat16)]
    sublayer = _sublayer_through_ops
    if compiled:
        torch._dynamo.reset()
        sublayer = torch.compile(_sublayer_through_ops, fullgraph=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        out = sublayer(*inputs, 20)
        grad_out = torch.randn_like(out)
        grads = torch.autograd.grad(out, inputs, grad_out)
        torch.cuda.synchronize()
    # Inductor may suffix a user kernel's name with an index.
    launched = {re.sub(r"_\d+$", "", e.name) for e in profile.events() if e.name.startswith("_mhc_")}
    assert launched == KERNELS, f"profiler saw {sorted(launched)}"

    def forward(*tensors):
        return reference.sublayer(*tensors, lambda u: u, 20)

    (ref_out,), ref_grads = _float64_vjp(forward, inputs, (grad_out,))
    _assert_close(["out"], [out], [ref_out], torch.bfloat16)
    _assert_close(COEFFICIENT_GRADS, grads, ref_grads, torch.bfloat16)


@cuda_only
@pytest.mark.parametrize("shape, dtype", [((4, 96, (2, 33)), torch.bfloat16),
                                          ((3, 50, (37,)), torch.float32)], ids=["bf16", "fp32"])
def test_backend_hands_the_kernels_to_inductor(monkeypatch, shape, dtype):
    """Compiled as backend="mhc" compiles (ops traced whole, the grad-streams fold, then
    passes/inline_kernels.py): no opaque op is left in Inductor's forward and backward graphs,
    every kernel runs from Inductor's generated code (none through our launchers at run time), and
    the sublayer matches the float64 reference."""
    from torch._functorch import config as functorch_config
    from torch._inductor import config as inductor_config

    from mhc_compile import passes
    from mhc_compile.backend import compile_whole_ops

    graphs = []

    def record_graph(graph, context):
        graphs.append(graph)
        return 0

    monkeypatch.setitem(passes.STAGES, "post_grad",
                        (*passes.POST_GRAD_PASSES, passes.GraphPass(record_graph, "graphs kept")))
    launches = _recorded_launches(monkeypatch)
    torch._dynamo.reset()
    compiled = torch.compile(_sublayer_through_ops, backend=compile_whole_ops, fullgraph=True)
    with inductor_config.patch(fx_graph_cache=False), \
            functorch_config.patch(enable_autograd_cache=False):
        _check_sublayer_against_float64(compiled, shape, dtype)
    assert len(graphs) == 2, "expected Inductor's forward and backward graphs"
    for graph in graphs:
        targets = [node.target for node in graph.nodes if node.op == "call_function"]
        assert not set(targets) & set(ops.OPAQUE_OPS), graph
        # Inductor's later passes turn the functional wrappers into mutating ones.
        assert torch.ops.higher_order.triton_kernel_wrapper_mutation in targets, graph
    eager_launches = [name for name, by_tracer in launches if not by_tracer]
    assert eager_launches == [], f"launched by our launchers at run time: {eager_launches}"


@cuda_only
def test_repeated_launches_run_the_compiled_binary(monkeypatch, poisoned):
    """After one launch through Triton, launches of the same specialisation (here 32 and 48 tokens)
    call the binary directly: with Triton's launch path made to fail, the post/res kernels still
    match the float64 reference."""
    monkeypatch.setattr(kernel_launch, "_COMPILED", {})
    _check_post_res_mix(4, 96, (32,), torch.bfloat16, 20, "sinkhorn", y_dtype=torch.bfloat16)

    def triton_launch_path(*args, **kwargs):
        raise AssertionError("launched through triton.autotune again")

    for kernel in ("mhc_post_res_mix_fwd", "mhc_post_res_mix_bwd"):
        monkeypatch.setattr(configs.TUNED[kernel], "run", triton_launch_path)
    _check_post_res_mix(4, 96, (48,), torch.bfloat16, 20, "sinkhorn", y_dtype=torch.bfloat16)


@cuda_only
def test_float64_on_cuda_falls_back_to_the_reference():
    inputs = [t.double() for t in _mhc_inputs(2, 8, (3,), torch.float32)]
    outputs = ops.coefficients_pre_mix(*inputs, 20, "sinkhorn")
    expected = reference.coefficients_pre_mix_and_projection(*inputs, 20, "sinkhorn")
    assert all(torch.equal(a, b) for a, b in zip(outputs, expected, strict=True))


@cuda_only
def test_cli_autotune_prints_the_chosen_configs(capsys):
    from mhc_compile import cli

    assert cli.main(["autotune", "--C", "96", "--tokens", "64"]) == 0
    out = capsys.readouterr().out
    assert "n=4 C=96 bf16, 64 tokens:" in out
    for kernel in configs.TUNED:
        assert kernel in out, f"{kernel} missing from the chosen configs:\n{out}"


@cuda_only
def test_autotuning_every_candidate_compiles_them_in_parallel(tmp_path):
    """A fresh process with nothing forced and an empty Triton cache: every kernel of a sublayer
    tunes among its candidates, whose compiles go through the thread pool first. A failure of that
    path would be logged ("... in parallel failed") and is a defect here."""
    assert len(configs.TUNED) == 8  # the kernel modules were imported above
    env = {key: value for key, value in os.environ.items() if key != configs.ENV_VAR}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "mhc_compile.cli", "autotune", "--C", "96", "--tokens", "256"],
        env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "in parallel failed" not in done.stdout + done.stderr
    for kernel in configs.TUNED:
        assert f"autotuned {kernel} for n=4 C=96" in done.stdout, done.stdout
