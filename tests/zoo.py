"""The test zoo: small unmodified models, each with how many residual blocks it holds.

A residual block is an add `x + f(x)` whose f holds a parameterised linear, matmul or convolution
(see passes/find_residual_blocks.py). Every factory takes `seed` and small size keyword arguments
and returns `(model, example_args)`; the same seed gives the same parameters and inputs, and a
forward pass takes milliseconds on a CPU. `ZOO[name]` adds the block count at the default sizes,
a fixed scalar training loss for the model's output, and a note on what the model exercises:

    entry = ZOO["moe"]
    model, args = entry.factory()
    entry.loss(model(*args), args).backward()

The models use only torch; the built-in examples and their shared modules (attention, MLP, the
pre-LN block, the GPT shell) come from mhc_compile.examples, which uses only torch too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mhc_compile.examples import (
    GPT, MLP, Block, SelfAttention, gpt, llama, random_ids, random_images, resnet, vit,
)

__all__ = [
    "ZOO", "ZooEntry", "next_token_loss", "class_loss", "regression_loss",
    "gpt", "llama", "vit", "resnet", "bert", "parallel", "moe", "scaled", "inplace",
    "no_residual", "graph_break", "gelu_tanh", "broadcast",
]

# --- losses: fixed scalar objectives for a model's output -----------------------------------------


def next_token_loss(logits: torch.Tensor, args: tuple) -> torch.Tensor:
    """Language models: cross entropy of the logits at t against the input id at t + 1."""
    (ids,) = args
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def class_loss(logits: torch.Tensor, args: tuple) -> torch.Tensor:
    """Classifiers [batch, classes]: cross entropy against labels drawn from a fixed seed."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, logits.shape[-1], logits.shape[:1], generator=generator)
    return F.cross_entropy(logits, labels.to(logits.device))


def regression_loss(output: torch.Tensor, args: tuple) -> torch.Tensor:
    """Anything else: mean squared error to a target of the output's shape from a fixed seed."""
    target = torch.randn(output.shape, generator=torch.Generator().manual_seed(0))
    return F.mse_loss(output, target.to(output))


def random_features(batch: int, seq: int, width: int, seed: int) -> torch.Tensor:
    """Seeded float32 features [batch, seq, width] for the models that take no tokens."""
    return torch.randn(batch, seq, width, generator=torch.Generator().manual_seed(seed))


# --- BERT: post-LN encoder ------------------------------------------------------------------------


class PostLNBlock(nn.Module):
    """BERT layer: the norm comes after each residual add, `ln(x + f(x))`."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = SelfAttention(width, heads, causal=False)
        self.ln1 = nn.LayerNorm(width)
        self.mlp = MLP(width)
        self.ln2 = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln1(x + self.attn(x))
        x = self.ln2(x + self.mlp(x))
        return x


class BERT(nn.Module):
    """BERT-style sequence classifier: embeddings + LN, post-LN encoder, head on [CLS].

    Token and learned position embeddings; the head reads the first position.
    """

    def __init__(self, vocab: int, max_seq: int, width: int, depth: int, heads: int, classes: int):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, width)
        self.pos_emb = nn.Embedding(max_seq, width)
        self.emb_ln = nn.LayerNorm(width)
        self.layers = nn.ModuleList(PostLNBlock(width, heads) for _ in range(depth))
        self.classifier = nn.Linear(width, classes)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.emb_ln(self.tok_emb(idx) + self.pos_emb(positions))
        for layer in self.layers:
            x = layer(x)
        return self.classifier(x[:, 0])


def bert(seed: int = 0, batch: int = 4, seq: int = 32, width: int = 64, depth: int = 3,
         heads: int = 4, vocab: int = 96, classes: int = 10) -> tuple[BERT, tuple[torch.Tensor]]:
    """Post-LN encoder classifier on ids [batch, seq]; 2 * depth blocks (`layers.{i}`)."""
    torch.manual_seed(seed)
    return BERT(vocab, seq, width, depth, heads, classes), (random_ids(vocab, batch, seq, seed),)


# --- GPT variants: parallel residual, mixture of experts, LayerScale, a graph break ---------------


class ParallelBlock(Block):
    """GPT-NeoX / Phi layer: attention and MLP both read x and share one residual."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attn(self.ln1(x)) + self.mlp(self.ln2(x))


def parallel(seed: int = 0, batch: int = 4, seq: int = 32, width: int = 64, depth: int = 3,
             heads: int = 4, vocab: int = 96) -> tuple[GPT, tuple[torch.Tensor]]:
    """GPT with parallel residual layers; one block per layer (`blocks.{i}`), depth in all."""
    torch.manual_seed(seed)
    model = GPT(vocab, seq, width, depth, heads, block=ParallelBlock)
    return model, (random_ids(vocab, batch, seq, seed),)


