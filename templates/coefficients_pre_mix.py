"""Kernels of mhc::coefficients_pre_mix: H_pre, H_post, H_res (paper Eq. 7-8) and F's input
u = H_pre x_l (Eq. 3), with one read of the streams in the forward, and the hand-written backward.

Forward, one launch. H_pre needs a reduction over all n*C values of a token before any of u can be
written, so each chunk of BLOCK_T tokens is done by two kinds of task:
  projection  BLOCK_T tokens x SPLIT of the n*C columns: v @ phi and the sum of squares, written
              as a partial row [KP] per token (a few % of the stream bytes);
  mix         MIX_T tokens: sum the chunk's partials, RMS, gates, Sinkhorn (registers), write
              H_pre, H_post, H_res, then u = H_pre x over all C.
Every program takes its task from a ticket counter (an atomic, so tickets follow the order in which
programs actually start); the tickets interleave the chunks' projection tasks with the mix tasks of
the chunk LAG chunks earlier. A mix task waits (a spin on the chunk's counter of finished
projections, acquire) for its chunk: every task it waits for holds a smaller ticket, so it already
runs or ran and the wait ends (no deadlock, whatever the number of programs on the GPU). The mix
re-reads the chunk's streams soon after the projection read them, from L2: the streams cross HBM
once. Under the interpreter the programs run one by one in ticket order and never wait.

Backward, three launches (gradients from grad_h_pre, grad_h_post, grad_h_res and grad_mixed):
  1. projection again (recomputed from the streams, not saved) plus <grad_mixed, x_j> (the
     gradient of H_pre through the pre-mix), as partials per column split;
  2. per token block: the gates' and Sinkhorn's gradient (iterates recomputed on chip) w.r.t. the
     projection and the sum of squares, per-block partials for alpha and the biases, and H_pre
     again for step 3, all written into one row [KP] per token;
  3. per (n*C column block, token split): grad streams = d proj @ phi^T + 2 d sumsq x + H_pre_j
     grad_mixed: the pre-mix's and the coefficients' contributions in one write; and grad phi
     partials x^T @ d proj.
Every reduction across programs writes partials summed afterwards in a fixed order: no atomics in
any sum, deterministic. Saved between forward and backward: nothing but the op's inputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mhc_compile.templates import configs

# Kernels call helpers by their plain names, and no local variable takes a helper's name: under
# torch.compile Inductor copies the source of the JIT functions a kernel names (co_names), not of
# module attributes (coefficients.sinkhorn) nor of names a local shadows.
from mhc_compile.templates.coefficients import (
    dot_fp32_operand, fp32, gate_columns, gate_offsets, gate_parameters, is_sinkhorn, layout,
    multiprocessors, padded_phi, project_columns, res_columns, res_logits, res_matrix, res_offsets,
    rms_of, sinkhorn, sinkhorn_bwd, sinkhorn_segment, sum_splits,
)
from mhc_compile.templates.tiles import channel_tile, per_token, stream_tile, token_block, token_rows

# A mix task gives up waiting after this many polls (about a second; a real wait lasts one
# projection task, microseconds): only a bug gets there, and its outputs are then NaN, not a hang.
_MAX_POLLS = tl.constexpr(1 << 20)
# Elements of a mix task's [MIX_T, NP, MIX_C] stream tile; MIX_C follows from it.
_MIX_TILE = tl.constexpr(configs.MIX_TILE)
# Splits (of columns in the backward projection, of tokens in grad phi) aim at this many programs
# per SM.
_PROGRAMS_PER_SM = 4


# --- forward: the task schedule ---------------------------------------------------------------------


@triton.jit
def scheduled_task(ticket, chunks, splits, MIX_TASKS: tl.constexpr, LAG: tl.constexpr):
    """Task of `ticket`: (is_mix, chunk, index). Step s holds the projection tasks of chunk s, then
    the mix tasks of chunk s - LAG; tickets run through the steps in order."""
    lag = tl.minimum(chunks, LAG)
    step_size = splits + MIX_TASKS
    head = lag * splits  # steps 0 .. lag-1: projections only
    body = (chunks - lag) * step_size
    in_head = ticket < head
    in_body = (ticket >= head) & (ticket < head + body)
    position = ticket - head
    step = lag + position // step_size
    within = position % step_size
    tail = position - body  # the last lag steps: mixes only
    body_mix = within >= splits
    is_mix = tl.where(in_head, False, tl.where(in_body, body_mix, True))
    chunk = tl.where(
        in_head, ticket // splits,
        tl.where(in_body, tl.where(body_mix, step - lag, step), chunks - lag + tail // MIX_TASKS),
    )
    index = tl.where(
        in_head, ticket % splits,
        tl.where(in_body, tl.where(body_mix, within - splits, within), tail % MIX_TASKS),
    )
    return is_mix, chunk, index


@triton.jit
def _wait_for(counter_ptr, target):
    """Spin until *counter_ptr >= target (acquire: the writers' partials are visible afterwards).
    Returns whether it got there (False only after _MAX_POLLS polls)."""
    done = tl.atomic_add(counter_ptr, 0, sem="acquire")
    polls = 0
    while (done < target) & (polls < _MAX_POLLS):
        done = tl.atomic_add(counter_ptr, 0, sem="acquire")
        polls += 1
    return done >= target


@triton.jit
def _projection_task(
    streams_ptr, phi_ptr, partial_ptr, done_ptr, chunk, split, T, C, SPLIT,
    n: tl.constexpr, KP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):
    tokens, token_valid = token_block(chunk, T, BLOCK_T)
    first = split * SPLIT
    last = tl.minimum(first + SPLIT, n * C)
    row = project_columns(
        streams_ptr, phi_ptr, streams_ptr, tokens, token_valid, first, last, C,
        n, KP, BLOCK_T, BLOCK_K, False,
    )
    columns = tl.arange(0, KP)
    offsets = (split.to(tl.int64) * T + tokens)[:, None] * KP + columns[None, :]
    tl.store(partial_ptr + offsets, row, mask=token_valid[:, None] & (columns <= n * n + 2 * n)[None, :])
    # Every thread's stores are done before the count says so (release).
    tl.debug_barrier()
    tl.atomic_add(done_ptr, 1, sem="release")


@triton.jit
def _mix_task(
    streams_ptr, alpha_ptr, b_pre_ptr, b_post_ptr, b_res_ptr, partial_ptr, done_ptr,
    h_pre_ptr, h_post_ptr, h_res_ptr, mixed_ptr, chunk, index, T, C, splits, sinkhorn_iters,
    n: tl.constexpr, KP: tl.constexpr, GATES: tl.constexpr, NP: tl.constexpr,
    SINKHORN: tl.constexpr, BLOCK_T: tl.constexpr, MIX_T: tl.constexpr, MIX_C: tl.constexpr,
):
    K: tl.constexpr = n * n + 2 * n
    tokens = chunk.to(tl.int64) * BLOCK_T + index * MIX_T + tl.arange(0, MIX_T)
    token_valid = tokens < T
    # NaN in every output if the wait gave up (a bug), never numbers computed from missing partials.
    poison = tl.where(_wait_for(done_ptr, splits), 0.0, float("nan"))

    # r and the gates: H_pre = sigmoid(alpha_pre h_pre / r + b_pre), H_post = 2 sigmoid(...)
    sumsq_column = tl.arange(0, 1) + K
    sumsq = tl.sum(sum_splits(
        partial_ptr, tokens, token_valid, T, splits, sumsq_column, sumsq_column >= 0, KP), axis=1)
    rms = rms_of(sumsq, C, n)
    gate_cols, gate_valid = gate_columns(n, GATES)
    proj_gates = sum_splits(partial_ptr, tokens, token_valid, T, splits, gate_cols, gate_valid, KP)
    alpha, bias, scale = gate_parameters(alpha_ptr, b_pre_ptr, b_post_ptr, n, GATES)
    gates = scale[None, :] * tl.sigmoid(alpha[None, :] * (proj_gates / rms[:, None]) + bias[None, :])
    gates += poison
    pre_offsets, pre_mask, post_offsets, post_mask = gate_offsets(tokens, token_valid, n, GATES)
    tl.store(h_pre_ptr + pre_offsets, gates, mask=pre_mask)
    tl.store(h_post_ptr + post_offsets, gates, mask=post_mask)

    # H_res = SinkhornKnopp(alpha_res mat(h_res) / r + b_res), or the raw logits without constraint
    res_cols, res_valid = res_columns(n, NP)
    proj_res = sum_splits(partial_ptr, tokens, token_valid, T, splits, res_cols, res_valid, KP)
    logits, _ = res_logits(proj_res, rms, alpha_ptr, b_res_ptr, n, NP)
    if SINKHORN:
        log_m, valid = res_matrix(logits, n, NP, MIX_T)
        h_res = tl.reshape(tl.exp(sinkhorn(log_m, valid, sinkhorn_iters)), (MIX_T, NP * NP))
    else:
        h_res = logits
    offsets, mask = res_offsets(tokens, token_valid, n, NP)
    tl.store(h_res_ptr + offsets, h_res + poison, mask=mask)

    # u = sum_j H_pre[j] x_j: the same gates, in the [MIX_T, NP] layout of a stream tile.
    streams = tl.arange(0, NP)
    pre = sum_splits(partial_ptr, tokens, token_valid, T, splits, streams, streams < n, KP)
    b_pre = tl.load(b_pre_ptr + streams, mask=streams < n, other=0.0)
    h_pre = tl.sigmoid(tl.load(alpha_ptr) * (pre / rms[:, None]) + b_pre[None, :])
    h_pre = tl.where((streams < n)[None, :], h_pre, 0.0) + poison
    for start in range(0, C, MIX_C):
        channels = start + tl.arange(0, MIX_C)
        x_offsets, x_mask = stream_tile(tokens, token_valid, channels, C, n, NP)
        x = tl.load(streams_ptr + x_offsets, mask=x_mask, other=0.0).to(tl.float32)
        mixed = tl.sum(h_pre[:, :, None] * x, axis=1)
        out_offsets, out_mask = channel_tile(tokens, token_valid, channels, C)
        tl.store(mixed_ptr + out_offsets, mixed.to(mixed_ptr.dtype.element_ty), mask=out_mask)


@configs.autotune(
    "coefficients_pre_mix_fwd", "mhc_coefficients_pre_mix_fwd",
    # The ticket and chunk counters must start at 0 on every run, benchmarking runs included.
    restore_value=["sync_ptr"],
)
@triton.jit
def _mhc_coefficients_pre_mix_fwd_kernel(
    streams_ptr, phi_ptr, alpha_ptr, b_pre_ptr, b_post_ptr, b_res_ptr, partial_ptr, sync_ptr,
    h_pre_ptr, h_post_ptr, h_res_ptr, mixed_ptr, T, C, sinkhorn_iters,
    n: tl.constexpr, KP: tl.constexpr, GATES: tl.constexpr, NP: tl.constexpr,
    SINKHORN: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
    MIX_T: tl.constexpr, LAG: tl.constexpr,
):
    MIX_C: tl.constexpr = _MIX_TILE // (MIX_T * NP)
    chunks = tl.cdiv(T, BLOCK_T)
    splits = tl.cdiv(n * C, SPLIT)
    # sync: [0] the ticket counter, [1 + c] the finished projection tasks of chunk c.
    ticket = tl.atomic_add(sync_ptr, 1)
    is_mix, chunk, index = scheduled_task(ticket, chunks, splits, BLOCK_T // MIX_T, LAG)
    done_ptr = sync_ptr + 1 + chunk
    if is_mix:
        _mix_task(
            streams_ptr, alpha_ptr, b_pre_ptr, b_post_ptr, b_res_ptr, partial_ptr, done_ptr,
            h_pre_ptr, h_post_ptr, h_res_ptr, mixed_ptr, chunk, index, T, C, splits, sinkhorn_iters,
            n, KP, GATES, NP, SINKHORN, BLOCK_T, MIX_T, MIX_C,
        )
    else:
        _projection_task(
            streams_ptr, phi_ptr, partial_ptr, done_ptr, chunk, index, T, C, SPLIT,
            n, KP, BLOCK_T, BLOCK_K,
        )


def mhc_coefficients_pre_mix_fwd(
    streams: torch.Tensor,
    phi: torch.Tensor,
    alpha: torch.Tensor,
    b_pre: torch.Tensor,
    b_post: torch.Tensor,
    b_res: torch.Tensor,
    sinkhorn_iters: int,
    constraint: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """streams [..., n, C] (bf16/fp16/fp32), phi [n*C, n*n+2n], alpha [3], b_pre [n], b_post [n],
    b_res [n, n] -> h_pre [..., n], h_post [..., n], h_res [..., n, n] (fp32) and mixed [..., C]
    in the stream dtype."""
    x = token_rows(streams)
    tokens, n, channels = x.shape
    kernel = "mhc_coefficients_pre_mix_fwd"
    # Sized for the config with the most splits and chunks; the chosen one may use fewer rows.
    max_splits = triton.cdiv(n * channels, configs.smallest(kernel, "SPLIT"))
    max_chunks = triton.cdiv(tokens, configs.smallest(kernel, "BLOCK_T"))
    kp = configs.padded_phi_columns(n)
    partial = torch.empty((max_splits, tokens, kp), dtype=torch.float32, device=x.device)
    sync = torch.zeros((1 + max_chunks,), dtype=torch.int32, device=x.device)
    h_pre = torch.empty((tokens, n), dtype=torch.float32, device=x.device)
    h_post = torch.empty_like(h_pre)
    h_res = torch.empty((tokens, n, n), dtype=torch.float32, device=x.device)
    mixed = torch.empty((tokens, channels), dtype=x.dtype, device=x.device)

    def grid(meta):
        chunks = triton.cdiv(tokens, meta["BLOCK_T"])
        splits = triton.cdiv(n * channels, meta["SPLIT"])
        return (chunks * (splits + meta["BLOCK_T"] // meta["MIX_T"]),)

    configs.launch(
        kernel, grid, x, padded_phi(phi),
        *fp32(alpha, b_pre, b_post, b_res), partial, sync, h_pre, h_post, h_res, mixed,
        T=tokens, C=channels, sinkhorn_iters=sinkhorn_iters,
        SINKHORN=is_sinkhorn(constraint), **layout(n),
    )
    lead = streams.shape[:-2]
    return (
        h_pre.view(*lead, n), h_post.view(*lead, n), h_res.view(*lead, n, n),
        mixed.view(*lead, channels),
    )


# --- backward, step 1: the projection again, and <grad_mixed, x_j> ----------------------------------


@configs.autotune("projection", "mhc_projection")
@triton.jit
def _mhc_projection_kernel(
    streams_ptr, phi_ptr, grad_mixed_ptr, partial_ptr, T, C, columns_per_split,
    n: tl.constexpr, KP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):
    tokens, token_valid = token_block(tl.program_id(0), T, BLOCK_T)
    split = tl.program_id(1)
    first = split * columns_per_split
    last = tl.minimum(first + columns_per_split, n * C)
    row = project_columns(
        streams_ptr, phi_ptr, grad_mixed_ptr, tokens, token_valid, first, last, C,
        n, KP, BLOCK_T, BLOCK_K, True,
    )
    columns = tl.arange(0, KP)
    offsets = (split.to(tl.int64) * T + tokens)[:, None] * KP + columns[None, :]
    tl.store(partial_ptr + offsets, row, mask=token_valid[:, None])


def _projection_bwd(x: torch.Tensor, phi: torch.Tensor, grad_mixed: torch.Tensor) -> torch.Tensor:
    """x [T, n, C], padded phi [n*C, KP], grad_mixed [T, C] -> partial rows [splits, T, KP]."""
    tokens, n, channels = x.shape
    n_columns, kp = n * channels, phi.shape[1]
    # Split the columns so that the grid fills the GPU (counted for 64-token blocks), keeping at
    # least 512 columns per split so the partials stay a few % of the stream bytes.
    wanted = triton.cdiv(_PROGRAMS_PER_SM * multiprocessors(x.device), triton.cdiv(tokens, 64))
    splits = max(1, min(wanted, n_columns // 512))
    columns_per_split = triton.cdiv(triton.cdiv(n_columns, splits), 256) * 256
    splits = triton.cdiv(n_columns, columns_per_split)
    partial = torch.empty((splits, tokens, kp), dtype=torch.float32, device=x.device)

    def grid(meta):
        return triton.cdiv(tokens, meta["BLOCK_T"]), splits

    configs.launch(
        "mhc_projection", grid, x, phi, grad_mixed, partial, T=tokens, C=channels,
        columns_per_split=columns_per_split, n=n, KP=kp,
    )
    return partial


# --- backward, step 2: per token block, d(projection), d(sum of squares), parameter partials -------


@configs.autotune(
    "coefficients_bwd", "mhc_coefficients_bwd",
    # Configs write different partial rows (BLOCK_T differs): zero them around benchmarking.
    restore_value=["grad_bias_partial_ptr", "grad_alpha_partial_ptr"],
)
@triton.jit
def _mhc_coefficients_bwd_kernel(
    grad_h_pre_ptr, grad_h_post_ptr, grad_h_res_ptr,
    partial_ptr, alpha_ptr, b_pre_ptr, b_post_ptr, b_res_ptr,
    grad_proj_ptr, grad_bias_partial_ptr, grad_alpha_partial_ptr,
    T, C, splits, sinkhorn_iters, sinkhorn_segment,
    n: tl.constexpr, KP: tl.constexpr, GATES: tl.constexpr, NP: tl.constexpr,
    SINKHORN: tl.constexpr, BLOCK_T: tl.constexpr,
):
    K: tl.constexpr = n * n + 2 * n
    block = tl.program_id(0)
    tokens, token_valid = token_block(block, T, BLOCK_T)
    gate_cols, gate_valid = gate_columns(n, GATES)
    proj_gates = sum_splits(partial_ptr, tokens, token_valid, T, splits, gate_cols, gate_valid, KP)
    # Column K: sum of squares; K + 1 + j: <grad_mixed, x_j> (read in the packed gate layout, pre
    # entries k < n only).
    sumsq = tl.sum(sum_splits(
        partial_ptr, tokens, token_valid, T, splits, tl.arange(0, 1) + K, tl.arange(0, 1) >= 0, KP,
    ), axis=1)
    grad_h_pre_mix = sum_splits(
        partial_ptr, tokens, token_valid, T, splits, gate_cols + K + 1, gate_cols < n, KP
    )
    rms = rms_of(sumsq, C, n)

    # Gates: d/dz of scale * sigmoid(z) is scale * s (1 - s); tokens past T load zero gradients.
    alpha, bias, scale = gate_parameters(alpha_ptr, b_pre_ptr, b_post_ptr, n, GATES)
    h_gates = proj_gates / rms[:, None]
    sig = tl.sigmoid(alpha[None, :] * h_gates + bias[None, :])
    pre_offsets, pre_mask, post_offsets, post_mask = gate_offsets(tokens, token_valid, n, GATES)
    # H_pre is read by the pre-mix (grad <grad_mixed, x_j>) and may be an output read elsewhere.
    grad_gates = tl.load(grad_h_pre_ptr + pre_offsets, mask=pre_mask, other=0.0) + tl.load(
        grad_h_post_ptr + post_offsets, mask=post_mask, other=0.0
    ) + grad_h_pre_mix
    grad_gate_logits = grad_gates * scale[None, :] * sig * (1.0 - sig)

    # H_res: through Sinkhorn (recomputed on chip), or the identity without constraint.
    res_cols, res_valid = res_columns(n, NP)
    proj_res = sum_splits(partial_ptr, tokens, token_valid, T, splits, res_cols, res_valid, KP)
    logits, h_res_raw = res_logits(proj_res, rms, alpha_ptr, b_res_ptr, n, NP)
    res_index, res_mask = res_offsets(tokens, token_valid, n, NP)
    grad_h_res = tl.load(grad_h_res_ptr + res_index, mask=res_mask, other=0.0)
    if SINKHORN:
        log_m, valid = res_matrix(logits, n, NP, BLOCK_T)
        h_res = tl.exp(sinkhorn(log_m, valid, sinkhorn_iters))
        # H_res = exp(final log iterate): the gradient w.r.t. that iterate is grad * H_res.
        grad_log = tl.reshape(grad_h_res, (BLOCK_T, NP, NP)) * h_res
        grad_logits = sinkhorn_bwd(log_m, valid, grad_log, sinkhorn_iters, sinkhorn_segment)
        grad_res_logits = tl.reshape(grad_logits, (BLOCK_T, NP * NP))
    else:
        grad_res_logits = grad_h_res

    # This block's share of d alpha and d bias; summed over blocks on the host (deterministic).
    partial_row = grad_bias_partial_ptr + block * KP
    tl.store(partial_row + gate_cols, tl.sum(grad_gate_logits, axis=0), mask=gate_valid)
    tl.store(partial_row + res_cols, tl.sum(grad_res_logits, axis=0), mask=res_valid)
    is_pre = (gate_cols < n)[None, :]
    grad_alpha_pre = tl.sum(tl.where(is_pre, grad_gate_logits * h_gates, 0.0))
    grad_alpha_post = tl.sum(tl.where(is_pre, 0.0, grad_gate_logits * h_gates))
    grad_alpha_res = tl.sum(grad_res_logits * h_res_raw)
    which = tl.arange(0, 4)
    grad_alpha = tl.where(
        which == 0, grad_alpha_pre, tl.where(which == 1, grad_alpha_post, grad_alpha_res)
    )
    tl.store(grad_alpha_partial_ptr + block * 3 + which, grad_alpha, mask=which < 3)

    # h = proj / r and r = sqrt(sumsq / nC + eps): d proj = d h / r, d sumsq = d r / (2 r nC),
    # d r = -sum(d h * h) / r.
    grad_h_gates = grad_gate_logits * alpha[None, :]
    grad_h_res_raw = grad_res_logits * tl.load(alpha_ptr + 2)
    grad_rms = -(tl.sum(grad_h_gates * h_gates, axis=1) + tl.sum(grad_h_res_raw * h_res_raw, axis=1)) / rms
    grad_sumsq = grad_rms / (2.0 * rms * (n * C))
    # The row for step 3: d proj in columns < K, d sumsq in column K, H_pre_j in column K + 1 + j,
    # zeros after (step 3's products must see finite numbers there).
    row = grad_proj_ptr + tokens[:, None] * KP
    gate_mask = token_valid[:, None] & gate_valid[None, :]
    tl.store(row + gate_cols[None, :], grad_h_gates / rms[:, None], mask=gate_mask)
    tl.store(row + res_cols[None, :], grad_h_res_raw / rms[:, None], mask=res_mask)
    tl.store(row + (gate_cols + K + 1)[None, :], sig, mask=token_valid[:, None] & (gate_cols < n)[None, :])
    columns = tl.arange(0, KP)[None, :]
    tail = tl.where(columns == K, grad_sumsq[:, None], 0.0)
    tl.store(row + columns, tail, mask=token_valid[:, None] & ((columns == K) | (columns > K + n)))


# --- backward, step 3: d streams = d proj @ phi^T + 2 d sumsq x + H_pre_j d u;  d phi = x^T d proj --


@configs.autotune("coefficients_bwd_streams", "mhc_coefficients_bwd_streams")
@triton.jit
def _mhc_coefficients_bwd_streams_kernel(
    streams_ptr, phi_ptr, grad_mixed_ptr, grad_proj_ptr, grad_streams_ptr, grad_phi_partial_ptr,
    T, C, tokens_per_split,
    n: tl.constexpr, KP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_NC: tl.constexpr,
):
    K: tl.constexpr = n * n + 2 * n
    nC = n * C
    columns = tl.program_id(0) * BLOCK_NC + tl.arange(0, BLOCK_NC)
    column_valid = columns < nC
    k = tl.arange(0, KP)
    # This program's slice of the padded phi [n*C, KP] stays on chip for its whole token range.
    phi_t = tl.trans(
        tl.load(phi_ptr + columns[:, None] * KP + k[None, :], mask=column_valid[:, None], other=0.0)
    )
    # Column K + 1 + j of a step-2 row holds H_pre_j: this program's columns belong to streams
    # j = col // C, at channels col % C of grad_mixed.
    h_pre_column = K + 1 + columns // C
    channel = columns % C
    grad_phi = tl.zeros((BLOCK_NC, KP), dtype=tl.float32)
    split = tl.program_id(1)
    first = split.to(tl.int64) * tokens_per_split
    last = tl.minimum(first + tokens_per_split, T)
    for offset in range(0, tokens_per_split, BLOCK_T):
        tokens = first + offset + tl.arange(0, BLOCK_T)
        token_valid = tokens < last
        x_offsets = tokens[:, None] * nC + columns[None, :]
        x_mask = token_valid[:, None] & column_valid[None, :]
        x = tl.load(streams_ptr + x_offsets, mask=x_mask, other=0.0)
        grad_mixed = tl.load(
            grad_mixed_ptr + tokens[:, None] * C + channel[None, :], mask=x_mask, other=0.0
        )
        grad_row = grad_proj_ptr + tokens * KP
        grad_proj = tl.load(grad_row[:, None] + k[None, :], mask=token_valid[:, None], other=0.0)
        grad_sumsq = tl.load(grad_row + K, mask=token_valid, other=0.0)
        # A gather within rows just loaded (L1): H_pre of each column's stream, per token.
        h_pre = tl.load(grad_row[:, None] + h_pre_column[None, :], mask=x_mask, other=0.0)
        # The stream gradient is rounded to the stream dtype: tf32 is accurate enough for phi's term.
        grad_x = tl.dot(grad_proj, phi_t, input_precision="tf32")
        grad_x += 2.0 * grad_sumsq[:, None] * x.to(tl.float32) + h_pre * grad_mixed.to(tl.float32)
        tl.store(grad_streams_ptr + x_offsets, grad_x.to(grad_streams_ptr.dtype.element_ty), mask=x_mask)
        grad_phi = dot_fp32_operand(tl.trans(x), grad_proj, grad_phi)
    # Only the K real columns of grad phi are kept: [splits, n*C, K].
    tl.store(
        grad_phi_partial_ptr + split.to(tl.int64) * (nC * K) + columns[:, None] * K + k[None, :],
        grad_phi, mask=column_valid[:, None] & (k < K)[None, :],
    )


def _token_splits(tokens: int, columns: int, device: torch.device) -> int:
    """How many token ranges grad phi is reduced over: enough programs to fill the GPU, counted for
    128-column blocks, and at least 512 tokens per range so the partials stay small."""
    wanted = triton.cdiv(_PROGRAMS_PER_SM * multiprocessors(device) * 128, max(columns, 1))
    return max(1, min(wanted, triton.cdiv(tokens, 512)))


def mhc_coefficients_pre_mix_bwd(
    grad_h_pre: torch.Tensor,
    grad_h_post: torch.Tensor,
    grad_h_res: torch.Tensor,
    grad_mixed: torch.Tensor,
    streams: torch.Tensor,
    phi: torch.Tensor,
    alpha: torch.Tensor,
    b_pre: torch.Tensor,
    b_post: torch.Tensor,
    b_res: torch.Tensor,
    sinkhorn_iters: int,
    constraint: str,
) -> tuple[torch.Tensor, ...]:
    """Gradients of (streams, phi, alpha, b_pre, b_post, b_res), each in its input's dtype and shape,
    from grad_h_pre [..., n], grad_h_post [..., n], grad_h_res [..., n, n], grad_mixed [..., C]."""
    x = token_rows(streams)
    tokens, n, channels = x.shape
    n_columns, n_phi = n * channels, n * n + 2 * n
    phi_padded = padded_phi(phi)
    kp = phi_padded.shape[1]
    device = x.device
    grad_mixed = grad_mixed.contiguous().view(tokens, channels)

    partial = _projection_bwd(x, phi_padded, grad_mixed)

    grad_proj = torch.empty((tokens, kp), dtype=torch.float32, device=device)
    # One row per token block of the smallest BLOCK_T; rows of unused blocks stay 0.
    blocks = triton.cdiv(tokens, configs.smallest("mhc_coefficients_bwd", "BLOCK_T"))
    grad_bias_partial = torch.zeros((blocks, kp), dtype=torch.float32, device=device)
    grad_alpha_partial = torch.zeros((blocks, 3), dtype=torch.float32, device=device)

    def token_grid(meta):
        return (triton.cdiv(tokens, meta["BLOCK_T"]),)

    configs.launch(
        "mhc_coefficients_bwd", token_grid,
        per_token(grad_h_pre, 1), per_token(grad_h_post, 1), per_token(grad_h_res, 2),
        partial, *fp32(alpha, b_pre, b_post, b_res), grad_proj, grad_bias_partial,
        grad_alpha_partial, T=tokens, C=channels, splits=partial.shape[0],
        sinkhorn_iters=sinkhorn_iters, sinkhorn_segment=sinkhorn_segment(sinkhorn_iters),
        SINKHORN=is_sinkhorn(constraint), **layout(n),
    )

    splits = _token_splits(tokens, n_columns, device)
    grad_streams = torch.empty_like(x)
    grad_phi_partial = torch.empty((splits, n_columns, n_phi), dtype=torch.float32, device=device)

    def column_grid(meta):
        return triton.cdiv(n_columns, meta["BLOCK_NC"]), splits

    configs.launch(
        "mhc_coefficients_bwd_streams", column_grid, x, phi_padded, grad_mixed, grad_proj,
        grad_streams, grad_phi_partial, T=tokens, C=channels,
        tokens_per_split=triton.cdiv(tokens, splits), n=n, KP=kp,
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
