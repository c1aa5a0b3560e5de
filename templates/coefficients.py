"""Coefficient kernels: RMS, projection, gates and Sinkhorn-Knopp, and their backward.

The work splits into a memory-bound part and a latency-bound part, each its own kernel so that each
gets the block sizes, warps and occupancy that suit it:
  projection  one pass over the n*C stream values of a block of tokens, split over column ranges:
              sums of squares and v @ phi on tensor cores (bf16/fp16 streams as stored against phi
              split in two 16-bit halves, finer than the paper's tf32; fp32 streams exactly, on the
              FMA units), written as per-split partials [splits, T, KP] (a few % of the stream
              bytes);
  forward     per token block: sum the partials, divide by the RMS (after the matmul), then alpha,
              bias, sigmoid, 2*sigmoid and the Sinkhorn iterations in registers; the summed
              projection [T, n*n+2n] and sums of squares [T] are written for the backward;
  backward    per token block, from the forward's projection, the gradient of the gates and of
              Sinkhorn (iterates stored in a scratch and loaded back, `_iterations_bwd`) w.r.t. the
              projection and the sum of squares, with per-group partial sums for alpha and the
              biases; then, per (channel block of one stream, token split), grad streams
              x_j = grad_proj @ phi_j^T + 2 grad_sumsq x_j + h_pre_j du (the pre-mix's share)
              + `accumulate` (the post/res mix's dx, when given), so that the op writes one grad
              streams, and grad phi partials x^T @ grad_proj.
Every reduction across programs writes partials that are summed afterwards in a fixed order: no
atomics, deterministic. Saved between forward and backward: the op's inputs, H_pre and the projection
((n*n + 2n + 1) fp32 per token, about 1% of the bf16 streams' bytes at C = 1024), so the backward
reads the streams once, not twice: recomputing the projection costs a whole pass over them (about
0.066 ms of the sublayer's 1.02 ms at C = 1024 on an H100; docs/design.md, Kernels).

Register layouts of the coefficient math: gates [GATES] (entry k is phi column k: H_pre for k < n,
H_post for n <= k < 2n) and H_res [NP, NP] (entry (i, j) is phi column 2n + i*n + j), padded to
powers of two and masked; Sinkhorn runs on [BLOCK_T, NP, NP] with padded entries at -inf (log
space) or 0 (linear space).

The ops' `constraint` picks the formulation (reference.formulation), a constexpr of the two
coefficient kernels: "sinkhorn" (the paper's, in log space), "none" (raw logits) or DeepSeek-V4's
"deepseek_v4:<eps>" (eps added to H_pre, and an eps-guarded Sinkhorn in linear space after a
softmax over each column), its eps a runtime argument. The other kernels take H_pre as the forward
computed it, whatever the formulation.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from mhc_compile import kernel_launch, reference, spec
from mhc_compile.templates import configs
from mhc_compile.templates.tiles import per_token, token_block, token_rows

_RMS_EPS = tl.constexpr(reference.RMS_EPS)
# Splits (of columns in the projection, of tokens in grad phi) aim at this many programs per SM.
_PROGRAMS_PER_SM = 4


# --- projection: sum of squares and v @ phi  (mHC Eq. 7; the RMS divides later) -------------------


@triton.jit
def _dot_fp32_operand(a, b_fp32, acc):
    """acc + a @ b_fp32 for `a` as stored (bf16, fp16 or fp32) and an fp32 `b`.

    16-bit `a` stays in its dtype (tensor cores read it as loaded): b is split into b_hi + b_lo in
    that dtype, two products, about 16 bits of b kept (more than tf32's 10). fp32 `a` (fp32 models,
    rare in training) is multiplied exactly in fp32 on the FMA units: the tf32 tensor-core product
    of a 64-row block gives errors of 4e-2 on an H100 (bench/RESULTS.md), which the 16-bit path
    does not show.
    """
    if a.dtype == tl.float32:
        return tl.dot(a, b_fp32, acc, input_precision="ieee")
    b_hi = b_fp32.to(a.dtype)
    b_lo = (b_fp32 - b_hi.to(tl.float32)).to(a.dtype)
    return tl.dot(a, b_lo, tl.dot(a, b_hi, acc))


@configs.autotune("projection", "mhc_projection")
@triton.jit
def _mhc_projection_kernel(
    streams_ptr, phi_high_ptr, phi_low_ptr, proj_ptr, sumsq_ptr, T, C, columns_per_split,
    n: tl.constexpr, KP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):
    tokens, token_valid = token_block(tl.program_id(0), T, BLOCK_T)
    split = tl.program_id(1)
    first = split * columns_per_split
    last = tl.minimum(first + columns_per_split, n * C)
    phi_columns = tl.arange(0, KP)
    sumsq = tl.zeros((BLOCK_T,), dtype=tl.float32)
    proj = tl.zeros((BLOCK_T, KP), dtype=tl.float32)
    rows = tokens[:, None] * (n * C)
    for offset in range(0, columns_per_split, BLOCK_K):
        k = first + offset + tl.arange(0, BLOCK_K)
        k_valid = k < last
        x = tl.load(
            streams_ptr + rows + k[None, :], mask=token_valid[:, None] & k_valid[None, :], other=0.0
        )
        x_fp32 = x.to(tl.float32)
        sumsq += tl.sum(x_fp32 * x_fp32, axis=1)
        # Padded phi rows [KP] are contiguous and need no column mask: 16-byte loads, from L2.
        phi_offsets = k[:, None] * KP + phi_columns[None, :]
        phi_high = tl.load(phi_high_ptr + phi_offsets, mask=k_valid[:, None], other=0.0)
        if x.dtype == tl.float32:
            proj = tl.dot(x, phi_high, proj, input_precision="ieee")
        else:
            phi_low = tl.load(phi_low_ptr + phi_offsets, mask=k_valid[:, None], other=0.0)
            proj = tl.dot(x, phi_low, tl.dot(x, phi_high, proj))
    partial_row = split.to(tl.int64) * T + tokens
    tl.store(sumsq_ptr + partial_row, sumsq, mask=token_valid)
    tl.store(proj_ptr + partial_row[:, None] * KP + phi_columns[None, :], proj, mask=token_valid[:, None])


def _padded_phi(phi: torch.Tensor) -> torch.Tensor:
    """phi [n*C, n*n+2n] as fp32 [n*C, KP], zero columns appended: rows of a power-of-two length
    load as whole 16-byte vectors."""
    n_phi = phi.shape[1]
    n = math.isqrt(n_phi + 1) - 1  # n*n + 2n = (n+1)^2 - 1
    return torch.nn.functional.pad(phi.float(), (0, configs.padded_phi_columns(n) - n_phi))


def _phi_operands(phi: torch.Tensor, stream_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The projection's phi operands [n*C, KP]: for 16-bit streams phi's high and low halves in the
    stream dtype (high + low keeps about 16 bits of phi, finer than tf32; split once per call, not
    in every program's every step), for fp32 streams the fp32 phi (the low half unused)."""
    padded = _padded_phi(phi)
    if stream_dtype == torch.float32:
        return padded, padded
    high = padded.to(stream_dtype)
    return high, (padded - high.float()).to(stream_dtype)


