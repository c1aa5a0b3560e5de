"""One mHC sublayer on the GPU: check the Triton kernels, then time them against the alternatives.

The sublayer is coefficients + Sinkhorn + pre-mix (one op, mhc::coefficients_pre_mix) + post/res-mix
with f = identity, bf16 streams [tokens, n, C], fp32 coefficients, sinkhorn_iters = 20. Steps:

1. Check: at every benchmark shape, forward and backward through the mhc:: ops (which run the
   kernels on CUDA) against the float64 reference: the output, the intermediates (h_pre, h_post,
   h_res, the pre-mix) and the gradients of the inputs and of the intermediates, so every kernel's
   every output is compared. Buffers the kernels allocate are poisoned with NaN first.
2. Time (triton.testing.do_bench, median) forward and forward+backward of:
     ours            the mhc:: ops in eager mode (the Triton kernels)
     ours+inductor   the same under torch.compile: the ops are triton_ops, so Inductor compiles
                     the kernels and the work around them and launches them
     ours+whole-ops  the same as backend="mhc" compiles it (backend.compile_whole_ops): the ops
                     traced whole, the post-grad fold (passes/fuse_grad_streams.py) handing
                     post/res's grad streams to the coefficient backward instead of leaving
                     autograd's add, then the kernels handed to Inductor (passes/inline_kernels.py)
     ours+whole-ops (CUDA graph)  the same replayed as one CUDA graph (captured like "ours (CUDA
                     graph)"): the training path's GPU time, with no host cost and no copies
     ours+whole-ops+graphs   the same with the option cudagraphs=True (Inductor's cudagraph trees:
                     no host cost per kernel launch), on its own copy of the inputs marked as
                     static addresses: cudagraph trees copy any other input into the graph's
                     buffers at every replay, and in a model the streams are made inside the graph
                     (the backward's tangent, as large as the streams, is still copied)
     naive           reference.sublayer in PyTorch eager
     naive+inductor  reference.sublayer under default torch.compile
     liger           liger_kernel.transformers.mhc.LigerMHC (phi in bf16, its recommended setting)
   plus each of our kernels alone, against the bytes it moves.
3. Print per shape: ms, GB/s and % of the measured copy bandwidth on the forward's floor bytes
   ((3n+2)C elements per token), speedups, and the autotune configs chosen; write kernels.json and
   kernels.png under $OUT (or bench/out).

    python bench/kernels.py [--tokens 16384] [--channels 1024 2048 4096] [--n 4] [--check-only]
                            [--warm-only] [--host-profile]

--warm-only runs steps 1 and every provider once per shape, timing nothing: it fills Triton's and
Inductor's on-disk caches (autotune choices, compiled graphs), so that a later timing run in the
same environment spends its time timing.

Every kernel autotunes all its candidates here (MHC_TRITON_CONFIG=autotune unless set), autotuning
tables or not: the candidates' times are what checks a table's entry. So the first call's seconds
are an autotuning cold start, not the tabled one users get (bench/e2e.py's cold compile is).
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import importlib.util
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("MHC_TRITON_CONFIG", "autotune")  # before the kernels are imported

import torch  # noqa: E402
from triton.testing import do_bench, do_bench_cudagraph  # noqa: E402

from common import (  # noqa: E402
    copy_bandwidth, host_profile_text, log, out_dir, poisoned_allocations, pyplot, relative_error,
    versions, write_json, write_table,
)
from mhc_compile import ops, private_apis, reference, spec  # noqa: E402
from mhc_compile.backend import compile_whole_ops  # noqa: E402
from mhc_compile.options import MHCOptions  # noqa: E402
from mhc_compile.templates import (  # noqa: E402
    coefficients, coefficients_pre_mix, configs, kernels_active, post_res_mix, pre_mix,
)

DEVICE = "cuda"
ITERS = 20
STREAM_DTYPE = torch.bfloat16
# ||ours - float64 reference|| / ||reference|| allowed for bf16 streams (one bf16 rounding, 2^-8,
# of each stream-dtype output; tf32 projection for the coefficients).
TOLERANCE = 1e-2
# The training path (whole ops, the fold, Inductor) replayed as one CUDA graph: the GPU time
# backend="mhc" spends on a sublayer. The cudagraph-trees provider also copies the backward's
# tangent (grad_out, as large as the streams) into its graph at every replay: a model's tangent
# is the loss's, and its streams' gradients are made inside the graph.
WHOLE_OPS_GRAPHED = "ours+whole-ops (CUDA graph)"
PROVIDERS = ("ours", "ours+inductor", "ours+whole-ops", "ours+whole-ops+graphs", "naive",
             "naive+inductor", "liger")


# --- inputs and the sublayer -------------------------------------------------------------------


def make_inputs(tokens: int, n: int, channels: int, seed: int) -> list[torch.Tensor]:
    """streams [tokens, n, C] bf16; phi [n*C, n*n+2n], alpha [3], b_pre [n], b_post [n], b_res [n, n]
    fp32; random with logits of order 1 (fresh per seed), all requiring grad."""
    generator = torch.Generator(device=DEVICE).manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, device=DEVICE, generator=generator) * scale

    streams = randn(tokens, n, channels).to(STREAM_DTYPE)
    phi = randn(n * channels, spec.coefficient_count(n), scale=(n * channels) ** -0.5)
    alpha = torch.rand(3, device=DEVICE, generator=generator) + 0.5
    tensors = [streams, phi, alpha, randn(n), randn(n), randn(n, n)]
    return [t.requires_grad_() for t in tensors]


def sublayer_parts(impl, streams, phi, alpha, b_pre, b_post, b_res) -> dict[str, torch.Tensor]:
    """The sublayer through `impl` (mhc_compile.ops or mhc_compile.reference), f = identity."""
    h_pre, h_post, h_res, mixed, *_ = impl.coefficients_pre_mix(
        streams, phi, alpha, b_pre, b_post, b_res, ITERS, "sinkhorn"
    )
    out = impl.post_res_mix(streams, mixed, h_post, h_res)
    return {"h_pre": h_pre, "h_post": h_post, "h_res": h_res, "mixed": mixed, "out": out}


def ours(*inputs):
    return sublayer_parts(ops, *inputs)["out"]


def whole_ops_inductor(graph_module, example_inputs, cudagraphs: bool = False):
    """Inductor as backend="mhc" runs it: the ops traced whole, the grad-streams fold, then
    (passes/inline_kernels.py) the kernels handed to Inductor."""
    return compile_whole_ops(graph_module, example_inputs,
                             MHCOptions(recompute=False, cudagraphs=cudagraphs))


def naive(*inputs):
    return reference.sublayer(*inputs, lambda u: u, ITERS)


# --- 1. correctness ------------------------------------------------------------------------------


def check(tokens: int, n: int, channels: int, seed: int) -> dict[str, float]:
    """Relative errors of every output and gradient of the sublayer through our kernels."""
    inputs = make_inputs(tokens, n, channels, seed)
    with poisoned_allocations():
        parts = sublayer_parts(ops, *inputs)
        for part in parts.values():
            part.retain_grad()
        # Seeded like the inputs: the gate parameters' gradients are sums over every token of
        # terms the bf16 mixed output and its gradient round, so their error varies with grad_out
        # (1e-3 to 1e-2 between runs); a check must give the same verdict twice. In the output's
        # dtype, so that the reference gets the values autograd hands our kernels.
        grad_out = torch.randn(parts["out"].shape, dtype=parts["out"].dtype, device=DEVICE,
                               generator=torch.Generator(device=DEVICE).manual_seed(1000 + seed))
        parts["out"].backward(grad_out)
    torch.cuda.synchronize()
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    ref_parts = sublayer_parts(reference, *ref_inputs)
    for part in ref_parts.values():
        part.retain_grad()
    ref_parts["out"].backward(grad_out.double())
    input_names = ["streams", "phi", "alpha", "b_pre", "b_post", "b_res"]
    errors = {name: relative_error(parts[name], ref_parts[name]) for name in parts}
    # h_pre is read inside our coefficients_pre_mix only (the reference's pre-mix reads it outside,
    # so only there has it a gradient of its own): compared as a value, not as a gradient.
    errors |= {
        f"grad_{k}": relative_error(parts[k].grad, ref_parts[k].grad)
        for k in parts if k not in ("out", "h_pre")
    }
    errors |= {
        f"grad_{name}": relative_error(t.grad, r.grad)
        for name, t, r in zip(input_names, inputs, ref_inputs)
    }
    return errors


# --- 2. timing -----------------------------------------------------------------------------------


def floor_bytes(tokens: int, n: int, channels: int) -> int:
    """Forward floor: (3n+2)C stream elements per token (spec.forward_floor_elements: coefficients
    with the pre-mix read x once and write u; post/res reads x and y and writes x_{l+1}). Our
    kernels read x twice (projection, then pre-mix, both from HBM at these sizes): nC more."""
    return spec.forward_floor_elements(n) * channels * tokens * STREAM_DTYPE.itemsize


def kernel_bytes(tokens: int, n: int, channels: int) -> dict[str, int]:
    """Stream bytes each call of time_kernels moves (coefficient-sized traffic left out)."""
    return {name: elements * channels * tokens * STREAM_DTYPE.itemsize
            for name, elements in kernel_elements(n).items()}


def kernel_elements(n: int) -> dict[str, int]:
    """Stream elements per token (times C) each call of time_kernels moves, from the ops' kernel
    passes in mhc_compile/spec.py. The coefficient-and-pre-mix backward runs without the fold
    (passes/fuse_grad_streams.py) unless "+acc": then its grad-streams pass also reads post/res's dx."""
    passes = {kernel.name: kernel.elements(n) for op in spec.OPS for kernel in op.kernel_passes}
    folded = spec.COEFFICIENTS_PRE_MIX_BACKWARD.stream_elements(n)
    unfolded = folded - n  # less the read of the other reader's dx
    return {
        "projection": passes["coefficients_fwd"],  # read x, inside the coefficients' forward
        "coefficients_fwd": passes["coefficients_fwd"],
        "pre_mix_fwd": passes["pre_mix_fwd"],
        "coefficients_pre_mix_fwd": spec.COEFFICIENTS_PRE_MIX.stream_elements(n),
        "post_res_mix_fwd": passes["post_res_mix_fwd"],
        "post_res_mix_bwd": passes["post_res_mix_bwd"],
        "pre_mix_grad_h_pre": passes["pre_mix_grad_h_pre"],
        "coefficients_bwd": passes["coefficients_bwd"],  # timed with accumulate
        "coefficients_pre_mix_bwd": unfolded,
        "coefficients_pre_mix_bwd+acc": folded,
        "grad_accumulate_add": spec.GRAD_STREAMS_ADD.elements(n),
    }


