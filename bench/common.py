"""What the benches share: logging, where results go and what they record, the copy bandwidth they
are measured against, a step's GPU time by kernel family (torch.profiler), and the numeric checks
(NaN-poisoned buffers, relative error) that tests/test_kernels.py uses as well.

A bench imports it as its neighbour (`import common`: a script's folder is on sys.path); the tests
put bench/ on sys.path first.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import pstats
import statistics
import time
from datetime import date
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator

import torch


def log(message: str) -> None:
    print(message, flush=True)


# --- results -------------------------------------------------------------------------------------


def out_dir(given: str | Path | None = None) -> Path:
    """Where a bench writes (created): `given`, else $OUT (the folder a device run brings back),
    else bench/out."""
    out = Path(given or os.environ.get("OUT") or Path(__file__).parent / "out")
    out.mkdir(parents=True, exist_ok=True)
    return out


def versions() -> dict[str, str | None]:
    """The date and the versions a result was measured with (Triton's None where it is absent)."""
    try:
        triton = metadata.version("triton")
    except metadata.PackageNotFoundError:
        triton = None
    return {"date": date.today().isoformat(), "torch": torch.__version__, "triton": triton,
            "python": platform.python_version()}


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1))


def write_table(path: Path, table: str) -> None:
    """Print a markdown table and write it to `path`."""
    log(table)
    path.write_text(table + "\n")


def pyplot():
    """matplotlib.pyplot drawing to files (Agg), or None, said in the log, without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        log("matplotlib is not installed: no plot")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# --- timing --------------------------------------------------------------------------------------


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (nothing to wait for on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def take_peak_gib(device: torch.device) -> float:
    """The peak of allocated GPU memory since the last call (or the process start), in GiB, and a
    fresh start for the next call; 0 off CUDA."""
    if device.type != "cuda":
        return 0.0
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.reset_peak_memory_stats(device)
    return peak


def copy_bandwidth(device: torch.device | str) -> float:
    """Bytes read + written per second by a device-to-device copy: of 2 GiB on CUDA, the median
    of triton.testing.do_bench; of 64 MiB on the CPU, the median of 20 timed copies."""
    device = torch.device(device)
    source = torch.randn(2**29 if device.type == "cuda" else 2**24, device=device)
    target = torch.empty_like(source)
    copy = lambda: target.copy_(source)  # noqa: E731
    if device.type == "cuda":
        from triton.testing import do_bench

        seconds = do_bench(copy, warmup=50, rep=300, return_mode="median") * 1e-3
    else:
        seconds = median_seconds(copy, device, repeats=20, warmup=3)
    return 2 * source.numel() * source.element_size() / seconds


def median_seconds(fn: Callable[[], object], device: torch.device | str, repeats: int,
                   warmup: int = 1) -> float:
    """Median wall time of fn() over `repeats` runs after `warmup` runs, the device drained
    before and after each."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


# --- numeric checks ------------------------------------------------------------------------------


@contextlib.contextmanager
def poisoned_allocations() -> Iterator[None]:
    """While active, float buffers from torch.empty and torch.empty_like start as NaN, so an element
    a kernel fails to write cannot pass as a plausible value."""
    saved = torch.empty, torch.empty_like
    torch.empty, torch.empty_like = (_nan_filled(allocate) for allocate in saved)
    try:
        yield
    finally:
        torch.empty, torch.empty_like = saved


def _nan_filled(allocate: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def allocate_nan(*args, **kwargs) -> torch.Tensor:
        tensor = allocate(*args, **kwargs)
        return tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor

    return allocate_nan


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||, in float64 on expected's device; NaN when `actual`
    holds a NaN. An `expected` that is exactly zero (n = 1: H_res is always 1) is measured against
    a floor of 1e-6 per element."""
    actual = actual.detach().to(expected.device, torch.float64)
    expected = expected.detach().double()
    if actual.isnan().any():
        return float("nan")
    scale = max(expected.norm().item(), 1e-6 * expected.numel() ** 0.5)
    return ((actual - expected).norm() / scale).item()


# Kernel families by name, first match wins: where the GPU time of a step goes.
KERNEL_FAMILIES = (
    ("mhc kernels", ("_mhc",)),
    ("matmul", ("gemm", "cutlass", "nvjet", "sm90_xmma", "cublas")),
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("inductor triton", ("triton_",)),
    ("optimizer", ("adam", "multi_tensor")),
)


def profile_steps(step, device: torch.device, steps: int = 2) -> dict | None:
    """GPU time per step by kernel family and the busiest kernels (torch.profiler): shows whether
    a step waits on the GPU or on the host (busy ms against the median step) and which kernels
    hold the time. None on CPU."""
    if device.type != "cuda":
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    kernels: dict[str, list[float]] = {}
    host: dict[str, list[float]] = {}  # CPU-side events: runtime calls and operators
    for event in profiler.events():
        by_name = kernels if event.device_type == DeviceType.CUDA else host
        by_name.setdefault(event.name, []).append(event.time_range.elapsed_us() / 1e3)
    families: dict[str, float] = {}
    for name, times in kernels.items():
        family = next((f for f, keys in KERNEL_FAMILIES
                       if any(k in name.lower() for k in keys)), "other")
        families[family] = families.get(family, 0.0) + sum(times) / steps
    busiest = sorted(kernels.items(), key=lambda item: -sum(item[1]))[:25]
    return {
        "gpu_busy_ms_per_step": sum(families.values()),
        "launches_per_step": sum(len(t) for t in kernels.values()) / steps,
        "families_ms_per_step": dict(sorted(families.items(), key=lambda item: -item[1])),
        "busiest": [{"name": name[:120], "ms_per_step": sum(t) / steps, "calls_per_step":
                     len(t) / steps} for name, t in busiest],
        # Why the GPU may wait on the host: allocator calls that synchronise and explicit syncs.
        "runtime_calls_per_step": {
            name: {"calls": len(t) / steps, "ms": sum(t) / steps} for name, t in host.items()
            if name.startswith(("cudaMalloc", "cudaFree", "cudaStreamSynchronize",
                                "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy"))
        },
        "host_ops_per_step": {name: len(t) / steps for name, t in sorted(
            host.items(), key=lambda item: -len(item[1]))[:15]},
    }


def profile_text(profiled: dict) -> str:
    families = ", ".join(f"{name} {ms:.2f}" for name, ms in profiled["families_ms_per_step"].items())
    lines = [f"   GPU busy {profiled['gpu_busy_ms_per_step']:.2f} ms/step, "
             f"{profiled['launches_per_step']:.0f} launches/step: {families}"]
    lines += [f"   {k['ms_per_step']:7.3f} ms {k['calls_per_step']:5.0f}x {k['name']}"
              for k in profiled["busiest"][:15]]
    lines.append("   runtime calls/step: " + ", ".join(
        f"{name} {c['calls']:.0f}x {c['ms']:.2f} ms"
        for name, c in profiled["runtime_calls_per_step"].items()))
    return "\n".join(lines)


def host_profile_text(profiler, title: str) -> str:
    """A cProfile run as text under `title`: functions by their own time, then by cumulative time."""
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("tottime").print_stats(30)
    stats.sort_stats("cumulative").print_stats(40)
    return f"{title}\n{text.getvalue()}"
