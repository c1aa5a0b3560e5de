"""passes/inline_kernels.py: which opaque op calls of a post-grad graph are handed to Inductor,
and what they become.

Here, on any machine: the choice of calls, against graphs traced with static and with symbolic
shapes; the splice itself and the TTIR cache in a process without Triton's interpreter (tracing a
launch needs real Triton kernels; torch's TTIR generation, which needs a GPU, is stubbed). Running
what was spliced in needs the GPU (tests/test_kernels.py, test_backend_hands_the_kernels_to_inductor)."""

from __future__ import annotations

import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch._functorch import config as functorch_config
from torch._inductor import config as inductor_config
from torch.fx.experimental.proxy_tensor import make_fx

import mhc_compile
from mhc_compile import kernel_launch, private_apis, templates
from mhc_compile.templates import configs
from mhc_compile.examples import llama
from mhc_compile.options import MHCOptions
from mhc_compile.passes import PassContext, inline_kernels

N, C, TOKENS = 4, 24, 6


def _sublayer_through_opaque_ops(streams, y, phi, alpha, b_pre, b_post, b_res, grad_out):
    """A sublayer's forward and backward as the opaque ops (y stands in for F(mixed))."""
    h_pre, h_post, h_res, mixed, proj, sum_squares = torch.ops.mhc.coefficients_pre_mix_opaque(
        streams, phi, alpha, b_pre, b_post, b_res, 20, "sinkhorn")
    out = torch.ops.mhc.post_res_mix_opaque(streams, y, h_post, h_res)
    grad_streams, grad_y, grad_h_post, grad_h_res = torch.ops.mhc.post_res_mix_backward_opaque(
        grad_out, streams, y, h_post, h_res)
    grads = torch.ops.mhc.coefficients_pre_mix_backward_opaque(
        torch.zeros_like(h_pre), grad_h_post, grad_h_res, grad_y, h_pre, proj, sum_squares, streams,
        phi, alpha, b_pre, b_post, b_res, 20, "sinkhorn", grad_streams)
    return out, grads[0]


def _two_sublayers(streams, y, *parameters_and_grad):
    """Two calls of each op with the same shapes (what the blocks of a model make)."""
    out, _ = _sublayer_through_opaque_ops(streams, y, *parameters_and_grad)
    return _sublayer_through_opaque_ops(out, y, *parameters_and_grad)


def _inputs(n: int, channels: int = C) -> tuple[torch.Tensor, ...]:
    return (torch.randn(TOKENS, n, channels), torch.randn(TOKENS, channels),
            torch.randn(n * channels, n * n + 2 * n), torch.rand(3), torch.randn(n), torch.randn(n),
            torch.randn(n, n), torch.randn(TOKENS, n, channels))


def _graph(tracing_mode: str, n: int = N, function=_sublayer_through_opaque_ops) -> torch.fx.Graph:
    return make_fx(function, tracing_mode=tracing_mode)(*_inputs(n)).graph


@pytest.fixture
def replaced(monkeypatch):
    """The launcher names inline_kernels would splice in, in graph order (nothing is spliced)."""
    names = []
    monkeypatch.setattr(templates, "launcher", lambda name: name)
    monkeypatch.setattr(inline_kernels, "_splice_launcher",
                        lambda node, launcher, traces: names.append(launcher))
    return names


@pytest.fixture
def kernels_on_cpu(monkeypatch):
    """templates.kernels_apply as on CUDA, for this machine's CPU tensors."""
    monkeypatch.setattr(templates, "kernels_active", lambda device: True)


def test_static_calls_whose_kernels_apply_are_handed_over(kernels_on_cpu, replaced):
    assert inline_kernels.inline_kernels(_graph("fake"), PassContext(MHCOptions())) == 4
    assert replaced == ["coefficients_pre_mix", "post_res_mix", "post_res_mix_backward",
                        "coefficients_pre_mix_backward"]


def test_symbolic_shapes_keep_the_opaque_ops(kernels_on_cpu, replaced):
    assert inline_kernels.inline_kernels(_graph("symbolic"), PassContext(MHCOptions())) == 0
    assert replaced == []


