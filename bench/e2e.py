"""End to end: what mHC costs per training step, in memory and in compile time (issue 4).

    python3 bench/e2e.py --out DIR          # GPU: C=1024 (12 layers, 8 x 1024 tokens) and
                                            # C=2048 (16 layers, 4 x 2048 tokens)
    python3 bench/e2e.py --sizes C512 C4096 --out DIR   # also: C=512 (12 layers, 8 x 1024
                                            # tokens: host overhead weighs most) and C=4096
                                            # (12 layers, 4 x 2048 tokens: what one 80 GB GPU holds)
    python3 bench/e2e.py --tiny --out DIR   # CPU smoke run of the same code on a tiny model
    python3 bench/e2e.py --merge A.json B.json --out DIR   # one table and plot from several runs

A LLaMA-style decoder (mhc_compile.examples.LLaMA: RMSNorm, rotary attention through causal SDPA,
SwiGLU) trains with bf16 autocast and fused AdamW, in these variants:

    baseline          the plain residual model, torch.compile with its defaults
    baseline_graphs   the plain model with mode="reduce-overhead" (Inductor's CUDA graphs): what the
                      CUDA graphs themselves cost in compile time and save in step time, apart from
                      mHC (the mhc_*_graphs variants' overheads are still against baseline)
    mhc               the same unmodified model, torch.compile(backend="mhc"), n=4, recompute "auto"
    naive_pieces      mHC written by hand in PyTorch with mhc_compile/reference.py's math, one module
                      per sublayer, each transformer layer compiled on its own (Module.compile)
    liger             the same hand wrapping with liger-kernel's LigerMHC around each sublayer
                      (hc=n, tmax=20, phi in bf16, bf16 streams: LigerMHC refuses fp32 ones), each
                      layer compiled on its own with fullgraph=True: what a user gets by wrapping
                      by hand without the backend. Dynamo traces LigerMHC's three autograd.Functions
                      (forward and backward) into the layer's graph, their Triton launches as
                      user-defined Triton kernels (triton_kernel_wrapper_mutation), without a graph
                      break: one graph with six autograd_function_apply per layer (it compiled
                      with fullgraph=True on an H100, torch 2.11, liger-kernel 0.8.5: RESULTS.md,
                      e2e run 16). Inductor launches liger's kernels as they are and fuses only
                      the ops around them. fullgraph turns a break (under another torch or
                      liger version) into an error row rather than a step that runs partly eager.
                      Needs CUDA and liger-kernel: left out, said in one log line, without either
    mhc_no_recompute  backend="mhc" with recompute=False (every block's streams kept)
    mhc_bf16          backend="mhc" with stream_dtype="bfloat16": the streams in bf16 (the
                      paper's storage; autocast leaves the residual, and so default streams, fp32)
    mhc_bf16_graphs   the same with cudagraphs=True (Inductor's CUDA graphs: no host launch cost)
    mhc_graphs        backend="mhc" with cudagraphs=True and the default (float32) streams: the two
                      options' effects apart
    naive_whole       the hand-written mHC compiled as one model (only with --naive-whole: the issue
                      measured it not finishing in 530 s)

Each variant runs in its own process with fresh Inductor and Triton cache directories (so the
first step's compile is cold) under a hard time limit; the JSON is rewritten after every variant,
so a run cut short still returns what it measured. Per variant: median step time, tokens/s, peak
memory (torch.cuda.max_memory_allocated from the first step on: weights, gradients, AdamW state,
activations), cold compile (prepare() plus the first step less a median step, with the seconds
of each compile phase in the JSON and the main ones printed, those of the first backward apart:
a graph's backward compiles there; `--cold-repeats N` compiles each
variant cold N times, taking turns at the end of the run, and reports the median), and warm compile
(the same in a new process on the Inductor and Triton caches the cold run filled, for baseline and
mhc when time is left; every variant also records a recompile after torch.compiler.reset() in its
own process, where even the in-memory caches are warm).

The bytes floor: the stream elements mHC must move per token per sublayer in a training step
(mhc_compile/spec.py's training_floor_elements: the forward's (3n+2)C, both backwards', and the
post/res mix the recompute policy runs again, where it is on: 50C at n=4, 41C without recompute);
at the measured copy bandwidth that is the least time mHC can add to a step. It is reported for
2-byte elements (the issue's count) and for the dtype the variant stores its streams in: the
residual's own by default (float32 here: autocast leaves the embedding output and so the residual
adds in float32), bf16 for the mhc_bf16 variants and liger.

Against the hand-wrapped liger model, what mHC adds to a step: each variant's step time less its
size's baseline (overhead ms) and, where the run has a liger row of that size, liger's overhead
over the variant's (vs liger, mHC share; the issue's target: at least 1.5x at every size).
"""

from __future__ import annotations

import argparse
import cProfile
import importlib.util
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from common import (copy_bandwidth, host_profile_text, log, out_dir, profile_steps, profile_text,
                    pyplot, synchronize, versions, write_json, write_table)
from mhc_compile import private_apis, spec
from mhc_compile.options import MHCOptions

N_STREAMS = 4
SINKHORN_ITERS = 20
VOCAB = 32000