def _projection(x: torch.Tensor, phi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, n, C], phi [n*C, n*n+2n] -> per-split partials of v @ phi [splits, T, KP] and of the
    sums of squares [splits, T], fp32."""
    tokens, n, channels = x.shape
    phi_high, phi_low = _phi_operands(phi, x.dtype)
    n_columns, kp = n * channels, phi_high.shape[1]
    # Split the columns so that the grid fills the GPU (counted for 64-token blocks), keeping at
    # least 512 columns per split so the partials stay a few % of the stream bytes.
    wanted = configs.ceil_div(_PROGRAMS_PER_SM * _multiprocessors(x.device), configs.ceil_div(tokens, 64))
    splits = max(1, min(wanted, n_columns // 512))
    columns_per_split = configs.ceil_div(configs.ceil_div(n_columns, splits), 256) * 256
    splits = configs.ceil_div(n_columns, columns_per_split)
    proj = torch.empty((splits, tokens, kp), dtype=torch.float32, device=x.device)
    sumsq = torch.empty((splits, tokens), dtype=torch.float32, device=x.device)

    def grid(meta):
        return configs.ceil_div(tokens, meta["BLOCK_T"]), splits

    kernel_launch.launch(
        "mhc_projection", grid, x, phi_high, phi_low, proj, sumsq, T=tokens, C=channels,
        columns_per_split=columns_per_split, n=n, KP=kp,
    )
    return proj, sumsq


def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # the interpreter: keep grids small
    return torch.cuda.get_device_properties(device).multi_processor_count


# --- coefficient math: packed layouts, gates --------------------------------------------------------


@triton.jit
def _gate_columns(n: tl.constexpr, GATES: tl.constexpr):
    """phi column of each packed gate entry [GATES] (pre: k < n, post: n <= k < 2n), and validity."""
    columns = tl.arange(0, GATES)
    return columns, columns < 2 * n


@triton.jit
def _group_sums(values, GROUPS: tl.constexpr, GROUP_T: tl.constexpr):
    """Sums of [GROUPS * GROUP_T, W] over each group of GROUP_T consecutive rows: [GROUPS, W]."""
    return tl.sum(tl.reshape(values, (GROUPS, GROUP_T, values.shape[1])), axis=1)


@triton.jit
def _res_columns(n: tl.constexpr, NP: tl.constexpr):
    """phi column of each packed H_res entry [NP * NP] (entry (i, j) -> 2n + i*n + j), and validity."""
    entry = tl.arange(0, NP * NP)
    rows, cols = entry // NP, entry % NP
    return 2 * n + rows * n + cols, (rows < n) & (cols < n)


@triton.jit
def _gate_offsets(tokens, token_valid, n: tl.constexpr, GATES: tl.constexpr):
    """Where packed gate entries live in h_pre / h_post [T, n] (or their gradients)."""
    k = tl.arange(0, GATES)[None, :]
    pre_mask = token_valid[:, None] & (k < n)
    post_mask = token_valid[:, None] & (k >= n) & (k < 2 * n)
    return tokens[:, None] * n + k, pre_mask, tokens[:, None] * n + (k - n), post_mask


@triton.jit
def _load_projection(
    proj_ptr, sumsq_ptr, tokens, token_valid, T, splits,
    n: tl.constexpr, ROW: tl.constexpr, GATES: tl.constexpr, NP: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """The projection's partials [splits, T, ROW] (ROW >= n*n+2n columns) summed over splits: sums
    of squares [BLOCK_T], gates [BLOCK_T, GATES] and H_res logits [BLOCK_T, NP * NP] in the packed
    layouts (before the RMS)."""
    gate_cols, gate_valid = _gate_columns(n, GATES)
    res_cols, res_valid = _res_columns(n, NP)
    sumsq = tl.zeros((BLOCK_T,), dtype=tl.float32)
    proj_gates = tl.zeros((BLOCK_T, GATES), dtype=tl.float32)
    proj_res = tl.zeros((BLOCK_T, NP * NP), dtype=tl.float32)
    for split in range(splits):
        row = split * T + tokens
        sumsq += tl.load(sumsq_ptr + row, mask=token_valid, other=0.0)
        proj_row = proj_ptr + row[:, None] * ROW
        proj_gates += tl.load(
            proj_row + gate_cols[None, :], mask=token_valid[:, None] & gate_valid[None, :], other=0.0
        )
        proj_res += tl.load(
            proj_row + res_cols[None, :], mask=token_valid[:, None] & res_valid[None, :], other=0.0
        )
    return sumsq, proj_gates, proj_res


@triton.jit
def _store_projection(
    proj_ptr, sumsq_ptr, tokens, token_valid, sumsq, proj_gates, proj_res,
    n: tl.constexpr, GATES: tl.constexpr, NP: tl.constexpr,
):
    """_load_projection's packed values back to one row of n*n+2n columns per token, and the sums
    of squares: the layout `_load_projection` reads with splits = 1 and ROW = n*n+2n."""
    gate_cols, gate_valid = _gate_columns(n, GATES)
    res_cols, res_valid = _res_columns(n, NP)
    proj_row = proj_ptr + tokens[:, None] * (n * n + 2 * n)
    tl.store(proj_row + gate_cols[None, :], proj_gates, mask=token_valid[:, None] & gate_valid[None, :])
    tl.store(proj_row + res_cols[None, :], proj_res, mask=token_valid[:, None] & res_valid[None, :])
    tl.store(sumsq_ptr + tokens, sumsq, mask=token_valid)


@triton.jit
def _gate_parameters(alpha_ptr, b_pre_ptr, b_post_ptr, n: tl.constexpr, GATES: tl.constexpr):
    """Per packed gate entry [GATES]: alpha (pre or post), bias, and the output scale (1 or 2)."""
    k = tl.arange(0, GATES)
    is_pre = k < n
    is_post = (k >= n) & (k < 2 * n)
    alpha = tl.where(is_pre, tl.load(alpha_ptr), tl.load(alpha_ptr + 1))
    bias = tl.load(b_pre_ptr + k, mask=is_pre, other=0.0) + tl.load(
        b_post_ptr + (k - n), mask=is_post, other=0.0
    )
    return alpha, bias, tl.where(is_pre, 1.0, 2.0)


# --- Sinkhorn-Knopp (mHC Eq. 8: t_max iterations, columns then rows): the paper's in log space, ----
#     DeepSeek-V4's in linear space with every sum guarded by + eps (reference.sinkhorn_eps) -------
# Both run on [BLOCK_T, NP, NP] tiles. An iteration is a @triton.jit function (matrix, valid, eps)
# with its backward (matrix, valid, eps, grad), passed to `_iterate`, `_store_iterates` and
# `_iterations_bwd` as constexprs: one loop of each for both.


@triton.jit
def _normalize(log_m, valid, axis: tl.constexpr):
    """log_m minus its logsumexp along `axis`; padded entries stay -inf and make no NaN."""
    peak = tl.max(log_m, axis=axis, keep_dims=True)
    peak = tl.where(peak == float("-inf"), 0.0, peak)
    total = tl.sum(tl.exp(log_m - peak), axis=axis, keep_dims=True)
    lse = peak + tl.log(tl.where(total > 0.0, total, 1.0))
    return tl.where(valid, log_m - lse, float("-inf"))


@triton.jit
def _log_iteration(log_m, valid, eps):
    """One iteration in log space: columns (axis 1), then rows (axis 2). `eps` is unused: every
    iteration takes it (`_iterate`)."""
    return _normalize(_normalize(log_m, valid, 1), valid, 2)


@triton.jit
def _log_iteration_bwd(log_m, valid, eps, grad):
    """Gradient w.r.t. one iteration's input log_m, given `grad` w.r.t. its output (log space).

    B = A - logsumexp_rows(A) gives dA = dB - exp(B) * rowsum(dB); likewise for the columns.
    """
    cols = _normalize(log_m, valid, 1)
    rows = _normalize(cols, valid, 2)
    grad = grad - tl.exp(rows) * tl.sum(grad, axis=2, keep_dims=True)
    return grad - tl.exp(cols) * tl.sum(grad, axis=1, keep_dims=True)


@triton.jit
def _normalize_eps(m, valid, eps, axis: tl.constexpr):
    """m / (sum of m along `axis` + eps); padded entries stay 0 (a wholly padded line's 0/0, when
    eps is 0, is masked out and reaches no sum)."""
    return tl.where(valid, m / (tl.sum(m, axis=axis, keep_dims=True) + eps), 0.0)


@triton.jit
def _normalize_eps_bwd(m, valid, eps, grad, axis: tl.constexpr):
    """Gradient w.r.t. m of y = m / (S + eps), S the sum of m along `axis`, given `grad` w.r.t. y:
    dm = (dy - sum(dy * y)) / (S + eps) along the axis; padded entries get 0."""
    denominator = tl.sum(m, axis=axis, keep_dims=True) + eps
    y = tl.where(valid, m / denominator, 0.0)
    return tl.where(valid, (grad - tl.sum(grad * y, axis=axis, keep_dims=True)) / denominator, 0.0)


@triton.jit
def _eps_iteration(m, valid, eps):
    """One iteration of DeepSeek-V4's: columns (axis 1), then rows (axis 2), each sum plus eps."""
    return _normalize_eps(_normalize_eps(m, valid, eps, 1), valid, eps, 2)


