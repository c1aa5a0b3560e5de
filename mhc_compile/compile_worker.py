"""A process that compiles mHC kernels into Triton's on-disk cache: `python -m
mhc_compile.compile_worker` reads a pickled list of jobs from stdin (kernel_launch.compile_ahead
writes them), one (kernel module, kernel name, CUDA device index, arguments, keyword arguments) per
kernel config, with dtypes in place of tensors as JITFunction.warmup takes them.

A process, not a thread of the compiling one: most of a Triton compile holds the GIL (the Python
front end), so compiles on threads slowed Inductor's own work on the main thread by about as much
as they saved (bench/RESULTS.md, session 16). A plain module run with -m, not multiprocessing:
spawn and forkserver import the user's main script in every worker, which would run a training
script without a main guard again. The worker also loads each kernel once, which builds its host
launcher (a C compile) into Triton's cache, so the training process finds everything cached.
"""

from __future__ import annotations

import importlib
import pickle
import sys
import traceback

import torch


def compile_job(module: str, kernel_name: str, device_index: int, args: tuple, kwargs: dict) -> None:
    importlib.import_module(module)  # defines the kernel: configs.TUNED[kernel_name]
    from mhc_compile import private_apis
    from mhc_compile.templates import configs

    with torch.cuda.device(device_index):
        compiled = configs.TUNED[kernel_name].fn.warmup(*args, grid=(1,), **kwargs)
        private_apis.load_compiled_kernel(compiled)


def main() -> int:
    failed = 0
    for job in pickle.load(sys.stdin.buffer):
        try:
            compile_job(*job)
        except Exception:  # noqa: BLE001 (the training process compiles this config itself)
            failed += 1
            print(f"compiling {job[1]} failed:\n{traceback.format_exc()}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