def test_more_streams_than_the_kernels_take_keep_the_opaque_ops(kernels_on_cpu, replaced):
    assert inline_kernels.inline_kernels(_graph("fake", templates.MAX_STREAMS + 1), PassContext(MHCOptions())) == 0
    assert replaced == []


def test_graphs_replayed_as_cuda_graphs_keep_the_opaque_ops(kernels_on_cpu, replaced, monkeypatch):
    """Under CUDA graphs (cudagraphs=True, mode="reduce-overhead") a replay runs no Python, so the
    splice would only lengthen the compile; the ops' kernels are compiled ahead instead."""
    ahead = []
    monkeypatch.setattr(kernel_launch, "compile_ahead", lambda calls: ahead.extend(
        launcher for launcher, _ in calls))
    with inductor_config.patch({"triton.cudagraphs": True}):
        assert inline_kernels.inline_kernels(_graph("fake"), PassContext(MHCOptions())) == 0
    assert replaced == []
    assert ahead == ["coefficients_pre_mix", "post_res_mix", "post_res_mix_backward",
                     "coefficients_pre_mix_backward"]
    assert inline_kernels.inline_kernels(_graph("fake"), PassContext(MHCOptions())) == 4
    assert len(ahead) == 4


def _launches_of(function, *inputs) -> list[tuple]:
    """The kernel launches `function` makes through the launchers on real tensors: kernel name,
    each tensor argument's dtype and every other argument's value."""
    launches = []

    def record(kernel_name, grid, *args, **kwargs):
        launches.append((kernel_name, tuple(a.dtype if isinstance(a, torch.Tensor) else a for a in args),
                         tuple(sorted(kwargs.items()))))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kernel_launch, "launch", record)
        function(*inputs)
    return launches


def _sublayer_through_launchers(streams, y, phi, alpha, b_pre, b_post, b_res, grad_out):
    """_sublayer_through_opaque_ops with each op's launcher called directly."""
    launch = templates.launcher
    h_pre, h_post, h_res, mixed, proj, sum_squares = launch("coefficients_pre_mix")(
        streams, phi, alpha, b_pre, b_post, b_res, 20, "sinkhorn")
    launch("post_res_mix")(streams, y, h_post, h_res)
    grad_streams, grad_y, grad_h_post, grad_h_res = launch("post_res_mix_backward")(
        grad_out, streams, y, h_post, h_res)
    launch("coefficients_pre_mix_backward")(
        torch.zeros_like(h_pre), grad_h_post, grad_h_res, grad_y, h_pre, proj, sum_squares, streams,
        phi, alpha, b_pre, b_post, b_res, 20, "sinkhorn", grad_streams)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graphs_replayed_as_cuda_graphs_compile_their_kernels_ahead(kernels_on_cpu, monkeypatch, dtype):
    """Under CUDA graphs the opaque ops' kernels start compiling from the post-grad pass
    (kernel_launch.compile_ahead): once per kernel, arguments and config, for exactly the launches
    the ops make when they run (recorded here from the launchers on real tensors)."""
    started = []
    monkeypatch.setattr(kernel_launch, "_start_compiles", lambda jobs: started.extend(
        (kernel_name, warmup_args, tuple(sorted(kwargs.items())))
        for kernel_name, _, warmup_args, kwargs in jobs))
    monkeypatch.setattr(kernel_launch, "_STARTED_AHEAD", set())
    inputs = _inputs(N)
    inputs = (inputs[0].to(dtype), *inputs[1:])
    graph = make_fx(_two_sublayers, tracing_mode="fake")(*inputs).graph
    with inductor_config.patch({"triton.cudagraphs": True}):
        assert inline_kernels.inline_kernels(graph, PassContext(MHCOptions())) == 0
        compiled_once = len(started)
        # A recompile of the same graph starts nothing: those configs are compiled already.
        inline_kernels.inline_kernels(make_fx(_two_sublayers, tracing_mode="fake")(*inputs).graph,
                                      PassContext(MHCOptions()))
        assert len(started) == compiled_once

    expected = []
    for kernel_name, args, kwargs in dict.fromkeys(_launches_of(_sublayer_through_launchers, *inputs)):
        tuned = configs.TUNED[kernel_name]
        named = dict(zip(tuned.fn.arg_names, args))
        for config in tuned.early_config_prune(tuned.configs, named, **dict(kwargs)):
            expected.append((kernel_name, args, tuple(sorted({**dict(kwargs), **config.all_kwargs()}.items()))))
    assert len(expected) >= 8
    assert sorted(map(repr, started)) == sorted(map(repr, expected))


