"""bench/saved_activations.py on the tiny LLaMA (CPU, compiled): the saved streams it attributes
are exactly the ones the recompute policy keeps, counted independently from the policy's L_r."""


import pytest
import torch

import benches
from mhc_compile.passes.recompute_policy import group_size


@pytest.fixture(scope="module")
def saved_activations():
    return benches.load("saved_activations")


def test_kept_streams_are_counted_by_kind(saved_activations):
    tokens, size = 16, saved_activations.SIZES["tiny"]
    device = torch.device("cpu")
    rows = {variant: saved_activations.measure("tiny", tokens, variant, device)
            for variant in ("baseline", "mhc", "mhc_no_recompute")}
    n, width, blocks = 4, size["width"], 2 * size["depth"]
    stream_bytes = tokens * n * width * 4  # float32: autocast leaves the residual in float32
    # Policy on: x_k for k = L_r, 2 L_r, ... < L; off: every block's input streams x_1 .. x_{L-1}
    # (x_0 is the expanded chain input; nothing in backward reads x_L).
    kept = len(range(group_size("auto", n, blocks), blocks, group_size("auto", n, blocks)))
    assert rows["mhc"]["streams"] == kept * stream_bytes
    assert rows["mhc_no_recompute"]["streams"] == (blocks - 1) * stream_bytes
    assert "streams" not in rows["baseline"]
    assert rows["mhc"]["weights"] == rows["baseline"]["weights"] > 0

    table = saved_activations.table("tiny", tokens, rows)
    assert table.splitlines()[2].startswith("| baseline | 0.0 |")
    assert len(table.splitlines()) == 2 + len(rows)