class MoE(nn.Module):
    """Top-k mixture of MLP experts: linear router, softmax, top-k, gates renormalised over the k.

    The masking form: every expert runs on every token and is weighted by its gate, which is zero
    where the router did not choose it. Shapes stay static, so Dynamo traces it in one graph.
    """

    def __init__(self, width: int, experts: int = 4, top_k: int = 2):
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(width, experts, bias=False)
        self.experts = nn.ModuleList(MLP(width, 2 * width) for _ in range(experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = F.softmax(self.router(x), dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(x)
        for index, expert in enumerate(self.experts):
            gate = (weights * (chosen == index)).sum(dim=-1, keepdim=True)
            out = out + gate * expert(x)
        return out


class MoEBlock(nn.Module):
    """Pre-LN layer whose feed-forward is a mixture of experts."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.ln2 = nn.LayerNorm(width)
        self.moe = MoE(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        x = x + self.moe(self.ln2(x))
        return x


def moe(seed: int = 0, batch: int = 4, seq: int = 32, width: int = 64, depth: int = 2,
        heads: int = 4, vocab: int = 96) -> tuple[GPT, tuple[torch.Tensor]]:
    """GPT with top-2-of-4 MoE feed-forwards; 2 * depth blocks (attention, MoE per layer)."""
    torch.manual_seed(seed)
    model = GPT(vocab, seq, width, depth, heads, block=MoEBlock)
    return model, (random_ids(vocab, batch, seq, seed),)


class LayerScaleBlock(Block):
    """Pre-LN layer with LayerScale (CaiT): each branch scaled by a learned per-channel gamma."""

    def __init__(self, width: int, heads: int, init: float = 0.1):
        super().__init__(width, heads)
        self.gamma1 = nn.Parameter(init * torch.ones(width))
        self.gamma2 = nn.Parameter(init * torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.gamma1 * self.attn(self.ln1(x))
        x = x + self.gamma2 * self.mlp(self.ln2(x))
        return x


def scaled(seed: int = 0, batch: int = 4, seq: int = 32, width: int = 64, depth: int = 2,
           heads: int = 4, vocab: int = 96) -> tuple[GPT, tuple[torch.Tensor]]:
    """GPT with LayerScale residuals `x + gamma * f(ln(x))`; 2 * depth blocks."""
    torch.manual_seed(seed)
    model = GPT(vocab, seq, width, depth, heads, block=LayerScaleBlock)
    return model, (random_ids(vocab, batch, seq, seed),)


class GraphBreakGPT(GPT):
    """GPT whose forward calls `torch._dynamo.graph_break()` before `blocks[break_at]`.

    The break sits between two loops, not inside one: Dynamo resumes after a break in the
    frame's own code, but a break inside a loop makes it run this forward eagerly and compile
    only each block's forward on its own.
    """

    def __init__(self, *args, break_at: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.break_at = break_at

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(positions)
        for block in self.blocks[: self.break_at]:
            x = block(x)
        torch._dynamo.graph_break()
        for block in self.blocks[self.break_at :]:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def graph_break(seed: int = 0, batch: int = 4, seq: int = 32, width: int = 64, depth: int = 3,
                heads: int = 4, vocab: int = 96,
                break_at: int = 2) -> tuple[GPT, tuple[torch.Tensor]]:
    """GPT traced as two graphs: blocks before `break_at` in the first, the rest in the second.

    2 * depth blocks in all; by default 4 (`blocks.0`, `blocks.1`) then 2 (`blocks.2`).
    """
    torch.manual_seed(seed)
    model = GraphBreakGPT(vocab, seq, width, depth, heads, break_at=break_at)
    return model, (random_ids(vocab, batch, seq, seed),)


# --- MLP and CNN models ---------------------------------------------------------------------------


class InplaceResidualBlock(nn.Module):
    """Pre-LN MLP block whose residual add is in place, as torchvision's BasicBlock writes it.

    The add mutates f's output, `out += h`. The other way round, `h += f(h)`, cannot train in
    eager mode: LayerNorm and Linear save h for backward, and autograd rejects the mutated h.
    """

    def __init__(self, width: int):
        super().__init__()
        self.ln = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = self.fc2(F.gelu(self.fc1(self.ln(h))))
        out += h
        return out


class InplaceResidualMLP(nn.Module):
    """Input projection, in-place residual MLP blocks, output projection."""

    def __init__(self, width: int, depth: int):
        super().__init__()
        self.inp = nn.Linear(width, width)
        self.blocks = nn.ModuleList(InplaceResidualBlock(width) for _ in range(depth))
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return self.out(h)


def inplace(seed: int = 0, batch: int = 4, seq: int = 16, width: int = 64,
            depth: int = 3) -> tuple[InplaceResidualMLP, tuple[torch.Tensor]]:
    """In-place residual MLP on features [batch, seq, width]; depth blocks (`blocks.{i}`)."""
    torch.manual_seed(seed)
    return InplaceResidualMLP(width, depth), (random_features(batch, seq, width, seed),)


class PlainCNN(nn.Module):
    """LeNet-style CNN: conv-ReLU-pool twice, then a two-layer MLP head. No residual adds."""

    def __init__(self, image: int, width: int, classes: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * width * (image // 4) ** 2, 64), nn.ReLU(),
            nn.Linear(64, classes),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(images))


def no_residual(seed: int = 0, batch: int = 4, image: int = 32, width: int = 16,
                classes: int = 10) -> tuple[PlainCNN, tuple[torch.Tensor]]:
    """Plain CNN classifier on images [batch, 3, image, image]; no residual blocks."""
    torch.manual_seed(seed)
    return PlainCNN(image, width, classes), (random_images(batch, image, seed),)


class TanhGELU(nn.Module):
    """GELU's tanh approximation written out, as GPT-2's original code does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * (x + 0.044715 * x**3)))


class TanhGELUMLP(nn.Module):
    """A stack of Linear -> TanhGELU layers without residual adds, then an output Linear.

    `x + 0.044715 * x**3` adds a function of x to x, but that function holds no weight.
    """

    def __init__(self, width: int, depth: int):
        super().__init__()
        self.layers = nn.Sequential(
            *(nn.Sequential(nn.Linear(width, width), TanhGELU()) for _ in range(depth))
        )
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.layers(x))


