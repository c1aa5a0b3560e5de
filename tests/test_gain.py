"""The Amax gain diagnostics against a hand computation, on a fresh, trained and loaded model."""

import json
import re
import textwrap

import pytest
import torch
import torch._dynamo.testing
import torch.nn.functional as F
from torch import nn

import mhc_compile
from mhc_compile import cli, reference
from hand_mhc import TanhBlocks


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every prepare/gain call compiles TanhBlocks.forward with a new backend: one cache entry
    each, and Dynamo stops compiling a function after 8."""
    torch._dynamo.reset()


def _model(seed=0, batch=2, tokens=5, width=6):
    torch.manual_seed(seed)
    model = TanhBlocks(width).double()
    return model, torch.randn(batch, tokens, width, dtype=torch.float64)


def _randomize_mhc_parameters(model, seed=1):
    """Fresh random mHC parameters (of a model, or of one MHCParameters store), wide enough
    that H_res is far from the identity."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in getattr(model, "mhc", model).named_parameters():
            scale = 0.5 if name.endswith("phi") else 1.0
            parameter.copy_(scale * torch.randn(parameter.shape, generator=generator,
                                                dtype=parameter.dtype))


def _hand_coefficients(model, x, n, constraint):
    """Each block's (h_pre, h_post, h_res) on the real streams, the mHC forward written out."""
    streams = x.unsqueeze(-2).repeat_interleave(n, dim=-2)  # the chain head replicates x
    per_block = []
    for index, fc in enumerate(model.fcs):
        p = model.mhc.blocks[f"fcs-{index}"]
        h_pre, h_post, h_res = reference.coefficients(
            streams, p.phi, p.alpha, p.b_pre, p.b_post, p.b_res, 20, constraint)
        y = torch.tanh(fc((h_pre.unsqueeze(-1) * streams).sum(dim=-2)))
        streams = h_res @ streams + h_post.unsqueeze(-1) * y.unsqueeze(-2)
        per_block.append((h_pre, h_post, h_res))
    return per_block


def _hand_gains(matrices):
    """Token mean and worst token of max |row sum| (inf-norm) and max |column sum| (1-norm)."""
    forward = torch.linalg.matrix_norm(matrices, ord=float("inf"))
    backward = torch.linalg.matrix_norm(matrices, ord=1)
    return [forward.mean(), forward.max(), backward.mean(), backward.max()]


@pytest.mark.parametrize("constraint,n", [("sinkhorn", 4), ("none", 3)], ids=["mHC-n4", "HC-n3"])
def test_gain_matches_a_hand_computation_on_three_blocks(constraint, n):
    model, x = _model()
    mhc_compile.prepare(model, x, options={"n": n, "constraint": constraint})
    _randomize_mhc_parameters(model)
    report = mhc_compile.gain(model, x)

    per_block = _hand_coefficients(model, x, n, constraint)
    h_res = [h.reshape(-1, n, n) for _, _, h in per_block]
    assert (report.n, report.constraint, len(report.chains)) == (n, constraint, 1)
    chain = report.chains[0]
    assert chain.tokens == 10 and [b.key for b in chain.blocks] == ["fcs.0", "fcs.1", "fcs.2"]
    for index, block in enumerate(chain.blocks):
        composite = torch.eye(n, dtype=torch.float64).expand(10, n, n)
        for later in h_res[index:]:  # x_{k+1} = H_k x_k: later blocks multiply on the left
            composite = later @ composite
        measured = block.composite
        expected = _hand_gains(composite)
        assert [measured.forward_mean, measured.forward_max, measured.backward_mean,
                measured.backward_max] == pytest.approx([e.item() for e in expected], rel=1e-10)
        single = block.single
        assert [single.forward_mean, single.forward_max, single.backward_mean,
                single.backward_max] == pytest.approx(
                    [e.item() for e in _hand_gains(h_res[index])], rel=1e-10)
        for spread, values in ((block.h_pre, per_block[index][0]), (block.h_post, per_block[index][1])):
            assert [spread.min, spread.mean, spread.max, spread.std] == pytest.approx(
                [values.min().item(), values.mean().item(), values.max().item(),
                 values.std(correction=0).item()], rel=1e-10)
    assert chain.whole == chain.blocks[0].composite
    assert report.largest_mean == max(b.composite.largest_mean for b in chain.blocks)
    if constraint == "sinkhorn":
        # Doubly stochastic: rows sum to 1 exactly (Sinkhorn ends on rows); columns only nearly,
        # since 20 iterations on logits this wide stop short (the paper's 1.6 has the same cause).
        assert chain.whole.forward_max == pytest.approx(1.0, abs=1e-12)
        assert 1.0 <= chain.whole.backward_max < 1.1
    else:
        assert report.largest_mean > 1.5, "random unconstrained H_res should amplify"


