"""A process that compiles mHC kernels into Triton's on-disk cache: `python -m
mhc_compile.compile_worker` reads a pickled list of jobs from stdin (kernel_launch.compile_ahead
writes them), one (kernel module, kernel name, arguments, keyword arguments) per kernel config,
with dtypes in place of tensors as JITFunction.warmup takes them, for the one GPU it sees
(CUDA_VISIBLE_DEVICES).

A process, not a thread of the compiling one: most of a Triton compile holds the GIL (the Python
front end), so compiles on threads slowed Inductor's own work on the main thread by about as much
as they saved (bench/RESULTS.md, session 16). A plain module run with -m, not multiprocessing:
spawn and forkserver import the user's main script in every worker, which would run a training
script without a main guard again. The worker compiles each kernel and builds its host launcher
(under Triton 3.6 a C compile of its own, which lands in the disk cache too), but loads no module:
that would open a CUDA context, holding GPU memory on the training GPU while the worker lives; the
training process loads the modules itself (kernel_launch._compile_share).
"""

from __future__ import annotations

import importlib
import pickle
import sys
import traceback


def main() -> int:
    from mhc_compile import kernel_launch

    failed = 0
    for module, kernel_name, args, kwargs in pickle.load(sys.stdin.buffer):
        try:
            importlib.import_module(module)  # defines the kernel
            kernel_launch.compile_kernel(kernel_name, None, args, kwargs, load=False)
        except Exception:  # noqa: BLE001 (the autotuner skips a config that does not compile)
            failed += 1
            print(f"compiling {kernel_name} or building its host launcher failed:\n"
                  f"{traceback.format_exc()}", file=sys.stderr)
    return kernel_launch.CONFIGS_FAILED if failed else 0


if __name__ == "__main__":
    sys.exit(main())
