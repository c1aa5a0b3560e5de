"""Addressing shared by the kernels: token blocks and the tiles they load from [T, n, C] streams.

Tiles pad the stream axis to NP = next power of two of n (Triton tiles are powers of two) and mask
the padding; offsets are int64 so that T * n * C may exceed 2**31.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def token_block(block, T, BLOCK_T: tl.constexpr):
    """Token indices [BLOCK_T] of program block `block`, and which of them exist."""
    tokens = block.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    return tokens, tokens < T


@triton.jit
def stream_tile(tokens, token_valid, channels, C, n: tl.constexpr, NP: tl.constexpr):
    """Offsets and mask of a [BLOCK_T, NP, BLOCK_C] tile of streams [T, n, C]."""
    streams = tl.arange(0, NP)
    offsets = (tokens[:, None, None] * n + streams[None, :, None]) * C + channels[None, None, :]
    mask = (
        token_valid[:, None, None]
        & (streams < n)[None, :, None]
        & (channels < C)[None, None, :]
    )
    return offsets, mask


@triton.jit
def channel_tile(tokens, token_valid, channels, C):
    """Offsets and mask of a [BLOCK_T, BLOCK_C] tile of a single stream [T, C]."""
    offsets = tokens[:, None] * C + channels[None, :]
    return offsets, token_valid[:, None] & (channels < C)[None, :]


@triton.jit
def gate_tile(tokens, token_valid, n: tl.constexpr, NP: tl.constexpr):
    """Offsets and mask of a [BLOCK_T, NP] tile of per-stream gates [T, n] (h_pre, h_post)."""
    streams = tl.arange(0, NP)
    return tokens[:, None] * n + streams[None, :], token_valid[:, None] & (streams < n)[None, :]


@triton.jit
def matrix_tile(tokens, token_valid, n: tl.constexpr, NP: tl.constexpr):
    """Offsets and mask of a [BLOCK_T, NP, NP] tile of stream-mixing matrices [T, n, n] (h_res)."""
    rows = tl.arange(0, NP)
    offsets = tokens[:, None, None] * (n * n) + rows[None, :, None] * n + rows[None, None, :]
    mask = token_valid[:, None, None] & (rows < n)[None, :, None] & (rows < n)[None, None, :]
    return offsets, mask


def token_rows(streams: torch.Tensor) -> torch.Tensor:
    """[..., n, C] streams as a contiguous [T, n, C] view (a copy only if they were strided)."""
    n, channels = streams.shape[-2:]
    return streams.contiguous().view(-1, n, channels)


def per_token(tensor: torch.Tensor, trailing: int) -> torch.Tensor:
    """Leading dims of `tensor` flattened into tokens, `trailing` dims kept, contiguous fp32."""
    return tensor.contiguous().view(-1, *tensor.shape[tensor.dim() - trailing :]).float()
