"""Graph targets that move tensors in and out of the stream layout [..., n, C].

Transformer residuals carry channels last already. Convolutional ones ([B, C, H, W]) carry them in
dimension 1: their streams are laid out [B, H, W, n, C], so each token's n*C values are contiguous
(what the coefficient pass reads) and conv inputs come back as channels_last views.
"""

from __future__ import annotations

import torch

from mhc_compile import reference


def enter_streams(x: torch.Tensor, n: int, channel_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """x [..., C, ...] -> n equal streams [..., n, C], stored in the streams' `dtype`.

    Written contiguous: the kernels read dense streams, and each op reading an expanded view would
    copy it, forward and backward (seven copies a step in a LLaMA chain). Compiled, the recompute
    policy rebuilds this copy in backward rather than saving it (_tag_replicated_head)."""
    return reference.expand_streams(to_channels_last(x, channel_dim).to(dtype), n).contiguous()


def leave_streams(streams: torch.Tensor, channel_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """The streams' mean, back in the residual's layout and `dtype`."""
    return from_channels_last(reference.reduce_streams(streams).to(dtype), channel_dim)


def read_streams(mixed: torch.Tensor, channel_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """F's input H_pre x_l, in the residual's layout and dtype (F's code expects those)."""
    return from_channels_last(mixed.to(dtype), channel_dim)


def to_channels_last(x: torch.Tensor, channel_dim: int) -> torch.Tensor:
    return x if channel_dim in (-1, x.dim() - 1) else x.movedim(channel_dim, -1)


def from_channels_last(x: torch.Tensor, channel_dim: int) -> torch.Tensor:
    return x if channel_dim in (-1, x.dim() - 1) else x.movedim(-1, channel_dim)