def test_a_launch_waits_for_its_kernels_compiles_ahead(monkeypatch):
    """A first launch finds its kernel compiled ahead, not compiling beside it: it waits for the
    compiles compile_ahead started (and only for its own kernel's)."""
    events = []
    compiled = threading.Event()

    class Kernel:
        configs = [object()]

        def __getitem__(self, grid):
            return lambda *args, **kwargs: events.append("launched")

    def compile_slowly():
        compiled.wait(5)
        events.append("compiled")

    monkeypatch.setattr(configs, "TUNED", {"stub": Kernel(), "other": Kernel()})
    monkeypatch.setattr(configs, "INTERPRETING", True)  # no specialisation lookup for the stub
    monkeypatch.setattr(kernel_launch, "_LAUNCHED_KEYS", {})
    with ThreadPoolExecutor(1) as pool:
        monkeypatch.setitem(kernel_launch._COMPILING_AHEAD, "stub", [pool.submit(compile_slowly)])
        kernel_launch.launch("other", (1,))
        assert events == ["launched"]
        threading.Timer(0.2, compiled.set).start()
        kernel_launch.launch("stub", (1,))
    assert events == ["launched", "compiled", "launched"]


@pytest.mark.parametrize("load", [False, True], ids=["worker", "training process"])
def test_a_worker_builds_the_host_launcher_and_the_training_process_loads(monkeypatch, load):
    """A worker's compile also builds the kernel's host launcher (a C compile under Triton 3.6,
    cached on disk) without loading its module; the training process's load does both."""
    done = []

    class JITFunction:
        def warmup(self, *args, grid, **kwargs):
            done.append(("compiled", args, kwargs))
            return "compiled kernel"

    class Tuned:
        fn = JITFunction()

    monkeypatch.setattr(configs, "TUNED", {"stub": Tuned()})
    monkeypatch.setattr(private_apis, "build_host_launcher", lambda kernel: done.append(("built", kernel)))
    monkeypatch.setattr(private_apis, "load_compiled_kernel", lambda kernel: done.append(("loaded", kernel)))
    kernel_launch.compile_kernel("stub", None, (torch.float32, 16), {"BLOCK_T": 4}, load=load)
    assert done == [("compiled", (torch.float32, 16), {"BLOCK_T": 4}),
                    ("loaded" if load else "built", "compiled kernel")]


def _share_of_one_config():
    """A compile job as compile_ahead makes them (here on CPU, where compiling fails)."""
    templates.launcher("post_res_mix")  # imports the kernel's module
    return [("mhc_post_res_mix_fwd", None, (torch.float32, torch.float32),
             {"T": 8, "C": 16, "n": 4, "NP": 4, "BLOCK_T": 1, "BLOCK_C": 16, "num_warps": 1})]


@pytest.mark.parametrize("visible, index, physical", [(None, 1, "1"), ("4,5,6", 1, "5"), ("2", 0, "2")])
def test_workers_see_one_gpu_this_process_s_modules_and_triton_cache(monkeypatch, visible, index,
                                                                     physical):
    """A worker sees the launching GPU alone (its current device without selecting one, which
    would open a CUDA context there), imports what this process imports, and writes to the
    Triton cache folder this process reads, settled before it starts."""
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    environment = kernel_launch._worker_environment(index)
    assert environment["CUDA_VISIBLE_DEVICES"] == physical
    assert environment["TRITON_CACHE_DIR"] == os.environ["TRITON_CACHE_DIR"]
    assert environment["TRITON_CACHE_DIR"].endswith(os.path.join("triton", str(index)))
    assert [path for path in sys.path if path] == environment["PYTHONPATH"].split(os.pathsep)


