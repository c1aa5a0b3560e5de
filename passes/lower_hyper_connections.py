"""Mutation: the model's own hyper-connections that match_hyper_connections recognised, lowered
onto the mhc:: ops.

Each DeepseekV4Site's coefficients and pre-mix become one mhc::coefficients_pre_mix and its update
one mhc::post_res_mix, reading the model's own parameters through reference.deepseek_v4_parameters
(no new ones), with constraint "deepseek_v4:<eps>": the streams are read by the fused kernels
instead of by dozens of small ops, and the recompute policy and the grad-streams fold apply as to
the blocks rewrite_mhc makes.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from mhc_compile import reference
from mhc_compile.passes import graph_facts
from mhc_compile.passes.context import PassContext
from mhc_compile.passes.match_hyper_connections import DeepseekV4Site
from mhc_compile.passes.rewrite_mhc import call_like


def lower_hyper_connections(graph_module: fx.GraphModule, context: PassContext) -> int:
    """Rewrite: replace every matched hyper-connection by the mhc:: ops; returns how many."""
    sites = [site for site in context.hyper_connections.values() if isinstance(site, DeepseekV4Site)]
    graph = graph_module.graph
    lowered: dict[fx.Node, fx.Node] = {}  # an erased update -> the op that stands for it
    for site in sites:
        site.streams = lowered.get(site.streams, site.streams)
        lowered[site.add] = _lower(graph, site)
    if sites:
        graph.eliminate_dead_code()
        graph.lint()
        graph_module.recompile()
    return len(sites)


def _lower(graph: fx.Graph, site: DeepseekV4Site) -> fx.Node:
    """Replace one site by the ops; returns the post/res mix that replaced its update."""
    with graph.inserting_before(site.collapsed):
        mapped = call_like(graph, reference.deepseek_v4_parameters, site.fn, site.base, site.scale,
                           site.n, like=site.add)
        parameters = [call_like(graph, operator.getitem, mapped, i, like=site.add) for i in range(5)]
        coefficients = call_like(graph, torch.ops.mhc.coefficients_pre_mix.default, site.streams,
                                 *parameters, site.sinkhorn_iters, site.constraint, like=site.add)
        h_post, h_res, mixed = (call_like(graph, operator.getitem, coefficients, i, like=site.add)
                                for i in (1, 2, 3))
    site.collapsed.replace_all_uses_with(mixed)
    with graph.inserting_before(site.add):
        written = site.written
        if graph_facts.example_value(written).dtype != graph_facts.example_value(site.streams).dtype:
            written = call_like(graph, torch.Tensor.to, written,
                                graph_facts.example_value(site.streams).dtype, like=site.add)
        updated = call_like(graph, torch.ops.mhc.post_res_mix.default, site.streams, written,
                            h_post, h_res, like=site.add)
    site.add.replace_all_uses_with(updated)
    graph.erase_node(site.add)
    return updated