SIZES = {
    "C512": dict(width=512, depth=12, heads=8, batch=8, seq=1024, vocab=VOCAB, steps=20),
    "C1024": dict(width=1024, depth=12, heads=8, batch=8, seq=1024, vocab=VOCAB, steps=15),
    "C2048": dict(width=2048, depth=16, heads=16, batch=4, seq=2048, vocab=VOCAB, steps=10),
    # Depth: what one 80 GB H100 (79 GiB usable) holds for the baseline and every backend="mhc"
    # variant. A layer has 4C^2 + 3C * 10928 (SwiGLU's hidden, 8C/3 rounded up to 16) = 201M
    # parameters, 3.2 GB at 16 B each (fp32 weights and grads, AdamW's two moments), and keeps
    # for backward 37 B per token and channel (C1024's and C2048's forward_kept_bytes agree,
    # bench/RESULTS.md) plus autocast's bf16 weight copies: 1.24 + 0.40 GB at 4 x 2048 tokens.
    # Embedding and LM head add 262M parameters (4.2 GB) and 0.5 GB of logits. 12 layers:
    # 4.7 + 12 * 4.9 = 63 GB (59 GiB) for the baseline, the sum overestimating C2048's measured
    # peak by 2%. Streams add, per token and channel of a layer (C2048's peaks): mhc_bf16 3.4 B,
    # mhc 10.4 B, liger's bf16 streams ~20 B (LigerMHC saves each sublayer's input streams and
    # its layer's output), mhc_no_recompute 36.8 B (every block's fp32 streams): 60, 63, 66 and
    # 73 GiB. A 13th layer would take mhc_no_recompute to 78 GiB. naive_pieces (+64 B: 83 GiB)
    # does not fit. Measured (e2e run 17, H100): baseline 51.9 GiB, mhc_bf16_graphs 53.3 GiB, so
    # the estimate is 14% high at this width.
    "C4096": dict(width=4096, depth=12, heads=32, batch=4, seq=2048, vocab=VOCAB, steps=8),
}
DEFAULT_SIZES = ["C1024", "C2048"]
TINY = {"tiny": dict(width=64, depth=2, heads=4, batch=2, seq=32, vocab=128, steps=3)}
ORDER = ["baseline", "baseline_graphs", "mhc", "naive_pieces", "liger", "mhc_no_recompute",
         "mhc_bf16", "mhc_bf16_graphs", "mhc_graphs"]
LIMIT_S = {"baseline": 150, "baseline_graphs": 150, "mhc": 200, "naive_pieces": 200, "liger": 200,
           "mhc_no_recompute": 170, "mhc_bf16": 170, "mhc_bf16_graphs": 170, "mhc_graphs": 170,
           "naive_whole": 300}
# backend="mhc" options of each mHC variant
MHC_VARIANTS = {
    "mhc": {},
    "mhc_no_recompute": {"recompute": False},
    "mhc_bf16": {"stream_dtype": "bfloat16"},
    "mhc_bf16_graphs": {"stream_dtype": "bfloat16", "cudagraphs": True},
    "mhc_graphs": {"cudagraphs": True},
}
WARMUP_STEPS = 3
# Warm compiles measured (in a new process) when time is left: the plain model (with and without
# CUDA graphs), the defaults and the options README recommends for speed.
WARM_VARIANTS = ("baseline", "baseline_graphs", "mhc", "mhc_bf16_graphs")
# The plain model's variants: no mHC, so no bytes floor; "baseline" is the reference of every row.
PLAIN_VARIANTS = ("baseline", "baseline_graphs")


# --- models ---------------------------------------------------------------------------------------


def build_llama(size: dict, device: torch.device, seed: int = 0):
    from mhc_compile.examples import LLaMA

    torch.manual_seed(seed)
    model = LLaMA(size["vocab"], size["seq"], size["width"], size["depth"], size["heads"])
    ids = torch.randint(0, size["vocab"], (size["batch"], size["seq"] + 1),
                        generator=torch.Generator().manual_seed(seed))
    return model.to(device), ids.to(device)


class NaiveMHCSublayer(nn.Module):
    """One hand-written mHC sublayer: x_{l+1} = H_res x_l + H_post^T f(H_pre x_l) with the
    coefficients of mhc_compile/reference.py, as a user would write it without the backend."""

    def __init__(self, f, width: int, position: int, device: torch.device):
        super().__init__()
        from mhc_compile.parameters import MHCBlockParameters

        self.f = f
        self.hc = MHCBlockParameters(N_STREAMS, width, position, MHCOptions(n=N_STREAMS),
                                     torch.float32, device)

    def forward(self, streams):
        from mhc_compile import reference

        p = self.hc
        h_pre, h_post, h_res = reference.coefficients(
            streams, p.phi, p.alpha, p.b_pre, p.b_post, p.b_res, SINKHORN_ITERS)
        y = self.f(reference.pre_mix(streams, h_pre))
        return reference.post_res_mix(streams, y, h_post, h_res)