def bench(fn, grad_to_none=None) -> float:
    return do_bench(fn, warmup=25, rep=200, grad_to_none=grad_to_none, return_mode="median")


def bench_graph(fn, grad_to_none=None) -> float:
    """Median ms of `fn` replayed as a CUDA graph; NaN (with the reason printed) if it cannot be
    captured, since this figure only explains the others."""
    try:
        return do_bench_cudagraph(fn, rep=50, grad_to_none=grad_to_none, return_mode="median")
    except RuntimeError as error:
        log(f"  (no CUDA-graph timing: {str(error).splitlines()[0]})")
        return float("nan")


def time_sublayer(sublayer, inputs, grad_out, leaves, timed: bool = True) -> dict[str, float]:
    """Median ms of the forward (no autograd) and of forward + backward of `sublayer(*inputs)`
    (with timed=False only the first calls: compiling and autotuning)."""

    def forward():
        with torch.no_grad():
            sublayer(*inputs)

    def forward_backward():
        sublayer(*inputs).backward(grad_out)

    started = time.perf_counter()
    forward(), forward_backward()  # compile and autotune outside the timing
    torch.cuda.synchronize()
    if not timed:
        return {"fwd_ms": float("nan"), "fwd_bwd_ms": float("nan"),
                "first_call_s": time.perf_counter() - started}
    times = {"fwd_ms": bench(forward), "fwd_bwd_ms": bench(forward_backward, grad_to_none=leaves)}
    times["first_call_s"] = time.perf_counter() - started
    return times


