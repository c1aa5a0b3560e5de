"""The zoo and the transformers matrix on CUDA: function kept at init through the eager rewrite
and through Inductor, and a few training steps. Skips on machines without CUDA (CI); run on the
GPU machine, recorded in bench/RESULTS.md."""

import copy
import warnings

import pytest
import torch

import mhc_compile
import test_third_party as third_party
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


def _train_losses(model, args, entry, steps: int, **options) -> list[float]:
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=mhc_compile.backend(**options))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        loss = entry.loss(compiled(*args), args)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_cudagraphs_replay_the_same_training():
    """cudagraphs=True: five steps (warm-up, recording, replays) give the losses of the same
    prepared model trained without CUDA graphs."""
    entry = ZOO["gpt"]
    model, args = _on_cuda("gpt")
    mhc_compile.prepare(model, *args)
    twin = copy.deepcopy(model)
    expected = _train_losses(model, args, entry, steps=5)
    replayed = _train_losses(twin, args, entry, steps=5, cudagraphs=True)
    torch.testing.assert_close(replayed, expected, rtol=1e-4, atol=1e-5)


class _MutatesItsInput(torch.nn.Module):
    """Two residual blocks, and a counter the caller passes in and forward increments: Inductor
    replays no graph that mutates an input it does not own as CUDA graphs; torch 2.11 finds it when
    it records the graph, at the second call."""

    def __init__(self, width=64):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(width, width), torch.nn.Linear(width, width)

    def forward(self, x, calls):
        calls.add_(1)
        x = x + self.fc1(x)
        return x + self.fc2(x)


def test_a_graph_inductor_will_not_replay_as_cuda_graphs_warns():
    model = _MutatesItsInput().cuda()
    x, calls = torch.randn(8, 64, device="cuda"), torch.zeros(1, device="cuda")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="mhc", options={"cudagraphs": True})
    with torch.no_grad(), pytest.warns(
            UserWarning, match="mhc: Inductor will not replay a compiled graph as CUDA graphs"):
        for _ in range(3):  # warm-up, recording (where the mutation is found), the next call
            torch.compiler.cudagraph_mark_step_begin()
            compiled(x, calls)


def test_half_precision_streams_under_inductor_on_cuda():
    """stream_dtype="bfloat16" on a float32 model: the kernels take bf16 streams, the output
    agrees with the plain model to bf16 rounding at init, and training lowers the loss."""
    entry = ZOO["llama"]
    model, args = _on_cuda("llama")
    plain = copy.deepcopy(model)
    mhc_compile.prepare(model, *args, options={"stream_dtype": "bfloat16"})
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=mhc_compile.backend(stream_dtype="bfloat16"))
    torch.testing.assert_close(compiled(*args), plain(*args), rtol=3e-2, atol=3e-2)
    losses = _train_losses(model, args, entry, steps=4, stream_dtype="bfloat16")
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("name", [pytest.param(name, id=name) for name in third_party.FAMILIES])
def test_third_party_matrix_through_inductor_on_cuda(name):
    """Each transformers family of the CPU matrix, on CUDA through Inductor with our kernels:
    the same blocks rewritten, equal to the plain model at init, and a few steps lower the loss."""
    model, args = third_party._build(name)
    model, args = model.cuda().eval(), tuple(a.cuda() for a in args)
    plain = copy.deepcopy(model)
    report = third_party._prepare(model, args)
    assert len(report.rewritten) == third_party.FAMILIES[name].blocks, report.summary()
    assert {b.ops for b in report.rewritten} == {"triton kernels"}
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="mhc")
    output = compiled(*args)
    torch.testing.assert_close(third_party._main_output(output),
                               third_party._main_output(plain(*args)), rtol=1e-3, atol=1e-3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(3):
        loss = third_party._loss(compiled(*args), args)
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("name", [pytest.param(name, id=name) for name in third_party.FAMILIES])
def test_third_party_matrix_under_cuda_graphs(name):
    """cudagraphs=True on each transformers family of the CPU matrix: Inductor replays every graph
    (no decline warning: the ops were kept whole for the replay) and a few steps lower the loss."""
    model, args = third_party._build(name)
    model, args = model.cuda().eval(), tuple(a.cuda() for a in args)
    third_party._prepare(model, args)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="mhc", options={"cudagraphs": True})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(4):  # warm-up, recording, replays
            torch.compiler.cudagraph_mark_step_begin()
            loss = third_party._loss(compiled(*args), args)
            losses.append(loss.item())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    assert not [str(w.message) for w in caught if "will not replay" in str(w.message)]
    assert losses[-1] < losses[0]
