"""Pre-mix kernels: F_pre = H_pre x_l, the input of the wrapped sublayer, and H_pre's gradient.

Both kernels are memory-bound: the forward reads n*C and writes C per token; the backward reads
n*C + C and writes n floats. The streams' gradient through the pre-mix, H_pre du, has no pass of
its own: the coefficient backward adds it while it writes grad streams. Nothing is saved between
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


# --- backward, H_pre's share: dh_pre_j = <du, x_j> over C ---------------------------------------
# dx_j = h_pre_j du, the streams' share, is added where the coefficient backward writes grad streams
# (templates/coefficients.py): one write of grad streams per block, and this pass only reads.


@configs.autotune("pre_mix_grad_h_pre", "mhc_pre_mix_grad_h_pre")
@triton.jit
def _mhc_pre_mix_grad_h_pre_kernel(
    grad_mixed_ptr, streams_ptr, grad_h_pre_ptr, T, C,
    n: tl.constexpr, NP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Each program owns its tokens and walks all of C, so dh_pre is summed in registers in a fixed
    # order: deterministic, no atomics, no second pass.
    tokens, token_valid = token_block(tl.program_id(0), T, BLOCK_T)
    grad_h_pre = tl.zeros((BLOCK_T, NP), dtype=tl.float32)
    for start in range(0, C, BLOCK_C):
        channels = start + tl.arange(0, BLOCK_C)
        g_offsets, g_mask = channel_tile(tokens, token_valid, channels, C)
        grad_mixed = tl.load(grad_mixed_ptr + g_offsets, mask=g_mask, other=0.0).to(tl.float32)
        x_offsets, x_mask = stream_tile(tokens, token_valid, channels, C, n, NP)
        x = tl.load(streams_ptr + x_offsets, mask=x_mask, other=0.0).to(tl.float32)
        grad_h_pre += tl.sum(x * grad_mixed[:, None, :], axis=2)
    h_offsets, h_mask = gate_tile(tokens, token_valid, n, NP)
    tl.store(grad_h_pre_ptr + h_offsets, grad_h_pre, mask=h_mask)


def mhc_pre_mix_grad_h_pre(grad_mixed: torch.Tensor, streams: torch.Tensor) -> torch.Tensor:
    """grad_mixed [..., C], streams [..., n, C] -> the gradient of H_pre through the pre-mix,
    <grad_mixed, x_j> [T, n] fp32 (tokens flattened)."""
    x = token_rows(streams)
    tokens, n, channels = x.shape
    grad_h_pre = torch.empty((tokens, n), dtype=torch.float32, device=x.device)

    def grid(meta):
        return (configs.ceil_div(tokens, meta["BLOCK_T"]),)

    kernel_launch.launch(
        "mhc_pre_mix_grad_h_pre", grid, grad_mixed.contiguous().view(tokens, channels), x,
        grad_h_pre, T=tokens, C=channels, n=n, NP=configs.padded_streams(n),
    )
    return grad_h_pre