def time_graphed(name: str, sublayer, inputs, grad_out) -> dict[str, float]:
    """`sublayer` replayed as one CUDA graph (captured by triton's do_bench_cudagraph after a call
    outside the capture): its kernels' GPU time without host cost or input copies."""
    graphed = {
        "fwd_ms": bench_graph(lambda: sublayer(*[t.detach() for t in inputs])),
        "fwd_bwd_ms": bench_graph(lambda: sublayer(*inputs).backward(grad_out), grad_to_none=inputs),
    }
    log(f"  {name:21s} fwd {graphed['fwd_ms']:7.3f} ms   fwd+bwd {graphed['fwd_bwd_ms']:7.3f} ms")
    return graphed


def whole_ops_graphed(inputs) -> tuple:
    """The ours+whole-ops+graphs provider on its own static copy of `inputs`: its own leaves
    also keep the shared ones' AccumulateGrad nodes off the cudagraph trees' stream."""
    static_inputs = [t.detach().clone().requires_grad_() for t in inputs]
    for tensor in static_inputs:
        private_apis.mark_static_address(tensor)
    compiled = torch.compile(ours, backend=functools.partial(whole_ops_inductor, cudagraphs=True))

    def replay(*_):
        # Each call is a new step whose backward writes fresh gradients: accumulating into the last
        # step's, which live in the trees' pool, raised "accessing tensor output of CUDAGraphs that
        # has been overwritten" (kernel runs 7 and 8: do_bench's first calls keep the gradients).
        torch.compiler.cudagraph_mark_step_begin()
        for tensor in static_inputs:
            tensor.grad = None
        return compiled(*static_inputs)

    return replay, static_inputs


