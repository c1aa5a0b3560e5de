"""bench/e2e.py --merge: runs of one size per device call joined into one table and plot (CPU)."""

import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch

import benches

@pytest.fixture(scope="module")
def e2e():
    return benches.load("e2e")


def _worker_row(size: str, width: int, variant: str, step_ms: float, peak_gib: float) -> dict:
    """What a worker returns for one variant (the fields summarize and table read)."""
    return {"size": size, "width": width, "depth": 2, "variant": variant, "tokens_per_step": 512,
            "stream_dtype": "bfloat16", "step_ms_median": step_ms, "peak_memory_bytes": peak_gib * 2**30,
            "cold_compile_s": 10.0, "tokens_per_s": 512 / step_ms * 1e3, "copy_bandwidth": 3e12}


def _run_file(e2e, tmp_path: Path, size: str, width: int, device: str = "H100") -> tuple[str, dict]:
    steps = {"baseline": random.uniform(10, 20), "mhc": random.uniform(20, 30)}
    rows = [_worker_row(size, width, variant, ms, random.uniform(1, 2) * width / 1024)
            for variant, ms in reversed(steps.items())]  # mhc first: merge must order them
    path = tmp_path / f"{size}.json"
    path.write_text(json.dumps({"device": device, "commit": "abc1234", "torch": "2.11",
                                "rows": e2e.summarize(rows)}))
    return str(path), steps


def test_merge_joins_the_sizes_in_order_with_their_own_baselines(e2e, tmp_path):
    small, small_steps = _run_file(e2e, tmp_path, "C1024", 1024)
    large, large_steps = _run_file(e2e, tmp_path, "C2048", 2048)
    out = tmp_path / "merged"
    assert e2e.merge([large, small], out) == 0
    merged = json.loads((out / "e2e.json").read_text())
    assert [(r["size"], r["variant"]) for r in merged["rows"]] == [
        ("C1024", "baseline"), ("C1024", "mhc"), ("C2048", "baseline"), ("C2048", "mhc")]
    for row, steps in ((merged["rows"][1], small_steps), (merged["rows"][3], large_steps)):
        assert row["step_overhead"] == pytest.approx(steps["mhc"] / steps["baseline"] - 1)
    assert merged["merged_from"] == [large, small]
    assert (out / "e2e.md").read_text().count("\n| C") == 4
    if importlib.util.find_spec("matplotlib"):
        assert (out / "e2e.png").stat().st_size > 0


def test_merge_refuses_runs_of_different_devices(e2e, tmp_path):
    h100, _ = _run_file(e2e, tmp_path, "C1024", 1024, device="H100")
    h200, _ = _run_file(e2e, tmp_path, "C2048", 2048, device="H200")
    with pytest.raises(SystemExit, match="the runs differ in device"):
        e2e.merge([h100, h200], tmp_path / "merged")


def test_repeated_cold_compiles_take_turns_after_everything_else(e2e):
    plan = e2e._plan(["C1024"], ["baseline", "mhc", "mhc_bf16"], warm=True, cold_repeats=3)
    again = [(size, variant) for kind, size, variant in plan if kind == "cold again"]
    assert again == 2 * [("C1024", "baseline"), ("C1024", "mhc"), ("C1024", "mhc_bf16")]
    first_repeat = next(i for i, (kind, _, _) in enumerate(plan) if kind == "cold again")
    assert all(kind == "cold again" for kind, _, _ in plan[first_repeat:])
    assert not [step for step in e2e._plan(["C1024"], ["baseline", "mhc"], warm=True)
                if step[0] == "cold again"]


