"""Plain-PyTorch reference of every mHC op: the one source of truth for the math.

The rewrite's CPU path, the custom ops' backward (by recomputation), the Triton kernels' tests and
the benchmarks all call these functions. Shapes follow the mHC paper (arXiv 2512.24880), per token:

    streams  [T, n, C]      the n residual streams x_l
    phi      [n*C, n*n+2n]  the projection (RMSNorm weight folded in), paper Eq. 7
    alpha    [3]            gates (alpha_pre, alpha_post, alpha_res)
    b_pre    [n], b_post [n], b_res [n, n]
    h_pre    [T, n], h_post [T, n], h_res [T, n, n]   always in the coefficient dtype (fp32, or fp64)

Leading dimensions beyond T are allowed everywhere: ``[..., n, C]`` streams give ``[..., n]`` and
``[..., n, n]`` coefficients.
"""

from __future__ import annotations

import math

import torch

RMS_EPS = 1e-6
CONSTRAINTS = ("sinkhorn", "none")  # what new mHC blocks may be built with (MHCOptions.constraint)
# An existing hyper-connection lowered onto the ops keeps its own formulation, named in the ops'
# `constraint` argument with its epsilon: DeepSeek-V4's as transformers writes it
# (models/deepseek_v4: DeepseekV4HyperConnection), "deepseek_v4:<hc_eps>".
DEEPSEEK_V4 = "deepseek_v4"


def deepseek_v4_constraint(eps: float) -> str:
    return f"{DEEPSEEK_V4}:{float(eps)!r}"


def formulation(constraint: str) -> tuple[str, float]:
    """(kind, eps) of an ops `constraint`: "sinkhorn" and "none" (eps 0), or "deepseek_v4:<eps>"."""
    kind, _, eps = constraint.partition(":")
    if constraint in CONSTRAINTS:
        return constraint, 0.0
    if kind == DEEPSEEK_V4 and eps:
        try:
            value = float(eps)
        except ValueError:
            value = float("nan")
        if math.isfinite(value) and value >= 0:
            return kind, value
    raise ValueError(
        f"mhc: constraint must be one of {', '.join(map(repr, CONSTRAINTS))} or "
        f"'{DEEPSEEK_V4}:<eps>' with a finite eps >= 0, got {constraint!r}"
    )


def coefficient_dtype(stream_dtype: torch.dtype) -> torch.dtype:
    """The paper keeps r, the alphas, the biases and every H in fp32; float64 models stay float64."""
    return torch.float64 if stream_dtype == torch.float64 else torch.float32


