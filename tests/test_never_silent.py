"""Never silent: what a compile leaves plain is reported with a reason and warned about once, a
rewritten frame never falls back to the plain model, and models with hyper-connections of their
own are recognised and, where they are not a formulation the ops run (tests/
test_existing_hyper_connections.py), left as they are with the reason."""

import re

import pytest
import torch
import torch._dynamo
from torch import nn

import mhc_compile
from mhc_compile import SkipReason


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Broadcasting(nn.Module):
    """Two residual blocks and one add whose f(x) is [.., 1]: broadcast, left plain."""

    def __init__(self, width=6):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, width), nn.Linear(width, width)
        self.gate = nn.Linear(width, 1)

    def forward(self, x):
        x = x + self.fc1(x)
        x = x + self.fc2(x)
        return x + self.gate(x)


class NoResidual(nn.Module):
    def __init__(self, width=6):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _eager(model):
    return torch.compile(model, backend=mhc_compile.backend(eager=True))


def test_skipped_blocks_warn_once_with_count_and_reason():
    model, x = Broadcasting(), torch.randn(3, 6)
    compiled = _eager(model)
    with pytest.warns(UserWarning) as caught:
        compiled(x)
    messages = [str(w.message) for w in caught if str(w.message).startswith("mhc:")]
    assert messages == [
        "mhc: 1 residual block(s) of a compiled graph of Broadcasting stay plain residuals "
        "(2 rewritten). Main "
        f"reasons: 1 x {SkipReason.BROADCAST.value}. mhc_compile.report(model, "
        "*example_args).print() lists every block and why."]
    with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
        import warnings
        with warnings.catch_warnings(record=True) as again:
            warnings.simplefilter("always")
            compiled(torch.randn(5, 6))  # a recompile: the same finding is not repeated
    assert not [w for w in again if str(w.message).startswith("mhc:")]


def test_a_graph_with_weights_and_no_residual_warns():
    with pytest.warns(UserWarning, match="no residual block x \\+ f\\(x\\) was found"):
        _eager(NoResidual())(torch.randn(3, 6))


def test_prepare_and_report_do_not_warn_they_return_the_report():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = mhc_compile.report(Broadcasting(), torch.randn(3, 6))
    assert [b.status for b in report.blocks] == ["rewritten", "rewritten", "skipped"]


class Stack(nn.Module):
    def __init__(self, width=6, depth=2):
        super().__init__()
        self.fcs = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, x):
        for fc in self.fcs:
            x = x + torch.tanh(fc(x))
        return x


def test_past_the_recompile_limit_a_rewritten_frame_raises_instead_of_running_plain():
    model = Stack()
    compiled = torch.compile(model, backend=mhc_compile.backend(eager=True), dynamic=False)
    with torch._dynamo.config.patch(recompile_limit=3, fail_on_recompile_limit_hit=False):
        for length in range(1, 4):
            compiled(torch.randn(2, length, 6))
        with pytest.raises(torch._dynamo.exc.FailOnRecompileLimitHit):
            compiled(torch.randn(2, 4, 6))


class HandWrittenMHC(nn.Module):
    """A hyper-connection as research code writes it: n streams [B, T, n, C], H_res mixes them."""

    def __init__(self, width=8, n=4, depth=2):
        super().__init__()
        self.n = n
        self.fs = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.mix = nn.ParameterList(nn.Parameter(torch.eye(n) + 0.1 * torch.rand(n, n)) for _ in range(depth))
        self.pre = nn.ParameterList(nn.Parameter(torch.full((n,), 1.0 / n)) for _ in range(depth))
        self.post = nn.ParameterList(nn.Parameter(torch.ones(n)) for _ in range(depth))

    def forward(self, x):
        streams = x.unsqueeze(-2).expand(*x.shape[:-1], self.n, x.shape[-1])
        for f, mix, pre, post in zip(self.fs, self.mix, self.pre, self.post):
            h_res = torch.softmax(mix, dim=-1)
            y = torch.tanh(f((pre.unsqueeze(-1) * streams).sum(-2)))
            streams = h_res @ streams + post.unsqueeze(-1) * y.unsqueeze(-2)
        return streams.mean(-2)


