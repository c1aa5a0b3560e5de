"""Built-in example models for the CLI (`mhc-compile report --example gpt`) and the README demo.

Each is written the way its family is usually written in plain PyTorch, with nothing from
mhc_compile, so the backend sees what it would see in a user's code. Every factory takes a
`seed` and small size keyword arguments and returns `(model, example_args)`:

    model, example_args = EXAMPLES["gpt"]()
    logits = model(*example_args)

The same seed always gives the same parameters and inputs. Sizes default to a forward pass of a
few milliseconds on a CPU.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


def random_ids(vocab: int, batch: int, seq: int, seed: int) -> torch.Tensor:
    """Seeded int64 token ids [batch, seq], drawn independently of the parameters' seed state."""
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def random_images(batch: int, image: int, seed: int) -> torch.Tensor:
    """Seeded float32 images [batch, 3, image, image]."""
    return torch.randn(batch, 3, image, image, generator=torch.Generator().manual_seed(seed))


# --- GPT-2 / ViT: pre-LN transformer --------------------------------------------------------------


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (GPT-2's c_attn / c_proj)."""

    def __init__(self, width: int, heads: int, causal: bool = True):
        super().__init__()
        assert width % heads == 0, "width must be a multiple of heads"
        self.heads = heads
        self.causal = causal
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=2)
        q, k, v = (t.view(batch, seq, self.heads, width // self.heads).transpose(1, 2)
                   for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.proj(y.transpose(1, 2).reshape(batch, seq, width))


class MLP(nn.Module):
    """Transformer feed-forward: Linear -> GELU -> Linear with a 4x hidden width."""

    def __init__(self, width: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or 4 * width
        self.fc = nn.Linear(width, hidden)
        self.proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-LN transformer block: two residual blocks, attention then MLP."""

    def __init__(self, width: int, heads: int, causal: bool = True):
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads, causal)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = MLP(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        x = x + self.mlp(self.ln2(x))
        return x


class GPT(nn.Module):
    """GPT-2: token + learned position embeddings, causal pre-LN blocks, final LN, LM head.

    `block(width, heads)` builds each layer; variants (parallel, mixture-of-experts) pass theirs.
    """

    def __init__(self, vocab: int, max_seq: int, width: int, depth: int, heads: int,
                 block: Callable[[int, int], nn.Module] = Block):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, width)
        self.pos_emb = nn.Embedding(max_seq, width)
        self.blocks = nn.ModuleList(block(width, heads) for _ in range(depth))
        self.ln_f = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(positions)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def gpt(seed: int = 0, batch: int = 4, seq: int = 32, width: int = 64, depth: int = 4,
        heads: int = 4, vocab: int = 96) -> tuple[GPT, tuple[torch.Tensor]]:
    """GPT-2 style language model; example_args = (ids int64 [batch, seq],), output logits.

    Residual blocks `x + f(x)`: 2 * depth (8 by default), `blocks.{i}` attention
    (`x + attn(ln1(x))`) and MLP (`x + mlp(ln2(x))`) for each layer i.
    """
    torch.manual_seed(seed)
    model = GPT(vocab, seq, width, depth, heads)
    return model, (random_ids(vocab, batch, seq, seed),)


# --- LLaMA: RMSNorm, rotary embeddings, SwiGLU ----------------------------------------------------


class RMSNorm(nn.Module):
    """Root-mean-square norm without centring or bias: x * rsqrt(mean(x^2) + eps) * weight."""

    def __init__(self, width: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_tables(head_dim: int, max_seq: int,
                  base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [max_seq, head_dim] of the rotary angles, each frequency repeated twice."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_seq, dtype=torch.float32), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


class Attention(nn.Module):
    """LLaMA attention: separate bias-free q/k/v/o projections, rotary q and k, causal SDPA."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        assert width % heads == 0, "width must be a multiple of heads"
        self.heads = heads
        self.head_dim = width // heads
        self.wq = nn.Linear(width, width, bias=False)
        self.wk = nn.Linear(width, width, bias=False)
        self.wv = nn.Linear(width, width, bias=False)
        self.wo = nn.Linear(width, width, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, seq, width = x.shape
        q, k, v = (w(x).view(batch, seq, self.heads, self.head_dim).transpose(1, 2)
                   for w in (self.wq, self.wk, self.wv))
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(batch, seq, width))


class SwiGLU(nn.Module):
    """LLaMA feed-forward: w2(silu(w1 x) * w3 x), hidden width 8/3 of the model's rounded up."""

    def __init__(self, width: int, multiple_of: int = 16):
        super().__init__()
        hidden = multiple_of * math.ceil(8 * width / 3 / multiple_of)
        self.w1 = nn.Linear(width, hidden, bias=False)
        self.w2 = nn.Linear(hidden, width, bias=False)
        self.w3 = nn.Linear(width, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """LLaMA layer: `x + attention(attention_norm(x))`, then `x + feed_forward(ffn_norm(x))`."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attention_norm = RMSNorm(width)
        self.attention = Attention(width, heads)
        self.ffn_norm = RMSNorm(width)
        self.feed_forward = SwiGLU(width)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin)
        x = x + self.feed_forward(self.ffn_norm(x))
        return x


class LLaMA(nn.Module):
    """LLaMA: token embeddings, rotary attention, RMSNorm, SwiGLU, an untied LM head."""

    def __init__(self, vocab: int, max_seq: int, width: int, depth: int, heads: int):
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, width)
        self.layers = nn.ModuleList(TransformerBlock(width, heads) for _ in range(depth))
        self.norm = RMSNorm(width)
        self.output = nn.Linear(width, vocab, bias=False)
        cos, sin = rotary_tables(width // heads, max_seq)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        seq = idx.shape[1]
        cos, sin = self.cos[:seq], self.sin[:seq]
        x = self.tok_embeddings(idx)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.output(self.norm(x))


def llama(seed: int = 0, batch: int = 4, seq: int = 32, width: int = 64, depth: int = 4,
          heads: int = 4, vocab: int = 96) -> tuple[LLaMA, tuple[torch.Tensor]]:
    """LLaMA style language model; example_args = (ids int64 [batch, seq],), output logits.

    Residual blocks `x + f(x)`: 2 * depth (8 by default), `layers.{i}` attention
    (`x + attention(attention_norm(x))`) and feed-forward (`x + feed_forward(ffn_norm(x))`).
    The rotary `q * cos + rotate_half(q) * sin` is an add of two functions of q, not a residual.
    """
    torch.manual_seed(seed)
    model = LLaMA(vocab, seq, width, depth, heads)
    return model, (random_ids(vocab, batch, seq, seed),)


# --- ViT ------------------------------------------------------------------------------------------


class ViT(nn.Module):
    """Vision transformer: Conv2d patch embedding, cls token, learned positions, pre-LN encoder."""

    def __init__(self, image: int, patch: int, width: int, depth: int, heads: int, classes: int):
        super().__init__()
        assert image % patch == 0, "image size must be a multiple of the patch size"
        self.patch_embed = nn.Conv2d(3, width, kernel_size=patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, 1 + (image // patch) ** 2, width))
        self.blocks = nn.ModuleList(Block(width, heads, causal=False) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # [batch, patches, width]
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


def vit(seed: int = 0, batch: int = 4, image: int = 32, patch: int = 8, width: int = 64,
        depth: int = 4, heads: int = 4, classes: int = 10) -> tuple[ViT, tuple[torch.Tensor]]:
    """ViT classifier; example_args = (images float32 [batch, 3, image, image],), output logits.

    Residual blocks `x + f(x)`: 2 * depth (8 by default), `blocks.{i}` attention and MLP.
    """
    torch.manual_seed(seed)
    model = ViT(image, patch, width, depth, heads, classes)
    return model, (random_images(batch, image, seed),)


# --- ResNet ---------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """ResNet basic block: conv3x3-BN-ReLU-conv3x3-BN, add the shortcut, ReLU.

    With an identity shortcut this is a residual block `x + f(x)`. With a projection shortcut
    (`downsample`, conv1x1 + BN, where stride or width change) the skip is `downsample(x)`, not x,
    so the block is not `x + f(x)`.
    """

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Identity shortcut: out = x + f(x), a residual block. Projection shortcut: the skip is
        # downsample(x), a function of x with its own weights, so the add is not x + f(x).
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """CIFAR-style ResNet: conv3x3 stem, three stages of BasicBlocks, global average pool, fc."""

    def __init__(self, width: int, depth: int, classes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._stage(width, width, depth, stride=1)
        self.layer2 = self._stage(width, 2 * width, depth, stride=2)
        self.layer3 = self._stage(2 * width, 4 * width, depth, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, classes)

    @staticmethod
    def _stage(inplanes: int, planes: int, depth: int, stride: int) -> nn.Sequential:
        blocks = [BasicBlock(inplanes, planes, stride)]
        blocks += [BasicBlock(planes, planes) for _ in range(depth - 1)]
        return nn.Sequential(*blocks)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(images)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet(seed: int = 0, batch: int = 4, image: int = 32, width: int = 16, depth: int = 2,
           classes: int = 10) -> tuple[ResNet, tuple[torch.Tensor]]:
    """Small ResNet classifier; example_args = (images float32 [batch, 3, image, image],).

    Stage widths width, 2 * width, 4 * width (16/32/64 by default), `depth` blocks per stage.

    Residual blocks `x + f(x)`: the identity-shortcut BasicBlocks, 3 * depth - 2 (4 by default):
    all of `layer1` and `layer2.{1..}`, `layer3.{1..}`. The first block of layer2 and of layer3
    downsamples with a projection shortcut (conv1x1 + BN): its skip is conv(x), not x, so it is
    not a residual block. BatchNorm is in training mode unless the caller switches to eval().
    """
    torch.manual_seed(seed)
    model = ResNet(width, depth, classes)
    return model, (random_images(batch, image, seed),)


EXAMPLES: dict[str, Callable[..., tuple[nn.Module, tuple]]] = {
    "gpt": gpt,
    "llama": llama,
    "vit": vit,
    "resnet": resnet,
}