@triton.jit
def _eps_iteration_bwd(m, valid, eps, grad):
    """Gradient w.r.t. one `_eps_iteration`'s input m, given `grad` w.r.t. its output."""
    cols = _normalize_eps(m, valid, eps, 1)
    return _normalize_eps_bwd(m, valid, eps, _normalize_eps_bwd(cols, valid, eps, grad, 2), 1)


@triton.jit
def _iterate(matrix, valid, eps, iters, ITERATION: tl.constexpr):
    """`iters` iterations of ITERATION (`_log_iteration` or `_eps_iteration`) on `matrix`."""
    for _ in range(iters):
        matrix = ITERATION(matrix, valid, eps)
    return matrix


@triton.jit
def _store_iterates(start, valid, eps, iters, iterates, mask, ITERATION: tl.constexpr):
    """`_iterate(start, valid, eps, iters, ITERATION)`, each iteration's input stored for
    `_iterations_bwd`: the i-th at iterates + i * NP * NP, `iterates` pointing at this program's
    tokens' rows of a scratch [T, iters, NP * NP] and `mask` their validity."""
    matrix = start
    step = matrix.shape[1] * matrix.shape[2]
    for i in range(iters):
        tl.store(iterates + i * step, matrix, mask=mask)
        matrix = ITERATION(matrix, valid, eps)
    # The backward's loads may fall to other threads of the program than these stores.
    tl.debug_barrier()
    return matrix