def _described(jobs):
    """compile_ahead's jobs in the form a worker takes them."""
    return [(kernel_launch._kernel_module(name), name, args, kwargs) for name, _, args, kwargs in jobs]


def test_a_worker_whose_configs_fail_to_compile_reports_quietly(caplog):
    """A worker runs the jobs it is sent (a real `python -m mhc_compile.compile_worker`); configs
    that fail to compile (here, on CPU, none can) are left to the autotuner, which skips them, without a
    warning."""
    worker = kernel_launch._CompileWorker(dict(os.environ))
    with caplog.at_level("DEBUG", logger="mhc_compile.templates"):
        kernel_launch._compile_share(_share_of_one_config(), worker)
    worker.close()
    assert "some kernel configs failed to compile ahead" in caplog.text
    assert "compiling mhc_post_res_mix_fwd or building its host launcher failed" in caplog.text
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_a_worker_that_fails_warns_once(monkeypatch, caplog):
    """A worker that does not answer in time (here: before it has even imported torch) is stopped
    and warned about, once, and so is every list sent to it after that: its configs then compile in
    the training process, and the cold compile is longer."""
    monkeypatch.setattr(kernel_launch, "_WORKER_TIMEOUT_S", 0.01)
    monkeypatch.setattr(kernel_launch, "_WORKER_FAILURES", set())
    workers = [kernel_launch._CompileWorker(dict(os.environ)) for _ in range(2)]
    with caplog.at_level("WARNING", logger="mhc_compile.templates"):
        for worker in (*workers, workers[0]):
            kernel_launch._compile_share(_share_of_one_config(), worker)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1, warned
    assert "a process compiling the mHC kernels ahead failed (no result in 0.01 s, exit code -9" in warned[0]
    assert not any(worker.usable() for worker in workers)


def test_a_worker_whose_answer_cannot_be_read_is_closed_and_fails_every_later_list(monkeypatch):
    """Any error reading an answer (a garbled or truncated one) leaves the pipe out of step: the
    worker is closed and reported as failed, for that list and every later one."""
    worker = kernel_launch._CompileWorker(dict(os.environ))

    def garbled(stream):
        raise ValueError("could not convert string to float: 'Loading'")

    monkeypatch.setattr(kernel_launch.pickle, "load", garbled)
    for _ in range(2):
        with pytest.raises(kernel_launch._WorkerFailed, match="^it died, exit code -9"):
            worker.compile(_described(_share_of_one_config()))
    assert not worker.usable()


def test_a_worker_answers_every_list_of_jobs_whatever_it_prints(tmp_path):
    """One worker process serves the compiles ahead of every graph (it imports torch and Triton
    once), answering each list with its failures on a pipe of its own, so that what a module prints
    (here one that prints as it is imported) cannot garble the answers; it ends when the training
    process closes the job pipe."""
    (tmp_path / "noisy_kernels.py").write_text(
        "import sys\nprint('loading kernels', flush=True)\nsys.stdout.buffer.write(b'\\x80\\x04')\n")
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    worker = kernel_launch._CompileWorker(environment)
    described = _described(_share_of_one_config())
    noisy = [("noisy_kernels", *job[1:]) for job in described]
    for jobs in (described, noisy, described * 2, []):
        failures = worker.compile(jobs)
        assert len(failures) == len(jobs), failures
        assert all(f.startswith("compiling mhc_post_res_mix_fwd or building") for f in failures)
    assert worker.usable()
    worker._process.stdin.close()
    assert worker._process.wait(timeout=30) == 0
    worker.close()


def test_a_worker_idles_out_and_is_not_handed_jobs_near_its_end(monkeypatch):
    """A worker with no job for _WORKER_IDLE_S exits; in the second half of that time it is no
    longer usable, so that no list is sent to a worker on its way out, unless it is compiling (then
    it is not idle, and replacing it would kill its compile)."""
    monkeypatch.setattr(kernel_launch, "_WORKER_IDLE_S", 2)
    worker = kernel_launch._CompileWorker(dict(os.environ))
    worker.compile([])
    assert worker.usable()
    time.sleep(1.1)
    with worker._lock:
        assert worker.usable()  # compiling (a list in flight) is not idleness
    assert not worker.usable()
    assert worker._process.wait(timeout=30) == 0
    with pytest.raises(kernel_launch._WorkerFailed, match="^it died, exit code 0"):
        worker.compile([])