def test_fresh_compiled_trained_and_checkpoint_loaded_models(tmp_path):
    model, x = _model()
    target = torch.randn(2, 5, 2, dtype=torch.float64)
    compiled = torch.compile(model, backend=mhc_compile.backend(eager=True, constraint="none"))
    compiled(x)  # a freshly compiled model: the parameters exist after its first call
    fresh = mhc_compile.gain(model, x)
    # HC's init: H_res = I (b_res = I, phi = 0), so every gain is exactly 1.
    assert (fresh.largest_mean, fresh.largest_max) == (1.0, 1.0)

    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    for _ in range(4):
        F.mse_loss(compiled(x), target).backward()
        optimizer.step()
        optimizer.zero_grad()
    trained = mhc_compile.gain(model, x)
    assert trained.largest_mean != 1.0
    torch.save(model.state_dict(), tmp_path / "model.pt")

    loaded_model, _ = _model(seed=5)
    mhc_compile.prepare(loaded_model, x, options={"constraint": "none"})
    loaded_model.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    assert mhc_compile.gain(loaded_model, x).to_dict() == trained.to_dict()


def test_gain_leaves_the_model_as_it_was():
    model, x = _model()
    mhc_compile.prepare(model, x)
    _randomize_mhc_parameters(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.random.get_rng_state()
    mhc_compile.gain(model, x)
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_bad_inputs_are_clear_errors():
    model, x = _model()
    with pytest.raises(ValueError, match=re.escape(
            "mhc gain: TanhBlocks has no mHC parameters. Call mhc_compile.prepare(model, "
            "*example_args, options=...) first")):
        mhc_compile.gain(model, x)
    mhc_compile.prepare(model, x, options={"exclude": ["fcs.1"]})
    with pytest.raises(ValueError, match=re.escape(
            "mhc gain: the model's mHC parameters were created with constraint='sinkhorn', but "
            "constraint='none' was asked for")):
        mhc_compile.gain(model, x, options={"exclude": ["fcs.1"], "constraint": "none"})
    with pytest.raises(ValueError, match=re.escape(
            "mhc gain: block(s) fcs-1 have no mHC parameters on this model")):
        mhc_compile.gain(model, x)
    assert set(model.mhc.blocks) == {"fcs-0", "fcs-2"}, "the probe must not add parameters"
    # With the options it was prepared with: two chains of one block (fcs.1 stays plain).
    assert len(mhc_compile.gain(model, x, options={"exclude": ["fcs.1"]}).chains) == 2
    with pytest.raises(TypeError, match=re.escape(
            "mhc gain: pass the model itself, not the module torch.compile returned")):
        mhc_compile.gain(torch.compile(model), x)
    with pytest.raises(ValueError, match=re.escape(
            "mhc GainLogger: every must be a positive integer, got 0")):
        mhc_compile.GainLogger(model, every=0)


def test_logger_measures_every_k_steps_without_touching_the_compiled_step():
    model, x = _model()
    target = torch.randn(2, 5, 2, dtype=torch.float64)
    mhc_compile.prepare(model, x, options={"constraint": "none"})
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    counter = torch._dynamo.testing.CompileCounterWithBackend(
        mhc_compile.backend(eager=True, constraint="none"))
    compiled = torch.compile(model, backend=counter)
    logged = []
    logger = mhc_compile.GainLogger(model, every=2, log=lambda step, report: logged.append(step))
    for step in range(5):
        report = logger(step, x[:1])
        if step % 2:
            assert report is None
        else:
            assert report.to_dict() == mhc_compile.gain(model, x[:1]).to_dict()
        F.mse_loss(compiled(x), target).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert counter.frame_count == 1, "the training step must stay one graph, compiled once"
    assert logged == [0, 2, 4] == [step for step, _ in logger.history]
    assert len(logger.probe.backend.report.blocks) == 3, "the probe traced once"
    first, last = logger.history[0][1], logger.history[-1][1]
    assert first.largest_mean == 1.0 and last.largest_mean != 1.0
    assert logger.largest_mean == max(r.largest_mean for _, r in logger.history)
    assert logger.largest_max >= logger.largest_mean


FACTORY = textwrap.dedent('''
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fcs = nn.ModuleList(nn.Linear(6, 6) for _ in range(3))

        def forward(self, x):
            for fc in self.fcs:
                x = x + torch.tanh(fc(x))
            return x

    def build():
        torch.manual_seed(0)
        return Net(), (torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(3)),)
''')


def test_cli_report_gain_from_a_checkpoint(tmp_path, capsys):
    target = tmp_path / "net.py"
    target.write_text(FACTORY)
    model, args = cli.load_target(f"{target}:build")
    mhc_compile.prepare(model, *args, options={"constraint": "none"})
    _randomize_mhc_parameters(model)
    torch.save(model.state_dict(), tmp_path / "net.pt")
    expected = mhc_compile.gain(model, *args).to_dict()

    assert cli.main(["report", f"{target}:build", "--gain", "--constraint", "none",
                     "--checkpoint", str(tmp_path / "net.pt"), "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "mHC gain n=4 (none), 3 blocks in 1 chain run(s)" in out and "fcs.2" in out
    assert json.loads((tmp_path / "r.json").read_text())["gain"] == json.loads(json.dumps(expected))

    assert cli.main(["report", f"{target}:build", "--checkpoint", "x.pt"]) == 2
    assert "--checkpoint is read by --gain; add --gain" in capsys.readouterr().err
    assert cli.main(["report", f"{target}:build", "--gain", "--checkpoint",
                     str(tmp_path / "missing.pt")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
    assert cli.main(["report", f"{target}:build", "--gain", "--n", "2",
                     "--checkpoint", str(tmp_path / "net.pt")]) == 2
    assert "does not fit the prepared model" in capsys.readouterr().err


class BrokenBlock(nn.Module):
    """Two residuals with a graph break between: each is its own one-block chain."""

    def __init__(self, width=6):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x):
        x = x + torch.tanh(self.fc1(x))
        torch._dynamo.graph_break()
        return x + torch.tanh(self.fc2(x))


class BrokenStack(nn.Module):
    def __init__(self, width=6, depth=2):
        super().__init__()
        self.blocks = nn.ModuleList(BrokenBlock(width) for _ in range(depth))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def test_chains_split_by_graph_breaks_and_frames_reused_across_instances():
    torch.manual_seed(0)
    model, x = BrokenStack().double(), torch.randn(2, 3, 6, dtype=torch.float64)
    mhc_compile.prepare(model, x, options={"n": 2, "constraint": "none"})
    # One compiled frame serves both instances; each binds its own parameters in the prepared
    # model's store, found from its weights.
    store = model.mhc
    assert sorted(store.blocks) == ["blocks-0-fc1", "blocks-0-fc2", "blocks-1-fc1", "blocks-1-fc2"]
    _randomize_mhc_parameters(store)
    with torch.no_grad():
        for index in range(2):  # distinct per instance
            store.blocks[f"blocks-{index}-fc1"].b_res.add_(index)
    report = mhc_compile.gain(model, x)

    expected, h = [], x
    for index, block in enumerate(model.blocks):
        for key, fc in (("fc1", block.fc1), ("fc2", block.fc2)):
            p = store.blocks[f"blocks-{index}-{key}"]
            streams = h.unsqueeze(-2).repeat_interleave(2, dim=-2)
            h_pre, h_post, h_res = reference.coefficients(
                streams, p.phi, p.alpha, p.b_pre, p.b_post, p.b_res, 20, "none")
            y = torch.tanh(fc((h_pre.unsqueeze(-1) * streams).sum(dim=-2)))
            h = (h_res @ streams + h_post.unsqueeze(-1) * y.unsqueeze(-2)).mean(dim=-2)
            expected.append(torch.linalg.matrix_norm(h_res.reshape(-1, 2, 2), ord=float("inf")).mean())
    assert [(c.chain, c.run, len(c.blocks)) for c in report.chains] == [
        (0, 0, 1), (0, 0, 1), (0, 1, 1), (0, 1, 1)]
    assert [c.blocks[0].key for c in report.chains] == [
        "blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2"]
    graphs = [c.graph for c in report.chains]
    assert graphs[0] == graphs[2] != graphs[1] == graphs[3]
    assert [c.whole.forward_mean for c in report.chains] == pytest.approx(
        [e.item() for e in expected], rel=1e-10)
