"""Pre-mix kernels: F_pre = H_pre x_l, the input of the wrapped sublayer, and its backward.

Both kernels are memory-bound: the forward reads n*C and writes C per token; the backward reads
n*C + C and writes n*C, and with `accumulate` (the streams' gradient from their other reader, the
post/res mix) reads n*C more instead of leaving autograd a separate add. Nothing is saved between
them but the op's inputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mhc_compile import kernel_launch
from mhc_compile.templates import configs
from mhc_compile.templates.tiles import (
    channel_tile, gate_tile, per_token, stream_tile, token_block, token_rows,
)

# --- forward: u = H_pre x_l   (mHC Eq. 3: the input of F is H_pre x_l) ---------------------------


@configs.autotune("pre_mix_fwd", "mhc_pre_mix_fwd")
@triton.jit
def _mhc_pre_mix_fwd_kernel(
    streams_ptr, h_pre_ptr, mixed_ptr, T, C,
    n: tl.constexpr, NP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    tokens, token_valid = token_block(tl.program_id(0), T, BLOCK_T)
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    x_offsets, x_mask = stream_tile(tokens, token_valid, channels, C, n, NP)
    x = tl.load(streams_ptr + x_offsets, mask=x_mask, other=0.0).to(tl.float32)
    h_offsets, h_mask = gate_tile(tokens, token_valid, n, NP)
    h_pre = tl.load(h_pre_ptr + h_offsets, mask=h_mask, other=0.0)
    mixed = tl.sum(h_pre[:, :, None] * x, axis=1)
    out_offsets, out_mask = channel_tile(tokens, token_valid, channels, C)
    tl.store(mixed_ptr + out_offsets, mixed.to(mixed_ptr.dtype.element_ty), mask=out_mask)


def mhc_pre_mix_fwd(streams: torch.Tensor, h_pre: torch.Tensor) -> torch.Tensor:
    """streams [..., n, C] (bf16/fp16/fp32), h_pre [..., n] fp32 -> mixed [..., C] in the stream dtype."""
    x = token_rows(streams)
    tokens, n, channels = x.shape
    gates = per_token(h_pre, 1)
    mixed = torch.empty((tokens, channels), dtype=x.dtype, device=x.device)

    def grid(meta):
        return configs.ceil_div(tokens, meta["BLOCK_T"]), configs.ceil_div(channels, meta["BLOCK_C"])

    kernel_launch.launch(
        "mhc_pre_mix_fwd", grid, x, gates, mixed, T=tokens, C=channels,
        n=n, NP=configs.padded_streams(n),
    )
    return mixed.view(*streams.shape[:-2], channels)


# --- backward: dx_j = h_pre_j du (+ accumulate),  dh_pre_j = <du, x_j> over C ---------------------


@configs.autotune("pre_mix_bwd", "mhc_pre_mix_bwd")
@triton.jit
def _mhc_pre_mix_bwd_kernel(
    grad_mixed_ptr, streams_ptr, h_pre_ptr, accumulate_ptr, grad_streams_ptr, grad_h_pre_ptr, T, C,
    n: tl.constexpr, NP: tl.constexpr, ACCUMULATE: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # Each program owns its tokens and walks all of C, so dh_pre is summed in registers in a fixed
    # order: deterministic, no atomics, no second pass.
    tokens, token_valid = token_block(tl.program_id(0), T, BLOCK_T)
    h_offsets, h_mask = gate_tile(tokens, token_valid, n, NP)
    h_pre = tl.load(h_pre_ptr + h_offsets, mask=h_mask, other=0.0)
    grad_h_pre = tl.zeros((BLOCK_T, NP), dtype=tl.float32)
    for start in range(0, C, BLOCK_C):
        channels = start + tl.arange(0, BLOCK_C)
        g_offsets, g_mask = channel_tile(tokens, token_valid, channels, C)
        grad_mixed = tl.load(grad_mixed_ptr + g_offsets, mask=g_mask, other=0.0).to(tl.float32)
        x_offsets, x_mask = stream_tile(tokens, token_valid, channels, C, n, NP)
        x = tl.load(streams_ptr + x_offsets, mask=x_mask, other=0.0).to(tl.float32)
        grad_x = h_pre[:, :, None] * grad_mixed[:, None, :]
        if ACCUMULATE:
            grad_x += tl.load(accumulate_ptr + x_offsets, mask=x_mask, other=0.0).to(tl.float32)
        tl.store(
            grad_streams_ptr + x_offsets,
            grad_x.to(grad_streams_ptr.dtype.element_ty),
            mask=x_mask,
        )
        grad_h_pre += tl.sum(x * grad_mixed[:, None, :], axis=2)
    tl.store(grad_h_pre_ptr + h_offsets, grad_h_pre, mask=h_mask)


def mhc_pre_mix_bwd(
    grad_mixed: torch.Tensor, streams: torch.Tensor, h_pre: torch.Tensor,
    accumulate: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """grad_mixed [..., C] -> (grad streams [..., n, C] stream dtype, plus `accumulate` [..., n, C]
    when given; grad h_pre [..., n] h_pre dtype)."""
    x = token_rows(streams)
    tokens, n, channels = x.shape
    grad_streams = torch.empty_like(x)
    grad_h_pre = torch.empty((tokens, n), dtype=torch.float32, device=x.device)

    def grid(meta):
        return (configs.ceil_div(tokens, meta["BLOCK_T"]),)

    kernel_launch.launch(
        "mhc_pre_mix_bwd", grid, grad_mixed.contiguous().view(tokens, channels), x,
        per_token(h_pre, 1),
        # Without `accumulate` the kernel never reads its pointer: the streams stand in.
        x if accumulate is None else token_rows(accumulate),
        grad_streams, grad_h_pre, T=tokens, C=channels,
        n=n, NP=configs.padded_streams(n), ACCUMULATE=accumulate is not None,
    )
    return grad_streams.view(streams.shape), grad_h_pre.view(h_pre.shape).to(h_pre.dtype)
