"""Fuse a block's post/res mix with the next block's coefficients and pre-mix (post-grad pass).

In a chain's interior, block l's mhc::post_res_mix writes x_{l+1} and block l+1's
mhc::coefficients_pre_mix reads it straight back for its RMS and projection. One kernel can do
both: mhc::post_res_mix_coefficients_pre_mix_opaque computes x_{l+1}, writes it once and projects
it from registers, so each interior sublayer's forward reads the streams once less and launches
one kernel less (spec.POST_RES_MIX_COEFFICIENTS_PRE_MIX).

This runs on Inductor's post-grad forward graphs, after the partitioner: the recompute policy has
already decided which streams backward keeps and which it rebuilds with mhc::post_res_mix, and the
backward graph keeps both ops' backwards, so the fused op needs no autograd. Chain heads (the
streams come from the expansion), tails (nothing reads them but the mean) and mixes read through
stream-wise ops (ResNet's ReLU) keep the separate ops, as does the pipeline's side-stream mix,
which is another op. passes/inline_kernels.py then hands the fused op's kernels to Inductor like
the others'.
"""

from __future__ import annotations

import logging
import operator

import torch
from torch import fx

from mhc_compile import ops, spec
from mhc_compile.passes.context import PassContext

log = logging.getLogger(__name__)

_FUSED = torch.ops.mhc.post_res_mix_coefficients_pre_mix_opaque.default


def fuse_sublayers(graph: fx.Graph, context: PassContext) -> int:
    """Replace every post/res mix whose output a coefficient op reads directly by the fused op;
    returns the number of pairs fused."""
    position = {node: index for index, node in enumerate(graph.nodes)}
    fused = 0
    for mix in [node for node in graph.nodes if ops.spec_of(node.target) is spec.POST_RES_MIX]:
        coefficients = _next_coefficients(mix, position)
        if isinstance(coefficients, str):
            log.debug("mhc: %s stays unfused: %s", mix.name, coefficients)
            continue
        _fuse(graph, mix, coefficients)
        fused += 1
    return fused


def _next_coefficients(mix: fx.Node, position: dict[fx.Node, int]) -> fx.Node | str:
    """The coefficient op that reads `mix`'s streams, where the fused op can stand in its place,
    else why not."""
    readers = [user for user in mix.users
               if ops.spec_of(user.target) is spec.COEFFICIENTS_PRE_MIX and user.args[0] is mix]
    if not readers:
        return "no coefficient op reads its streams (a chain's tail, or a stream-wise op between)"
    coefficients = readers[0]
    if mix.kwargs or coefficients.kwargs:
        return "an op has keyword arguments"
    if any(position[user] < position[coefficients] for user in mix.users if user is not coefficients):
        return "its streams are read before the coefficient op, where the fused op is not yet"
    if not all(user.target is operator.getitem for user in coefficients.users):
        return "the coefficient op's outputs are read other than by index"
    return coefficients


def _fuse(graph: fx.Graph, mix: fx.Node, coefficients: fx.Node) -> None:
    """Put the fused op where the coefficient op stands (the mix's inputs come earlier, and every
    reader of the mix's streams later): output 0 is the mix's streams, output i + 1 the coefficient
    op's output i."""
    with graph.inserting_before(coefficients):
        fused = graph.call_function(_FUSED, (*mix.args, *coefficients.args[1:]))
        streams_out = graph.call_function(operator.getitem, (fused, 0))
    fused.meta["val"] = (mix.meta["val"], *coefficients.meta["val"])
    streams_out.meta["val"] = mix.meta["val"]
    _fuse_eager_input_values(fused, mix, coefficients)
    for reader in list(coefficients.users):
        reader.args = (fused, reader.args[1] + 1)
    graph.erase_node(coefficients)
    mix.replace_all_uses_with(streams_out)
    graph.erase_node(mix)


def _fuse_eager_input_values(fused: fx.Node, mix: fx.Node, coefficients: fx.Node) -> None:
    """Inductor lays out a custom op's inputs as its eager call had them (the example arguments in
    meta "eager_input_vals"), where a node records them: the fused op's are the mix's, then the
    coefficient op's but its streams."""
    if "eager_input_vals" in mix.meta and "eager_input_vals" in coefficients.meta:
        (mix_args, mix_kwargs), (coefficient_args, coefficient_kwargs) = (
            mix.meta["eager_input_vals"], coefficients.meta["eager_input_vals"])
        if not mix_kwargs and not coefficient_kwargs:
            fused.meta["eager_input_vals"] = ((*mix_args, *coefficient_args[1:]), {})
