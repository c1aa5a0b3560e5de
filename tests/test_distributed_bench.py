"""bench/distributed.py, the multi-GPU bench, runs on 2 gloo processes on a tiny model: each engine
trains, and its loss after the steps matches the one-device run (the script raises otherwise).
Its GPU numbers wait for a machine with several GPUs; this keeps the script working until then."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).parent.parent / "bench"


def test_the_distributed_bench_trains_each_engine_like_one_device(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               str(BENCH / "distributed.py"), "--device", "cpu", "--smoke", "--steps", "1",
               "--engines", "ddp", "fsdp", "1F1B", "--out", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "distributed.json").read_text())["rows"]
    assert [(row["engine"], row["variant"]) for row in rows] == [
        (engine, variant) for variant in ("plain", "mhc") for engine in ("ddp", "fsdp", "1F1B")]
    for row in rows:
        assert row["loss_diff"] <= 2e-2 * row["one_device_loss"], row
        assert row["step_ms"] > 0 and row["bytes_sent_per_step"] > 0, row