def time_providers(
    inputs, channels: int, n: int, skip: set[str], timed: bool = True
) -> dict[str, dict[str, float]]:
    """Forward and forward+backward median ms of every provider on the same inputs; "ours" also
    replayed as a CUDA graph (no host overhead: what torch.compile(mode="reduce-overhead") gets).
    With timed=False every provider only runs once (compiles, autotunes)."""
    grad_out = torch.randn_like(inputs[0])
    torch.compiler.reset()
    sublayers = {
        "ours": (ours, inputs),
        "ours+inductor": (torch.compile(ours), inputs),
        "ours+whole-ops": (torch.compile(ours, backend=whole_ops_inductor), inputs),
        "naive": (naive, inputs),
        "naive+inductor": (torch.compile(naive), inputs),
    }
    if "ours+whole-ops+graphs" not in skip:
        sublayers["ours+whole-ops+graphs"] = whole_ops_graphed(inputs)
    if "liger" not in skip:
        from liger_kernel.transformers.mhc import LigerMHC

        liger = LigerMHC(torch.nn.Identity(), hc=n, c=channels, tmax=ITERS, phi_dtype=torch.bfloat16)
        liger = liger.to(DEVICE)
        sublayers["liger"] = (lambda streams, *_: liger(streams), inputs + list(liger.parameters()))
    # Captured first: after the cudagraph-trees provider a capture of the shared leaves failed.
    results = {}
    if timed:
        results["ours (CUDA graph)"] = time_graphed("ours (CUDA graph)", ours, inputs, grad_out)
    for name, (sublayer, leaves) in sublayers.items():
        if name in skip:
            continue
        try:
            results[name] = time_sublayer(sublayer, inputs, grad_out, leaves, timed)
            if name == "ours+whole-ops" and timed:  # compiled and warm now
                results[WHOLE_OPS_GRAPHED] = time_graphed(WHOLE_OPS_GRAPHED, sublayer, inputs, grad_out)
        except Exception as error:  # one provider failing must not lose the others' numbers
            log(f"  {name:21s} FAILED: {type(error).__name__}: {str(error).splitlines()[0][:300]}")
            results[name] = {"fwd_ms": float("nan"), "fwd_bwd_ms": float("nan"), "error": repr(error)}
            continue
        log(f"  {name:21s} fwd {results[name]['fwd_ms']:7.3f} ms   fwd+bwd "
            f"{results[name]['fwd_bwd_ms']:7.3f} ms   (first call {results[name]['first_call_s']:.1f} s)")
    return results


def profile_host(inputs, channels: int, out: Path, repeats: int = 50) -> None:
    """Where the host time of a sublayer's forward + backward goes (bench/RESULTS.md, kernel run 6:
    about 3 ms per call on the H100's host, 1 ms of GPU work at C=1024): cProfile over `repeats`
    calls of "ours" and "ours+whole-ops", the GPU not waited for, functions by their own time and
    by their cumulative time."""
    grad_out = torch.randn_like(inputs[0])
    torch.compiler.reset()
    whole_ops = torch.compile(ours, backend=whole_ops_inductor)
    reports = [_host_profile(name, sublayer, inputs, grad_out, repeats)
               for name, sublayer in (("ours", ours), ("ours+whole-ops", whole_ops))]
    (out / f"host_profile_C{channels}.txt").write_text("\n".join(reports))


