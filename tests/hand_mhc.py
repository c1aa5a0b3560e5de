"""A small residual stack and its mHC forward written out by hand from the paper's equations
(Eq. 3, 7-8), independently of the backend and of mhc_compile.reference: the reference the tests
of gain, checkpoints and model keywords compare with."""

import torch
from torch import nn


class TanhBlocks(nn.Module):
    """x_{k+1} = x_k + tanh(fc_k(x_k)) for `depth` blocks (site keys fcs.0, fcs.1, ...), then a
    head. The mask zeroes masked tokens first; `blocks` limits how many blocks run."""

    def __init__(self, width=6, depth=3):
        super().__init__()
        self.fcs = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.head = nn.Linear(width, 2)

    def forward(self, x, attention_mask=None, blocks=None):
        if attention_mask is not None:
            x = x * attention_mask.unsqueeze(-1).to(x.dtype)
        for fc in self.fcs[:blocks]:
            x = x + torch.tanh(fc(x))
        return self.head(x)


def hand_written_mhc(model: TanhBlocks, x, n: int, constraint: str, iters: int = 20, blocks=None):
    """(each block's (H_pre, H_post, H_res), the output) of the mHC forward of `model` on x
    (masked already), reading its mHC parameters from `model.mhc`."""
    streams = x.unsqueeze(-2).expand(*x.shape[:-1], n, x.shape[-1])
    per_block = []
    for index, fc in enumerate(model.fcs[:blocks]):
        p = model.mhc.blocks[f"fcs-{index}"]
        flat = streams.flatten(-2)
        h = (flat @ p.phi) / torch.sqrt(flat.square().mean(dim=-1, keepdim=True) + 1e-6)
        h_pre = torch.sigmoid(p.alpha[0] * h[..., :n] + p.b_pre)
        h_post = 2 * torch.sigmoid(p.alpha[1] * h[..., n:2 * n] + p.b_post)
        h_res = p.alpha[2] * h[..., 2 * n:].unflatten(-1, (n, n)) + p.b_res
        if constraint == "sinkhorn":
            h_res = h_res.exp()
            for _ in range(iters):
                h_res = h_res / h_res.sum(dim=-2, keepdim=True)
                h_res = h_res / h_res.sum(dim=-1, keepdim=True)
        y = torch.tanh(fc((h_pre.unsqueeze(-1) * streams).sum(dim=-2)))
        streams = h_res @ streams + h_post.unsqueeze(-1) * y.unsqueeze(-2)
        per_block.append((h_pre, h_post, h_res))
    return per_block, model.head(streams.mean(dim=-2))


def randomize_mhc(model, seed=1):
    """Random mHC parameters, wide enough that H_res is far from the identity and HC and mHC
    compute clearly different functions."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.mhc.named_parameters():
            scale = 0.5 if name.endswith("phi") else 1.0
            parameter.copy_(scale * torch.randn(parameter.shape, generator=generator,
                                                dtype=parameter.dtype))
    return model


def fused_forward_bytes(n: int, channels: int, element_bytes: int) -> int:
    """What the forward kernels issue per token beyond the plain add (3C): the coefficient pass
    and the pre-mix read x twice and write u, the post/res mix reads x and y and writes x'; plus,
    in fp32, h_pre, h_post and h_res written and read, the projection and the sum of squares
    written."""
    stream_elements = (2 * n + 1) + (2 * n + 1) - 3
    gates_and_mix = n + n + n * n
    return stream_elements * channels * element_bytes + (2 * gates_and_mix + gates_and_mix + 1) * 4