@triton.jit
def _iterations_bwd(valid, eps, grad, iters, iterates, mask, ITERATION_BWD: tl.constexpr):
    """Exact gradient w.r.t. the start of the iterations `_store_iterates` ran, given `grad` w.r.t.
    their result; ITERATION_BWD is their iteration's backward.

    Reverse mode over the stored iterates: each iteration's input is loaded back, not recomputed.
    Recomputing them on chip instead (segments of sqrt(iters) iterations, O(1) memory) ran 110
    iterations' worth of the latency-bound math for iters = 20 against 40 here (docs/design.md,
    Kernels); the scratch costs iters * NP * NP fp32 per token, written and read once.
    """
    step = grad.shape[1] * grad.shape[2]
    for back in range(iters):
        matrix = tl.load(iterates + (iters - 1 - back) * step, mask=mask, other=0.0)
        grad = ITERATION_BWD(matrix, valid, eps, grad)
    return grad


@triton.jit
def _deepseek_v4_start(log_m, valid, eps):
    """DeepSeek-V4's first step on the logits (padded entries -inf): the softmax over each column
    (axis 1), that softmax plus eps (padded entries 0), and the first iterate, the latter's rows
    normalised."""
    softmax = tl.exp(_normalize(log_m, valid, 1))
    plus_eps = tl.where(valid, softmax + eps, 0.0)
    return softmax, plus_eps, _normalize_eps(plus_eps, valid, eps, 2)


@triton.jit
def _sinkhorn(log_m, valid, eps, iters):
    """The paper's Sinkhorn in log space, exponentiated: H_res."""
    return tl.exp(_iterate(log_m, valid, eps, iters, _log_iteration))


@triton.jit
def _constrained(log_m, valid, eps, iters, FORMULATION: tl.constexpr):
    """H_res [BLOCK_T, NP, NP] of the logits log_m (padded entries -inf; they come out 0): the
    paper's Sinkhorn ("sinkhorn"), or DeepSeek-V4's ("deepseek_v4"): the softmax of each column plus
    eps, the rows normalised, then `iters` - 1 iterations."""
    if FORMULATION == "sinkhorn":
        h_res = _sinkhorn(log_m, valid, eps, iters)
    else:
        _, _, start = _deepseek_v4_start(log_m, valid, eps)
        h_res = _iterate(start, valid, eps, iters - 1, _eps_iteration)
    return h_res


@triton.jit
def _constrained_bwd(log_m, valid, eps, grad_h_res, iters, iterates, mask,
                     FORMULATION: tl.constexpr):
    """Exact gradient w.r.t. the logits log_m of `_constrained`, given grad_h_res; the iterates go
    through `iterates` (`_store_iterates`)."""
    if FORMULATION == "sinkhorn":
        # H_res = exp(final log iterate): the gradient w.r.t. that iterate is grad * H_res.
        h_res = tl.exp(_store_iterates(log_m, valid, eps, iters, iterates, mask, _log_iteration))
        grad_logits = _iterations_bwd(valid, eps, grad_h_res * h_res, iters, iterates, mask,
                                      _log_iteration_bwd)
    else:
        softmax, plus_eps, start = _deepseek_v4_start(log_m, valid, eps)
        _store_iterates(start, valid, eps, iters - 1, iterates, mask, _eps_iteration)
        grad_start = _iterations_bwd(valid, eps, grad_h_res, iters - 1, iterates, mask,
                                     _eps_iteration_bwd)
        # + eps passes the gradient through; y = softmax(L) along the columns gives
        # dL = y * (dy - sum(dy * y)).
        grad_softmax = _normalize_eps_bwd(plus_eps, valid, eps, grad_start, 2)
        grad_logits = softmax * (grad_softmax - tl.sum(grad_softmax * softmax, axis=1, keep_dims=True))
    return grad_logits


@triton.jit
def _logit_tiles(logits, res_valid, BLOCK_T: tl.constexpr, NP: tl.constexpr):
    """Packed H_res logits [BLOCK_T, NP * NP] as [BLOCK_T, NP, NP] tiles, padded entries -inf, and
    the tiles' validity [1, NP, NP]."""
    valid = tl.reshape(res_valid, (1, NP, NP))
    return tl.where(valid, tl.reshape(logits, (BLOCK_T, NP, NP)), float("-inf")), valid