def test_a_model_with_its_own_hyper_connections_runs_unchanged_and_is_reported_as_such():
    torch.manual_seed(0)
    model, x = HandWrittenMHC(), torch.randn(2, 5, 8)
    expected = model(x)
    report = mhc_compile.report(model, x)
    assert [(b.status, b.pattern, b.shape) for b in report.blocks] == [
        ("skipped", "existing hyper-connection", (2, 5, 4, 8))] * 2
    assert all(b.reason.startswith(SkipReason.HYPER_CONNECTION.value + "; not lowered: ")
               for b in report.blocks)
    with pytest.warns(UserWarning, match="2 x the model already has hyper-connections"):
        out = _eager(model)(x)
    torch.testing.assert_close(out, expected)
    assert not hasattr(model, "mhc")


class BreakBeforeAdd(nn.Module):
    def __init__(self, width=6):
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(width), nn.Linear(width, width)

    def forward(self, x):
        h = self.fc(self.norm(x))
        torch._dynamo.graph_break()  # what a print() or an .item() check does
        return x + h


class RoutedByPython(nn.Module):
    """MoE routing with data-dependent Python: nonzero per expert, skipping empty experts."""

    def __init__(self, width=6, experts=3):
        super().__init__()
        self.router = nn.Linear(width, experts)
        self.experts = nn.ModuleList(nn.Linear(width, width) for _ in range(experts))

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        choice = self.router(flat).argmax(-1)
        out = torch.zeros_like(flat)
        for index, expert in enumerate(self.experts):
            tokens = (choice == index).nonzero().squeeze(-1)
            if tokens.numel() == 0:
                continue
            out.index_add_(0, tokens, expert(flat[tokens]))
        return out.reshape(x.shape)


class MoEBlock(nn.Module):
    def __init__(self, width=6):
        super().__init__()
        self.norm, self.moe, self.head = nn.LayerNorm(width), RoutedByPython(width), nn.Linear(width, 2)

    def forward(self, x):
        x = x + self.moe(self.norm(x))
        return self.head(x)


@pytest.mark.parametrize("cls, line", [
    (BreakBeforeAdd, "return x + h"), (MoEBlock, "x = x + self.moe(self.norm(x))")])
def test_a_residual_split_by_a_graph_break_is_reported_with_the_line_of_the_add(cls, line):
    torch.manual_seed(0)
    model, x = cls(), torch.randn(2, 5, 6)
    expected = model(x)
    backend = mhc_compile.backend(eager=True)
    with pytest.warns(UserWarning, match="split by a graph break"):
        torch.testing.assert_close(torch.compile(model, backend=backend)(x), expected)
    split = [b for b in backend.report.blocks if b.reason == SkipReason.GRAPH_BREAK.value]
    assert len(split) == 1 and backend.report.rewritten == []
    import inspect
    source, first = inspect.getsourcelines(cls.forward)
    add_line = first + next(i for i, text in enumerate(source) if line in text)
    assert split[0].where == f"test_never_silent.py:{add_line}"


def test_a_second_model_with_the_same_finding_is_warned_too():
    for _ in range(2):
        with pytest.warns(UserWarning, match="of a compiled graph of Broadcasting stay plain"):
            _eager(Broadcasting())(torch.randn(3, 6))


