"""How a kernel launch runs on the host: the one path every launcher in templates/ calls.

Under a tracer a launch is handed to torch (wrap_triton) so that Inductor compiles and launches the
kernel itself. Eagerly, the first launch of a new (n, C, dtypes) key autotunes, its candidates
compiled in parallel first and its progress logged; after that, a launch whose arguments Triton
would specialise the same way calls the binary that ran directly, bypassing Triton's host path.

Ops that stay opaque in a compiled graph (graphs replayed as CUDA graphs) launch their kernels from
Python at the graph's first run; `compile_ahead`, called from the post-grad pass, starts those
kernels' compiles in the background while Inductor is still compiling, in worker processes the
backend started (`start_compile_workers`) before AOT autograd traced the graph, and a first launch
waits for its kernel's compiles instead of compiling it again.

Those speed-ups need private Triton APIs (mhc_compile/private_apis.py), which is why this path
lives here and not in templates/: the kernels and their configs use public Triton only. The
configs themselves, forcing and pruning are templates/configs.py's.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import pickle
import select
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar

import torch
import triton

from mhc_compile import private_apis
from mhc_compile.templates import configs

# The templates' logger: `mhc-compile autotune` and the benchmarks print its autotuning progress.
log = logging.getLogger("mhc_compile.templates")

_LAUNCHED_KEYS: dict[str, set[tuple]] = {}  # per kernel, the keys it was launched with eagerly
_COMPILED: dict[tuple, Callable] = {}  # launch specialisation -> launcher of the binary it ran
_COMPILING_AHEAD: dict[str, list[futures.Future]] = {}  # per kernel, compiles compile_ahead started
# The launches compile_ahead collects while it runs launchers on fake tensors (None: launch them).
_PLANNED: ContextVar[list | None] = ContextVar("mhc_planned_launches", default=None)


# What eager callers pass: a kernel argument may be the user's parameter itself (`.float()` and
# `.contiguous()` return it unchanged).
_EAGER_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def _traced(args: tuple) -> bool:
    """Whether a tracer (Inductor's AOT autograd, make_fx, fake tensors) called: its tensors are
    subclasses (FakeTensor, FunctionalTensor), and the kernel must then go through
    torch.library.wrap_triton to be seen. An eager launch must not take that path: its dense
    implementation re-benchmarks an autotuned kernel at every call."""
    return any(type(a) not in _EAGER_TENSOR_TYPES for a in args if isinstance(a, torch.Tensor))


def launch(kernel_name: str, grid, *args, **kwargs) -> None:
    """Launch an autotuned kernel. Under a tracer it is wrapped (wrap_triton) so that Inductor
    compiles and launches it itself; eagerly it runs at once, and a launch that must tune a new
    (n, C, dtypes) key logs its progress at INFO (what `mhc-compile autotune` prints). Once a
    binary has run for arguments of one specialisation, later launches of that specialisation call
    it directly (_COMPILED): Triton's own path costs several times the launch itself in host time."""
    if (planned := _PLANNED.get()) is not None:
        planned.append((kernel_name, grid, args, kwargs))
        return
    tuned = configs.TUNED[kernel_name]
    if _traced(args) and not configs.INTERPRETING:
        _select_device(args)
        torch.library.wrap_triton(tuned)[grid](*args, **kwargs)
        return
    signature = None if configs.INTERPRETING else _specialisation(kernel_name, args, kwargs)
    if (compiled := _COMPILED.get(signature)) is not None:
        compiled(grid, args, kwargs)
        return
    _await_compiles_ahead(kernel_name)
    key = (kwargs.get("n"), kwargs.get("C"), *(str(a.dtype) for a in args if isinstance(a, torch.Tensor)))
    launched = _LAUNCHED_KEYS.setdefault(kernel_name, set())
    first_time = len(tuned.configs) > 1 and key not in launched
    started = time.perf_counter()
    if first_time:  # the autotuner prunes for this key now, reading the table of this GPU
        candidates = _candidates(kernel_name, args, kwargs)
        named = dict(zip(private_apis.kernel_argument_names(tuned.fn), args))
        tabled = len(candidates) == 1 and configs.tabled_config(kernel_name, {**named, **kwargs})
        log.info("%s %s for n=%s C=%s %s: %s", "autotuning" if len(candidates) > 1 else "compiling",
                 kernel_name, key[0], key[1], _dtype_names(args),
                 f"{len(candidates)} configs" if len(candidates) > 1
                 else configs.describe(candidates[0]) + (" (the autotuning table's)" if tabled else ""))
        _compile_in_parallel(tuned, candidates, grid, args, kwargs)
    tuned[grid](*args, **kwargs)
    launched.add(key)
    if first_time:
        log.info("autotuned %s for n=%s C=%s in %.1f s: %s", kernel_name, key[0], key[1],
                 time.perf_counter() - started, configs.describe(tuned.best_config))
    if signature is not None:
        _COMPILED[signature] = private_apis.compiled_triton_launcher(tuned, grid, args, kwargs)


def _select_device(args: tuple) -> None:
    configs.select_device(_device_of(args))


def _specialisation(kernel_name: str, args: tuple, kwargs: dict) -> tuple:
    """What decides which binary (autotune choice and Triton specialisation) a launch runs, on the
    current device: the value of every autotune key and constexpr, each tensor's dtype and 16-byte
    alignment, and of other integers whether they equal 1, divide by 16 and fit 32 or 64 bits
    (Triton specialises on these). Finer than Triton is harmless (one more entry); coarser would
    run a binary compiled for other arguments."""
    return torch.cuda.current_device(), *_argument_classes(kernel_name, args, kwargs)


def _argument_classes(kernel_name: str, args: tuple, kwargs: dict) -> tuple:
    by_value = _value_parameters(kernel_name)
    names = private_apis.kernel_argument_names(configs.TUNED[kernel_name].fn)
    return (
        kernel_name,
        *(value if name in by_value else _argument_class(value) for name, value in zip(names, args)),
        *((name, value if name in by_value else _argument_class(value)) for name, value in kwargs.items()),
    )


@functools.cache
def _value_parameters(kernel_name: str) -> frozenset[str]:
    """The arguments whose every value gets its own binary: the kernel's constexprs (compiled in)
    and its autotune key (tuned per value)."""
    tuned = configs.TUNED[kernel_name]
    return private_apis.triton_value_parameters(tuned.fn) | set(tuned.keys)


def _argument_class(value) -> tuple | object:
    if isinstance(value, torch.Tensor):
        return value.dtype, value.data_ptr() % 16 == 0
    if isinstance(value, int) and not isinstance(value, bool):
        return value == 1, value % 16 == 0, -(2**31) <= value < 2**31, -(2**63) <= value < 2**63
    return value


def _compile_in_parallel(tuned, candidates: list[triton.Config], grid, args: tuple,
                         kwargs: dict) -> None:
    """Compile every candidate config at once before Triton's autotuner benchmarks them: its loop
    compiles each one lazily, one after the other, and at a cold start those compiles, not the
    timings, are most of the tuning time. Triton's compiler releases the GIL, so threads overlap
    (8 of our kernels' sm_90 compiles: 3.8 s serially, 2.4 s on two CPU cores).

    Compile errors are left to the autotuner, which meets them again and skips that config; so is
    any failure of this speed-up itself (logged), since the launch that follows compiles whatever
    is missing."""
    if len(candidates) < 2:
        return
    with ThreadPoolExecutor(min(len(candidates), os.cpu_count() or 1)) as pool:
        compiling = private_apis.triton_compiles_to(pool)
        if compiling is None:
            return
        try:
            with compiling:
                for config in candidates:
                    tuned.fn.warmup(*args, grid=grid, **kwargs, **config.all_kwargs())
        except Exception as error:  # noqa: BLE001 (an optimisation: the launch compiles serially)
            log.warning("compiling %d autotune candidates in parallel failed (%s: %s); the "
                        "autotuner compiles them one by one", len(candidates),
                        type(error).__name__, error)


def compile_ahead(calls: Iterable[tuple[Callable, Sequence]]) -> int:
    """Start compiling, in worker processes, every kernel config that `launcher(*args)` would
    launch for each of `calls`, whose tensors are the fake values of a graph Inductor is compiling;
    returns the number of compiles started.

    An opaque op launches its kernels from Python at the compiled graph's first run, and there each
    kernel compiled one after the other: 5.5 s of the C=1024 model's cold compile, against which
    Inductor's own kernels compile in parallel (bench/RESULTS.md, session 15). Started from the
    post-grad pass, ours compile while Inductor lowers and compiles the graphs, in processes
    (mhc_compile/compile_worker.py says why not threads), started before the graph was traced
    (start_compile_workers), that fill Triton's on-disk cache; a
    background thread then loads each kernel from there into this process, module and host
    launcher included (JITFunction.warmup takes dtypes in place of tensors and stores the kernel
    where the launch looks). A launch waits for the compiles of its kernel
    (_await_compiles_ahead), so none compiles twice; a compile that fails is left for the launch
    to meet again and report. This is a speed-up only: if planning or starting the compiles fails,
    a warning says so and the kernels compile at their first launch."""
    try:
        jobs = [job for job in (
            (kernel_name, _device_of(args).index, _dtypes_for_tensors(args),
             {**kwargs, **config.all_kwargs()})
            for kernel_name, args, kwargs in _distinct_launches(calls)
            for config in _candidates(kernel_name, args, kwargs)) if _first_time_ahead(job)]
        if jobs:
            log.debug("compiling %d kernel configs ahead of their first launch", len(jobs))
            _start_compiles(jobs)
    except Exception as error:  # noqa: BLE001 (the first launch compiles what is not compiled)
        log.warning("mhc: could not start the mHC kernels' compiles ahead of their first launch "
                    "(%s: %s); they compile at the first step instead", type(error).__name__, error)
        return 0
    return len(jobs)


# (device index, Triton specialisation) of every config compile_ahead started in this process
_STARTED_AHEAD: set[tuple] = set()


def _first_time_ahead(job: tuple) -> bool:
    """Whether this process has not compiled this config ahead for this device before: a
    recompile (another graph of the model, eval after training, torch._dynamo.reset()) plans
    launches of kernels compiled and loaded already, and starting workers for them costs seconds
    of CPU."""
    kernel_name, device_index, warmup_args, kwargs = job
    key = (device_index, *_argument_classes(kernel_name, warmup_args, kwargs))
    if key in _STARTED_AHEAD:
        return False
    _STARTED_AHEAD.add(key)
    return True


def _distinct_launches(calls: Iterable[tuple[Callable, Sequence]]) -> list[tuple]:
    """The kernel launches (kernel name, args, kwargs) the launchers make for these calls (on fake
    tensors, nothing runs), one per Triton specialisation: the blocks of a model repeat the same
    launches."""
    planned: list[tuple] = []
    token = _PLANNED.set(planned)
    try:
        for launcher, args in calls:
            with private_apis.in_tracing_fake_mode(args):
                launcher(*args)
    finally:
        _PLANNED.reset(token)
    distinct: dict[tuple, tuple] = {}
    for kernel_name, _, args, kwargs in planned:
        distinct.setdefault(_argument_classes(kernel_name, _dtypes_for_tensors(args), kwargs),
                            (kernel_name, args, kwargs))
    return list(distinct.values())


def _dtypes_for_tensors(args: tuple) -> tuple:
    """The arguments as JITFunction.warmup takes them: a fake tensor has no data to point at."""
    return tuple(a.dtype if isinstance(a, torch.Tensor) else a for a in args)


def _candidates(kernel_name: str, args: tuple, kwargs: dict) -> list[triton.Config]:
    """The configs a launch compiles: the tabled one, or every candidate it benchmarks (pruned for
    these arguments, reading the table of their GPU)."""
    tuned = configs.TUNED[kernel_name]
    _select_device(args)
    named = dict(zip(private_apis.kernel_argument_names(tuned.fn), args))
    return private_apis.autotune_candidates(tuned, named, kwargs)


# Worker processes per GPU at most, and so the threads that wait on them.
_MAX_COMPILE_PROCESSES = 4


def _compile_processes() -> int:
    """Worker processes per GPU, at most _MAX_COMPILE_PROCESSES: each imports torch and Triton
    (seconds), and every rank of a node starts its own."""
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(_MAX_COMPILE_PROCESSES, (os.cpu_count() or 1) // (2 * ranks_here)))


# A worker that takes longer to answer is stopped: the launch compiles what is missing.
_WORKER_TIMEOUT_S = 300
# A worker with no job for this long exits: the graphs of a model compile within its first steps,
# and an idle worker holds the memory of its imports (about 0.4 GB). The training process hands a
# worker no job in the second half of that time, so none is sent to a worker on its way out.
_WORKER_IDLE_S = 120


class _WorkerFailed(Exception):
    """A compile worker died, or did not answer in _WORKER_TIMEOUT_S. `kind` says which, in words
    that do not vary with the worker's output (the warning is given once per kind)."""

    def __init__(self, kind: str, errors: str):
        super().__init__(f"{kind}: {errors}" if errors else kind)
        self.kind = kind


class _CompileWorker:
    """One `python -m mhc_compile.compile_worker` process, which compiles the lists of jobs sent to
    it one after the other until it idles out (_WORKER_IDLE_S). It answers on a pipe of its own:
    what torch, Triton or a kernel module prints, from the first import on, goes to its stdout and
    stderr, a temporary file (a pipe could fill and stall it) read only if it fails. Its own
    session: a Ctrl-C in the terminal is the training process's to handle; the worker ends when
    the training process closes or loses the job pipe."""

    def __init__(self, environment: dict[str, str]):
        self._errors = tempfile.TemporaryFile()
        answers_read, answers_write = os.pipe()
        # -P: the working directory does not come first (3.11+), so the worker imports what we run.
        command = [sys.executable, *(["-P"] if sys.version_info >= (3, 11) else []),
                   "-m", "mhc_compile.compile_worker", str(answers_write), str(_WORKER_IDLE_S)]
        try:
            self._process = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=self._errors, stderr=self._errors,
                env=environment, pass_fds=(answers_write,), start_new_session=True)
        finally:
            os.close(answers_write)
        self._answers = os.fdopen(answers_read, "rb")
        self._lock = threading.Lock()
        self._last_answer = time.monotonic()
        self._failure: _WorkerFailed | None = None
        # Reaps the process whenever it exits (idled out), so that none is left a zombie.
        threading.Thread(target=self._process.wait, daemon=True).start()

    def usable(self) -> bool:
        """Running, and compiling or not near its idle exit (a long compile is not idleness)."""
        return self._failure is None and self._process.poll() is None and (
            self._lock.locked() or time.monotonic() - self._last_answer < _WORKER_IDLE_S / 2)

    def compile(self, described: list[tuple]) -> list[str]:
        """Compile these jobs (compile_worker's form); the tracebacks of the configs that failed.
        Raises _WorkerFailed, after closing the worker, if it dies or does not answer, and again
        for every list sent to it after that."""
        with self._lock:
            if self._failure is None:
                answer, self._failure = self._send(described)
            if self._failure is not None:
                raise self._failure
            self._last_answer = time.monotonic()
            return answer

    def _send(self, described: list[tuple]) -> tuple[list[str] | None, _WorkerFailed | None]:
        """(the worker's answer, None), or (None, how it failed) with the worker closed."""
        try:
            pickle.dump(described, self._process.stdin)
            self._process.stdin.flush()
            if select.select([self._answers], [], [], _WORKER_TIMEOUT_S)[0]:
                return pickle.load(self._answers), None
            kind = f"no result in {_WORKER_TIMEOUT_S} s"
        except Exception:  # noqa: BLE001 (a broken pipe, a truncated or garbled answer: it died)
            kind = "it died"
        self.close()
        return None, _WorkerFailed(f"{kind}, exit code {self._process.returncode}", self._error_tail)

    def close(self) -> None:
        """End the process (if it has not ended), close what talks to it, and keep the end of
        what it printed (_error_tail)."""
        self._process.kill()
        self._process.wait()
        for stream in (self._process.stdin, self._answers):
            with contextlib.suppress(OSError):
                stream.close()
        if not self._errors.closed:
            self._errors.seek(0)
            self._error_tail = self._errors.read().decode(errors="replace")[-1500:]
            self._errors.close()


# Per GPU (as the workers see it: CUDA_VISIBLE_DEVICES), the compile workers started in this process.
_WORKERS: dict[str, list[_CompileWorker]] = {}
_WORKERS_LOCK = threading.Lock()


def start_compile_workers(device_index: int | None) -> None:
    """Start this GPU's compile workers if none was ever started in this process, so that they
    import torch and Triton while the graph is still traced: the backend calls this before
    Inductor compiles a graph whose mHC kernels compile ahead. Only the first time: on a warm start
    (AOT autograd's cache serves the graph, nothing compiles ahead) the workers stay unused, and
    a later graph that has kernels to compile starts them itself (_start_compiles). A speed-up
    only: a failure is warned about, and the compiles ahead start their workers then."""
    try:
        environment = _worker_environment(device_index)
        if environment["CUDA_VISIBLE_DEVICES"] not in _WORKERS:
            _compile_workers(environment)
    except Exception as error:  # noqa: BLE001 (compile_ahead starts them, or warns itself)
        log.warning("mhc: could not start the processes that compile the mHC kernels ahead "
                    "(%s: %s)", type(error).__name__, error)


def _compile_workers(environment: dict[str, str]) -> list[_CompileWorker]:
    """The compile workers of the GPU `environment` shows, those that idled out or failed
    replaced."""
    gpu = environment["CUDA_VISIBLE_DEVICES"]
    with _WORKERS_LOCK:
        workers = []
        for worker in _WORKERS.get(gpu, []):
            if worker.usable():
                workers.append(worker)
            else:
                worker.close()
        workers += [_CompileWorker(environment) for _ in range(_compile_processes() - len(workers))]
        _WORKERS[gpu] = workers
    return workers


@functools.cache
def _waiting_threads() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(_MAX_COMPILE_PROCESSES, thread_name_prefix="mhc-compile-ahead")


def _start_compiles(jobs: list[tuple]) -> None:
    """Compile `jobs` ((kernel name, device index, arguments with dtypes for tensors, kwargs) per
    config, all for one device) in that GPU's worker processes (mhc_compile/compile_worker.py),
    each kernel's configs in one share, and record under each kernel's name the future that ends
    once its share is compiled and loaded here."""
    workers = _compile_workers(_worker_environment(jobs[0][1]))
    kernels = list(dict.fromkeys(job[0] for job in jobs))
    shares = min(len(kernels), len(workers))
    for share in range(shares):
        share_jobs = [job for job in jobs if kernels.index(job[0]) % shares == share]
        future = _waiting_threads().submit(_compile_share, share_jobs, workers[share])
        for kernel_name in dict.fromkeys(job[0] for job in share_jobs):
            _COMPILING_AHEAD.setdefault(kernel_name, []).append(future)


def _worker_environment(device_index: int | None) -> dict[str, str]:
    """The workers' environment: this process's Triton cache folder, settled now (Inductor would
    otherwise choose one later in this process, after the workers had written elsewhere), its
    module path (a worker imports the mhc_compile this process runs), and that device as the only
    GPU they see: their current device without selecting one, which would open a CUDA context
    (GPU memory) on it."""
    index = device_index or 0
    private_apis.settle_triton_cache_dir(index)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    physical = visible.split(",")[index].strip() if visible else str(index)
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path for path in sys.path if path),
            "CUDA_VISIBLE_DEVICES": physical}


