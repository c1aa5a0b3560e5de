"""Models that already have hyper-connections: a tiny random DeepSeek-V4 from transformers has its
hyper-connections recognised by structure and lowered onto the mhc:: ops (passes/
lower_hyper_connections.py), trains as the eager model does (loss and every gradient, at init and
after a few steps), and a hyper-connection that is not the formulation stays as written, with the
part that differs in the report.

Eager graphs (backend option eager=True): the ops run the float64-checked reference on CPU; the
kernels' own tests cover the formulation on the kernels (tests/test_kernels.py).
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mhc_compile
from mhc_compile import ops

transformers = pytest.importorskip("transformers")

SIZES = dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=1, vocab_size=101, head_dim=16,
             q_lora_rank=16, o_lora_rank=16, n_routed_experts=4, num_experts_per_tok=2,
             index_head_dim=8, qk_rope_head_dim=8)
SITES = ["model.layers.0.attn_hc", "model.layers.0.ffn_hc", "model.layers.1.attn_hc",
         "model.layers.1.ffn_hc"]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _deepseek_v4(seed=0, **config):
    """A tiny random DeepSeek-V4 whose hyper-connection weights are far from any identity (its
    own init leaves them empty), and a batch of token ids."""
    torch.manual_seed(seed)
    model = transformers.DeepseekV4ForCausalLM(transformers.DeepseekV4Config(**{**SIZES, **config}))
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "hc" in name:
                param.copy_(0.5 * torch.randn(param.shape, generator=generator))
    return model, torch.randint(0, SIZES["vocab_size"], (2, 8), generator=generator)


def _assert_same_gradients(model, reference):
    """Every gradient within float32 tolerance of the eager model's, relative to the largest
    (the MoE router's are ~1e-10: their rounding is not a difference)."""
    scale = max(p.grad.abs().max() for p in reference.parameters() if p.grad is not None)
    for (name, got), expected in zip(model.named_parameters(), reference.parameters()):
        if expected.grad is None:
            assert got.grad is None, name
            continue
        torch.testing.assert_close(got.grad, expected.grad, rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_deepseek_v4_hyper_connections_are_lowered_and_train_like_the_eager_model(monkeypatch):
    model, ids = _deepseek_v4()
    reference = copy.deepcopy(model)
    report = mhc_compile.report(model, ids)
    assert [(b.key, b.status, b.shape[-2]) for b in report.lowered] == [
        (site, "lowered", 4) for site in SITES]
    assert all("DeepSeek-V4's formulation, n=4, 20 Sinkhorn iterations" in b.reason
               for b in report.lowered)
    assert report.rewritten == [] and "4 existing hyper-connections lowered" in report.summary()

    calls = []
    coefficients = ops.reference.coefficients_pre_mix_and_projection
    monkeypatch.setattr(ops.reference, "coefficients_pre_mix_and_projection",
                        lambda *args: calls.append(args[-1]) or coefficients(*args))
    compiled = torch.compile(model, backend=mhc_compile.backend(eager=True))
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, reference)]
    for step in range(3):
        loss = compiled(ids, labels=ids).loss
        expected = reference(ids, labels=ids).loss
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6, msg=f"step {step}")
        loss.backward()
        expected.backward()
        _assert_same_gradients(model, reference)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
        # the model's own hyper-connections ran on the op, one call per sublayer
        assert calls[-len(SITES):] == ["deepseek_v4:1e-06"] * len(SITES)
    assert not hasattr(model, "mhc"), "lowering created mHC parameters"


@pytest.mark.parametrize("config, described", [
    (dict(hc_mult=2, hc_sinkhorn_iters=3, hc_eps=1e-2), "n=2, 3 Sinkhorn iterations, eps=0.01"),
])
def test_other_settings_of_the_formulation_are_lowered_with_them(config, described):
    model, ids = _deepseek_v4(seed=3, **config)
    reference = copy.deepcopy(model)
    report = mhc_compile.report(model, ids)
    assert len(report.lowered) == len(SITES) and all(described in b.reason for b in report.lowered)
    compiled = torch.compile(model, backend=mhc_compile.backend(eager=True))
    loss, expected = compiled(ids, labels=ids).loss, reference(ids, labels=ids).loss
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    expected.backward()
    _assert_same_gradients(model, reference)


