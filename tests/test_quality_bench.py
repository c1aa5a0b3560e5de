"""bench/quality.py: its pure parts, and its --tiny smoke mode end to end (CPU, a few seconds)."""

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import benches


@pytest.fixture(scope="module")
def quality():
    return benches.load("quality")


def _validation_files_in_a_fresh_process(files: list[str], hash_seed: str) -> set[str]:
    """The split as another interpreter computes it, with its own string-hash seed: a split that
    used hash() (randomised per process) would differ between them."""
    script = (f"import json, sys\n"
              f"sys.path.insert(0, {str(benches.BENCH)!r})\n"
              "import quality\n"
              "files = json.loads(sys.stdin.read())\n"
              "print(json.dumps([f for f in files if quality.is_validation_file(f)]))\n")
    result = subprocess.run([sys.executable, "-c", script], input=json.dumps(files), text=True,
                            capture_output=True, env={**os.environ, "PYTHONHASHSEED": hash_seed},
                            check=True)
    return set(json.loads(result.stdout))


def test_split_by_file_is_deterministic_across_processes_and_a_partition(quality):
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p.relative_to(root).as_posix() for p in quality.stdlib_sources(root, None)]
    validation = {f for f in files if quality.is_validation_file(f)}
    assert 0.05 < len(validation) / len(files) < 0.2
    assert _validation_files_in_a_fresh_process(files, "1") == validation
    assert _validation_files_in_a_fresh_process(files, "2") == validation
    assert not any("site-packages" in f for f in files)
    some = quality.stdlib_sources(root, 200)
    corpus = quality.load_corpus(200)  # every file goes to exactly one side, whole
    assert corpus.validation_files == sum(quality.is_validation_file(p.relative_to(root).as_posix())
                                          for p in some)
    assert corpus.train_files + corpus.validation_files == len(some)
    assert len(corpus.train) + len(corpus.validation) == sum(len(p.read_bytes()) for p in some)


def test_grad_norm_spikes_counts_only_jumps_over_the_running_median(quality):
    norms = [1.0 + 0.01 * (i % 3) for i in range(200)]
    norms[120], norms[150] = 3.5, 2.9  # 3.5x the median is a spike, 2.9x is not
    spikes = quality.grad_norm_spikes(norms, warmup=10)
    assert spikes["steps"] == [120] and spikes["count"] == 1
    assert spikes["worst_ratio"] == pytest.approx(3.5 / 1.01)
    assert quality.grad_norm_spikes(norms[:40], warmup=10)["count"] == 0  # shorter than the window


def test_tiny_mode_runs_every_variant_and_writes_json_and_png(quality, tmp_path):
    assert quality.main(["--tiny", "--steps", "10", "--seeds", "0", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "quality.json").read_text())
    assert [r["variant"] for r in result["runs"]] == ["plain", "HC", "mHC"]
    assert {r["steps_done"] for r in result["runs"]} == {10}
    assert result["checks"]["mHC"]["rewritten_blocks"] == 4
    assert result["checks"]["mHC"]["max_logit_difference_at_init"] < 1e-5
    assert result["runs"][0]["largest_gain_mean"] is None
    assert abs(result["runs"][2]["largest_gain_mean"] - 1.0) < 0.05  # doubly stochastic
    assert (tmp_path / "quality.png").stat().st_size > 10_000
