"""The one-process run that the multi-process tests (pipeline, DDP, FSDP2) compare with: a float64
example model with perturbed mHC parameters, its loss, and its gradients when compiled whole."""

import contextlib
import copy

import torch
import torch.nn.functional as F

import mhc_compile
from mhc_compile.examples import gpt


def loss_of(logits, target):
    return F.cross_entropy(logits.flatten(0, 1), target.flatten())


def example_model(build=gpt, seed=0, prepared=True, **sizes):
    """(model, ids, target): a float64 example model; prepared, with perturbed mHC parameters (not
    the init that keeps the plain model's function, whose gradients would hide a missing mHC)."""
    torch._dynamo.reset()
    model, (ids,) = build(seed=seed, **sizes)
    model = model.double()
    if prepared:
        mhc_compile.prepare(model, ids[:1])
        generator = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for param in model.mhc.parameters():
                param.add_(0.1 * torch.randn(param.shape, generator=generator, dtype=param.dtype))
    return model, ids, torch.roll(ids, 1, dims=1)


def single_process_run(model, ids, target):
    """Loss and gradients (by parameter name) of a copy of `model`, rewritten and run in one
    process on the whole batch."""
    reference = copy.deepcopy(model)
    torch._dynamo.reset()
    loss = loss_of(torch.compile(reference, backend=mhc_compile.backend(eager=True))(ids), target)
    loss.backward()
    assert all(p.grad is not None for p in reference.mhc.parameters()), "reference was not rewritten"
    return loss.detach(), {name: p.grad for name, p in reference.named_parameters()}


def attention_that_compiles_in_float64():
    """A context in which scaled_dot_product_attention traces to its math form before torch 2.13:
    on 2.11 (the GPU machine's) Inductor's backward of CPU flash attention fails in float64
    ("expected scalar type Double but found Float", pytorch/pytorch#185539), which the compiled
    float64 example models would hit; 2.13 (CI's) compiles it. Elsewhere it changes nothing."""
    if torch.__version__ >= (2, 13):
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)