def _host_profile(name: str, sublayer, inputs, grad_out, repeats: int) -> str:
    def forward_backward():
        for _ in range(repeats):
            sublayer(*inputs).backward(grad_out)

    sublayer(*inputs).backward(grad_out)  # compile and autotune outside the profile
    torch.cuda.synchronize()
    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.runcall(forward_backward)
    host_ms = (time.perf_counter() - started) / repeats * 1e3
    torch.cuda.synchronize()
    title = f"== {name}, C={inputs[0].shape[-1]}: {host_ms:.3f} host ms per forward+backward (cProfile on)"
    log(title)
    return host_profile_text(profiler, title)


def time_kernels(inputs) -> dict[str, dict[str, float]]:
    """Median ms of each of our kernels alone (launchers called directly), eager and as a graph."""
    streams, phi, alpha, b_pre, b_post, b_res = parameters = [t.detach() for t in inputs]
    outputs = coefficients_pre_mix.mhc_coefficients_pre_mix_fwd(*parameters, ITERS, "sinkhorn")
    h_pre, h_post, h_res, mixed, proj, sum_squares = outputs
    grad_streams = torch.randn_like(streams)
    grad_outputs = [torch.randn_like(t) for t in outputs[:4]]
    calls = {
        "projection": lambda: coefficients._projection(streams, phi),
        "coefficients_fwd": lambda: coefficients.mhc_coefficients_fwd(*parameters, ITERS, "sinkhorn"),
        "pre_mix_fwd": lambda: pre_mix.mhc_pre_mix_fwd(streams, h_pre),
        "coefficients_pre_mix_fwd": lambda: coefficients_pre_mix.mhc_coefficients_pre_mix_fwd(
            *parameters, ITERS, "sinkhorn"),
        "post_res_mix_fwd": lambda: post_res_mix.mhc_post_res_mix_fwd(streams, mixed, h_post, h_res),
        "post_res_mix_bwd": lambda: post_res_mix.mhc_post_res_mix_bwd(
            grad_streams, streams, mixed, h_post, h_res),
        "pre_mix_grad_h_pre": lambda: pre_mix.mhc_pre_mix_grad_h_pre(mixed, streams),
        "coefficients_bwd": lambda: coefficients.mhc_coefficients_bwd(
            *grad_outputs[:3], proj, sum_squares, *parameters, ITERS, "sinkhorn", mixed, h_pre,
            grad_streams),
        "coefficients_pre_mix_bwd": lambda: coefficients_pre_mix.mhc_coefficients_pre_mix_bwd(
            *grad_outputs, h_pre, proj, sum_squares, *parameters, ITERS, "sinkhorn"),
        "coefficients_pre_mix_bwd+acc": lambda: (
            coefficients_pre_mix.mhc_coefficients_pre_mix_bwd(
                *grad_outputs, h_pre, proj, sum_squares, *parameters, ITERS, "sinkhorn",
                grad_streams)),
        "grad_accumulate_add": lambda: streams + grad_streams,
    }
    return {name: {"ms": bench(call), **split_host_and_gpu(call)} for name, call in calls.items()}


def split_host_and_gpu(call) -> dict[str, float]:
    """Host ms per call (Python + launches, no waiting) and GPU ms per call (CUDA-graph replay):
    when host_ms exceeds gpu_ms, eager timings measure the host, not the kernels."""
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(20):
        call()
    host_ms = (time.perf_counter() - started) / 20 * 1e3
    torch.cuda.synchronize()
    return {"host_ms": host_ms, "gpu_ms": bench_graph(call)}


# --- 3. report -----------------------------------------------------------------------------------


def percent_of_copy(nbytes: int, ms: float, copy_bw: float) -> float:
    """`nbytes` moved in `ms`, as % of the measured copy bandwidth."""
    return 100 * nbytes / (ms * 1e-3) / copy_bw


