"""The zoo on CUDA: function kept at init through the eager rewrite and through Inductor, and a
few training steps. Skips on machines without CUDA (CI); run on the GPU machine, recorded in
bench/RESULTS.md."""

import copy

import pytest
import torch

import mhc_compile
from zoo import ZOO

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(autouse=True)
def exact_float32():
    """cuDNN and cuBLAS default to TF32, whose rounding (1e-3) depends on the memory layout the
    rewrite changes (channels-last streams): compare in true fp32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _on_cuda(name):
    model, args = ZOO[name].factory()
    return model.cuda(), tuple(a.cuda() for a in args)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", list(ZOO))
def test_outputs_equal_at_init_on_cuda(name, mode):
    model, args = _on_cuda(name)
    model.train(mode == "train")
    plain = copy.deepcopy(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=mhc_compile.backend(eager=True))
    torch.testing.assert_close(compiled(*args), plain(*args), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["gpt", "llama", "vit", "resnet", "moe"])
def test_inductor_on_cuda_matches_eager_and_trains(name):
    entry = ZOO[name]
    model, args = _on_cuda(name)
    plain = copy.deepcopy(model)
    mhc_compile.prepare(model, *args)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="mhc")
    torch.testing.assert_close(compiled(*args), plain(*args), rtol=1e-3, atol=1e-3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    with torch.no_grad():
        before = entry.loss(compiled(*args), args).item()
    for _ in range(3):
        entry.loss(compiled(*args), args).backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        assert entry.loss(compiled(*args), args).item() < before