def test_a_gpu_s_workers_start_once_early_and_are_replaced_when_gone(monkeypatch):
    """start_compile_workers runs _compile_processes() workers for a GPU (as the workers see it)
    the first time only; the compiles ahead keep those usable and replace (closing) the others."""

    class Worker:
        started: list = []

        def __init__(self, environment):
            self.gpu, self.running = environment["CUDA_VISIBLE_DEVICES"], True
            Worker.started.append(self)

        def usable(self):
            return self.running

        def close(self):
            self.closed = True

    monkeypatch.setattr(kernel_launch, "_CompileWorker", Worker)
    monkeypatch.setattr(kernel_launch, "_WORKERS", {})
    monkeypatch.setattr(kernel_launch, "_compile_processes", lambda: 3)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    kernel_launch.start_compile_workers(0)
    kernel_launch.start_compile_workers(0)
    assert [w.gpu for w in Worker.started] == ["0"] * 3
    kernel_launch.start_compile_workers(1)
    assert [w.gpu for w in Worker.started] == ["0"] * 3 + ["1"] * 3
    for worker in Worker.started[:3]:
        worker.running = False
    kernel_launch.start_compile_workers(0)  # idled out: a later graph's compile_ahead starts them
    assert len(Worker.started) == 6
    Worker.started[0].running = True
    assert kernel_launch._compile_workers(kernel_launch._worker_environment(0)) == [
        Worker.started[0], *Worker.started[6:8]]
    assert [getattr(w, "closed", False) for w in Worker.started[:3]] == [False, True, True]


def test_cpu_streams_keep_the_opaque_ops(replaced):
    assert inline_kernels.inline_kernels(_graph("fake"), PassContext(MHCOptions())) == 0
    assert replaced == []


def test_every_op_of_a_static_model_is_handed_over(kernels_on_cpu, replaced):
    """Through backend="mhc": the mHC parameters the backend adds as graph inputs reach AOT
    autograd with static shapes (private_apis._static_unless_traced); with the symbolic sizes AOT
    autograd gives unseen real inputs, every coefficient op would stay opaque."""
    model, args = llama(seed=0, batch=2, seq=8, width=32, depth=2, vocab=64)
    mhc_compile.prepare(model, *args, options={"n": N})
    torch._dynamo.reset()
    # Inductor's and AOT autograd's caches off: the graphs must be built in this process.
    with inductor_config.patch(fx_graph_cache=False), \
            functorch_config.patch(enable_autograd_cache=False):
        compiled = torch.compile(model, backend="mhc", options={"n": N})
        compiled(*args).sum().backward()
    blocks = len(model.mhc.blocks)
    assert blocks == 4
    for launcher in ("coefficients_pre_mix", "coefficients_pre_mix_backward",
                     "post_res_mix_backward"):
        assert replaced.count(launcher) == blocks, (launcher, replaced)


@pytest.fixture
def generated_ttir(monkeypatch):
    """The kernels torch's generate_ttir really compiled (a stub stands in: no GPU here), with
    private_apis.reuse_mhc_kernel_ttir's cache in front."""
    from torch._higher_order_ops import triton_kernel_wrap

    generated = []

    def generate_ttir(kernel, kwargs, tma_descriptor_metadata):
        generated.append(kernel)
        return object(), list(kwargs)

    monkeypatch.setattr(triton_kernel_wrap, "generate_ttir", generate_ttir)
    monkeypatch.setattr(private_apis, "_current_triton_target", lambda: "a GPU")
    private_apis.reuse_mhc_kernel_ttir()
    private_apis.reuse_mhc_kernel_ttir()  # idempotent: one cache, not a cache of a cache
    return generated


