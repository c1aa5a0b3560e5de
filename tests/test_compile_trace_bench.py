"""bench/compile_trace.py: phase seconds from a TORCH_TRACE log, the backward's apart (CPU)."""

import json

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


def _events(*spans: tuple[str, float, float, str]) -> str:
    """Records of (name, begin s, end s, compile id) spans, in time order as torch logs them."""
    marks = sorted([(begin, 1, name, "B", cid) for name, begin, end, cid in spans]
                   + [(end, 0, name, "E", cid) for name, begin, end, cid in spans])
    return "".join(_event(name, phase, 1e15 + 1e6 * at, cid) for at, _, name, phase, cid in marks)


def test_phases_pair_begin_and_end_and_mark_the_backward(compile_trace, tmp_path):
    lowering, twice, bw_lowering, straddling = 1.25, 0.5, 2.0, 3.5
    other_record = 'V1207 18:06:44 2418 x.py:28] {"str": ["x.py", 1]}\n'
    log = _events(
        ("inductor_compile", 0.0, 3.0, "0/0"), ("GraphLowering.run", 0.5, 0.5 + lowering, "0/0"),
    ) + other_record + _events(
        ("compile_file", 9.0, 9.0 + straddling, "None"),  # begins before the backward's compile
        ("entire_backward_compile", 10.0, 16.0, "0/0"),
        ("GraphLowering.run", 11.0, 11.0 + bw_lowering, "0/0"),
        ("compile_file", 14.0, 15.0, "None"),
        ("GraphLowering.run", 20.0, 20.0 + twice, "10/0"),
        ("GraphLowering.run", 21.0, 21.0 + twice, "10/0"),
        ("GraphLowering.run", 30.0, 30.5, "2/0"),
    )
    seconds, code_lines = compile_trace.read_trace(log.splitlines(keepends=True))
    assert seconds == pytest.approx({
        ("0/0", "inductor_compile"): 3.0, ("0/0", "GraphLowering.run"): lowering,
        ("None", "compile_file"): straddling, ("None", "bw compile_file"): 1.0,
        ("0/0", "bw entire_backward_compile"): 6.0, ("0/0", "bw GraphLowering.run"): bw_lowering,
        ("10/0", "GraphLowering.run"): 2 * twice, ("2/0", "GraphLowering.run"): 0.5})
    assert code_lines == []

    code = 'V1207 18:06:45 2418 x.py:1] {"inductor_output_code": {"filename": "a.py"}}\n\tline\n\tline\n'
    (tmp_path / "rank0.log").write_text(log + code)
    (tmp_path / "worker.log").write_text("V1207 no events here\n")
    printed = compile_trace.summary(tmp_path, min_s=0.0).splitlines()
    assert printed[0] == "== rank0.log" and not any("worker.log" in line for line in printed)
    ids = [line.split()[0] for line in printed[1:] if line.endswith(" s")]
    assert ids.index("2/0") < ids.index("10/0") < ids.index("None")
    bw_line = next(line for line in printed if "bw GraphLowering.run" in line)
    assert bw_line.split()[0] == "0/0" and bw_line.endswith(f"{bw_lowering:8.2f} s")
    assert printed[-1] == "  output code 0: 2 lines"