# --- forward: H_pre, H_post, H_res per token (mHC Eq. 7-8) ----------------------------------------


@configs.autotune("coefficients", "mhc_coefficients_fwd")
@triton.jit
def _mhc_coefficients_fwd_kernel(
    proj_ptr, sumsq_ptr, alpha_ptr, b_pre_ptr, b_post_ptr, b_res_ptr,
    h_pre_ptr, h_post_ptr, h_res_ptr, saved_proj_ptr, saved_sumsq_ptr, T, C, splits, sinkhorn_iters,
    hc_eps, n: tl.constexpr, KP: tl.constexpr, GATES: tl.constexpr, NP: tl.constexpr,
    FORMULATION: tl.constexpr, BLOCK_T: tl.constexpr,
):
    tokens, token_valid = token_block(tl.program_id(0), T, BLOCK_T)
    sumsq, proj_gates, proj_res = _load_projection(
        proj_ptr, sumsq_ptr, tokens, token_valid, T, splits, n, KP, GATES, NP, BLOCK_T
    )
    # The summed projection [T, n*n+2n] and sums of squares [T], saved for the backward.
    _store_projection(saved_proj_ptr, saved_sumsq_ptr, tokens, token_valid, sumsq, proj_gates,
                      proj_res, n, GATES, NP)
    rms = tl.sqrt(sumsq / (n * C) + _RMS_EPS)

    # H_pre = sigmoid(alpha_pre h_pre / r + b_pre) + eps, H_post = 2 sigmoid(alpha_post h_post / r
    # + b_post); eps is DeepSeek-V4's, 0 in the paper's formulations.
    alpha, bias, scale = _gate_parameters(alpha_ptr, b_pre_ptr, b_post_ptr, n, GATES)
    pre_eps = tl.where(tl.arange(0, GATES) < n, hc_eps, 0.0)
    gate_logits = alpha[None, :] * (proj_gates / rms[:, None]) + bias[None, :]
    gates = scale[None, :] * tl.sigmoid(gate_logits) + pre_eps[None, :]
    pre_offsets, pre_mask, post_offsets, post_mask = _gate_offsets(tokens, token_valid, n, GATES)
    tl.store(h_pre_ptr + pre_offsets, gates, mask=pre_mask)
    tl.store(h_post_ptr + post_offsets, gates, mask=post_mask)

    # H_res = SinkhornKnopp(alpha_res mat(h_res) / r + b_res) as FORMULATION says, or the raw
    # logits without constraint
    res_cols, res_valid = _res_columns(n, NP)
    b_res = tl.load(b_res_ptr + (res_cols - 2 * n), mask=res_valid, other=0.0)
    logits = tl.load(alpha_ptr + 2) * (proj_res / rms[:, None]) + b_res[None, :]
    if FORMULATION == "none":
        h_res = logits
    else:
        log_m, valid = _logit_tiles(logits, res_valid, BLOCK_T, NP)
        h_res = _constrained(log_m, valid, hc_eps, sinkhorn_iters, FORMULATION)
        h_res = tl.reshape(h_res, (BLOCK_T, NP * NP))
    res_offsets = tokens[:, None] * (n * n) + (res_cols - 2 * n)[None, :]
    tl.store(h_res_ptr + res_offsets, h_res, mask=token_valid[:, None] & res_valid[None, :])


def _layout(n: int) -> dict[str, int]:
    """The layout constexprs for n streams: padded projection columns, packed gates and H_res."""
    return dict(
        n=n, KP=configs.padded_phi_columns(n), GATES=configs.next_power_of_2(2 * n),
        NP=configs.padded_streams(n),
    )


def _formulation(constraint: str) -> dict[str, str | float]:
    """The kernels' FORMULATION ("none", "sinkhorn" or "deepseek_v4") and hc_eps (0 but for
    DeepSeek-V4's, so adding it to H_pre changes nothing) of an ops `constraint`, by
    reference.formulation (a ValueError names the constraints it takes). eps is a runtime argument,
    not a constexpr: one binary serves every eps."""
    kind, eps = reference.formulation(constraint)
    return dict(FORMULATION=kind, hc_eps=eps)


def _fp32(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.contiguous().float() for t in tensors]


def mhc_coefficients_fwd(
    streams: torch.Tensor,
    phi: torch.Tensor,
    alpha: torch.Tensor,
    b_pre: torch.Tensor,
    b_post: torch.Tensor,
    b_res: torch.Tensor,
    sinkhorn_iters: int,
    constraint: str,
) -> tuple[torch.Tensor, ...]:
    """streams [..., n, C] (bf16/fp16/fp32), phi [n*C, n*n+2n], alpha [3], b_pre [n], b_post [n],
    b_res [n, n] -> h_pre [..., n], h_post [..., n], h_res [..., n, n], and for the backward
    v @ phi [..., n*n+2n] and the sums of squares of v [...] (reference.projection), all fp32."""
    formulation = _formulation(constraint)  # first: a bad constraint launches nothing
    x = token_rows(streams)
    tokens, n, channels = x.shape
    gate_parameters = _fp32(alpha, b_pre, b_post, b_res)
    proj_partials, sumsq_partials = _projection(x, phi)
    h_pre = torch.empty((tokens, n), dtype=torch.float32, device=x.device)
    h_post = torch.empty_like(h_pre)
    h_res = torch.empty((tokens, n, n), dtype=torch.float32, device=x.device)
    n_phi = spec.coefficient_count(n)
    proj = torch.empty((tokens, n_phi), dtype=torch.float32, device=x.device)
    sumsq = torch.empty((tokens,), dtype=torch.float32, device=x.device)

    def grid(meta):
        return (configs.ceil_div(tokens, meta["BLOCK_T"]),)

    kernel_launch.launch(
        "mhc_coefficients_fwd", grid, proj_partials, sumsq_partials, *gate_parameters, h_pre,
        h_post, h_res, proj, sumsq, T=tokens, C=channels, splits=proj_partials.shape[0],
        sinkhorn_iters=sinkhorn_iters, **formulation, **_layout(n),
    )
    lead = streams.shape[:-2]
    return (h_pre.view(*lead, n), h_post.view(*lead, n), h_res.view(*lead, n, n),
            proj.view(*lead, n_phi), sumsq.view(lead))