def sinkhorn(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """Sinkhorn-Knopp on exp(logits) [..., n, n]: normalise columns, then rows, `iters` times.

    Worked in log space so that logits of +-80 (exp underflows to 0 in fp32) cannot produce 0/0.
    The last step normalises rows, so rows sum to 1 exactly (to rounding); columns converge.
    """
    log_m = logits
    for _ in range(iters):
        log_m = log_m - torch.logsumexp(log_m, dim=-2, keepdim=True)
        log_m = log_m - torch.logsumexp(log_m, dim=-1, keepdim=True)
    return log_m.exp()


def sinkhorn_eps(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """DeepSeek-V4's Sinkhorn on [..., n, n], as transformers writes it on its comb matrix, here on
    its transpose H_res: a softmax over each column plus eps, the rows divided by their sum plus
    eps, then `iters` - 1 times the columns and the rows likewise. Rows sum to 1 (nearly)."""
    matrix = torch.softmax(logits, dim=-2) + eps
    matrix = matrix / (matrix.sum(dim=-1, keepdim=True) + eps)
    for _ in range(iters - 1):
        matrix = matrix / (matrix.sum(dim=-2, keepdim=True) + eps)
        matrix = matrix / (matrix.sum(dim=-1, keepdim=True) + eps)
    return matrix


def deepseek_v4_parameters(fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, n: int
                           ) -> tuple[torch.Tensor, ...]:
    """phi, alpha, b_pre, b_post, b_res of a DeepseekV4HyperConnection's fn [(n+2)n, n*C], base
    [(n+2)n] and scale [3]: its comb matrix mixes streams as comb^T x, so H_res = comb^T, and its
    logits' n x n block of fn rows and of base is transposed (differentiable: views, a copy)."""
    rows = fn.shape[-1]
    comb_rows = fn[2 * n:].reshape(n, n, rows).transpose(0, 1).reshape(n * n, rows)
    phi = torch.cat([fn[:2 * n], comb_rows]).t()
    return phi, scale, base[:n], base[n:2 * n], base[2 * n:].reshape(n, n).t()


def projection(streams: torch.Tensor, phi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token, v @ phi [..., n*n+2n] and the sum of squares of v [...], v being the n*C stream
    values, in the coefficient dtype: all the coefficients need from the streams (paper Eq. 7)."""
    *lead, n, channels = streams.shape
    dtype = coefficient_dtype(streams.dtype)
    flat = streams.reshape(*lead, n * channels).to(dtype)
    return flat @ phi.to(dtype), flat.square().sum(dim=-1)


def coefficients_of_projection(
    proj: torch.Tensor,
    sum_squares: torch.Tensor,
    width: int,
    alpha: torch.Tensor,
    b_pre: torch.Tensor,
    b_post: torch.Tensor,
    b_res: torch.Tensor,
    sinkhorn_iters: int,
    constraint: str = "sinkhorn",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """H_pre, H_post, H_res from `projection`'s two outputs over `width` = n*C stream values.

    r = RMS of the stream values; h = (v @ phi) / r (the norm is divided after the matmul);
    H_pre = sigmoid(alpha_pre h_pre + b_pre), H_post = 2 sigmoid(alpha_post h_post + b_post),
    H_res = SinkhornKnopp(alpha_res mat(h_res) + b_res), or the raw logits when constraint="none"
    (unconstrained hyper-connections, the paper's ablation). DeepSeek-V4's formulation
    ("deepseek_v4:<eps>") adds eps to H_pre and normalises H_res by `sinkhorn_eps`.
    """
    kind, eps = formulation(constraint)
    n = b_pre.shape[-1]
    dtype = proj.dtype
    rms = torch.sqrt(sum_squares.unsqueeze(-1) / width + RMS_EPS)
    h = proj / rms
    alpha = alpha.to(dtype)
    h_pre = torch.sigmoid(alpha[0] * h[..., :n] + b_pre.to(dtype)) + eps
    h_post = 2.0 * torch.sigmoid(alpha[1] * h[..., n : 2 * n] + b_post.to(dtype))
    res_logits = alpha[2] * h[..., 2 * n :].unflatten(-1, (n, n)) + b_res.to(dtype)
    if kind == "sinkhorn":
        h_res = sinkhorn(res_logits, sinkhorn_iters)
    elif kind == DEEPSEEK_V4:
        h_res = sinkhorn_eps(res_logits, sinkhorn_iters, eps)
    else:
        h_res = res_logits
    return h_pre, h_post, h_res


def coefficients(
    streams: torch.Tensor,
    phi: torch.Tensor,
    alpha: torch.Tensor,
    b_pre: torch.Tensor,
    b_post: torch.Tensor,
    b_res: torch.Tensor,
    sinkhorn_iters: int,
    constraint: str = "sinkhorn",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """H_pre, H_post, H_res for every token (paper Eq. 7-8): `coefficients_of_projection` of the
    streams' `projection`."""
    width = streams.shape[-2] * streams.shape[-1]
    return coefficients_of_projection(
        *projection(streams, phi), width, alpha, b_pre, b_post, b_res, sinkhorn_iters, constraint
    )


def pre_mix(streams: torch.Tensor, h_pre: torch.Tensor) -> torch.Tensor:
    """F_pre = H_pre x_l: [..., n, C] x [..., n] -> [..., C], accumulated in the coefficient dtype."""
    mixed = (h_pre.unsqueeze(-1) * streams.to(h_pre.dtype)).sum(dim=-2)
    return mixed.to(streams.dtype)


def coefficients_pre_mix(
    streams: torch.Tensor,
    phi: torch.Tensor,
    alpha: torch.Tensor,
    b_pre: torch.Tensor,
    b_post: torch.Tensor,
    b_res: torch.Tensor,
    sinkhorn_iters: int,
    constraint: str = "sinkhorn",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The coefficients, then F's input: h_pre [..., n], h_post [..., n], h_res [..., n, n] and
    mixed = H_pre x_l [..., C]. One op in the graph, so that a kernel reads the streams once."""
    return coefficients_pre_mix_and_projection(
        streams, phi, alpha, b_pre, b_post, b_res, sinkhorn_iters, constraint
    )[:4]


def coefficients_pre_mix_and_projection(
    streams: torch.Tensor,
    phi: torch.Tensor,
    alpha: torch.Tensor,
    b_pre: torch.Tensor,
    b_post: torch.Tensor,
    b_res: torch.Tensor,
    sinkhorn_iters: int,
    constraint: str = "sinkhorn",
) -> tuple[torch.Tensor, ...]:
    """`coefficients_pre_mix`'s four outputs, then `projection`'s two: what the op
    mhc::coefficients_pre_mix returns (the projection is saved for its backward)."""
    proj, sum_squares = projection(streams, phi)
    width = streams.shape[-2] * streams.shape[-1]
    h_pre, h_post, h_res = coefficients_of_projection(
        proj, sum_squares, width, alpha, b_pre, b_post, b_res, sinkhorn_iters, constraint
    )
    return h_pre, h_post, h_res, pre_mix(streams, h_pre), proj, sum_squares


def post_res_mix(
    streams: torch.Tensor, y: torch.Tensor, h_post: torch.Tensor, h_res: torch.Tensor
) -> torch.Tensor:
    """x_{l+1} = H_res x_l + H_post^T F(...) (paper Eq. 3): [..., n, C], [..., C] -> [..., n, C]."""
    dtype = h_res.dtype
    residual = h_res @ streams.to(dtype)
    written = h_post.unsqueeze(-1) * y.to(dtype).unsqueeze(-2)
    return (residual + written).to(streams.dtype)


def expand_streams(x: torch.Tensor, n: int) -> torch.Tensor:
    """Head of a chain: replicate [..., C] into n equal streams [..., n, C] (HC paper)."""
    return x.unsqueeze(-2).expand(*x.shape[:-1], n, x.shape[-1])


def reduce_streams(streams: torch.Tensor) -> torch.Tensor:
    """Tail of a chain: the mean over the streams keeps the magnitude of the plain residual."""
    return streams.mean(dim=-2)


def sublayer(streams, phi, alpha, b_pre, b_post, b_res, f, sinkhorn_iters, constraint="sinkhorn"):
    """One whole mHC sublayer: coefficients, pre-mix, f, post/res mix. Used by tests and benchmarks."""
    _, h_post, h_res, mixed = coefficients_pre_mix(
        streams, phi, alpha, b_pre, b_post, b_res, sinkhorn_iters, constraint
    )
    return post_res_mix(streams, f(mixed), h_post, h_res)
