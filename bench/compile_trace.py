"""Where a compile's time went, from TORCH_TRACE logs: per process and compile id, the seconds of
each of Dynamo's timed phases (its chromium begin/end events), those inside the backward's compile
marked "bw", and the size of each generated output code. No tlparse needed (the GPU machine has
none).

    TORCH_TRACE=DIR python3 bench/e2e.py ...      # each process writes its own log under DIR
    python3 bench/compile_trace.py DIR [--min-s 0.2]

A trace log is a line per record, `<glog prefix> {json metadata}`, its payload (if any) on the
lines after it, each starting with a tab; a chromium event's payload holds its name, phase ("B" or
"E") and timestamp in microseconds.
"""

from __future__ import annotations

import argparse
import collections
import json
from collections.abc import Iterator
from pathlib import Path

BACKWARD = "entire_backward_compile"


def records(lines) -> Iterator[tuple[dict, str]]:
    """(metadata, payload text) of each record of a trace log's lines."""
    metadata, payload = None, []
    for line in lines:
        if line.startswith("\t"):
            payload.append(line[1:])
            continue
        if metadata is not None:
            yield metadata, "".join(payload)
        brace = line.find("{")
        try:
            metadata = json.loads(line[brace:]) if brace >= 0 else {}
        except ValueError:
            metadata = {}
        payload = []
    if metadata is not None:
        yield metadata, "".join(payload)


def read_trace(lines) -> tuple[dict[tuple[str, str], float], list[int]]:
    """One pass over a trace log's lines: the seconds per (compile id, phase), summed over the
    phase's begin/end pairs (so phases that run on several threads at once, like compile_file, or
    nest in themselves add up past the wall time). A phase that begins inside the backward's compile is named
    "bw <phase>"; events logged outside any graph's compile (compile_file, on Inductor's compile
    threads) have compile id "None". Then the lines of each output code Inductor generated, in
    the order it logged them."""
    begun: dict[tuple[str, str], list[tuple[float, str]]] = collections.defaultdict(list)
    seconds: dict[tuple[str, str], float] = collections.defaultdict(float)
    code_lines: list[int] = []
    backward_depth = 0
    for metadata, payload in records(lines):
        if "inductor_output_code" in metadata:
            code_lines.append(payload.count("\n"))
        if "chromium_event" not in metadata:
            continue
        try:
            event = json.loads(payload)
        except ValueError:
            continue
        name, phase = event.get("name", "?"), event.get("ph")
        opened = (str(event.get("args", {}).get("compile_id")), name)
        if phase == "B":
            # Labelled where it begins, so that an event the backward's start or end falls
            # inside keeps one label.
            label = "bw " + name if backward_depth > 0 or name == BACKWARD else name
            begun[opened].append((event["ts"], label))
            backward_depth += name == BACKWARD
        elif phase == "E" and begun[opened]:
            started, label = begun[opened].pop()
            seconds[(opened[0], label)] += (event["ts"] - started) / 1e6
            backward_depth -= name == BACKWARD
    return dict(seconds), code_lines


def _compile_order(compile_id: str) -> tuple:
    """"10/0" after "2/0"; "None" last."""
    numbers = compile_id.split("/")
    return (0, *map(int, numbers)) if all(n.isdigit() for n in numbers) else (1, compile_id)


def summary(trace_dir: Path, min_s: float) -> str:
    """Every log under trace_dir that timed a compile: its phases of at least min_s, longest first
    per compile id, and its output codes' sizes."""
    out = []
    for path in sorted(trace_dir.rglob("*.log")):
        with path.open(errors="replace") as lines:
            seconds, code_lines = read_trace(lines)
        if not seconds:
            continue
        out.append(f"== {path.relative_to(trace_dir)}")
        for (compile_id, name), value in sorted(
                seconds.items(), key=lambda kv: (_compile_order(kv[0][0]), -kv[1])):
            if value >= min_s:
                out.append(f"  {compile_id:>8} {name:<56} {value:8.2f} s")
        out.extend(f"  output code {i}: {count} lines" for i, count in enumerate(code_lines))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trace_dir", type=Path, help="the folder TORCH_TRACE named")
    parser.add_argument("--min-s", type=float, default=0.2, help="shortest phase shown (s)")
    args = parser.parse_args(argv)
    print(summary(args.trace_dir, args.min_s))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
