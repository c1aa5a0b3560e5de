"""Per-token cost of one mHC sublayer over a plain residual add (mHC paper, Table 2)."""

from __future__ import annotations

COEFFICIENT_BYTES = 4  # H_pre, H_post, H_res and the projection's output are fp32


def coefficient_count(n: int) -> int:
    """n^2 + 2n: the projection's width (H_pre, H_post, H_res logits)."""
    return n * n + 2 * n


def parameter_count(n: int, channels: int) -> int:
    """phi [nC, n^2+2n], alpha [3], b_pre [n], b_post [n], b_res [n, n]."""
    return n * channels * coefficient_count(n) + 3 + coefficient_count(n)


def extra_bytes_per_token(n: int, channels: int, element_bytes: int) -> int:
    """Unfused mHC reads (5n+1)C + n^2+2n and writes (3n+1)C + n^2+2n elements; a plain add moves 3C."""
    stream_elements = (5 * n + 1) * channels + (3 * n + 1) * channels - 3 * channels
    return stream_elements * element_bytes + 2 * coefficient_count(n) * COEFFICIENT_BYTES


def extra_flops_per_token(n: int, channels: int, sinkhorn_iters: int) -> int:
    """RMS, projection v @ phi, gates, Sinkhorn (log space), pre-mix, post/res mix; less the add."""
    rms = 2 * n * channels
    projection = 2 * n * channels * coefficient_count(n)
    gates = 4 * coefficient_count(n)
    sinkhorn = sinkhorn_iters * 2 * 3 * n * n
    pre_mix = 2 * n * channels
    post_res_mix = 2 * n * n * channels + 2 * n * channels
    return rms + projection + gates + sinkhorn + pre_mix + post_res_mix - channels
