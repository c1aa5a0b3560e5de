"""Registers and spills of the mHC kernels under every autotune candidate, on any machine (no GPU):
Triton compiles each kernel for the chosen architecture down to PTX, and ptxas -v (shipped with
Triton) reports what a GPU would run.

    python3 bench/registers.py [--arch 90] [--n 4 8] [--channels 1024] [--dtype bfloat16] [--out DIR]

What it is for: templates/configs.py keeps, per n, only the candidates its register model says
will not spill (`_live_elements`, calibrated against ptxas -v). This shows, per kernel, n and config,
the registers, the spill bytes and whether the model keeps the config: a kept config that spills,
or a kernel change that starts to spill, shows here before any GPU time is spent on it.

The launches are recorded from the launchers themselves (kernel_launch.launch replaced by a recorder,
CPU tensors, nothing runs), so each kernel gets exactly the arguments a real call passes. Run it
without TRITON_INTERPRET: the interpreter replaces the kernels it must compile.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if os.environ.get("TRITON_INTERPRET"):
    sys.exit("bench/registers.py compiles the kernels: run it without TRITON_INTERPRET")

import torch  # noqa: E402
import triton  # noqa: E402

from common import log, write_json  # noqa: E402
from mhc_compile import kernel_launch, private_apis, spec, templates  # noqa: E402
from mhc_compile.templates import configs  # noqa: E402

SINKHORN_ITERS = 20


def recorded_launches(n: int, channels: int, dtype: torch.dtype, tokens: int = 64) -> list[tuple]:
    """(kernel name, args, kwargs) of every kernel launch of a sublayer's forward and backward
    (with and without the folded grad streams), as the launchers make them."""
    launches = []
    original = kernel_launch.launch
    kernel_launch.launch = lambda name, grid, *args, **kwargs: launches.append((name, args, kwargs))
    try:
        streams = torch.randn(tokens, n, channels).to(dtype)
        parameters = tuple(torch.randn(shape) for shape in spec.parameter_shapes(n, channels))
        h_pre, h_post, h_res, mixed, proj, sum_squares = templates.launcher("coefficients_pre_mix")(
            streams, *parameters, SINKHORN_ITERS, "sinkhorn")
        backward = templates.launcher("coefficients_pre_mix_backward")
        for accumulate in (None, torch.randn_like(streams)):
            backward(torch.randn_like(h_pre), torch.randn_like(h_post), torch.randn_like(h_res),
                     torch.randn_like(mixed), h_pre, proj, sum_squares, streams, *parameters,
                     SINKHORN_ITERS,
                     "sinkhorn", accumulate)
        y = torch.randn(tokens, channels).to(dtype)
        out = templates.launcher("post_res_mix")(streams, y, h_post, h_res)
        templates.launcher("post_res_mix_backward")(torch.randn_like(out), streams, y, h_post, h_res)
    finally:
        kernel_launch.launch = original
    return launches


def resource_usage(jit_function, values: dict, config: triton.Config, arch: int) -> dict:
    """Registers per thread and spill bytes of one compiled config, from ptxas -v."""
    ptx_text = private_apis.compile_to_ptx(jit_function, {**values, **config.kwargs},
                                           config.num_warps, config.num_stages, arch)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
        ptx.write(ptx_text)
        ptx.flush()
        report = subprocess.run(
            [private_apis.ptxas_path(arch), "-v", f"--gpu-name=sm_{arch}a", "-o", os.devnull,
             ptx.name], capture_output=True, text=True, check=True).stderr
    registers = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    return {"registers": int(registers.group(1)),
            "spill_store_bytes": int(spills.group(1)), "spill_load_bytes": int(spills.group(2))}


def kernel_rows(n: int, channels: int, dtype: torch.dtype, arch: int, only: set[str]) -> list[dict]:
    rows, seen = [], set()
    for name, args, kwargs in recorded_launches(n, channels, dtype):
        tuned = configs.TUNED[name]
        names = private_apis.kernel_argument_names(tuned.fn)
        values = {**dict(zip(names, args)), **kwargs}
        variant = tuple(sorted((k, v) for k, v in kwargs.items() if not isinstance(v, torch.Tensor)))
        if (only and name not in only) or (name, variant) in seen:
            continue
        seen.add((name, variant))
        kept = private_apis.autotune_candidates(tuned, dict(zip(names, args)), kwargs)
        constexprs = {argument: values[argument]
                      for argument in private_apis.triton_value_parameters(tuned.fn)
                      if argument in kwargs and argument != "n"}
        for config in tuned.configs:
            rows.append({
                "kernel": name, "n": n, "C": channels, "dtype": str(dtype).removeprefix("torch."),
                "constexprs": constexprs,
                "config": configs.describe(config), "kept_by_model": config in kept,
                **resource_usage(tuned.fn, values, config, arch),
            })
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for H100/H200")
    parser.add_argument("--n", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--channels", type=int, default=1024)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--kernels", nargs="*", default=[], help="kernel names (default: all)")
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    rows = [row for n in args.n
            for row in kernel_rows(n, args.channels, dtype, args.arch, set(args.kernels))]
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "registers.json", {"arch": args.arch, "rows": rows})
    log(f"sm_{args.arch}, C={args.channels}, {args.dtype} streams (ptxas -v)")
    log("| kernel | n | constexprs | config | kept by model | registers | spill stores B |")
    log("|---|---|---|---|---|---|---|")
    for row in rows:
        constexprs = " ".join(f"{k}={v}" for k, v in row["constexprs"].items())
        log(f"| {row['kernel']} | {row['n']} | {constexprs} | {row['config']} | "
              f"{'yes' if row['kept_by_model'] else 'no'} | {row['registers']} | "
              f"{row['spill_store_bytes']} |")
    spilling = [r for r in rows if r["kept_by_model"] and r["spill_store_bytes"]]
    log(f"\n{len(spilling)} kept configs spill" + "".join(
        f"\n  {r['kernel']} n={r['n']} {r['config']}: {r['spill_store_bytes']} B" for r in spilling))
    return 0


if __name__ == "__main__":
    sys.exit(main())