def _compile_share(jobs: list[tuple], worker: _CompileWorker) -> None:
    """Have `worker` compile `jobs`, then load what it compiled and built from Triton's cache into
    this process's kernel caches, modules and host launchers (the launchers were built by the
    worker, so here they only load: the Python half of a build would compete for the GIL with
    Inductor's compile on the main thread). A worker that fails, or takes over _WORKER_TIMEOUT_S,
    is warned about once per kind of failure: its configs then compile here, still off the
    launching thread, but holding the GIL."""
    described = [(_kernel_module(kernel_name), kernel_name, warmup_args, kwargs)
                 for kernel_name, _, warmup_args, kwargs in jobs]
    started = time.perf_counter()
    worker_failed = False
    try:
        if failed_configs := worker.compile(described):
            log.debug("some kernel configs failed to compile ahead:\n%s", "\n".join(failed_configs))
    except _WorkerFailed as error:
        worker_failed = True
        _warn_worker_failed(error)
    compiled_s = time.perf_counter() - started
    for kernel_name, device_index, warmup_args, kwargs in jobs:
        try:
            compile_kernel(kernel_name, device_index, warmup_args, kwargs, load=True)
        except Exception as error:  # noqa: BLE001 (the launch compiles it again and reports)
            log.debug("compiling %s ahead failed (%s: %s)", kernel_name, type(error).__name__, error)
    log.info("compiled %d configs of %s ahead: %.1f s in a worker process%s, then %.1f s here",
             len(jobs), ", ".join(dict.fromkeys(job[0] for job in jobs)), compiled_s,
             " (which failed: compiled here)" if worker_failed else "",
             time.perf_counter() - started - compiled_s)


