"""Which module holds the mHC parameters, found from the Parameter objects themselves: decorated
forwards (with and without functools.wraps), forward hooks, Module.compile(), per-block compiles,
weight sharing, wrapper modules. Every case is checked against the plain model at init and
against a float64 reference of mHC with the parameters perturbed away from the init."""

import functools

import pytest
import torch
from torch import nn

import mhc_compile
from mhc_compile import reference


class Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x):
        return x + torch.tanh(self.fc(x))


def wrapped(forward):
    @functools.wraps(forward)
    def wrapper(*args, **kwargs):
        return forward(*args, **kwargs)

    return wrapper


def bare(forward):
    def wrapper(*args, **kwargs):  # no functools.wraps: the frame knows nothing of forward
        return forward(*args, **kwargs)

    return wrapper


class Stack(nn.Module):
    def __init__(self, width=6, depth=3):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, width)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class WrapsStack(Stack):
    forward = wrapped(Stack.forward)  # as transformers 5 decorates LlamaForCausalLM.forward


class BareStack(Stack):
    forward = bare(Stack.forward)


class Wrapper(nn.Module):
    """Calls the real model through __call__, as task heads and adapters do."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x) * 2


def _model(cls=Stack, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return cls().to(dtype), torch.randn(2, 5, 6, dtype=dtype)


def _perturb(model):
    """Move every mHC parameter away from its init, so a wrong binding shows in the outputs."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".mhc." in f".{name}":
                parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator,
                                                  dtype=parameter.dtype))


def _mhc_stack(model, store, key_prefix, x, n=4):
    """Float64 reference: the blocks of `model` as one mHC chain, parameters from `store`."""
    streams = x.unsqueeze(-2).expand(*x.shape[:-1], n, x.shape[-1])
    for index, block in enumerate(model.blocks):
        p = store.blocks[f"{key_prefix}blocks-{index}-fc"]
        h_pre, h_post, h_res = reference.coefficients(
            streams, p.phi, p.alpha, p.b_pre, p.b_post, p.b_res, 20, "sinkhorn")
        y = torch.tanh(block.fc((h_pre.unsqueeze(-1) * streams).sum(-2)))
        streams = h_res @ streams + h_post.unsqueeze(-1) * y.unsqueeze(-2)
    return model.head(streams.mean(-2))


def _compile(model):
    torch._dynamo.reset()
    return torch.compile(model, backend=mhc_compile.backend(eager=True))


@pytest.mark.parametrize("cls", [Stack, WrapsStack, BareStack], ids=["plain", "wraps", "bare"])
def test_decorated_forward_is_owned_by_the_model(cls):
    model, x = _model(cls)
    expected = model(x)
    compiled = _compile(model)
    torch.testing.assert_close(compiled(x), expected)
    assert sorted(model.mhc.blocks) == ["blocks-0-fc", "blocks-1-fc", "blocks-2-fc"]
    _perturb(model)
    torch.testing.assert_close(compiled(x), _mhc_stack(model, model.mhc, "", x))


def test_prepare_then_compile_of_a_decorated_forward_reuses_the_prepared_parameters():
    model, x = _model(WrapsStack)
    report = mhc_compile.prepare(model, x)
    assert [b.key for b in report.rewritten] == ["blocks.0.fc", "blocks.1.fc", "blocks.2.fc"]
    assert [b.path for b in report.rewritten] == ["blocks.0", "blocks.1", "blocks.2"]
    prepared = list(model.mhc.parameters())
    _perturb(model)
    torch._dynamo.reset()
    out = torch.compile(model, backend="mhc", options={"eager": True})(x)
    assert list(model.mhc.parameters()) == prepared
    torch.testing.assert_close(out, _mhc_stack(model, model.mhc, "", x))


def test_forward_hooks_and_module_compile():
    model, x = _model()
    model.register_forward_hook(lambda module, args, output: output + 1)
    expected = model(x)
    torch._dynamo.reset()
    model.compile(backend=mhc_compile.backend(eager=True))
    torch.testing.assert_close(model(x), expected)
    _perturb(model)
    torch.testing.assert_close(model(x), _mhc_stack(model, model.mhc, "", x) + 1)


def test_wrapper_module_owns_the_parameters_of_what_it_wraps():
    model, x = _model()
    wrapper = Wrapper(model)
    expected = wrapper(x)
    compiled = _compile(wrapper)
    torch.testing.assert_close(compiled(x), expected)
    assert sorted(wrapper.mhc.blocks) == ["inner-blocks-0-fc", "inner-blocks-1-fc", "inner-blocks-2-fc"]
    _perturb(wrapper)
    store = wrapper.mhc
    reference_out = _mhc_stack(model, store, "inner-", x) * 2
    torch.testing.assert_close(compiled(x), reference_out)


@pytest.mark.parametrize("how", ["torch.compile", "Module.compile"])
def test_per_block_compile_binds_each_block_its_own_parameters(how):
    model, x = _model()
    expected = model(x)
    torch._dynamo.reset()
    for index, block in enumerate(model.blocks):
        if how == "torch.compile":
            model.blocks[index] = torch.compile(block, backend=mhc_compile.backend(eager=True))
        else:
            block.compile(backend=mhc_compile.backend(eager=True))
    torch.testing.assert_close(model(x), expected)
    blocks = [getattr(b, "_orig_mod", b) for b in model.blocks]
    stores = [block.mhc for block in blocks]  # each block is its own chain of one
    assert all(sorted(store.blocks) == ["fc"] for store in stores)
    assert len({id(store) for store in stores}) == 3
    _perturb(model)
    h = x
    for block, store in zip(blocks, stores):
        single = nn.Module()
        single.blocks = nn.ModuleList([block])
        single.head = nn.Identity()
        p = store.blocks["fc"]
        store_view = type("View", (), {"blocks": {"blocks-0-fc": p}})
        h = _mhc_stack(single, store_view, "", h)
    torch.testing.assert_close(model(x), model.head(h))


def test_shared_weights_share_their_mhc_parameters():
    model, x = _model()
    model.blocks[2].fc = model.blocks[0].fc  # tied: blocks 0 and 2 run one Linear
    expected = model(x)
    compiled = _compile(model)
    torch.testing.assert_close(compiled(x), expected)
    assert sorted(model.mhc.blocks) == ["blocks-0-fc", "blocks-1-fc"]  # the site is the weight
    _perturb(model)
    store = model.mhc
    view = type("View", (), {"blocks": {
        "blocks-0-fc": store.blocks["blocks-0-fc"], "blocks-1-fc": store.blocks["blocks-1-fc"],
        "blocks-2-fc": store.blocks["blocks-0-fc"]}})
    torch.testing.assert_close(compiled(x), _mhc_stack(model, view, "", x))


def test_functional_parameter_without_a_module_is_reported():
    weight = nn.Parameter(torch.randn(4, 4))

    def residual(x, w):
        return x + torch.tanh(x @ w)

    backend = mhc_compile.backend(eager=True)
    torch._dynamo.reset()
    with pytest.warns(UserWarning, match="1 residual block"):
        torch.compile(residual, backend=backend)(torch.randn(3, 4), weight)
    assert [b.reason for b in backend.report.blocks] == [mhc_compile.SkipReason.NO_OWNER_MODULE.value]