# --- backward, step 1: per token block, d(projection), d(sum of squares), parameter partials -------


@configs.autotune("coefficients", "mhc_coefficients_bwd")
@triton.jit
def _mhc_coefficients_bwd_kernel(
    grad_h_pre_ptr, grad_h_post_ptr, grad_h_res_ptr,
    proj_ptr, sumsq_ptr, alpha_ptr, b_pre_ptr, b_post_ptr, b_res_ptr,
    grad_proj_ptr, grad_sumsq_ptr, grad_bias_partial_ptr, grad_alpha_partial_ptr, iterates_ptr,
    T, C, sinkhorn_iters, hc_eps,
    n: tl.constexpr, KP: tl.constexpr, GATES: tl.constexpr, NP: tl.constexpr,
    FORMULATION: tl.constexpr, GROUP_T: tl.constexpr, BLOCK_T: tl.constexpr,
):
    block = tl.program_id(0)
    tokens, token_valid = token_block(block, T, BLOCK_T)
    # The forward's saved projection: one row of n*n+2n per token (_store_projection).
    sumsq, proj_gates, proj_res = _load_projection(
        proj_ptr, sumsq_ptr, tokens, token_valid, T, 1, n, n * n + 2 * n, GATES, NP, BLOCK_T
    )
    rms = tl.sqrt(sumsq / (n * C) + _RMS_EPS)

    # Gates: d/dz of scale * sigmoid(z) (+ eps, a constant) is scale * s (1 - s); tokens past T
    # load zero gradients.
    alpha, bias, scale = _gate_parameters(alpha_ptr, b_pre_ptr, b_post_ptr, n, GATES)
    h_gates = proj_gates / rms[:, None]
    sig = tl.sigmoid(alpha[None, :] * h_gates + bias[None, :])
    pre_offsets, pre_mask, post_offsets, post_mask = _gate_offsets(tokens, token_valid, n, GATES)
    grad_gates = tl.load(grad_h_pre_ptr + pre_offsets, mask=pre_mask, other=0.0) + tl.load(
        grad_h_post_ptr + post_offsets, mask=post_mask, other=0.0
    )
    grad_gate_logits = grad_gates * scale[None, :] * sig * (1.0 - sig)

    # H_res: through the formulation's Sinkhorn (its iterates stored and loaded back), or the
    # identity without constraint.
    res_cols, res_valid = _res_columns(n, NP)
    b_res = tl.load(b_res_ptr + (res_cols - 2 * n), mask=res_valid, other=0.0)
    alpha_res = tl.load(alpha_ptr + 2)
    h_res_raw = proj_res / rms[:, None]
    res_offsets = tokens[:, None] * (n * n) + (res_cols - 2 * n)[None, :]
    res_mask = token_valid[:, None] & res_valid[None, :]
    grad_h_res = tl.load(grad_h_res_ptr + res_offsets, mask=res_mask, other=0.0)
    if FORMULATION == "none":
        grad_res_logits = grad_h_res
    else:
        log_m, valid = _logit_tiles(alpha_res * h_res_raw + b_res[None, :], res_valid, BLOCK_T, NP)
        # This block's rows of the scratch [T, iters, NP * NP] that holds the Sinkhorn iterates.
        entries = tl.arange(0, NP)[:, None] * NP + tl.arange(0, NP)[None, :]
        iterates = iterates_ptr + tokens[:, None, None] * (sinkhorn_iters * NP * NP) + entries[None]
        grad_logits = _constrained_bwd(log_m, valid, hc_eps, tl.reshape(grad_h_res, (BLOCK_T, NP, NP)),
                                       sinkhorn_iters, iterates, token_valid[:, None, None],
                                       FORMULATION)
        # Tokens past T load no iterates (zeros): with eps = 0 DeepSeek-V4's normalisations of
        # them give NaN, which must not reach the partial sums.
        grad_res_logits = tl.where(token_valid[:, None],
                                   tl.reshape(grad_logits, (BLOCK_T, NP * NP)), 0.0)

    # d alpha and d bias per group of GROUP_T tokens, summed over groups on the host. Every config
    # writes every group's row, so no row keeps what another config wrote while the autotuner
    # benchmarked it on these buffers (Inductor's copy of an autotuner drops restore_value).
    GROUPS: tl.constexpr = BLOCK_T // GROUP_T
    rows = block * GROUPS + tl.arange(0, GROUPS)
    row_valid = (rows * GROUP_T < T)[:, None]
    gate_cols, gate_valid = _gate_columns(n, GATES)
    partial_rows = grad_bias_partial_ptr + rows[:, None] * KP
    tl.store(partial_rows + gate_cols[None, :], _group_sums(grad_gate_logits, GROUPS, GROUP_T),
             mask=row_valid & gate_valid[None, :])
    tl.store(partial_rows + res_cols[None, :], _group_sums(grad_res_logits, GROUPS, GROUP_T),
             mask=row_valid & res_valid[None, :])
    # Per token, d alpha_pre, d alpha_post and d alpha_res (the fourth column is padding).
    is_pre = (gate_cols < n)[None, :]
    gate_terms = grad_gate_logits * h_gates
    which = tl.arange(0, 4)[None, :]
    alpha_terms = tl.where(
        which == 0, tl.sum(tl.where(is_pre, gate_terms, 0.0), axis=1)[:, None],
        tl.where(which == 1, tl.sum(tl.where(is_pre, 0.0, gate_terms), axis=1)[:, None],
                 tl.sum(grad_res_logits * h_res_raw, axis=1)[:, None]),
    )
    tl.store(grad_alpha_partial_ptr + rows[:, None] * 3 + which,
             _group_sums(alpha_terms, GROUPS, GROUP_T), mask=row_valid & (which < 3))

    # h = proj / r and r = sqrt(sumsq / nC + eps): d proj = d h / r, d sumsq = d r / (2 r nC),
    # d r = -sum(d h * h) / r.
    grad_h_gates = grad_gate_logits * alpha[None, :]
    grad_h_res_raw = grad_res_logits * alpha_res
    grad_rms = -(tl.sum(grad_h_gates * h_gates, axis=1) + tl.sum(grad_h_res_raw * h_res_raw, axis=1)) / rms
    grad_sumsq = grad_rms / (2.0 * rms * (n * C))
    tl.store(grad_sumsq_ptr + tokens, grad_sumsq, mask=token_valid)
    # Rows of KP: gates and H_res fill columns [0, K), the padding gets zeros.
    proj_row = grad_proj_ptr + tokens[:, None] * KP
    gate_mask = token_valid[:, None] & gate_valid[None, :]
    tl.store(proj_row + gate_cols[None, :], grad_h_gates / rms[:, None], mask=gate_mask)
    tl.store(proj_row + res_cols[None, :], grad_h_res_raw / rms[:, None], mask=res_mask)
    padding = tl.arange(0, KP)[None, :]
    padding_mask = token_valid[:, None] & (padding >= n * n + 2 * n)
    tl.store(proj_row + padding, tl.zeros((BLOCK_T, KP), tl.float32), mask=padding_mask)