def test_ttir_of_mhc_kernels_is_generated_once_per_signature(generated_ttir):
    """private_apis.reuse_mhc_kernel_ttir: torch generates a kernel's Triton IR for every traced
    and lowered launch; ours are generated once per kernel, dtypes and argument values, and
    nobody else's kernels are cached."""
    import triton
    from torch._higher_order_ops import triton_kernel_wrap

    from mhc_compile.templates import post_res_mix

    generated = generated_ttir

    @triton.jit
    def theirs(pointer, size):
        pass

    ours = post_res_mix._mhc_post_res_mix_fwd_kernel
    with torch._subclasses.FakeTensorMode():
        bf16, other_bf16 = torch.empty(8, 4, dtype=torch.bfloat16), torch.empty(3, dtype=torch.bfloat16)
        fp32 = torch.empty(8, 4)

    def ttir(kernel, pointer, size):
        return triton_kernel_wrap.generate_ttir(kernel, {"pointer": pointer, "size": size}, {})

    first = ttir(ours, bf16, 64)
    assert ttir(ours, other_bf16, 64) is first  # every tensor becomes torch.empty(2, dtype)
    assert len(generated) == 1
    assert ttir(ours, fp32, 64) is not first and len(generated) == 2
    ttir(ours, fp32, 65)
    ttir(ours, fp32, 65)
    ttir(ours, fp32, 65.0)  # equal to 65, but a float argument
    assert len(generated) == 4
    ttir(ours.fn, fp32, 65)  # the JITFunction Inductor's lowering passes, keyed apart
    ttir(ours.fn, fp32, 65)
    assert len(generated) == 5
    ttir(theirs, bf16, 64)
    ttir(theirs, bf16, 64)
    assert generated[5:] == [theirs, theirs]
    triton_kernel_wrap.generate_ttir(ours, {"pointer": bf16, "size": 64}, {"pointer": ("tma",)})
    assert len(generated) == 8  # TMA descriptors are passed through


def test_a_trace_is_reused_only_for_the_same_signature():
    """inline_kernels._trace_key: calls share a trace only with equal launchers, constants and
    tensor layouts, and with the same pattern of repeated arguments (make_fx traces a tensor
    passed twice as one input, which must not serve two different tensors). Symbolic sizes are
    never keyed."""
    graph = torch.fx.Graph()

    def placeholder(name, value):
        node = graph.placeholder(name)
        node.meta["val"] = value
        return node

    a, b = (placeholder(name, torch.empty(4, 8)) for name in "ab")
    transposed = placeholder("transposed", torch.empty(8, 4).t())
    wider = placeholder("wider", torch.empty(4, 9))
    half = placeholder("half", torch.empty(4, 8, dtype=torch.float16))

    def key(*arguments, function=len):
        return inline_kernels._trace_key(function, list(arguments))

    assert key(a, b, 20) == key(b, a, 20)  # other nodes, same layouts: one trace
    assert key(a, a, 20) != key(a, b, 20)  # a repeated argument is traced as one input
    assert len({key(a, b, 20), key(a, transposed, 20), key(a, wider, 20), key(a, half, 20),
                key(a, b, 21), key(a, b, 20.0), key(a, b, 20, function=repr)}) == 7
    assert key(a, b, [20]) is None  # an unhashable constant: traced afresh
    symbolic_streams = next(node for node in _graph("symbolic").nodes if node.op == "placeholder")
    assert isinstance(symbolic_streams.meta["val"].shape[0], torch.SymInt)
    assert key(a, symbolic_streams, 20) is None


# Tracing a launch needs Triton kernels that are not interpreted, so these run in a new process
# without TRITON_INTERPRET (this process, without a GPU, interprets them: wrap_triton would run the
# kernel instead of tracing it). Torch's TTIR generation, which needs a GPU, is a stub that counts.
_STUBBED_TTIR = """
import sys
import torch
from torch._higher_order_ops import triton_kernel_wrap
from mhc_compile import private_apis

generated = []
def generate_ttir(kernel, kwargs, tma_descriptor_metadata):
    generated.append(kernel)
    return object(), list(kwargs)
triton_kernel_wrap.generate_ttir = generate_ttir
private_apis._current_triton_target = lambda: "a GPU"
private_apis.reuse_mhc_kernel_ttir()
"""


