"""The recompute policy (passes/recompute_policy.py) under Inductor, and the user's own activation
checkpointing composed with the rewrite (passes/inline_checkpoint.py).

What backward keeps is read from the compiled forward with torch.autograd.graph.saved_tensors_hooks
(the compiled autograd function saves through ctx.save_for_backward, which the hooks see); when
backward rebuilds the streams is read from the post-grad backward graph Inductor schedules.
Compile-heavy: a LLaMA of 4 layers (8 residual blocks), 4 compiles in all.
"""

import collections
import copy
import functools
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch._functorch import config as functorch_config
from torch._inductor import config as inductor_config
from torch.utils.checkpoint import checkpoint

import mhc_compile
from mhc_compile.examples import LLaMA, llama
from mhc_compile.options import MHCOptions
from mhc_compile import passes
from mhc_compile.passes import inline_kernels
from mhc_compile.passes.recompute_policy import group_size

N, BATCH, SEQ, WIDTH, DEPTH, VOCAB = 4, 4, 32, 64, 4, 96
BLOCKS = 2 * DEPTH
STREAMS = (BATCH, SEQ, N, WIDTH)
HIDDEN = (BATCH * SEQ, 176)  # SwiGLU's hidden activations, saved by F's own backward
# Where the coefficient backward's `accumulate` (the folded grad streams) sits in its arguments.
ACCUMULATE_AT = [argument.name for argument in
                 torch.ops.mhc.coefficients_pre_mix_backward.default._schema.arguments].index("accumulate")


# --- options ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["sometimes", 0, -2, 2.5, True, None], ids=repr)
def test_recompute_option_rejects_bad_values_by_name(bad):
    message = ("mhc option recompute must be 'auto', a group size L_r >= 1 (blocks per kept "
               f"stream) or False (keep every block's streams), got {bad!r}")
    with pytest.raises(ValueError) as error:
        MHCOptions(recompute=bad)
    assert str(error.value) == message


@pytest.mark.parametrize("n, blocks", [(4, 24), (4, 32), (4, 8), (1, 3), (8, 100), (4, 1)])
def test_auto_group_size_is_the_papers_optimum(n, blocks):
    # Kept streams L/L_r * nC against about L_r (n + 2)C rebuilt: least at sqrt(n L / (n + 2)).
    def memory(size):
        return blocks / size * n + size * (n + 2)

    chosen = group_size("auto", n, blocks)
    best = min(range(1, blocks + 1), key=memory)
    assert chosen == max(1, round(math.sqrt(n * blocks / (n + 2))))
    assert memory(chosen) <= memory(best) * 1.1
    assert group_size(3, n, blocks) == 3 and group_size(False, n, blocks) is None


# --- the policy under Inductor ----------------------------------------------------------------------


def test_ops_trace_as_their_opaque_twins_while_kept_whole(monkeypatch):
    """Where the kernels apply (CUDA, static shapes) a public op's body launches them and AOT
    autograd decomposes the op into kernels and glue; the backend compiles under keep_ops_whole
    so the policy finds whole ops in the joint graph."""
    from mhc_compile import ops, templates

    monkeypatch.setattr(templates, "kernels_apply", lambda streams, args: True)
    streams = torch.randn(2, N, WIDTH)
    assert ops.launches_kernels(streams, (streams,))
    with ops.keep_ops_whole():
        assert not ops.launches_kernels(streams, (streams,))
        with ops.keep_ops_whole(False):
            assert ops.launches_kernels(streams, (streams,))
    assert ops.launches_kernels(streams, (streams,))


class _GraphRecorder:
    """Inductor's post-grad graphs (forward, then backward) as passes/inline_kernels.py receives
    them, after the grad-streams fold (`graphs`), and as it leaves them (`final`)."""

    def __init__(self, monkeypatch):
        self.graphs, self.final = [], []

        def record(graph, context):
            self.graphs.append(copy.deepcopy(graph))
            inlined = inline_kernels.inline_kernels(graph, context)
            self.final.append(graph)
            return inlined

        stage = tuple(graph_pass._replace(run=record)
                      if graph_pass.run is inline_kernels.inline_kernels else graph_pass
                      for graph_pass in passes.POST_GRAD_PASSES)
        monkeypatch.setitem(passes.STAGES, "post_grad", stage)


