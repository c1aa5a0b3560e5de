"""A process that compiles mHC kernels into Triton's on-disk cache: `python -m
mhc_compile.compile_worker ANSWERS_FD IDLE_S` reads pickled lists of jobs from stdin
(kernel_launch.compile_ahead writes them), one (kernel module, kernel name, arguments, keyword
arguments) per kernel config, with dtypes in place of tensors as JITFunction.warmup takes them, for
the one GPU it sees (CUDA_VISIBLE_DEVICES). It answers each list on the pipe ANSWERS_FD with the
pickled list of the configs that failed (their tracebacks): not on stdout, where torch, Triton or a
kernel module may print from the first import on. It exits at the end of its input or after IDLE_S
seconds without a job.

A process, not a thread of the compiling one: most of a Triton compile holds the GIL (the Python
front end), so compiles on threads slowed Inductor's own work on the main thread by about as much
as they saved (bench/RESULTS.md, session 16). A plain module run with -m, not multiprocessing:
spawn and forkserver import the user's main script in every worker, which would run a training
script without a main guard again. A lasting one, started before its first jobs are known
(kernel_launch.start_compile_workers): importing torch, Triton and mhc_compile is most of what a
worker does for a graph (8-14 s of a one-shot worker's time on a host busy with Inductor's own
compile workers, bench/RESULTS.md runs 28-29), so it is done while the training process still
traces, and once for all the graphs. The worker compiles each kernel and builds its host launcher
(under Triton 3.6 a C compile of its own, which lands in the disk cache too), but loads no module:
that would open a CUDA context, holding GPU memory on the training GPU while the worker lives; the
training process loads the modules itself (kernel_launch._compile_share).
"""

from __future__ import annotations

import importlib
import os
import pickle
import select
import sys
import traceback


def main() -> int:
    answers, idle_s = os.fdopen(int(sys.argv[1]), "wb"), float(sys.argv[2])
    from mhc_compile import kernel_launch

    jobs_in = sys.stdin.buffer
    while select.select([jobs_in], [], [], idle_s)[0]:
        try:
            jobs = pickle.load(jobs_in)
        except EOFError:  # the training process closed the pipe, or ended
            break
        pickle.dump(_failures_compiling(jobs, kernel_launch), answers)
        answers.flush()
    return 0


def _failures_compiling(jobs: list[tuple], kernel_launch) -> list[str]:
    """Compile every job; the tracebacks of those that failed (the autotuner skips such configs)."""
    failures = []
    for module, kernel_name, args, kwargs in jobs:
        try:
            importlib.import_module(module)  # defines the kernel
            kernel_launch.compile_kernel(kernel_name, None, args, kwargs, load=False)
        except Exception:  # noqa: BLE001 (reported to the training process)
            failures.append(f"compiling {kernel_name} or building its host launcher failed:\n"
                            f"{traceback.format_exc()}")
    return failures


if __name__ == "__main__":
    sys.exit(main())
