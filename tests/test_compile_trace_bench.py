"""bench/compile_trace.py: phase seconds from a TORCH_TRACE log, the backward's apart (CPU)."""

import json
import random

import pytest

import benches


@pytest.fixture(scope="module")
def compile_trace():
    return benches.load("compile_trace")


def _event(name: str, phase: str, micros: float, compile_id: str = "0/0") -> str:
    """One chromium-event record as torch's structured logger writes it."""
    payload = json.dumps({"name": name, "ts": micros, "args": {"compile_id": compile_id},
                          "ph": phase, "cat": "dynamo_timed"}, indent=1)
    header = 'V1207 18:06:43.699000 2418 torch/_dynamo/utils.py:2350] {"chromium_event": {}, "has_payload": "ab"}'
    return header + "\n" + "".join(f"\t{line}\n" for line in payload.splitlines())


def test_phases_pair_begin_and_end_and_mark_the_backward(compile_trace, tmp_path):
    start, lowering, backward, bw_lowering, again = (random.uniform(1, 5) * 1e6 for _ in range(5))
    t = 1e15
    log = "".join([
        _event("inductor_compile", "B", t),
        _event("GraphLowering.run", "B", t + 1),
        _event("GraphLowering.run", "E", t + 1 + lowering),
        _event("inductor_compile", "E", t + start),
        'V1207 18:06:44.000000 2418 torch/_logging/structured.py:28] {"str": ["x.py", 1]}\n',
        _event("entire_backward_compile", "B", t + 1e7),
        _event("GraphLowering.run", "B", t + 1e7 + 1),
        _event("GraphLowering.run", "E", t + 1e7 + 1 + bw_lowering),
        _event("entire_backward_compile", "E", t + 1e7 + backward),
        _event("GraphLowering.run", "B", t + 2e7, "1/0"),
        _event("GraphLowering.run", "E", t + 2e7 + again, "1/0"),
    ])
    seconds = compile_trace.phase_seconds(log.splitlines(keepends=True))
    assert seconds == pytest.approx({
        ("0/0", "inductor_compile"): start / 1e6, ("0/0", "GraphLowering.run"): lowering / 1e6,
        ("0/0", "bw entire_backward_compile"): backward / 1e6,
        ("0/0", "bw GraphLowering.run"): bw_lowering / 1e6,
        ("1/0", "GraphLowering.run"): again / 1e6})

    (tmp_path / "rank0.log").write_text(log)
    (tmp_path / "worker.log").write_text("V1207 no events here\n")
    printed = compile_trace.summary(tmp_path, min_s=0.0)
    assert "== rank0.log" in printed and "worker.log" not in printed
    assert "bw GraphLowering.run" in printed and f"{bw_lowering / 1e6:8.2f} s" in printed