_WORKER_FAILURES: set[str] = set()


def _warn_worker_failed(failure: _WorkerFailed) -> None:
    if failure.kind not in _WORKER_FAILURES:
        _WORKER_FAILURES.add(failure.kind)
        log.warning("mhc: a process compiling the mHC kernels ahead failed (%s); they compile in "
                    "the training process instead, which lengthens the cold compile", failure)


def compile_kernel(kernel_name: str, device_index: int | None, args: tuple, kwargs: dict,
                   load: bool) -> None:
    """Compile one config of a kernel for these arguments (dtypes for tensors) for a CUDA device
    (None: the current one), from Triton's disk cache where a worker compiled it; with `load`,
    also load it as its first launch would (its module, which needs a CUDA context, and its host
    launcher), else build only the host launcher (a C compile under Triton 3.6, cached on disk for
    the process that loads it)."""
    device = contextlib.nullcontext() if device_index is None else torch.cuda.device(device_index)
    with device:
        compiled = configs.TUNED[kernel_name].fn.warmup(*args, grid=(1,), **kwargs)
        if load:
            private_apis.load_compiled_kernel(compiled)
        else:
            private_apis.build_host_launcher(compiled)


def _kernel_module(kernel_name: str) -> str:
    """The module that defines the kernel (importing it registers configs.TUNED[kernel_name])."""
    return configs.TUNED[kernel_name].fn.__module__


def _device_of(args: tuple) -> torch.device:
    return next(a.device for a in args if isinstance(a, torch.Tensor))


# A first launch that waits longer for its compiles ahead says so (INFO): the wait lengthens the
# cold compile, and a shorter one is within what a module load takes anyway.
_REPORTED_WAIT_S = 0.05


def _await_compiles_ahead(kernel_name: str) -> None:
    """Wait for the compiles compile_ahead started for this kernel (each share's worker is
    bounded by _WORKER_TIMEOUT_S, and reports its own failures)."""
    pending = _COMPILING_AHEAD.pop(kernel_name, None)
    if pending:
        started = time.perf_counter()
        futures.wait(pending)
        if (waited := time.perf_counter() - started) > _REPORTED_WAIT_S:
            log.info("%s's first launch waited %.1f s for its compiles ahead", kernel_name, waited)


def _dtype_names(args: tuple) -> str:
    names = {str(a.dtype).removeprefix("torch.") for a in args if isinstance(a, torch.Tensor)}
    return "/".join(sorted(names))
