"""bench/registers.py: compiles a kernel's candidates for sm_90 with no GPU and reads ptxas -v."""

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).parent.parent / "bench" / "registers.py"


def test_reports_registers_and_spills_of_every_candidate(tmp_path):
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, str(BENCH), "--n", "4", "--channels", "64", "--kernels",
         "mhc_pre_mix_fwd", "--out", str(tmp_path)],
        env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "registers.json").read_text())["rows"]
    from mhc_compile.templates import configs

    assert [row["config"] for row in rows] == [
        configs.describe(config) for config in configs._STAGE_CONFIGS["pre_mix_fwd"]]
    for row in rows:
        assert (row["kernel"], row["n"], row["C"]) == ("mhc_pre_mix_fwd", 4, 64)
        # A thread has 255 registers at most; a kernel that loads and stores uses a few dozen.
        assert 16 <= row["registers"] <= 255
        assert row["spill_store_bytes"] >= 0 and isinstance(row["kept_by_model"], bool)
    assert "| mhc_pre_mix_fwd | 4 |" in result.stdout


def test_refuses_to_run_under_the_interpreter():
    result = subprocess.run([sys.executable, str(BENCH)], env={**os.environ, "TRITON_INTERPRET": "1"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "without TRITON_INTERPRET" in result.stderr