def test_a_part_that_is_not_the_formulation_stays_as_written_with_the_reason():
    """The kernels' RMS eps is 1e-6: a DeepSeek-V4 built with another is not lowered, and the
    report names the part."""
    model, ids = _deepseek_v4(rms_norm_eps=1e-5)
    report = mhc_compile.report(model, ids)
    assert report.lowered == []
    hyper = [b for b in report.skipped if b.pattern == "existing hyper-connection"]
    assert [b.key for b in hyper] == SITES
    assert all("not lowered: the RMS norm's eps is 1e-05; the kernels use 1e-06" in b.reason
               for b in hyper)


class HandWrittenSublayer(nn.Module):
    """DeepSeek-V4's formulation written by hand, in other spellings than transformers' (flatten,
    keyword dims, torch.matmul on a transpose), around a linear f."""

    def __init__(self, n, width, iters, eps):
        super().__init__()
        self.n, self.iters, self.eps = n, iters, eps
        self.fn = nn.Parameter(0.3 * torch.randn((n + 2) * n, n * width))
        self.base, self.scale = nn.Parameter(torch.randn((n + 2) * n)), nn.Parameter(torch.randn(3))
        self.f = nn.Linear(width, width)

    def forward(self, streams):
        n, eps = self.n, self.eps
        flat = streams.flatten(2)
        normed = flat * torch.rsqrt(flat.square().mean(dim=-1, keepdim=True) + 1e-6)
        pre_w, post_w, comb_w = F.linear(normed, self.fn).split([n, n, n * n], dim=-1)
        pre_b, post_b, comb_b = self.base.split([n, n, n * n])
        pre_s, post_s, comb_s = self.scale.unbind(0)
        pre = torch.sigmoid(pre_w * pre_s + pre_b) + eps
        post = 2 * torch.sigmoid(post_w * post_s + post_b)
        comb = torch.softmax(comb_w.view(*comb_w.shape[:-1], n, n) * comb_s + comb_b.view(n, n),
                             dim=-1) + eps
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
        for _ in range(self.iters - 1):
            comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
            comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
        out = self.f((pre.unsqueeze(dim=-1) * streams).sum(dim=2))
        return post.unsqueeze(dim=-1) * out.unsqueeze(dim=-2) + torch.matmul(comb.transpose(-1, -2), streams)


class HandWrittenHyperConnections(nn.Module):
    def __init__(self, n=3, width=8, iters=5, eps=1e-3, depth=2):
        super().__init__()
        self.n = n
        self.sublayers = nn.ModuleList(HandWrittenSublayer(n, width, iters, eps) for _ in range(depth))

    def forward(self, x):
        streams = x.unsqueeze(2).expand(-1, -1, self.n, -1)
        for sublayer in self.sublayers:
            streams = sublayer(streams)
        return streams.sum(dim=2)


@pytest.mark.parametrize("eager", [True, False], ids=["eager-graph", "inductor"])
def test_a_hand_written_copy_of_the_formulation_is_recognised_by_its_structure(eager):
    """Not by class names: a hand-written copy is lowered, and computes what it computed (float64:
    outputs and every gradient to 1e-10), also through Inductor with the backend's passes."""
    torch.manual_seed(0)
    model = HandWrittenHyperConnections().double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    report = mhc_compile.report(model, x)
    assert [b.key for b in report.lowered] == ["sublayers.0", "sublayers.1"]
    assert all("n=3, 5 Sinkhorn iterations, eps=0.001" in b.reason for b in report.lowered)
    reference = copy.deepcopy(model)
    got = torch.compile(model, backend=mhc_compile.backend(eager=eager))(x)
    expected = reference(x)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    got.square().sum().backward()
    expected.square().sum().backward()
    for (name, param), other in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(param.grad, other.grad, rtol=1e-10, atol=1e-12, msg=name)