def summarize(row: dict, copy_bw: float) -> None:
    """Print one shape: per provider ms, GB/s and % of copy bandwidth on the floor, speedups."""
    floor = row["floor_bytes"]
    providers = row["providers"]
    mine = providers["ours"]
    log(f"\nC={row['C']}  floor {floor / 1e6:.0f} MB = {floor / copy_bw * 1e3:.3f} ms at copy bandwidth")
    log(f"  {'provider':21s} {'fwd ms':>8s} {'GB/s':>7s} {'%copy':>6s} {'fwd+bwd ms':>11s} "
        f"{'ours x fwd':>10s} {'ours x f+b':>10s}")
    for name, times in providers.items():
        gbps = floor / (times["fwd_ms"] * 1e-3) / 1e9
        log(f"  {name:21s} {times['fwd_ms']:8.3f} {gbps:7.0f} "
            f"{percent_of_copy(floor, times['fwd_ms'], copy_bw):5.1f}% "
            f"{times['fwd_bwd_ms']:11.3f} {times['fwd_ms'] / mine['fwd_ms']:10.2f} "
            f"{times['fwd_bwd_ms'] / mine['fwd_bwd_ms']:10.2f}")
    log(f"  {'our kernels alone':28s} {'ms':>7s} {'%copy':>6s} {'host ms':>8s} {'GPU ms':>7s} "
        f"{'GPU %copy':>9s}")
    for name, v in row["kernels"].items():
        log(f"  {name:28s} {v['ms']:7.3f} {v['pct_copy']:5.0f}% {v['host_ms']:8.3f} {v['gpu_ms']:7.3f} "
            f"{v['gpu_pct_copy']:8.0f}%")
    log("  autotune: " + "; ".join(f"{k}: {v}" for k, v in row["configs"].items()))


def markdown_table(rows: list[dict], copy_bw: float) -> str:
    """The speed table of bench/RESULTS.md: per shape and provider, forward ms and % of copy
    bandwidth on the floor bytes, forward+backward ms, and how many times faster ours (eager,
    under Inductor, under Inductor with the ops whole, and the latter with CUDA graphs) is than
    each provider."""
    mine = ("ours", "ours+inductor", "ours+whole-ops", "ours+whole-ops+graphs", WHOLE_OPS_GRAPHED)
    lines = [
        "| C | provider | fwd ms | % copy | fwd+bwd ms | "
        + " | ".join(f"{name} faster, fwd / fwd+bwd" for name in mine) + " |",
        "|---|---|---|---|---|" + "---|" * len(mine),
    ]
    for row in rows:
        providers = row["providers"]
        for name, times in providers.items():
            pct = percent_of_copy(row["floor_bytes"], times["fwd_ms"], copy_bw)
            ratios = [
                " / ".join(f"{times[key] / providers[ours][key]:.2f}"
                           for key in ("fwd_ms", "fwd_bwd_ms")) if ours in providers else "-"
                for ours in mine
            ]
            lines.append(
                f"| {row['C']} | {name} | {times['fwd_ms']:.3f} | {pct:.0f}% | {times['fwd_bwd_ms']:.3f} "
                f"| {' | '.join(ratios)} |"
            )
    return "\n".join(lines)


