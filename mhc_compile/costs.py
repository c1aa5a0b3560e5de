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
    return sum(mhc_op_flops_per_token(op, n, channels, sinkhorn_iters) for op in MHC_OPS) - channels


MHC_OPS = ("coefficients", "pre_mix", "post_res_mix")


def mhc_op_flops_per_token(op: str, n: int, channels: int, sinkhorn_iters: int) -> int:
    """Forward flops per token of one mhc:: op (`op` is its name: one of MHC_OPS, or the graph's
    fused coefficients_pre_mix)."""
    if op == "coefficients_pre_mix":
        return sum(mhc_op_flops_per_token(part, n, channels, sinkhorn_iters)
                   for part in ("coefficients", "pre_mix"))
    if op == "coefficients":  # RMS, projection v @ phi, gates, Sinkhorn in log space
        rms = 2 * n * channels
        projection = 2 * n * channels * coefficient_count(n)
        return rms + projection + 4 * coefficient_count(n) + sinkhorn_iters * 2 * 3 * n * n
    if op == "pre_mix":
        return 2 * n * channels
    if op == "post_res_mix":
        return 2 * n * n * channels + 2 * n * channels
    raise ValueError(f"unknown mhc op {op!r}; expected one of {MHC_OPS}")


# --- Whole-op estimates for pipeline balancing (passes/annotate_pipeline.py) -----------------------

# Flops one byte of memory traffic is worth: an H100/H200's dense bf16 peak over its HBM bandwidth
# (about 990 TFLOP/s / 3.35 TB/s). A node's roofline cost is max(flops, bytes * this).
MACHINE_BALANCE_FLOPS_PER_BYTE = 300


def matmul_flops(output_numel: int, reduced: int) -> int:
    """2 * (output elements) * (length of the reduced dimension): linear, matmul, bmm."""
    return 2 * output_numel * reduced


def attention_flops(query_shape, key_shape, value_shape) -> int:
    """scaled_dot_product_attention, q [..., L, E], k [..., S, E], v [..., S, Ev]: QK^T and PV."""
    lead = 1
    for size in query_shape[:-2]:
        lead *= size
    queries, keys = query_shape[-2], key_shape[-2]
    return 2 * lead * queries * keys * (query_shape[-1] + value_shape[-1])


def roofline_cost(flops: int, bytes_moved: int) -> int:
    """A node's cost in flop-equivalents: bound by compute or by memory traffic, whichever is larger."""
    return max(flops, bytes_moved * MACHINE_BALANCE_FLOPS_PER_BYTE)