# --- backward, step 2: d x_j = d proj @ phi_j^T + 2 d sumsq x_j + h_pre_j du (+ accumulate);
#     d phi = x^T d proj ----------------------------------------------------------------------------


@configs.autotune("coefficients_bwd_streams", "mhc_coefficients_bwd_streams")
@triton.jit
def _mhc_coefficients_bwd_streams_kernel(
    streams_ptr, phi_ptr, grad_proj_ptr, grad_sumsq_ptr, grad_mixed_ptr, h_pre_ptr, accumulate_ptr,
    grad_streams_ptr, grad_phi_partial_ptr, T, C, tokens_per_split,
    n: tl.constexpr, KP: tl.constexpr, ACCUMULATE: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_COLUMNS: tl.constexpr,
):
    K: tl.constexpr = n * n + 2 * n
    nC = n * C
    # A program owns one channel block of one stream; the stream varies fastest in the grid, so
    # the n programs reading the same du tiles run together and du comes from L2 after the first.
    stream = tl.program_id(0) % n
    channels = (tl.program_id(0) // n) * BLOCK_COLUMNS + tl.arange(0, BLOCK_COLUMNS)
    channel_valid = channels < C
    columns = stream * C + channels
    k = tl.arange(0, KP)
    # This program's slice of the padded phi [n*C, KP] stays on chip for its whole token range.
    phi_t = tl.trans(
        tl.load(phi_ptr + columns[:, None] * KP + k[None, :], mask=channel_valid[:, None], other=0.0)
    )
    grad_phi = tl.zeros((BLOCK_COLUMNS, KP), dtype=tl.float32)
    split = tl.program_id(1)
    first = split.to(tl.int64) * tokens_per_split
    last = tl.minimum(first + tokens_per_split, T)
    for offset in range(0, tokens_per_split, BLOCK_T):
        tokens = first + offset + tl.arange(0, BLOCK_T)
        token_valid = tokens < last
        x_offsets = tokens[:, None] * nC + columns[None, :]
        x_mask = token_valid[:, None] & channel_valid[None, :]
        x = tl.load(streams_ptr + x_offsets, mask=x_mask, other=0.0)
        grad_proj = tl.load(
            grad_proj_ptr + tokens[:, None] * KP + k[None, :], mask=token_valid[:, None], other=0.0
        )
        grad_sumsq = tl.load(grad_sumsq_ptr + tokens, mask=token_valid, other=0.0)
        h_pre = tl.load(h_pre_ptr + tokens * n + stream, mask=token_valid, other=0.0)
        grad_mixed = tl.load(
            grad_mixed_ptr + tokens[:, None] * C + channels[None, :], mask=x_mask, other=0.0
        ).to(tl.float32)
        # The stream gradient is rounded to the stream dtype: tf32 is accurate enough here.
        grad_x = tl.dot(grad_proj, phi_t, input_precision="tf32")
        grad_x += 2.0 * grad_sumsq[:, None] * x.to(tl.float32) + h_pre[:, None] * grad_mixed
        if ACCUMULATE:  # the streams' gradient from their other reader, added: one tensor written
            grad_x += tl.load(accumulate_ptr + x_offsets, mask=x_mask, other=0.0).to(tl.float32)
        tl.store(grad_streams_ptr + x_offsets, grad_x.to(grad_streams_ptr.dtype.element_ty), mask=x_mask)
        grad_phi = _dot_fp32_operand(tl.trans(x), grad_proj, grad_phi)
    # Only the K real columns of grad phi are kept: [splits, n*C, K].
    tl.store(
        grad_phi_partial_ptr + split.to(tl.int64) * (nC * K) + columns[:, None] * K + k[None, :],
        grad_phi, mask=channel_valid[:, None] & (k < K)[None, :],
    )


def _token_splits(tokens: int, columns: int, device: torch.device) -> int:
    """How many token ranges grad phi is reduced over: enough programs to fill the GPU, counted for
    128-column blocks, and at least 512 tokens per range so the partials stay small."""
    wanted = configs.ceil_div(_PROGRAMS_PER_SM * _multiprocessors(device) * 128, max(columns, 1))
    return max(1, min(wanted, configs.ceil_div(tokens, 512)))


def mhc_coefficients_bwd(
    grad_h_pre: torch.Tensor,
    grad_h_post: torch.Tensor,
    grad_h_res: torch.Tensor,
    proj: torch.Tensor,
    sumsq: torch.Tensor,
    streams: torch.Tensor,
    phi: torch.Tensor,
    alpha: torch.Tensor,
    b_pre: torch.Tensor,
    b_post: torch.Tensor,
    b_res: torch.Tensor,
    sinkhorn_iters: int,
    constraint: str,
    grad_mixed: torch.Tensor,
    h_pre: torch.Tensor,
    accumulate: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """Gradients of (streams, phi, alpha, b_pre, b_post, b_res), each in its input's dtype and shape,
    from grad_h_pre [..., n] (the whole of it, the pre-mix's share included), grad_h_post [..., n],
    grad_h_res [..., n, n]; proj [..., n*n+2n] and sumsq [...] are the forward's
    (mhc_coefficients_fwd). Grad streams also gets the pre-mix's share h_pre_j * grad_mixed
    (grad_mixed [..., C], h_pre [..., n]) and, when given, `accumulate` [..., n, C] (the streams'
    gradient from their other reader)."""
    x = token_rows(streams)
    tokens, n, channels = x.shape
    n_columns, n_phi = n * channels, spec.coefficient_count(n)
    phi_padded = _padded_phi(phi)
    gate_parameters = _fp32(alpha, b_pre, b_post, b_res)
    device = x.device

    # Step 1: gradients of the projection and of the sums of squares, parameter partials.
    grad_proj = torch.empty((tokens, phi_padded.shape[1]), dtype=torch.float32, device=device)
    grad_sumsq = torch.empty((tokens,), dtype=torch.float32, device=device)
    # One row of parameter partials per group of tokens as wide as the smallest BLOCK_T.
    group_tokens = configs.smallest("mhc_coefficients_bwd", "BLOCK_T")
    groups = configs.ceil_div(tokens, group_tokens)
    grad_bias_partial = torch.empty((groups, phi_padded.shape[1]), dtype=torch.float32, device=device)
    grad_alpha_partial = torch.empty((groups, 3), dtype=torch.float32, device=device)
    formulation, layout = _formulation(constraint), _layout(n)
    # Scratch for the Sinkhorn iterates the kernel stores and loads back (_iterations_bwd).
    constrained = formulation["FORMULATION"] != "none" and sinkhorn_iters > 0
    sinkhorn_iterates = torch.empty(
        (tokens, sinkhorn_iters, layout["NP"] ** 2) if constrained else (1,), dtype=torch.float32,
        device=device)

    def token_grid(meta):
        return (configs.ceil_div(tokens, meta["BLOCK_T"]),)

    kernel_launch.launch(
        "mhc_coefficients_bwd", token_grid,
        per_token(grad_h_pre, 1), per_token(grad_h_post, 1), per_token(grad_h_res, 2),
        per_token(proj, 1), per_token(sumsq, 0), *gate_parameters, grad_proj, grad_sumsq,
        grad_bias_partial, grad_alpha_partial, sinkhorn_iterates, T=tokens, C=channels,
        sinkhorn_iters=sinkhorn_iters, **formulation, GROUP_T=group_tokens, **layout,
    )

    # Step 2: grad streams, and grad phi per token split.
    splits = _token_splits(tokens, n_columns, device)
    grad_streams = torch.empty_like(x)
    grad_phi_partial = torch.empty((splits, n_columns, n_phi), dtype=torch.float32, device=device)

    def column_grid(meta):
        return n * configs.ceil_div(channels, meta["BLOCK_COLUMNS"]), splits

    kernel_launch.launch(
        "mhc_coefficients_bwd_streams", column_grid, x, phi_padded, grad_proj, grad_sumsq,
        grad_mixed.contiguous().view(tokens, channels), per_token(h_pre, 1),
        # Without `accumulate` the kernel never reads its pointer: the streams stand in.
        x if accumulate is None else token_rows(accumulate),
        grad_streams, grad_phi_partial, T=tokens, C=channels,
        tokens_per_split=configs.ceil_div(tokens, splits), n=n, KP=phi_padded.shape[1],
        ACCUMULATE=accumulate is not None,
    )
    # Each gradient is its own tensor: a custom op's outputs may not alias one another.
    return (
        grad_streams.view(streams.shape),
        grad_phi_partial.sum(dim=0).to(phi.dtype),
        grad_alpha_partial.sum(dim=0).view(alpha.shape).to(alpha.dtype),
        *(
            grad_bias_partial[:, columns].sum(dim=0).view(bias.shape).to(bias.dtype)
            for columns, bias in (
                (slice(0, n), b_pre), (slice(n, 2 * n), b_post), (slice(2 * n, n_phi), b_res)
            )
        ),
    )