def test_warm_compiles_follow_the_cold_runs_they_reuse(e2e):
    """Warm compiles reuse the caches of their variant's cold run: baseline's and mhc's come before
    the other variants, the recommended speed options' after its own cold run."""
    plan = e2e._plan(["C1024"], ["baseline", "mhc_bf16", "mhc_bf16_graphs"], warm=True)
    assert plan == [("cold", "C1024", "baseline"), ("warm", "C1024", "baseline"),
                    ("cold", "C1024", "mhc_bf16"), ("cold", "C1024", "mhc_bf16_graphs"),
                    ("warm", "C1024", "mhc_bf16_graphs")]
    assert not [step for step in e2e._plan(["C1024"], ["baseline", "mhc_bf16_graphs"], warm=False)
                if step[0] == "warm"]


def test_cold_compile_ratio_is_of_the_medians(e2e):
    baseline = _worker_row("C1024", 1024, "baseline", 30.0, 9.0)
    mhc = _worker_row("C1024", 1024, "mhc", 40.0, 9.5)
    baseline["cold_compile_s"], mhc["cold_compile_s"] = 41.0, 70.0
    for seconds in (27.0, 33.0):
        e2e._add_cold_compile(baseline, seconds)
    for seconds in (66.0, 90.0):
        e2e._add_cold_compile(mhc, seconds)
    assert baseline["cold_compile_s_all"] == [41.0, 27.0, 33.0]
    summary = e2e.summarize([baseline, mhc])
    assert summary[1]["cold_compile_ratio"] == pytest.approx(70.0 / 33.0)
    assert "70.0 (2.12x), median of 70.0, 66.0, 90.0" in e2e.table(summary)


def test_overhead_ms_and_mhc_share_vs_liger_of_the_same_size(e2e):
    rows = [_worker_row(size, width, variant, ms, 1.0)
            for size, width in (("C1024", 1024), ("C2048", 2048))
            for variant, ms in (("baseline", 30.0), ("mhc", 40.0), ("liger", 55.0))]
    rows[4]["step_ms_median"] = 70.0  # C2048's mhc: a share of 40 ms against liger's 25
    summary = {(r["size"], r["variant"]): r for r in e2e.summarize(rows)}
    assert "step_overhead_ms" not in summary["C1024", "baseline"]
    assert summary["C1024", "mhc"]["step_overhead_ms"] == pytest.approx(10.0)
    assert summary["C1024", "mhc"]["mhc_share_vs_liger"] == pytest.approx(2.5)
    assert summary["C2048", "mhc"]["mhc_share_vs_liger"] == pytest.approx(25.0 / 40.0)
    assert "mhc_share_vs_liger" not in summary["C1024", "liger"]
    text = e2e.table(list(summary.values()))
    assert "| C1024 | mhc | 40.0 | +33.3% | +10.0 | 2.50x |" in text
    assert "| C1024 | liger | 55.0 | +83.3% | +25.0 | - |" in text


def test_no_liger_share_without_a_liger_row(e2e):
    rows = [_worker_row("C1024", 1024, "baseline", 30.0, 1.0),
            _worker_row("C1024", 1024, "mhc", 40.0, 1.0),
            {"size": "C1024", "variant": "liger", "error": "did not finish in 200 s"}]
    summary = e2e.summarize(rows)
    assert "mhc_share_vs_liger" not in summary[1]
    assert e2e.table(summary).count("\n") == 4


def test_liger_is_left_out_in_one_line_without_cuda(e2e, capsys):
    assert e2e.runnable(e2e.ORDER, on_cuda=False) == [v for v in e2e.ORDER if v != "liger"]
    assert capsys.readouterr().out.count("no liger row") == 1
    assert e2e.runnable(["baseline", "mhc"], on_cuda=False) == ["baseline", "mhc"]


def test_liger_wraps_each_sublayer_over_bf16_streams(e2e):
    """The hand-wrapped liger model builds on the CPU (its forward needs CUDA)."""
    pytest.importorskip("liger_kernel")
    from liger_kernel.transformers.mhc import LigerMHC
    import torch

    model, _ = e2e.build_llama(e2e.TINY["tiny"], torch.device("cpu"))
    liger = e2e.hand_wrapped_llama("liger", model, torch.device("cpu"))
    sublayers = [s for layer in liger.layers for s in (layer.attention, layer.feed_forward)]
    assert len(sublayers) == 2 * len(model.layers)
    assert all(isinstance(s, LigerMHC) and s.hc == e2e.N_STREAMS and s.phi.dtype == torch.bfloat16
               for s in sublayers)
    assert liger.stream_dtype == torch.bfloat16
    assert sublayers[0].layer.cos is model.cos  # the model's rotary tables, not copies


