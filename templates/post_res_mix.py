"""Post/res-mix kernels: x_{l+1} = H_res x_l + H_post^T y, and its backward.

Memory-bound: the forward reads (n+1)C and writes nC per token; the backward reads (2n+1)C and
writes (n+1)C. The n x n mixing is done in registers on [BLOCK_T, n, n, BLOCK_C] tiles.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mhc_compile import kernel_launch
from mhc_compile.templates import configs
from mhc_compile.templates.tiles import (
    channel_tile, gate_tile, matrix_tile, per_token, stream_tile, token_block, token_rows,
)

# --- forward: x_{l+1,i} = sum_j H_res[i, j] x_{l,j} + H_post[i] y   (mHC Eq. 3) -------------------


@configs.autotune("post_res_mix_fwd", "mhc_post_res_mix_fwd")
@triton.jit
def _mhc_post_res_mix_fwd_kernel(
    streams_ptr, y_ptr, h_post_ptr, h_res_ptr, out_ptr, T, C,
    n: tl.constexpr, NP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    tokens, token_valid = token_block(tl.program_id(0), T, BLOCK_T)
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    x_offsets, x_mask = stream_tile(tokens, token_valid, channels, C, n, NP)
    x = tl.load(streams_ptr + x_offsets, mask=x_mask, other=0.0).to(tl.float32)
    y_offsets, y_mask = channel_tile(tokens, token_valid, channels, C)
    y = tl.load(y_ptr + y_offsets, mask=y_mask, other=0.0).to(tl.float32)
    gate_offsets, gate_mask = gate_tile(tokens, token_valid, n, NP)
    h_post = tl.load(h_post_ptr + gate_offsets, mask=gate_mask, other=0.0)
    res_offsets, res_mask = matrix_tile(tokens, token_valid, n, NP)
    h_res = tl.load(h_res_ptr + res_offsets, mask=res_mask, other=0.0)
    out = tl.sum(h_res[:, :, :, None] * x[:, None, :, :], axis=2) + h_post[:, :, None] * y[:, None, :]
    tl.store(out_ptr + x_offsets, out.to(out_ptr.dtype.element_ty), mask=x_mask)


def mhc_post_res_mix_fwd(
    streams: torch.Tensor, y: torch.Tensor, h_post: torch.Tensor, h_res: torch.Tensor
) -> torch.Tensor:
    """streams [..., n, C], y [..., C], h_post [..., n], h_res [..., n, n] -> [..., n, C] stream dtype."""
    x = token_rows(streams)
    tokens, n, channels = x.shape
    out = torch.empty_like(x)

    def grid(meta):
        return configs.ceil_div(tokens, meta["BLOCK_T"]), configs.ceil_div(channels, meta["BLOCK_C"])

    kernel_launch.launch(
        "mhc_post_res_mix_fwd", grid, x, y.contiguous().view(tokens, channels),
        per_token(h_post, 1), per_token(h_res, 2), out, T=tokens, C=channels,
        n=n, NP=configs.padded_streams(n),
    )
    return out.view(streams.shape)


# --- backward: dx = H_res^T dout, dy = H_post dout, dH_res = dout x^T, dH_post = dout y -----------


@configs.autotune("post_res_mix_bwd", "mhc_post_res_mix_bwd")
@triton.jit
def _mhc_post_res_mix_bwd_kernel(
    grad_out_ptr, streams_ptr, y_ptr, h_post_ptr, h_res_ptr,
    grad_streams_ptr, grad_y_ptr, grad_h_post_ptr, grad_h_res_ptr, T, C,
    n: tl.constexpr, NP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Each program owns its tokens and walks all of C: dH_res and dH_post are summed in registers
    # in a fixed order (deterministic, no atomics, no second pass).
    tokens, token_valid = token_block(tl.program_id(0), T, BLOCK_T)
    gate_offsets, gate_mask = gate_tile(tokens, token_valid, n, NP)
    h_post = tl.load(h_post_ptr + gate_offsets, mask=gate_mask, other=0.0)
    res_offsets, res_mask = matrix_tile(tokens, token_valid, n, NP)
    h_res = tl.load(h_res_ptr + res_offsets, mask=res_mask, other=0.0)
    grad_h_post = tl.zeros((BLOCK_T, NP), dtype=tl.float32)
    grad_h_res = tl.zeros((BLOCK_T, NP, NP), dtype=tl.float32)
    for start in range(0, C, BLOCK_C):
        channels = start + tl.arange(0, BLOCK_C)
        x_offsets, x_mask = stream_tile(tokens, token_valid, channels, C, n, NP)
        grad_out = tl.load(grad_out_ptr + x_offsets, mask=x_mask, other=0.0).to(tl.float32)
        x = tl.load(streams_ptr + x_offsets, mask=x_mask, other=0.0).to(tl.float32)
        y_offsets, y_mask = channel_tile(tokens, token_valid, channels, C)
        y = tl.load(y_ptr + y_offsets, mask=y_mask, other=0.0).to(tl.float32)
        # dx_j = sum_i H_res[i, j] dout_i;  dy = sum_i H_post[i] dout_i
        grad_x = tl.sum(h_res[:, :, :, None] * grad_out[:, :, None, :], axis=1)
        grad_x = grad_x.to(grad_streams_ptr.dtype.element_ty)
        tl.store(grad_streams_ptr + x_offsets, grad_x, mask=x_mask)
        grad_y = tl.sum(h_post[:, :, None] * grad_out, axis=1)
        tl.store(grad_y_ptr + y_offsets, grad_y.to(grad_y_ptr.dtype.element_ty), mask=y_mask)
        # dH_res[i, j] += <dout_i, x_j>;  dH_post[i] += <dout_i, y>
        grad_h_res += tl.sum(grad_out[:, :, None, :] * x[:, None, :, :], axis=3)
        grad_h_post += tl.sum(grad_out * y[:, None, :], axis=2)
    tl.store(grad_h_post_ptr + gate_offsets, grad_h_post, mask=gate_mask)
    tl.store(grad_h_res_ptr + res_offsets, grad_h_res, mask=res_mask)


def mhc_post_res_mix_bwd(
    grad_out: torch.Tensor,
    streams: torch.Tensor,
    y: torch.Tensor,
    h_post: torch.Tensor,
    h_res: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """grad_out [..., n, C] -> gradients of streams [..., n, C], y [..., C], h_post [..., n] and
    h_res [..., n, n], each in its input's dtype."""
    x = token_rows(streams)
    tokens, n, channels = x.shape
    grad_streams = torch.empty_like(x)
    grad_y = torch.empty((tokens, channels), dtype=y.dtype, device=x.device)
    grad_h_post = torch.empty((tokens, n), dtype=torch.float32, device=x.device)
    grad_h_res = torch.empty((tokens, n, n), dtype=torch.float32, device=x.device)

    def grid(meta):
        return (configs.ceil_div(tokens, meta["BLOCK_T"]),)

    kernel_launch.launch(
        "mhc_post_res_mix_bwd", grid, token_rows(grad_out), x, y.contiguous().view(tokens, channels),
        per_token(h_post, 1), per_token(h_res, 2), grad_streams, grad_y, grad_h_post, grad_h_res,
        T=tokens, C=channels, n=n, NP=configs.padded_streams(n),
    )
    return (
        grad_streams.view(streams.shape),
        grad_y.view(y.shape),
        grad_h_post.view(h_post.shape).to(h_post.dtype),
        grad_h_res.view(h_res.shape).to(h_res.dtype),
    )