def plot(rows: list[dict], copy_bw: float, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    figure, (bandwidth, total) = plt.subplots(1, 2, figsize=(12, 4.5))
    channels = [row["C"] for row in rows]
    for name in rows[0]["providers"]:
        fwd = [percent_of_copy(row["floor_bytes"], row["providers"][name]["fwd_ms"], copy_bw)
               for row in rows]
        bandwidth.plot(channels, fwd, marker="o", label=name)
        total.plot(channels, [row["providers"][name]["fwd_bwd_ms"] for row in rows], marker="o", label=name)
    bandwidth.axhline(80, linestyle="--", color="grey", label="target 80%")
    bandwidth.set(xlabel="C", ylabel="% of copy bandwidth (floor bytes)",
                  title="forward: floor bytes / time")
    total.set(yscale="log", xlabel="C", ylabel="ms", title="forward + backward")
    for axis in (bandwidth, total):
        axis.set_xscale("log", base=2)
        axis.minorticks_off()
        axis.set_xticks(channels, [str(c) for c in channels])
        axis.legend(fontsize=8)
    figure.suptitle(rows[0]["title"])
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    log(f"wrote {path}")


# --- the run -------------------------------------------------------------------------------------


def check_shapes(tokens: int, n: int, channels_list: list[int]) -> tuple[list[int], dict]:
    """Step 1 at every shape, logged: (the C that failed, the autotune timings per C)."""
    failures, tuning = [], {}
    for seed, channels in enumerate(channels_list):
        errors = check(tokens, n, channels, seed)
        tuning[channels] = configs.config_timings()  # the check tuned this shape's kernels
        worst = max(errors, key=lambda k: errors[k] if errors[k] == errors[k] else float("inf"))
        passed = all(e <= TOLERANCE for e in errors.values())
        log(f"check C={channels}: {'ok' if passed else 'FAILED'}, worst {worst} {errors[worst]:.1e}; "
            + " ".join(f"{k}={v:.1e}" for k, v in errors.items()))
        failures += [] if passed else [channels]
        torch.cuda.empty_cache()
    return failures, tuning


def time_shape(inputs, n: int, channels: int, skip: set[str], copy_bw: float) -> dict:
    """Step 2 at one shape: the providers' times and each kernel's, with its bytes and % of copy
    bandwidth (eager and as a CUDA graph)."""
    tokens = inputs[0].shape[0]
    providers = time_providers(inputs, channels, n, skip)
    moved = kernel_bytes(tokens, n, channels)
    kernels = {
        name: {**times, "bytes": moved[name],
               "pct_copy": percent_of_copy(moved[name], times["ms"], copy_bw),
               "gpu_pct_copy": percent_of_copy(moved[name], times["gpu_ms"], copy_bw)}
        for name, times in time_kernels(inputs).items()
    }
    return {"C": channels, "floor_bytes": floor_bytes(tokens, n, channels),
            "providers": providers, "kernels": kernels, "configs": configs.chosen_configs()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--channels", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--check-only", action="store_true")
    parser.add_argument("--warm-only", action="store_true",
                        help="check, then run every provider once per shape (fill the caches), no timing")
    parser.add_argument("--skip", nargs="*", default=[], choices=PROVIDERS[1:])
    parser.add_argument("--host-profile", action="store_true",
                        help="check, then profile the host side of ours and ours+whole-ops per shape "
                             "(cProfile, host_profile_C*.txt), no timing")
    args = parser.parse_args()
    logging.basicConfig(format="%(name)s: %(message)s")
    logging.getLogger("mhc_compile.templates").setLevel(logging.INFO)  # autotuning progress
    out = out_dir()
    assert kernels_active(DEVICE), "the mhc:: ops do not run the Triton kernels on this machine"

    skip = set(args.skip)
    if importlib.util.find_spec("liger_kernel") is None:
        log("liger-kernel is not installed: no liger column")
        skip.add("liger")
    device = torch.cuda.get_device_name()
    header = {
        "device": device, **versions(),
        "tokens": args.tokens, "n": args.n, "dtype": "bf16", "sinkhorn_iters": ITERS,
        "title": f"mHC sublayer, {device}, n={args.n}, tokens={args.tokens}, bf16",
    }
    log(f"{header['title']}; torch {header['torch']}, triton {header['triton']}")

    failures, tuning = check_shapes(args.tokens, args.n, args.channels)
    if failures or args.check_only:
        return 1 if failures else 0
    if args.host_profile:
        for seed, channels in enumerate(args.channels):
            profile_host(make_inputs(args.tokens, args.n, channels, 100 + seed), channels, out)
        return 0
    if args.warm_only:
        for seed, channels in enumerate(args.channels):
            log(f"\nwarming C={channels}")
            time_providers(make_inputs(args.tokens, args.n, channels, 100 + seed), channels, args.n,
                           skip, timed=False)
            torch.cuda.empty_cache()
        return 0

    copy_bw = copy_bandwidth(DEVICE)
    log(f"copy bandwidth {copy_bw / 1e12:.2f} TB/s (2 GiB device-to-device, read + write)")
    rows = []
    for seed, channels in enumerate(args.channels):
        log(f"\ntiming C={channels}")
        inputs = make_inputs(args.tokens, args.n, channels, 100 + seed)
        rows.append({**header, **time_shape(inputs, args.n, channels, skip, copy_bw),
                     "config_timings": tuning[channels]})
        summarize(rows[-1], copy_bw)
        write_json(out / "kernels.json", {"copy_bw": copy_bw, "rows": rows})
        del inputs
        torch.cuda.empty_cache()
    log("")
    write_table(out / "kernels.md", markdown_table(rows, copy_bw))
    plot(rows, copy_bw, out / "kernels.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