def _saved_shapes(compiled, args):
    shapes = []

    def pack(tensor):
        shapes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = compiled(*args)
    return output, collections.Counter(shapes)


def _mhc_ops(nodes, name):
    """Calls of op `name` among `nodes` (a compiled graph's): the backend compiles under
    ops.keep_ops_whole, so Inductor's graphs hold each op's opaque twin."""
    nodes = nodes.nodes if isinstance(nodes, torch.fx.Graph) else nodes
    return [node for node in nodes if node.op == "call_function" and getattr(node.target, "namespace", None) == "mhc"
            and node.target.name() == f"{name}_opaque"]


def _most_streams_alive(graph):
    """The most rebuilt streams (post/res mix outputs) alive at once in a backward graph."""
    order = {node: index for index, node in enumerate(graph.nodes)}
    rebuilt = _mhc_ops(graph, "mhc::post_res_mix")
    spans = [(order[node], max(order[user] for user in node.users)) for node in rebuilt]
    return max((sum(start <= i < end for start, end in spans) for i in range(len(order))),
               default=0)


def _perturbed_llama(device="cpu"):
    """A prepared LLaMA whose mHC parameters are random, so every stream differs."""
    model, args = llama(seed=0, batch=BATCH, seq=SEQ, width=WIDTH, depth=DEPTH, vocab=VOCAB)
    model, args = model.to(device), tuple(arg.to(device) for arg in args)
    mhc_compile.prepare(model, *args, options={"n": N})
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.mhc.parameters():
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator).to(device))
    return model, args


def _loss(logits, args):
    (ids,) = args
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


# On CUDA the ops' bodies would trace into the Triton kernels; the policy must still see whole ops.
_ON_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("device, recompute, kept", [
    ("cpu", False, BLOCKS - 1), ("cpu", "auto", 3), ("cpu", 3, 2),
    pytest.param("cuda", "auto", 3, marks=_ON_CUDA),
], ids=["off", "auto", "L_r=3", "auto-cuda"])
def test_backward_keeps_one_stream_per_group_and_rebuilds_groups_in_turn(
        monkeypatch, device, recompute, kept):
    model, args = _perturbed_llama(device)
    reference_model = copy.deepcopy(model)
    torch._dynamo.reset()
    recorder = _GraphRecorder(monkeypatch)
    # Inductor's and AOT autograd's caches off: the graphs must be built in this process.
    with inductor_config.patch(fx_graph_cache=False), \
            functorch_config.patch(enable_autograd_cache=False):
        compiled = torch.compile(model, backend="mhc", options={"n": N, "recompute": recompute})
        output, saved = _saved_shapes(compiled, args)
        _loss(output, args).backward()
    backward = recorder.graphs[-1]

    # Kept streams: x_k for k = L_r, 2 L_r, ... < L (x_0, n copies of the chain input [B, S, C],
    # is rebuilt from it in every setting; nothing in backward reads x_L). Off: every block's
    # input streams x_1 .. x_{L-1}.
    assert saved[STREAMS] == kept
    # Every op reads dense streams, so none copies them (x_0 is written contiguous, forward and
    # rebuilt in backward, not read as an expanded view).
    for graph in (recorder.graphs[0], backward):
        for name, streams_at in (("mhc::coefficients_pre_mix", 0), ("mhc::post_res_mix", 0),
                                 ("mhc::post_res_mix_backward", 1),
                                 ("mhc::coefficients_pre_mix_backward", 7)):
            for node in _mhc_ops(graph, name):
                assert node.args[streams_at].meta["val"].is_contiguous(), (name, node.args[streams_at])
    # F is never recomputed: its saved activations are the same with the policy on or off.
    assert saved[HIDDEN] == 3 * DEPTH
    rebuilt = len(_mhc_ops(backward, "mhc::post_res_mix"))
    # passes/fuse_grad_streams.py: every block's coefficient backward receives the post/res
    # mix's grad streams (the first block's too: its streams expand the embedding output, which
    # needs a gradient), so no add of the two is left.
    accumulating = [node for node in _mhc_ops(backward, "mhc::coefficients_pre_mix_backward")
                    if len(node.args) == ACCUMULATE_AT + 1]
    assert len(accumulating) == BLOCKS
    assert all(_mhc_ops([node.args[ACCUMULATE_AT].args[0]], "mhc::post_res_mix_backward")
               for node in accumulating)
    # passes/inline_kernels.py then hands every op's kernels to Inductor where they apply.
    opaque_left = _mhc_ops(recorder.final[-1], "mhc::coefficients_pre_mix_backward")
    assert len(opaque_left) == (0 if device == "cuda" else BLOCKS)
    if recompute is False:
        assert rebuilt == 0
    else:
        size = group_size(recompute, N, BLOCKS)
        assert rebuilt >= BLOCKS - 1 - kept  # every stream not kept is rebuilt ...
        assert _most_streams_alive(backward) <= size < rebuilt  # ... one group at a time

    # Same loss and gradients as the rewritten model run eagerly by the reference ops.
    torch._dynamo.reset()
    eager = torch.compile(reference_model, backend=mhc_compile.backend(n=N, eager=True))
    expected = eager(*args)
    _loss(expected, args).backward()
    torch.testing.assert_close(output, expected, rtol=1e-4, atol=1e-5)
    grads = dict(reference_model.named_parameters())
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad, grads[name].grad, rtol=1e-3, atol=1e-5,
                                   msg=name)


