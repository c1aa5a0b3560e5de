"""Coefficient math shared by the kernels of mhc::coefficients_pre_mix (paper Eq. 7-8).

Device functions, no kernels:
  projection  one pass over a range of the n*C stream values of a block of tokens: v @ phi on
              tensor cores (bf16/fp16 streams as stored against phi split in two 16-bit halves,
              finer than the paper's tf32; fp32 streams in tf32) and the sum of squares; in the
              backward also <grad_mixed, x_j>, the gradient of H_pre through the pre-mix;
  gates       alpha, bias, sigmoid and 2*sigmoid on the summed projection divided by the RMS (the
              norm is divided after the matmul);
  Sinkhorn    t_max iterations in log space in registers, and its exact backward, which recomputes
              the iterates on chip instead of storing them.

A projection row has KP = configs.padded_phi_columns(n) fp32 columns: phi's K = n*n + 2n, then the
sum of squares (column K), then <grad_mixed, x_j> (columns K+1 .. K+n, backward only); the rest 0.
Register layouts of the coefficient math: gates [GATES] (entry k is phi column k: H_pre for k < n,
H_post for n <= k < 2n) and H_res [NP * NP] (entry (i, j) is phi column 2n + i*n + j), padded to
powers of two and masked; Sinkhorn runs on [BLOCK_T, NP, NP] with padded entries at -inf.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from mhc_compile import reference
from mhc_compile.templates import configs

RMS_EPS = tl.constexpr(reference.RMS_EPS)


# --- projection: v @ phi and the sum of squares  (mHC Eq. 7; the RMS divides later) --------------


@triton.jit
def dot_fp32_operand(a, b_fp32, acc):
    """acc + a @ b_fp32 for `a` as stored (bf16, fp16 or fp32) and an fp32 `b`.

    16-bit `a` stays in its dtype (tensor cores read it as loaded): b is split into b_hi + b_lo in
    that dtype, two products, about 16 bits of b kept (more than tf32's 10). fp32 `a` takes tf32,
    as the paper does.
    """
    if a.dtype == tl.float32:
        return tl.dot(a, b_fp32, acc, input_precision="tf32")
    b_hi = b_fp32.to(a.dtype)
    b_lo = (b_fp32 - b_hi.to(tl.float32)).to(a.dtype)
    return tl.dot(a, b_lo, tl.dot(a, b_hi, acc))


@triton.jit
def project_columns(
    streams_ptr, phi_ptr, grad_mixed_ptr, tokens, token_valid, first, last, C,
    n: tl.constexpr, KP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
    GRAD_MIXED: tl.constexpr,
):
    """One projection row [BLOCK_T, KP] over the stream values [first, last) of `tokens` (of the
    n*C per token): v @ phi in columns < K, the sum of squares in column K and, with GRAD_MIXED,
    <grad_mixed, x_j> over those values in column K + 1 + j (the rest of the row is 0)."""
    K: tl.constexpr = n * n + 2 * n
    columns = tl.arange(0, KP)
    sumsq = tl.zeros((BLOCK_T,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_T, KP), dtype=tl.float32)
    grad_h_pre = tl.zeros((BLOCK_T, KP), dtype=tl.float32)
    rows = tokens[:, None] * (n * C)
    for offset in range(first, last, BLOCK_K):
        k = offset + tl.arange(0, BLOCK_K)
        k_valid = k < last
        tile_mask = token_valid[:, None] & k_valid[None, :]
        x = tl.load(streams_ptr + rows + k[None, :], mask=tile_mask, other=0.0)
        x_fp32 = x.to(tl.float32)
        sumsq += tl.sum(x_fp32 * x_fp32, axis=1)
        # Padded phi rows [KP] are contiguous and need no column mask: 16-byte loads, from L2.
        phi = tl.load(phi_ptr + k[:, None] * KP + columns[None, :], mask=k_valid[:, None], other=0.0)
        acc = dot_fp32_operand(x, phi, acc)
        if GRAD_MIXED:
            # <grad_mixed, x_j> for each stream j this tile touches (one, or two where it crosses
            # a stream boundary; more only for C < BLOCK_K): grad_mixed at channel k - j*C.
            last_k = tl.minimum(offset + BLOCK_K, last) - 1
            for j in range(offset // C, last_k // C + 1):
                in_stream = (k >= j * C) & (k < (j + 1) * C)
                grad_mixed = tl.load(
                    grad_mixed_ptr + tokens[:, None] * C + (k - j * C)[None, :],
                    mask=tile_mask & in_stream[None, :], other=0.0,
                )
                partial = tl.sum(x_fp32 * grad_mixed.to(tl.float32), axis=1)
                grad_h_pre += tl.where(columns[None, :] == K + 1 + j, partial[:, None], 0.0)
    return tl.where(columns[None, :] == K, sumsq[:, None], acc + grad_h_pre)


@triton.jit
def sum_splits(partial_ptr, tokens, token_valid, T, splits, columns, column_valid, KP: tl.constexpr):
    """Columns `columns` of the projection partials [splits, T, KP], summed over the splits in a
    fixed order (deterministic): [BLOCK_T, len(columns)]."""
    mask = token_valid[:, None] & column_valid[None, :]
    total = tl.load(partial_ptr + tokens[:, None] * KP + columns[None, :], mask=mask, other=0.0)
    for split in range(1, splits):
        row = split * T + tokens
        total += tl.load(partial_ptr + row[:, None] * KP + columns[None, :], mask=mask, other=0.0)
    return total


# --- coefficient math: packed layouts, gates --------------------------------------------------------


@triton.jit
def gate_columns(n: tl.constexpr, GATES: tl.constexpr):
    """phi column of each packed gate entry [GATES] (pre: k < n, post: n <= k < 2n), and validity."""
    columns = tl.arange(0, GATES)
    return columns, columns < 2 * n


@triton.jit
def res_columns(n: tl.constexpr, NP: tl.constexpr):
    """phi column of each packed H_res entry [NP * NP] (entry (i, j) -> 2n + i*n + j), and validity."""
    entry = tl.arange(0, NP * NP)
    rows, cols = entry // NP, entry % NP
    return 2 * n + rows * n + cols, (rows < n) & (cols < n)


@triton.jit
def gate_offsets(tokens, token_valid, n: tl.constexpr, GATES: tl.constexpr):
    """Where packed gate entries live in h_pre / h_post [T, n] (or their gradients)."""
    k = tl.arange(0, GATES)[None, :]
    pre_mask = token_valid[:, None] & (k < n)
    post_mask = token_valid[:, None] & (k >= n) & (k < 2 * n)
    return tokens[:, None] * n + k, pre_mask, tokens[:, None] * n + (k - n), post_mask


@triton.jit
def res_offsets(tokens, token_valid, n: tl.constexpr, NP: tl.constexpr):
    """Where packed H_res entries live in h_res [T, n, n] (or its gradient), and their mask."""
    columns, valid = res_columns(n, NP)
    offsets = tokens[:, None] * (n * n) + (columns - 2 * n)[None, :]
    return offsets, token_valid[:, None] & valid[None, :]


@triton.jit
def gate_parameters(alpha_ptr, b_pre_ptr, b_post_ptr, n: tl.constexpr, GATES: tl.constexpr):
    """Per packed gate entry [GATES]: alpha (pre or post), bias, and the output scale (1 or 2)."""
    k = tl.arange(0, GATES)
    is_pre = k < n
    is_post = (k >= n) & (k < 2 * n)
    alpha = tl.where(is_pre, tl.load(alpha_ptr), tl.load(alpha_ptr + 1))
    bias = tl.load(b_pre_ptr + k, mask=is_pre, other=0.0) + tl.load(
        b_post_ptr + (k - n), mask=is_post, other=0.0
    )
    return alpha, bias, tl.where(is_pre, 1.0, 2.0)


@triton.jit
def rms_of(sumsq, C, n: tl.constexpr):
    """r = sqrt(mean of squares over the n*C values + eps), from their sum."""
    return tl.sqrt(sumsq / (n * C) + RMS_EPS)


@triton.jit
def res_logits(proj_res, rms, alpha_ptr, b_res_ptr, n: tl.constexpr, NP: tl.constexpr):
    """alpha_res * mat(h_res) / r + b_res in the packed layout [BLOCK_T, NP * NP], and h_res / r."""
    columns, valid = res_columns(n, NP)
    b_res = tl.load(b_res_ptr + (columns - 2 * n), mask=valid, other=0.0)
    h_res_raw = proj_res / rms[:, None]
    return tl.load(alpha_ptr + 2) * h_res_raw + b_res[None, :], h_res_raw


# --- Sinkhorn-Knopp in log space (mHC Eq. 8: t_max iterations, columns then rows) -----------------


@triton.jit
def _normalize(log_m, valid, axis: tl.constexpr):
    """log_m minus its logsumexp along `axis`; padded entries stay -inf and make no NaN."""
    peak = tl.max(log_m, axis=axis, keep_dims=True)
    peak = tl.where(peak == float("-inf"), 0.0, peak)
    total = tl.sum(tl.exp(log_m - peak), axis=axis, keep_dims=True)
    lse = peak + tl.log(tl.where(total > 0.0, total, 1.0))
    return tl.where(valid, log_m - lse, float("-inf"))


@triton.jit
def sinkhorn(log_m, valid, iters):
    """`iters` iterations on [BLOCK_T, NP, NP] log matrices: columns (axis 1), then rows (axis 2)."""
    for _ in range(iters):
        log_m = _normalize(log_m, valid, 1)
        log_m = _normalize(log_m, valid, 2)
    return log_m


@triton.jit
def res_matrix(logits, n: tl.constexpr, NP: tl.constexpr, BLOCK_T: tl.constexpr):
    """Packed logits [BLOCK_T, NP * NP] as log matrices [BLOCK_T, NP, NP] (padding -inf) and the
    mask of real entries [1, NP, NP]."""
    _, valid = res_columns(n, NP)
    valid = tl.reshape(valid, (1, NP, NP))
    return tl.where(valid, tl.reshape(logits, (BLOCK_T, NP, NP)), float("-inf")), valid


@triton.jit
def _sinkhorn_iteration_bwd(log_m, valid, grad):
    """Gradient w.r.t. one iteration's input log_m, given `grad` w.r.t. its output (log space).

    B = A - logsumexp_rows(A) gives dA = dB - exp(B) * rowsum(dB); likewise for the columns.
    """
    cols = _normalize(log_m, valid, 1)
    rows = _normalize(cols, valid, 2)
    grad = grad - tl.exp(rows) * tl.sum(grad, axis=2, keep_dims=True)
    return grad - tl.exp(cols) * tl.sum(grad, axis=1, keep_dims=True)


@triton.jit
def sinkhorn_bwd(logits, valid, grad, iters, segment):
    """Exact gradient w.r.t. the logits, given `grad` w.r.t. the final log iterate.

    Reverse mode with the iterates recomputed on chip instead of stored: the iterations form
    segments of `segment` (about sqrt(iters)); each segment's first iterate is recomputed from the
    logits, then each iteration's input from it. For iters = 20 (segment 5): 30 iterations to reach
    the segment starts, 40 inside the segments and 20 iteration backwards, instead of 190 when every
    input is recomputed from the logits; O(1) registers per token, no per-iteration history in memory.
    """
    num_segments = (iters + segment - 1) // segment
    for done in range(num_segments):
        first = (num_segments - 1 - done) * segment
        segment_start = sinkhorn(logits, valid, first)
        length = tl.minimum(segment, iters - first)
        for back in range(length):
            log_m = sinkhorn(segment_start, valid, length - 1 - back)
            grad = _sinkhorn_iteration_bwd(log_m, valid, grad)
    return grad


def sinkhorn_segment(iters: int) -> int:
    """Segment length of the Sinkhorn backward's recomputation: about sqrt(iters)."""
    return max(1, math.ceil(math.sqrt(iters)))


# --- host side ------------------------------------------------------------------------------------


def padded_phi(phi: torch.Tensor) -> torch.Tensor:
    """phi [n*C, n*n+2n] as fp32 [n*C, KP], zero columns appended: rows of a power-of-two length
    load as whole 16-byte vectors, and the extra columns of a projection row get no phi term."""
    n_phi = phi.shape[1]
    n = math.isqrt(n_phi + 1) - 1  # n*n + 2n = (n+1)^2 - 1
    return torch.nn.functional.pad(phi.float(), (0, configs.padded_phi_columns(n) - n_phi))


def layout(n: int) -> dict[str, int]:
    """The layout constexprs for n streams: projection row width, packed gates and H_res."""
    return dict(
        n=n, KP=configs.padded_phi_columns(n), GATES=triton.next_power_of_2(2 * n),
        NP=configs.padded_streams(n),
    )


def is_sinkhorn(constraint: str) -> bool:
    if constraint not in reference.CONSTRAINTS:
        raise ValueError(
            f"mhc coefficients: constraint must be one of {reference.CONSTRAINTS}, got {constraint!r}"
        )
    return constraint == "sinkhorn"


def fp32(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Small parameters (alpha, biases) as contiguous fp32, as the kernels read them."""
    return [t.contiguous().float() for t in tensors]


def multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # the interpreter: keep grids small
    return torch.cuda.get_device_properties(device).multi_processor_count
