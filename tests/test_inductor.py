"""The full path: backend="mhc" through Inductor (AOT autograd, partitioner, codegen), forward and
backward against the eager model at init. Compile-heavy: kept to two small models."""

import copy

import pytest
import torch
import torch._dynamo.testing

import mhc_compile
from zoo import ZOO


@pytest.mark.parametrize("name", ["gpt", "resnet"])
def test_inductor_matches_eager_forward_and_backward(name):
    entry = ZOO[name]
    model, args = entry.factory()
    plain = copy.deepcopy(model)
    mhc_compile.prepare(model, *args)
    rewritten = copy.deepcopy(model)  # the same mHC parameters, run by the eager rewritten graph
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("mhc")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    output, expected = compiled(*args), plain(*args)
    torch.testing.assert_close(output, expected, rtol=1e-4, atol=1e-4)
    entry.loss(output, args).backward()
    entry.loss(expected, args).backward()
    compared = 0
    for (name_, p), q in zip(plain.named_parameters(), [p for n, p in model.named_parameters() if not n.startswith("mhc.")]):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-4, msg=name_)
        compared += 1
    assert compared == len(list(plain.parameters()))
    compiled(*args)
    assert counter.frame_count == 1
    torch._dynamo.reset()
    eager = torch.compile(rewritten, backend=mhc_compile.backend(eager=True))
    entry.loss(eager(*args), args).backward()
    mhc_grads = dict(model.mhc.named_parameters())
    for name_, p in rewritten.mhc.named_parameters():  # Inductor's backward of the mHC ops
        torch.testing.assert_close(mhc_grads[name_].grad, p.grad, rtol=1e-3, atol=1e-6, msg=name_)
    assert len(mhc_grads) == len(list(rewritten.mhc.parameters())) > 0


def test_half_precision_streams_under_inductor(monkeypatch):
    """stream_dtype="bfloat16" through Inductor (AOT autograd, the recompute policy, codegen): the
    mHC ops get bf16 streams, the float32 model's output stays within bf16 rounding at init, and
    every parameter gets a finite gradient."""
    from mhc_compile import reference

    stream_dtypes = set()
    post_res_mix = reference.post_res_mix
    monkeypatch.setattr(reference, "post_res_mix", lambda streams, *rest: (
        stream_dtypes.add(streams.dtype) or post_res_mix(streams, *rest)))
    entry = ZOO["gpt"]
    model, args = entry.factory()
    plain = copy.deepcopy(model)
    mhc_compile.prepare(model, *args, options={"stream_dtype": "bfloat16"})
    stream_dtypes.clear()  # what the compiled graph passes, not the eager trace of prepare
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=mhc_compile.backend(stream_dtype="bfloat16"))
    output = compiled(*args)
    assert output.dtype == torch.float32 and stream_dtypes == {torch.bfloat16}
    torch.testing.assert_close(output, plain(*args), rtol=3e-2, atol=3e-2)
    entry.loss(output, args).backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())


def test_a_restarted_compile_is_served_from_the_caches(tmp_path, monkeypatch):
    """Compiling the same model again (a restarted job, or a recompile) reuses AOT autograd's and
    Inductor's cached graphs: the functions the rewrite puts in the graph do not make AOT autograd
    bypass its cache, and what the cache serves computes what the first compile did."""
    from torch._dynamo.utils import counters
    from torch._functorch import config as functorch_config
    from torch._inductor import config as inductor_config

    from mhc_compile.examples import llama

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    model, args = llama(seed=0, batch=2, seq=8, width=32, depth=2, vocab=64)
    mhc_compile.prepare(model, *args)
    results = []
    with inductor_config.patch(fx_graph_cache=True), \
            functorch_config.patch(enable_autograd_cache=True):
        for _ in range(2):
            torch._dynamo.reset()
            counters.clear()
            model.zero_grad()
            output = torch.compile(model, backend="mhc")(*args)
            output.float().square().mean().backward()
            results.append((output.detach(), [p.grad.clone() for p in model.parameters()],
                            dict(counters["aot_autograd"])))
    (first, first_grads, cold), (second, second_grads, warm) = results
    assert cold.get("autograd_cache_saved") == 1 and "autograd_cache_bypass" not in cold, cold
    assert warm.get("autograd_cache_hit") == 1 and "autograd_cache_bypass" not in warm, warm
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    for got, expected in zip(second_grads, first_grads):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