def liger_sublayer(f, width: int, position: int, device: torch.device) -> nn.Module:
    """f wrapped in liger-kernel's LigerMHC, as its docs show, phi in bf16 (its tensor-core path).
    LigerMHC initialises its own coefficients (phi ~ 0.02 randn, zero biases, unit alphas) on f's
    device, the same at every position."""
    from liger_kernel.transformers.mhc import LigerMHC

    return LigerMHC(f, hc=N_STREAMS, c=width, tmax=SINKHORN_ITERS, phi_dtype=torch.bfloat16)


class _Attention(nn.Module):
    """A layer's attention sublayer called with its input alone, as LigerMHC calls its layer: it
    holds the model's rotary tables (the same tensors) and takes the rows of the input's
    positions."""

    def __init__(self, layer, cos: torch.Tensor, sin: torch.Tensor):
        super().__init__()
        self.norm, self.attention = layer.attention_norm, layer.attention
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x):
        seq = x.shape[1]
        return self.attention(self.norm(x), self.cos[:seq], self.sin[:seq])


class _FeedForward(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.norm, self.feed_forward = layer.ffn_norm, layer.feed_forward

    def forward(self, x):
        return self.feed_forward(self.norm(x))


class NaiveMHCLayer(nn.Module):
    """A LLaMA layer's two sublayers, each wrapped by `sublayer(f, width, position, device)` into an
    mHC sublayer over [B, S, n, C] streams."""

    def __init__(self, layer, base, index: int, device: torch.device, sublayer=NaiveMHCSublayer):
        super().__init__()
        width = base.tok_embeddings.embedding_dim
        self.attention = sublayer(_Attention(layer, base.cos, base.sin), width, 2 * index, device)
        self.feed_forward = sublayer(_FeedForward(layer), width, 2 * index + 1, device)

    def forward(self, streams):
        return self.feed_forward(self.attention(streams))


class NaiveMHCLLaMA(nn.Module):
    """The benchmark's LLaMA with its residuals replaced by mHC wrapped by hand around each
    sublayer (NaiveMHCSublayer, or liger_sublayer): streams replicated at the head, averaged at
    the tail (reference.expand_streams / reduce_streams), kept in `stream_dtype` (None: the
    embedding output's)."""

    def __init__(self, base, device: torch.device, sublayer=NaiveMHCSublayer,
                 stream_dtype: torch.dtype | None = None):
        super().__init__()
        self.base = base
        self.stream_dtype = stream_dtype
        self.layers = nn.ModuleList(
            NaiveMHCLayer(layer, base, i, device, sublayer) for i, layer in enumerate(base.layers))

    def forward(self, idx):
        from mhc_compile import reference

        base = self.base
        streams = reference.expand_streams(base.tok_embeddings(idx), N_STREAMS)
        if self.stream_dtype is not None:
            streams = streams.to(self.stream_dtype)
        for layer in self.layers:
            streams = layer(streams)
        return base.output(base.norm(reference.reduce_streams(streams)))


def hand_wrapped_llama(variant: str, base, device: torch.device) -> NaiveMHCLLaMA:
    if variant == "liger":
        # LigerMHC refuses fp32 streams (allow_fp32 would take it off its tensor-core path), and
        # under autocast the embedding output, so the residual, is fp32.
        return NaiveMHCLLaMA(base, device, liger_sublayer, stream_dtype=torch.bfloat16)
    return NaiveMHCLLaMA(base, device)


# --- one variant, in its own process --------------------------------------------------------------


def _compile_plain(variant: str, model: nn.Module):
    return torch.compile(model, mode="reduce-overhead" if variant == "baseline_graphs" else None)


def _mhc_options(variant: str) -> dict:
    return {"n": N_STREAMS, **MHC_VARIANTS[variant]}


def prepare_variant(variant: str, model: nn.Module, ids: torch.Tensor, device: torch.device):
    """(model to train, callable for the forward, seconds spent before the first step)."""
    start = time.perf_counter()
    if variant in PLAIN_VARIANTS:
        return model, _compile_plain(variant, model), time.perf_counter() - start
    if variant in MHC_VARIANTS:
        import mhc_compile

        options = _mhc_options(variant)
        mhc_compile.prepare(model, ids[:, :-1], options=options)
        backend = mhc_compile.backend(**options)
        compiled = torch.compile(model, backend=backend)
        compiled.mhc_report = backend.report  # read after the first step: what training rewrote
        return model, compiled, time.perf_counter() - start
    naive = hand_wrapped_llama(variant, model, device)
    if variant == "naive_whole":
        return naive, torch.compile(naive), time.perf_counter() - start
    compile_layers(variant, naive)
    return naive, naive, time.perf_counter() - start


def compile_layers(variant: str, naive: NaiveMHCLLaMA) -> None:
    """Every layer compiled on its own. One frame serves all layers (parameters are graph inputs),
    but keep Dynamo from giving up on recompiles across the instances."""
    private_apis.raise_recompile_limit(64)
    for layer in naive.layers:
        # liger's layers whole or an error: a graph break would run some of LigerMHC's kernels
        # eagerly between compiled pieces, another thing than the variant says it measures.
        layer.compile(fullgraph=variant == "liger")


def make_step(forward, optimizer, ids: torch.Tensor, device: torch.device,
              after_forward=lambda: None):
    """One training step; `after_forward()` runs between the forward and the backward (a first
    step compiles the forward graph in the one and the backward graph in the other)."""
    inputs, targets = ids[:, :-1], ids[:, 1:]

    def step() -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = forward(inputs)
        after_forward()
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def timed(step, device: torch.device) -> float:
    """Seconds for one step, the device drained before and after."""
    synchronize(device)
    start = time.perf_counter()
    loss = step()
    synchronize(device)
    seconds = time.perf_counter() - start
    if not torch.isfinite(loss):
        raise RuntimeError(f"the loss is not finite: {loss.item()}")
    return seconds


# Where a cold compile goes (Dynamo's compile timers; phases nest: lowering and codegen count in
# the compiler's; the backward graph compiles at the first backward, outside AOT autograd's
# forward-time phases).
SHOWN_COMPILE_PHASES = {
    "Dynamo": "bytecode_tracing", "AOT autograd + Inductor": "create_aot_dispatcher_function",
    "joint trace": "aot_trace_joint_graph",
    "post-grad passes": "_recursive_post_grad_passes",
    "of which mhc's": "pass.post_grad_passes.post_grad_custom_post_pass",
    "lowering": "GraphLowering.run", "codegen": "GraphLowering.codegen",
    "kernel compiles awaited": "async_compile.wait",
    "backward": "compile_fx.<locals>.bw_compiler",
}


def compile_phases() -> dict[str, float]:
    """Seconds per compile phase in this process so far, summed over calls."""
    return private_apis.compile_phase_seconds()


def logged_compile_phases(what: str, phases: dict[str, float] | None = None) -> dict[str, float]:
    """`phases` (default: compile_phases()), the main ones logged in one line."""
    phases = compile_phases() if phases is None else phases
    log(f"   {what}: " + ", ".join(f"{label} {phases.get(phase, 0.0):.1f} s"
                                   for label, phase in SHOWN_COMPILE_PHASES.items()))
    return phases


def phases_since(earlier: dict[str, float], later: dict[str, float]) -> dict[str, float]:
    """Seconds per compile phase spent between two compile_phases() readings."""
    return {phase: seconds - earlier.get(phase, 0.0) for phase, seconds in later.items()
            if seconds - earlier.get(phase, 0.0) > 0.0}


def run_variant(size_name: str, size: dict, variant: str, device: torch.device) -> dict:
    model, ids = build_llama(size, device)
    trained, forward, prepare_s = prepare_variant(variant, model, ids, device)
    optimizer = torch.optim.AdamW(trained.parameters(), lr=1e-4, fused=device.type == "cuda")
    step = make_step(forward, optimizer, ids, device)
    log(f"   prepared in {prepare_s:.1f} s")
    if device.type == "cuda":
        # From the first step on: CUDA-graph variants allocate their private pool while recording
        # and none during replays, so a peak over the timed steps alone would leave it out.
        torch.cuda.reset_peak_memory_stats()
    before_backward: dict[str, float] = {}
    first_s = timed(make_step(forward, optimizer, ids, device,
                              after_forward=lambda: before_backward.update(compile_phases())),
                    device)
    log(f"   first step in {first_s:.1f} s")
    phases = logged_compile_phases("compile")
    backward_phases = logged_compile_phases("of which in the backward",
                                            phases_since(before_backward, phases))
    report = getattr(forward, "mhc_report", None)
    if report is not None and not any(b.status == "rewritten" for b in report.blocks):
        raise RuntimeError(f"backend=mhc rewrote no block of the training graph: {report.summary()}")
    for _ in range(WARMUP_STEPS - 1):
        timed(step, device)
    steps = int(os.environ.get("MHC_BENCH_STEPS") or size["steps"])
    times = [timed(step, device) for _ in range(steps)]
    median = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None

    kept = forward_kept_bytes(forward, ids, device)
    profiled = profile_steps(step, device) if os.environ.get("MHC_BENCH_PROFILE") else None
    again_s = None
    if not os.environ.get("MHC_BENCH_NO_WARM"):
        torch.compiler.reset()  # recompile in this process: fresh Dynamo, every cache warm
        _, forward, again_prepare_s = _recompile(variant, trained, model, ids, device)
        again_s = again_prepare_s + timed(make_step(forward, optimizer, ids, device), device) - median
    tokens = size["batch"] * size["seq"]
    result = {
        "size": size_name, "variant": variant, **{k: v for k, v in size.items() if k != "steps"},
        "tokens_per_step": tokens, "steps_timed": len(times),
        "step_ms_median": 1e3 * median, "step_ms_all": [1e3 * t for t in times],
        "tokens_per_s": tokens / median,
        "peak_memory_bytes": peak,
        "cold_compile_s": prepare_s + first_s - median, "prepare_s": prepare_s,
        "first_step_s": first_s,
        "compile_phases_s": phases,
        "backward_compile_phases_s": backward_phases,
        "recompile_in_process_s": again_s,
        "parameters": sum(p.numel() for p in trained.parameters()),
        "forward_kept_bytes": kept,
        "stream_dtype": _stream_dtype(variant, trained, model, ids, device),
    }
    if profiled is not None:
        result["profile"] = profiled
    if variant.startswith("mhc"):
        result["mhc_blocks"] = len(model.mhc.blocks)
        result["blocks_rewritten_in_training"] = sum(
            b.status == "rewritten" for b in report.blocks)
    if variant == "baseline":
        del trained, forward, optimizer, model, step
        if device.type == "cuda":
            torch.cuda.empty_cache()
        result["copy_bandwidth"] = copy_bandwidth(device)
    return result


def forward_kept_bytes(forward, ids, device: torch.device) -> int | None:
    """Device memory one forward leaves allocated for backward (activations and the logits):
    explains the peak-memory differences between variants. None on CPU (no allocator stats)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        output = forward(ids[:, :-1])
    torch.cuda.synchronize()
    kept = torch.cuda.memory_allocated() - before
    del output
    return kept


def run_warm(size: dict, variant: str, device: torch.device) -> dict:
    """A new process on the caches a cold run filled: what restarting a training job costs."""
    model, ids = build_llama(size, device)
    trained, forward, prepare_s = prepare_variant(variant, model, ids, device)
    optimizer = torch.optim.AdamW(trained.parameters(), lr=1e-4, fused=device.type == "cuda")
    step = make_step(forward, optimizer, ids, device)
    if not os.environ.get("MHC_BENCH_PROFILE"):
        first_s = timed(step, device)
        phases = logged_compile_phases("warm compile")  # on a cache hit: what is left of them
        median = statistics.median(timed(step, device) for _ in range(3))
        return {"warm_compile_s": prepare_s + first_s - median, "warm_prepare_s": prepare_s,
                "warm_compile_phases_s": phases}
    # Where the first step's host time goes. cProfile slows Python, and the variants unequally,
    # so such a run gives no warm compile figure.
    profiler = cProfile.Profile()
    first_s = profiler.runcall(timed, step, device)
    return {"warm_prepare_s": prepare_s, "warm_first_step_profiled_s": first_s,
            "warm_first_step_profile": host_profile_text(
                profiler, f"== warm first step, {first_s:.2f} s under cProfile")}


def _recompile(variant, trained, model, ids, device):
    start = time.perf_counter()
    if variant in PLAIN_VARIANTS:
        return trained, _compile_plain(variant, trained), time.perf_counter() - start
    if variant in MHC_VARIANTS:
        return trained, torch.compile(model, backend="mhc", options=_mhc_options(variant)), \
            time.perf_counter() - start
    if variant == "naive_whole":
        return trained, torch.compile(trained), time.perf_counter() - start
    compile_layers(variant, trained)
    return trained, trained, time.perf_counter() - start


def _stream_dtype(variant: str, trained: nn.Module, model, ids, device) -> str:
    """The dtype a variant stores its streams in: its own where it sets one, else the residual's
    under autocast (the embedding output's)."""
    dtype = (MHC_VARIANTS.get(variant, {}).get("stream_dtype")
             or getattr(trained, "stream_dtype", None))
    if dtype is None:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            dtype = model.tok_embeddings(ids[:1, :2]).dtype
    return str(dtype).removeprefix("torch.")


def worker(args) -> int:
    size = {**SIZES, **TINY}[args.size]
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    logging.basicConfig(format="   %(relativeCreated)8.0f ms %(name)s: %(message)s")
    logging.getLogger("mhc_compile.templates").setLevel(logging.INFO)  # autotuning progress
    try:
        if args.warm:
            result = run_warm(size, args.variant, device)
        else:
            result = run_variant(args.size, size, args.variant, device)
    except Exception as error:  # reported as the variant's result, the other variants go on
        result = {"size": args.size, "variant": args.variant,
                  "error": f"{type(error).__name__}: {error}",
                  "traceback": traceback.format_exc()[-4000:]}
        log(result["traceback"])
    Path(args.result).write_text(json.dumps(result))
    return 0


# --- the driver -------------------------------------------------------------------------------------


def launch(size_name: str, variant: str, limit_s: float, tiny: bool,
           caches: str | None = None, extra_env: dict | None = None) -> dict:
    """Run one variant in a new process; cold on fresh cache folders, warm on `caches`."""
    warm = caches is not None
    caches = caches or tempfile.mkdtemp(prefix=f"e2e-{size_name}-{variant}-")
    result_path = Path(caches) / ("warm.json" if warm else "result.json")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": f"{caches}/inductor",
           "TRITON_CACHE_DIR": f"{caches}/triton", "PYTHONUNBUFFERED": "1", **(extra_env or {})}
    command = [sys.executable, __file__, "--worker", "--size", size_name, "--variant", variant,
               "--result", str(result_path)] + (["--cpu"] if tiny else []) + \
        (["--warm"] if warm else [])
    start = time.perf_counter()
    try:
        subprocess.run(command, env=env, timeout=limit_s, check=False)
    except subprocess.TimeoutExpired:
        return {"size": size_name, "variant": variant, "timed_out": True, "limit_s": limit_s,
                "error": f"did not finish in {limit_s:.0f} s (compile and steps)"}
    if not result_path.exists():
        return {"size": size_name, "variant": variant, "error": "the worker process died"}
    result = json.loads(result_path.read_text())
    result["wall_s"] = time.perf_counter() - start
    result["caches"] = caches
    return result


def summarize(rows: list[dict]) -> list[dict]:
    """Overheads against the baseline of the same size, against the liger variant's
    (mhc_share_vs_liger), and the bytes floor."""
    bandwidth = next((r["copy_bandwidth"] for r in rows if r.get("copy_bandwidth")), None)
    summary = []
    for row in rows:
        if "error" in row:
            summary.append({**row})
            continue
        base = next((r for r in rows if r["size"] == row["size"] and r["variant"] == "baseline"
                     and "error" not in r), None)
        entry = dict(row)
        sublayers = 2 * row["depth"]
        elements = (floor_elements_per_token(row["variant"]) * row["width"] * row["tokens_per_step"]
                    * sublayers)
        stream_bytes = getattr(torch, row["stream_dtype"]).itemsize
        if base is not None:
            entry["step_overhead"] = row["step_ms_median"] / base["step_ms_median"] - 1
            if row["variant"] != "baseline":
                entry["step_overhead_ms"] = row["step_ms_median"] - base["step_ms_median"]
            if row["peak_memory_bytes"] and base["peak_memory_bytes"]:
                entry["memory_overhead"] = row["peak_memory_bytes"] / base["peak_memory_bytes"] - 1
            entry["cold_compile_ratio"] = row["cold_compile_s"] / max(base["cold_compile_s"], 1e-9)
            if "warm_compile_s" in row and "warm_compile_s" in base:
                entry["warm_compile_ratio"] = row["warm_compile_s"] / max(base["warm_compile_s"], 1e-9)
            if bandwidth and row["variant"] not in PLAIN_VARIANTS:
                for label, nbytes in (("floor_2byte", 2), ("floor_stream_dtype", stream_bytes)):
                    floor_ms = 1e3 * elements * nbytes / bandwidth
                    entry[f"{label}_ms"] = floor_ms
                    entry[f"{label}_overhead"] = floor_ms / base["step_ms_median"]
        summary.append(entry)
    _add_share_vs_liger(summary)
    return summary


def _add_share_vs_liger(summary: list[dict]) -> None:
    """mhc_share_vs_liger: how many times the liger variant's overhead over the baseline is the
    variant's, both of one size in one run: how much faster a variant does mHC's share of the step
    than LigerMHC wrapped by hand. Left out where either overhead is not positive (no share to
    compare: the difference is noise)."""
    for entry in summary:
        liger = next((e for e in summary if e["size"] == entry["size"] and e["variant"] == "liger"
                      and e.get("step_overhead_ms", 0) > 0), None)
        if liger is not None and entry is not liger and entry.get("step_overhead_ms", 0) > 0:
            entry["mhc_share_vs_liger"] = liger["step_overhead_ms"] / entry["step_overhead_ms"]


def floor_elements_per_token(variant: str) -> int:
    """Stream elements (times C) one sublayer's training step must move per token: with the post/res
    mix recomputed where backend="mhc" runs its recompute policy (a group size of 1 rebuilds
    nothing)."""
    options = MHCOptions.from_kwargs(MHC_VARIANTS.get(variant, {"recompute": False}))
    return spec.training_floor_elements(N_STREAMS, recompute=options.recompute not in (False, 1))


TABLE_COLUMNS = ("size", "variant", "step ms", "overhead", "overhead ms", "vs liger, mHC share",
                 "floor (2 B / stream dtype)", "tokens/s", "peak GiB", "memory", "fwd kept GiB",
                 "cold compile s", "warm compile s")


def table(summary: list[dict]) -> str:
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    for r in summary:
        if "error" in r:
            lines.append(f"| {r['size']} | {r['variant']} | {r['error']} |"
                         + " |" * (len(TABLE_COLUMNS) - 3))
            continue

        def pct(key):
            return f"{100 * r[key]:+.1f}%" if key in r else "-"

        floor = (f"{100 * r['floor_2byte_overhead']:.1f}% / {100 * r['floor_stream_dtype_overhead']:.1f}%"
                 if "floor_2byte_overhead" in r else "-")
        peak = f"{r['peak_memory_bytes'] / 2**30:.2f}" if r["peak_memory_bytes"] else "-"
        kept = f"{r['forward_kept_bytes'] / 2**30:.2f}" if r.get("forward_kept_bytes") else "-"
        cold = f"{r['cold_compile_s']:.1f}" + (
            f" ({r['cold_compile_ratio']:.2f}x)" if r["variant"] != "baseline" and "cold_compile_ratio" in r else "") + (
            f", median of {', '.join(f'{s:.1f}' for s in r['cold_compile_s_all'])}"
            if len(r.get("cold_compile_s_all", [])) > 1 else "")
        warm = (f"{r['warm_compile_s']:.1f}" if "warm_compile_s" in r
                else f"- (same process: {r['recompile_in_process_s']:.1f})"
                if r.get("recompile_in_process_s") is not None else "-")
        overhead_ms = f"{r['step_overhead_ms']:+.1f}" if "step_overhead_ms" in r else "-"
        vs_liger = f"{r['mhc_share_vs_liger']:.2f}x" if "mhc_share_vs_liger" in r else "-"
        lines.append(
            f"| {r['size']} | {r['variant']} | {r['step_ms_median']:.1f} | {pct('step_overhead')} | "
            f"{overhead_ms} | {vs_liger} | {floor} | {r['tokens_per_s']:,.0f} | {peak} | "
            f"{pct('memory_overhead')} | {kept} | {cold} | {warm} |")
    return "\n".join(lines)


def plot(summary: list[dict], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    figure, (steps, memory) = plt.subplots(1, 2, figsize=(11, 4.2))
    for variant in dict.fromkeys(r["variant"] for r in summary):
        rows = [r for r in summary if r["variant"] == variant and "error" not in r]
        if not rows:
            continue
        widths = [r["width"] for r in rows]
        steps.plot(widths, [r["step_ms_median"] for r in rows], marker="o", label=variant)
        if all(r["peak_memory_bytes"] for r in rows):
            memory.plot(widths, [r["peak_memory_bytes"] / 2**30 for r in rows], marker="o",
                        label=variant)
    steps.set(xlabel="C (model width)", ylabel="median step ms", title="training step")
    memory.set(xlabel="C (model width)", ylabel="peak GiB", title="peak memory")
    for axis in (steps, memory):
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def driver(args) -> int:
    out = out_dir(args.out)
    sizes = list(TINY) if args.tiny else args.sizes
    on_cuda = torch.cuda.is_available() and not args.tiny
    variants = runnable(args.variants, on_cuda) + (["naive_whole"] if args.naive_whole else [])
    deadline = time.perf_counter() + args.budget_s
    if args.no_warm:
        os.environ["MHC_BENCH_NO_WARM"] = "1"  # the workers skip their in-process recompile too
    if args.steps:
        os.environ["MHC_BENCH_STEPS"] = str(args.steps)
    if args.profile:
        os.environ["MHC_BENCH_PROFILE"] = "1"
    header = {
        **versions(), "n": N_STREAMS, "sinkhorn_iters": SINKHORN_ITERS,
        "device": torch.cuda.get_device_name() if on_cuda else platform.processor() or "cpu",
        "commit": _commit(),
    }
    log(f"e2e bench on {header['device']}, torch {header['torch']}, commit {header['commit']}")
    rows: list[dict] = []
    for kind, size_name, variant in _plan(sizes, variants, not args.no_warm, args.cold_repeats):
        left = deadline - time.perf_counter()
        limit = min(LIMIT_S[variant] * args.limit_scale, left - 5)
        if kind == "cold again":
            row = _measured_row(rows, size_name, variant)
            if row is not None and limit >= 30:
                log(f"\n== {size_name} {variant}: cold compile again (new process, fresh caches)")
                again = launch(size_name, variant, limit, args.tiny, extra_env=REPEAT_ENV)
                if "error" not in again:
                    _add_cold_compile(row, again["cold_compile_s"])
                    log(f"-> cold compile {again['cold_compile_s']:.1f} s; median of "
                        f"{len(row['cold_compile_s_all'])}: {row['cold_compile_s']:.1f} s")
        elif kind == "warm":
            row = _measured_row(rows, size_name, variant)
            if row is None:
                continue
            if limit < 30:
                row["warm_error"] = "not run: out of time"
                continue
            log(f"\n== {size_name} {variant}: warm compile (new process, filled caches)")
            warm = launch(size_name, variant, limit, args.tiny, caches=row["caches"])
            row.update({k: v for k, v in warm.items() if k.startswith("warm")}
                       if "error" not in warm else {"warm_error": warm["error"]})
            if "warm_first_step_profile" in row:
                log(row["warm_first_step_profile"])
            log("-> " + (row.get("warm_error") or (
                f"warm compile {row['warm_compile_s']:.1f} s" if "warm_compile_s" in row
                else "no warm compile figure (the first step ran under cProfile)")))
        elif limit < 30:
            rows.append({"size": size_name, "variant": variant, "error": "not run: out of time"})
        else:
            log(f"\n== {size_name} {variant} (limit {limit:.0f} s)")
            rows.append(launch(size_name, variant, limit, args.tiny))
            row = rows[-1]
            log("-> " + (row.get("error") or f"{row['step_ms_median']:.1f} ms/step, "
                                            f"cold compile {row['cold_compile_s']:.1f} s"))
            if row.get("profile"):
                log(profile_text(row["profile"]))
        write_json(out / "e2e.json", {**header, "rows": summarize(rows)})
    summary = summarize(rows)
    bandwidth = next((r["copy_bandwidth"] for r in rows if r.get("copy_bandwidth")), None)
    log("")
    if bandwidth:
        log(f"copy bandwidth {bandwidth / 1e12:.3f} TB/s (device-to-device, read + write)")
    write_table(out / "e2e.md", table(summary))
    plot(summary, out / "e2e.png")
    failed = [r for r in summary if "error" in r]
    return 1 if args.tiny and failed else 0


def runnable(variants: list[str], on_cuda: bool) -> list[str]:
    """The variants this machine can run: liger needs CUDA and liger-kernel (its kernels are
    Triton's, for GPUs); where either is missing it is left out, said in one log line."""
    if "liger" not in variants:
        return variants
    if not on_cuda:
        log("liger needs CUDA (LigerMHC's kernels are Triton's): no liger row")
    elif importlib.util.find_spec("liger_kernel") is None:
        log("liger-kernel is not installed: no liger row")
    else:
        return variants
    return [v for v in variants if v != "liger"]


def _measured_row(rows: list[dict], size_name: str, variant: str) -> dict | None:
    """The row of a variant's first cold run, if it measured (warm and repeated compiles join it)."""
    return next((r for r in rows if r["size"] == size_name and r["variant"] == variant
                 and "error" not in r), None)


def _plan(sizes: list[str], variants: list[str], warm: bool,
          cold_repeats: int = 1) -> list[tuple[str, str, str]]:
    """(cold | warm | cold again, size, variant) in the order the targets need them: baseline and
    mhc of every size, their warm compiles, then the other variants and theirs (WARM_VARIANTS), so
    a run cut short answers the targets; last, the repeated cold compiles, baseline and mhc
    variants taking turns so that a drift of the machine reaches both."""
    first = [v for v in ("baseline", "mhc") if v in variants]
    others = [v for v in variants if v not in first]
    plan = [("cold", size, v) for size in sizes for v in first]
    plan += [("warm", size, v) for size in sizes for v in first if v in WARM_VARIANTS and warm]
    plan += [("cold", size, v) for size in sizes for v in others]
    plan += [("warm", size, v) for size in sizes for v in others if v in WARM_VARIANTS and warm]
    plan += [("cold again", size, v) for _ in range(cold_repeats - 1) for size in sizes
             for v in variants if v != "naive_whole"]
    return plan


# A repeated cold compile needs only a median step to subtract: a few steps, no recompile or profile.
REPEAT_ENV = {"MHC_BENCH_STEPS": "3", "MHC_BENCH_NO_WARM": "1", "MHC_BENCH_PROFILE": ""}


def _add_cold_compile(row: dict, seconds: float) -> None:
    """One more cold compile of a variant: the row keeps all of them and reports their median
    (the baseline's alone varied by +-20% between machine starts: bench/RESULTS.md, run 8)."""
    row.setdefault("cold_compile_s_all", [row["cold_compile_s"]]).append(seconds)
    row["cold_compile_s"] = statistics.median(row["cold_compile_s_all"])


def _commit() -> str:
    if os.environ.get("MHC_BENCH_COMMIT"):  # a copy of the tree outside its git checkout
        return os.environ["MHC_BENCH_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=Path(__file__).parent, check=False).stdout.strip()
    except OSError:
        return "unknown"


def merge(paths: list[str], out: Path) -> int:
    """One table and one plot against C from the JSON of several runs (a device call holds one
    size: 10 minutes). Runs on different devices or commits are refused: their rows do not compare."""
    runs = [json.loads(Path(path).read_text()) for path in paths]
    for key in ("device", "commit", "torch"):
        if len({run.get(key) for run in runs}) > 1:
            raise SystemExit(f"e2e --merge: the runs differ in {key}: "
                             + ", ".join(f"{path}: {run.get(key)}" for path, run in zip(paths, runs)))
    rows = sorted((row for run in runs for row in run["rows"]),
                  key=lambda row: (row.get("width", 0), ORDER.index(row["variant"])
                                   if row["variant"] in ORDER else len(ORDER)))
    out.mkdir(parents=True, exist_ok=True)
    write_table(out / "e2e.md", table(rows))
    write_json(out / "e2e.json", {**runs[0], "rows": rows, "merged_from": paths})
    plot(rows, out / "e2e.png")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="output folder (default $OUT, else bench/out)")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run on a tiny model")
    parser.add_argument("--sizes", nargs="+", default=DEFAULT_SIZES, choices=list(SIZES),
                        help=f"default: {' '.join(DEFAULT_SIZES)}")
    parser.add_argument("--variants", nargs="+", default=ORDER, choices=ORDER)
    parser.add_argument("--naive-whole", action="store_true",
                        help="also compile the hand-written mHC as one model (slow)")
    parser.add_argument("--no-warm", action="store_true", help="skip the warm-compile runs")
    parser.add_argument("--steps", type=int, help="timed steps per variant (default per size)")
    parser.add_argument("--profile", action="store_true",
                        help="profile two steps per variant (GPU ms by kernel family) and, in place "
                             "of the warm compile figure, the warm first step (host time by "
                             "function; JSON, log)")
    parser.add_argument("--cold-repeats", type=int, default=1,
                        help="cold compiles per variant (fresh process and caches each); the "
                             "table reports their median")
    parser.add_argument("--budget-s", type=float, default=540, help="wall time for all variants")
    parser.add_argument("--limit-scale", type=float, default=1.0,
                        help="scale every variant's time limit")
    parser.add_argument("--merge", nargs="+", metavar="JSON",
                        help="no run: one table and plot from these runs' e2e.json files")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--cpu", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--warm", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.merge:
        return merge(args.merge, out_dir(args.out))
    return worker(args) if args.worker else driver(args)


if __name__ == "__main__":
    sys.exit(main())