def test_the_plain_model_under_cuda_graphs_is_a_plain_row(e2e, monkeypatch):
    """baseline_graphs compiles the plain model with mode="reduce-overhead"; its row is measured
    against baseline like any other, and has no mHC bytes floor."""
    modes = []
    monkeypatch.setattr(e2e.torch, "compile", lambda model, **kwargs: modes.append(kwargs.get("mode")) or model)
    for variant in ("baseline", "baseline_graphs"):
        e2e.prepare_variant(variant, object(), None, None)
    assert modes == [None, "reduce-overhead"]

    steps = {"baseline": random.uniform(10, 20), "baseline_graphs": random.uniform(5, 10),
             "mhc": random.uniform(20, 30)}
    rows = {row["variant"]: row for row in e2e.summarize(
        [_worker_row("C1024", 1024, variant, ms, 1.0) for variant, ms in steps.items()])}
    assert rows["baseline_graphs"]["step_overhead"] == pytest.approx(
        steps["baseline_graphs"] / steps["baseline"] - 1)
    assert "cold_compile_ratio" in rows["baseline_graphs"]
    assert "floor_2byte_overhead" not in rows["baseline_graphs"]
    assert "floor_2byte_overhead" in rows["mhc"]


@pytest.mark.parametrize("profiled", [False, True])
def test_the_warm_first_step_is_profiled_with_profile(e2e, monkeypatch, profiled):
    """--profile puts the warm first step's host time by function in place of the warm compile
    figure, which cProfile would inflate (and unequally across variants)."""
    monkeypatch.setenv("MHC_BENCH_PROFILE", "1" if profiled else "")
    monkeypatch.setattr(e2e, "prepare_variant", lambda variant, model, ids, device: (model, model, 0.5))
    result = e2e.run_warm(e2e.TINY["tiny"], "baseline", torch.device("cpu"))
    assert result["warm_prepare_s"] == 0.5
    if profiled:
        assert "warm_compile_s" not in result and result["warm_first_step_profiled_s"] > 0
        profile = result["warm_first_step_profile"]
        assert profile.startswith("== warm first step") and "cumulative" in profile
        assert "(step)" in profile  # the step's own frame: the profile covers it
    else:
        assert result["warm_compile_s"] > 0 and "warm_first_step_profile" not in result
        assert isinstance(result["warm_compile_phases_s"], dict)


def test_the_backward_compile_phases_are_those_of_the_first_backward(e2e, monkeypatch):
    """The first step's compile phases are split where its forward ends: a graph's backward
    compiles at its first backward. Here the phases count the model's forward and backward calls."""
    calls = {"forward": 0, "backward": 0}
    monkeypatch.setattr(e2e, "compile_phases", lambda: dict(calls))
    monkeypatch.setenv("MHC_BENCH_NO_WARM", "1")
    monkeypatch.setenv("MHC_BENCH_STEPS", "1")

    def count(phase: str) -> None:
        calls[phase] += 1

    def counted(module, inputs, logits):
        count("forward")
        logits.register_hook(lambda grad: count("backward"))

    def prepare_counted(variant, model, ids, device):
        model.register_forward_hook(counted)
        return model, model, 0.5

    monkeypatch.setattr(e2e, "prepare_variant", prepare_counted)
    result = e2e.run_variant("tiny", e2e.TINY["tiny"], "baseline", torch.device("cpu"))
    assert result["compile_phases_s"] == {"forward": 1, "backward": 1}
    assert result["backward_compile_phases_s"] == {"backward": 1}