# --- the user's activation checkpointing ------------------------------------------------------------


class CheckpointedLLaMA(LLaMA):
    """The example LLaMA with each layer wrapped in torch.utils.checkpoint, as users write it."""

    def forward(self, idx):
        seq = idx.shape[1]
        cos, sin = self.cos[:seq], self.sin[:seq]
        x = self.tok_embeddings(idx)
        for layer in self.layers:
            x = checkpoint(layer, x, cos, sin, use_reentrant=False)
        return self.output(self.norm(x))


def test_user_checkpointed_layers_are_rewritten_and_still_recompute():
    torch.manual_seed(0)
    model = CheckpointedLLaMA(VOCAB, SEQ, WIDTH, DEPTH, heads=4)
    args = (torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0)),)
    plain = copy.deepcopy(model)
    report = mhc_compile.prepare(model, *args, options={"n": N})
    assert [b.status for b in report.blocks] == ["rewritten"] * BLOCKS
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="mhc", options={"n": N})
    output, saved = _saved_shapes(compiled, args)

    # The user's regions recompute everything inside them, mHC ops included: no F activation
    # is kept, and of the streams only each region's output (the next layer's input).
    assert saved[HIDDEN] == 0
    assert saved[STREAMS] == DEPTH - 1
    # At init the rewritten model computes what the plain one did, gradients included.
    expected = plain(*args)
    torch.testing.assert_close(output, expected, rtol=1e-4, atol=1e-5)
    _loss(output, args).backward()
    _loss(expected, args).backward()
    grads = dict(plain.named_parameters())
    for name, parameter in model.named_parameters():
        if not name.startswith("mhc."):
            torch.testing.assert_close(parameter.grad, grads[name].grad, rtol=1e-3, atol=1e-5,
                                       msg=name)
    assert all(p.grad is not None for p in model.mhc.parameters())


class _Messages(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_selective_checkpoint_regions_are_left_alone_with_a_warning():
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    def save_matmuls(ctx, op, *args, **kwargs):
        return (CheckpointPolicy.MUST_SAVE if op is torch.ops.aten.mm.default
                else CheckpointPolicy.PREFER_RECOMPUTE)

    context_fn = functools.partial(create_selective_checkpoint_contexts, save_matmuls)

    class SelectiveLLaMA(LLaMA):
        def forward(self, idx):
            x = self.tok_embeddings(idx)
            cos, sin = self.cos[: idx.shape[1]], self.sin[: idx.shape[1]]
            for layer in self.layers:
                x = checkpoint(layer, x, cos, sin, use_reentrant=False, context_fn=context_fn)
            return self.output(self.norm(x))

    torch.manual_seed(0)
    model = SelectiveLLaMA(VOCAB, SEQ, WIDTH, 2, heads=4)
    args = (torch.randint(0, VOCAB, (2, SEQ)),)
    handler, logger = _Messages(), logging.getLogger("mhc_compile")
    logger.addHandler(handler)
    try:
        report = mhc_compile.report(model, *args)
    finally:
        logger.removeHandler(handler)
    assert report.blocks == []
    assert handler.messages == [
        "mhc: 2 selective activation checkpoint region(s) (checkpoint with a context_fn) left as "
        "they are; residual blocks inside them are not rewritten"]