def _run_without_interpreter(body: str) -> dict[str, str]:
    """Run _STUBBED_TTIR + body in a new process; returns its `key value` output lines."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    environment["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).parent), *filter(None, [environment.get("PYTHONPATH")])])
    result = subprocess.run([sys.executable, "-c", _STUBBED_TTIR + body], env=environment,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return dict(line.split(" ", 1) for line in result.stdout.splitlines() if " " in line)


def test_traced_launches_of_one_kernel_share_its_ttir():
    """Functionalizing a traced launch asks for the kernel's IR with a new Autotuner each time
    (torch copies it per launch); that must still hit the cache. Keyed on the Autotuner itself,
    it missed at every launch on the H100 (228 IR compiles for a 12-block model)."""
    output = _run_without_interpreter("""
from torch._subclasses.functional_tensor import dispatch_functionalize
from torch.fx.experimental.proxy_tensor import make_fx
from mhc_compile.templates import post_res_mix

def two_launches(streams, y, h_post, h_res):
    tokens, n, channels = streams.shape
    out = torch.empty_like(streams)
    for _ in range(2):
        torch.library.wrap_triton(post_res_mix._mhc_post_res_mix_fwd_kernel)[(1, 1)](
            streams, y, h_post, h_res, out, T=tokens, C=channels, n=n, NP=n)
    return out

make_fx(dispatch_functionalize(two_launches), tracing_mode="fake")(
    torch.randn(6, 4, 24), torch.randn(6, 24), torch.randn(6, 4), torch.randn(6, 4, 4))
print("generated", len(generated))
""")
    assert output["generated"] == "1"


def test_handed_over_ops_become_their_kernels():
    """inline_kernels splices in each launcher's functional trace: no opaque op is left, each op's
    kernels appear as triton_kernel_wrapper_functional nodes, the graph stays well formed, each
    kernel's IR is generated once and each op traced once for the two sublayers, and the second
    sublayer's copy of a trace reads the second sublayer's inputs (the GPU test runs the result:
    test_kernels.py, test_backend_hands_the_kernels_to_inductor)."""
    output = _run_without_interpreter("""
import test_inline_kernels as here
from mhc_compile import private_apis, ops, templates
from mhc_compile.options import MHCOptions
from mhc_compile.passes import PassContext, inline_kernels
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

traces = []
functional_trace = private_apis.functional_trace
private_apis.functional_trace = lambda *args: traces.append(1) or functional_trace(*args)

from torch._guards import detect_fake_mode
from torch._inductor.virtualized import V

templates.kernels_active = lambda device: True  # as on CUDA, for these CPU tensors
graph = here._graph("fake", function=here._two_sublayers)
# Inductor runs its post-grad passes in the graph's fake mode (V.fake_mode).
fake_mode = detect_fake_mode([node.meta["val"] for node in graph.nodes if node.op == "placeholder"])
with V.set_fake_mode(fake_mode):
    print("inlined", inline_kernels.inline_kernels(graph, PassContext(MHCOptions())))
graph.lint()
calls = [node for node in graph.nodes if node.op == "call_function"]
print("opaque", sum(node.target in ops.OPAQUE_OPS for node in calls))
wrapper = torch.ops.higher_order.triton_kernel_wrapper_functional
names = [kernel_side_table.get_kernel(node.kwargs["kernel_idx"]).fn.fn.__name__
         for node in calls if node.target is wrapper]
print("kernels", ",".join(names))
print("generated", len(generated))
print("traces", len(traces))

def kernel_name(node):
    if node.target is not wrapper:
        return None
    return kernel_side_table.get_kernel(node.kwargs["kernel_idx"]).fn.fn.__name__

def upstream_kernels(node):
    seen, stack = set(), [node]
    while stack:
        current = stack.pop()
        if current not in seen:
            seen.add(current)
            stack.extend(current.all_input_nodes)
    return {kernel_name(found) for found in seen} - {None}