class AttentionBlock(nn.Module):
    """torchvision's ViT encoder block: nn.MultiheadAttention, one opaque call in Dynamo's graph."""

    def __init__(self, width=16):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, 4, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(width, 32), nn.GELU(), nn.Linear(32, width))

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attention(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


def test_multihead_attention_residuals_in_a_sequential_are_rewritten():
    torch.manual_seed(0)
    model, x = nn.Sequential(AttentionBlock(), AttentionBlock()).double(), torch.randn(2, 5, 16).double()
    expected = model(x)
    report = mhc_compile.prepare(model, x)
    assert [(b.path, b.key, b.chain) for b in report.rewritten] == [  # keys below each block
        ("0", "attention", 0), ("0", "mlp.0", 0), ("1", "attention", 0), ("1", "mlp.0", 0)]
    assert not hasattr(model, "mhc")  # nn.Sequential runs every child: the blocks hold them
    assert sorted(model[0].mhc.blocks) == ["attention", "mlp-0"]
    torch.testing.assert_close(model(x), expected)  # the plain forward still runs
    torch.testing.assert_close(_eager(model)(x), expected)


def test_prepare_of_an_eval_mode_transformer_encoder_finds_what_training_compiles():
    """Under no_grad, nn.TransformerEncoderLayer in eval mode takes a fused fast path with no
    residual in sight; prepare traces with grad enabled, as the training step does."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    x = torch.randn(2, 5, 16)
    report = mhc_compile.prepare(model, x)
    assert len(report.rewritten) == 4, report.summary()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    compiled = _eager(model)
    for _ in range(2):  # the optimizer step check would refuse parameters created after it
        compiled(x).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()


def test_a_graph_running_mhc_blocks_without_their_parameters_warns():
    """After prepare, eval-mode inference under no_grad takes nn.TransformerEncoderLayer's fused
    fast path: the trained mHC parameters would be ignored, which is said, not left silent."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    x = torch.randn(2, 5, 16)
    mhc_compile.prepare(model, x)
    compiled = _eager(model)
    with torch.no_grad(), pytest.warns(UserWarning, match=re.escape(
            "runs the weights of 4 block(s) that have mHC parameters without them")):
        compiled(x)
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            expected = compiled(x)  # the rewritten graph again, under no_grad
        torch.testing.assert_close(expected, _eager(model)(x))
    finally:
        torch.backends.mha.set_fastpath_enabled(True)


class TwoBlocks(nn.Module):
    def __init__(self, width=8):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x):
        x = x + self.fc1(x)
        return x + self.fc2(x)


@pytest.mark.parametrize("cudagraphs, kernels, warned", [
    (True, True, True), (False, True, False), (True, False, False)])
def test_a_graph_inductor_will_not_replay_as_cuda_graphs_warns_once(monkeypatch, cudagraphs, kernels,
                                                                    warned):
    """Under CUDA graphs the mHC ops stay whole for the replay (passes/inline_kernels.py); if
    Inductor then declines to replay the graph (it counts a "cudagraph skip", and logs the reason
    only under TORCH_LOGS=cudagraphs), the ops launch their kernels from Python at every step, and
    the user is told once. Inductor declines every CPU graph: here the graph is made to count as
    running the mHC kernels (on CPU the ops run the reference, and no warning is due;
    tests/test_gpu.py has the CUDA case). Such a graph's kernels compile ahead, so their worker
    processes start before Inductor compiles it (here recorded, not started)."""
    import importlib

    from mhc_compile import kernel_launch, private_apis

    events = []
    if kernels:
        backend = importlib.import_module("mhc_compile.backend")
        monkeypatch.setattr(backend, "_mhc_kernel_device",
                            lambda graph_module, example_inputs: torch.device("cuda", 1))
    monkeypatch.setattr(kernel_launch, "start_compile_workers",
                        lambda index: events.append(("workers", index)))
    inductor_compile = private_apis.inductor_compile
    monkeypatch.setattr(private_apis, "inductor_compile",
                        lambda *args: events.append("inductor") or inductor_compile(*args))
    model, x = TwoBlocks(), torch.randn(3, 8)
    compiled = torch.compile(model, backend="mhc", options={"n": 2, "cudagraphs": cudagraphs})
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled(x)
        compiled(torch.randn(5, 8))  # a recompile: said once
    messages = [str(w.message) for w in caught if "will not replay" in str(w.message)]
    assert len(messages) == int(warned), messages
    assert events == ([("workers", 1), "inductor"] * 2 if warned else ["inductor"] * 2)
    if warned:
        assert messages[0].startswith("mhc: Inductor will not replay a compiled graph as CUDA graphs")
        assert "TORCH_LOGS=cudagraphs" in messages[0]