def gelu_tanh(seed: int = 0, batch: int = 4, seq: int = 16, width: int = 64,
              depth: int = 3) -> tuple[TanhGELUMLP, tuple[torch.Tensor]]:
    """MLP with a hand-written tanh GELU on features [batch, seq, width]; no residual blocks."""
    torch.manual_seed(seed)
    return TanhGELUMLP(width, depth), (random_features(batch, seq, width, seed),)


class BroadcastShift(nn.Module):
    """Shifts each token by one learned scalar: `x + bias_net(x).mean(-1, keepdim=True)`.

    An `x + f(x)` whose f(x) [..., 1] broadcasts against x [..., width]: not widenable to streams.
    """

    def __init__(self, width: int):
        super().__init__()
        self.bias_net = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width))
        self.head = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.bias_net(x).mean(dim=-1, keepdim=True)
        return self.head(x)


def broadcast(seed: int = 0, batch: int = 4, seq: int = 16,
              width: int = 64) -> tuple[BroadcastShift, tuple[torch.Tensor]]:
    """One broadcasting residual on features [batch, seq, width]; found, and skipped."""
    torch.manual_seed(seed)
    return BroadcastShift(width), (random_features(batch, seq, width, seed),)


# --- the zoo --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ZooEntry:
    """A factory, its residual block count at default sizes, a training loss, and a note."""

    factory: Callable[..., tuple[nn.Module, tuple]]
    expected_blocks: int
    loss: Callable[[torch.Tensor, tuple], torch.Tensor]
    note: str


ZOO: dict[str, ZooEntry] = {
    "gpt": ZooEntry(gpt, 8, next_token_loss, "GPT-2 pre-LN, 4 layers: attention + MLP per layer"),
    "llama": ZooEntry(llama, 8, next_token_loss,
                      "LLaMA: RMSNorm, rotary q/k (an add, not a residual), SwiGLU; 4 layers"),
    "vit": ZooEntry(vit, 8, class_loss, "ViT: conv patch embedding, cls token, 4 pre-LN layers"),
    "resnet": ZooEntry(resnet, 4, class_loss,
                       "ResNet, 3 stages x 2 BasicBlocks, in-place `out += identity`; the 2 "
                       "projection-shortcut blocks are not x + f(x); BatchNorm in train mode"),
    "bert": ZooEntry(bert, 6, class_loss, "post-LN `ln(x + f(x))`, 3 layers"),
    "parallel": ZooEntry(parallel, 3, next_token_loss,
                         "parallel residual `x + attn(ln1(x)) + mlp(ln2(x))`: "
                         "one block per layer, 3 layers"),
    "moe": ZooEntry(moe, 4, next_token_loss, "top-2 of 4 MLP experts (masking loop), 2 layers"),
    "scaled": ZooEntry(scaled, 4, next_token_loss,
                       "LayerScale `x + gamma * f(ln(x))`, gamma init 0.1, 2 layers"),
    "inplace": ZooEntry(inplace, 3, regression_loss,
                        "in-place `out += h`, mutating f's output (not the input), 3 blocks"),
    "no_residual": ZooEntry(no_residual, 0, class_loss, "plain CNN + MLP head: nothing to rewrite"),
    "graph_break": ZooEntry(graph_break, 6, next_token_loss,
                            "graph break before blocks.2: 6 blocks over 2 graphs (4 + 2)"),
    "gelu_tanh": ZooEntry(gelu_tanh, 0, regression_loss,
                          "hand-written tanh GELU `x + 0.044715 * x**3`: f holds no weight"),
    "broadcast": ZooEntry(broadcast, 1, regression_loss,
                          "skipped: broadcast (`x + f(x).mean(-1, keepdim=True)`)"),
}
