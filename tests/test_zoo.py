"""Every model of the zoo through the mhc backend: blocks found, function kept at init, training,
state_dict round trip. The rewritten graphs run eagerly here (option eager=True) to keep CI
short; test_inductor.py covers the Inductor path on a few models."""

import copy

import pytest
import torch

import mhc_compile
from mhc_compile import SkipReason
from zoo import ZOO

REWRITTEN = [name for name, entry in ZOO.items() if entry.expected_blocks and name != "broadcast"]


def _compiled(model, **options):
    torch._dynamo.reset()
    return torch.compile(model, backend=mhc_compile.backend(eager=True, **options))


@pytest.mark.parametrize("name", list(ZOO))
def test_blocks_found(name):
    entry = ZOO[name]
    model, args = entry.factory()
    report = mhc_compile.report(model, *args)
    if name == "broadcast":
        assert [b.reason for b in report.blocks] == [SkipReason.BROADCAST.value]
        return
    assert len(report.rewritten) == entry.expected_blocks, report.summary()
    projections = 2 if name == "resnet" else 0  # stages 2 and 3 open with a downsampling block
    assert [b.reason for b in report.skipped] == [SkipReason.PROJECTION_SHORTCUT.value] * projections
    assert all(b.path or b.key for b in report.blocks)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", list(ZOO))
def test_outputs_equal_at_init(name, mode):
    model, args = ZOO[name].factory()
    model.train(mode == "train")
    plain = copy.deepcopy(model)  # BatchNorm statistics move in train mode: compare fresh copies
    torch.testing.assert_close(_compiled(model)(*args), plain(*args), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", REWRITTEN)
def test_training_moves_mhc_parameters_lowers_the_loss_and_round_trips(name, tmp_path):
    entry = ZOO[name]
    model, args = entry.factory()
    mhc_compile.prepare(model, *args)
    initial = {k: v.clone() for k, v in model.mhc.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    compiled = _compiled(model)
    with torch.no_grad():
        loss_before = entry.loss(compiled(*args), args).item()
    for _ in range(3):
        entry.loss(compiled(*args), args).backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        loss_after = entry.loss(compiled(*args), args).item()
        trained_output = compiled(*args)
    assert loss_after < loss_before
    moved = [k for k, v in model.mhc.state_dict().items() if not torch.equal(v, initial[k])]
    assert any(k.endswith("phi") for k in moved) and any(k.endswith("b_res") for k in moved)

    torch.save(model.state_dict(), tmp_path / "trained.pt")
    fresh, fresh_args = entry.factory(seed=1)
    mhc_compile.prepare(fresh, *fresh_args)
    fresh.load_state_dict(torch.load(tmp_path / "trained.pt"))
    with torch.no_grad():
        torch.testing.assert_close(_compiled(fresh)(*args), trained_output)


def test_no_residual_model_runs_unchanged_and_reports_zero():
    model, args = ZOO["no_residual"].factory()
    report = mhc_compile.prepare(model, *args)
    assert report.rewritten == [] and "0 blocks rewritten" in report.summary()
    assert not hasattr(model, "mhc")


def test_graph_break_model_rewrites_both_graphs():
    model, args = ZOO["graph_break"].factory()
    report = mhc_compile.report(model, *args)
    assert {b.graph for b in report.rewritten} == {0, 1}