# The buffers the launchers allocate for the kernels to write, one storage each: splices of one
# trace sharing example values would look like aliases to Inductor's reinplace pass, which then
# copies every such buffer before its kernel.
from torch.multiprocessing.reductions import StorageWeakRef
allocations = (torch.ops.aten.empty, torch.ops.aten.empty_strided, torch.ops.aten.empty_like)
written = [argument.meta["val"] for node in calls if node.target is wrapper
           for name, argument in node.kwargs["kwargs"].items()
           if name in node.kwargs["tensors_to_clone"]
           and getattr(argument.target, "_overloadpacket", None) in allocations]
print("allocated_buffers", len(written))
print("their_storages", len({StorageWeakRef(value.untyped_storage()) for value in written}))

projections = [node for node in calls if kernel_name(node) == "_mhc_projection_kernel"]
print("projections_read_a_post_res_output", ",".join(
    str("_mhc_post_res_mix_fwd_kernel" in upstream_kernels(node.kwargs["kwargs"]["streams_ptr"]))
    for node in projections))
""")
    assert output["inlined"] == "8"
    assert output["opaque"] == "0"
    assert output["kernels"].split(",") == 2 * [
        "_mhc_projection_kernel", "_mhc_coefficients_fwd_kernel", "_mhc_pre_mix_fwd_kernel",
        "_mhc_post_res_mix_fwd_kernel", "_mhc_post_res_mix_bwd_kernel",
        "_mhc_pre_mix_grad_h_pre_kernel", "_mhc_coefficients_bwd_kernel",
        "_mhc_coefficients_bwd_streams_kernel",
    ]
    # Once per kernel and signature, not per launch (the backward reads the forward's projection).
    assert output["generated"] == "8"
    # One trace per op and signature: the second sublayer reuses the first one's four traces,
    # wired to its own inputs (its streams are the first sublayer's post/res output).
    assert output["traces"] == "4"
    assert output["projections_read_a_post_res_output"] == "False,True"
    assert int(output["allocated_buffers"]) >= 2 * 8  # at least one per kernel and sublayer
    assert output["their_storages"] == output["allocated_buffers"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernels_compiled_ahead_are_the_ones_launched(caplog):
    """What compile_ahead compiles from the graph's fake values (dtypes in place of tensors) is
    what the ops' first real launches look up: they compile nothing more. n = 5 and C = 40 (not a
    multiple of 16) are shapes no other test launches, so the compiles ahead are this test's. The
    worker processes compiled every config and built its host launcher (none failed and fell back
    to this process), so this process builds no launcher (a C compile under Triton 3.6)."""
    import logging

    import triton
    import triton.runtime.build

    caplog.set_level(logging.DEBUG, logger="mhc_compile.templates")

    streams, *middle, grad_out = (t.cuda() for t in _inputs(5, 40))
    inputs = (streams.bfloat16(), *middle, grad_out.bfloat16())
    graph = make_fx(_two_sublayers, tracing_mode="fake")(*inputs).graph
    compiles = []

    def record_compile(**details) -> bool:
        compiles.append(details.get("repr"))
        return False  # compile it

    built_here = []
    build = triton.runtime.build._build

    def record_build(name, *args, **kwargs):
        built_here.append(name)
        return build(name, *args, **kwargs)

    saved, triton.knobs.runtime.jit_cache_hook = triton.knobs.runtime.jit_cache_hook, record_compile
    triton.runtime.build._build = record_build
    try:
        with inductor_config.patch({"triton.cudagraphs": True}):
            inline_kernels.inline_kernels(graph, PassContext(MHCOptions()))
        for kernel_name in list(kernel_launch._COMPILING_AHEAD):
            kernel_launch._await_compiles_ahead(kernel_name)
        ahead = len(compiles)
        _two_sublayers(*inputs)
        torch.cuda.synchronize()
    finally:
        triton.knobs.runtime.jit_cache_hook = saved
        triton.runtime.build._build = build
    assert ahead >= 8, compiles
    assert len(compiles) == ahead, compiles[ahead:]
    assert "kernel configs ahead of their first launch" in caplog.text
    for failed in ("a process compiling the mHC kernels ahead failed",
                   "some kernel configs failed to compile ahead", "(which failed: compiled here)"):
        assert failed not in caplog.text, caplog.text
    assert "__triton_launcher" not in built_here, built_here
