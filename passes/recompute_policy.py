"""Recompute policy: which mHC tensors backward keeps and which it rebuilds (mHC paper, 4.3).

n streams multiply a residual chain's saved activations by n: every block's backward ops need its
input streams x_l [T, n, C]. The paper keeps x_l only at the first block of every L_r blocks, plus
each block's F output y_l [T, C] and its per-token coefficients (H_pre, H_post, H_res: n^2 + 2n
floats; here also the projection that the coefficient backward reads, n^2 + 2n + 1 floats), and
rebuilds the other streams in backward, group by group, with the cheap post/res mix
x_{l+1} = H_res x_l + H_post^T y_l (Eq. 3). F itself is never recomputed. Saved stream memory is
least at L_r ~ sqrt(n L / (n + 2)) for a chain of L blocks: L/L_r kept streams of nC against about
L_r (n + 2)C live while one group is rebuilt.

This pass runs on AOT autograd's joint graph (Inductor's joint_custom_pre_pass, installed by
`backend.compile_whole_ops`) and steers the min-cut partitioner with the tags that
selective activation checkpointing uses: node.meta["recompute"] = MUST_RECOMPUTE or MUST_SAVE,
and one "ac_graph_id" per group. The partitioner then saves only what the tags allow, and its
`reordering_to_mimic_autograd_engine` rebuilds each group just before that group's backward.
Nodes that the user's own torch.utils.checkpoint regions tagged keep their tags: the user's
choice wins inside their regions.

What is recomputed is keyed on ops (spec.py), here and nowhere else: the outputs of RECOMPUTED_OPS (the
ops that produce a block's output streams) and the stream-wise ops between blocks (a lifted ReLU
or norm) are rebuilt; every other mhc:: forward op (coefficients, pre-mix, or a fused
coefficients + pre-mix op) and F's output are kept.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass, field

import torch
from torch import fx
from torch.utils.checkpoint import CheckpointPolicy

from mhc_compile import ops, private_apis, spec
from mhc_compile.passes.context import PassContext

log = logging.getLogger(__name__)

RECOMPUTED_OPS = frozenset({spec.POST_RES_MIX})  # outputs: a block's streams x_{l+1}

# Our groups' ac_graph_ids sit above any id torch gives a user's checkpoint region (a counter
# from 1), so the partitioner's boundary rule (a recomputed node whose user is recomputed under a
# larger id is saved instead) keeps a user region's output streams when one of our groups reads
# them, rather than rebuilding the region early.
_GROUP_ID_BASE = 1 << 40
_group_ids = itertools.count(_GROUP_ID_BASE)


def group_size(setting: str | int | bool, n: int, blocks: int) -> int | None:
    """L_r for a chain of `blocks` blocks of n streams; None when the policy is off.

    "auto": the paper's optimum round(sqrt(n L / (n + 2))), at least 1.
    """
    if setting is False:
        return None
    if setting == "auto" or setting is True:
        return max(1, round(math.sqrt(n * blocks / (n + 2))))
    return int(setting)


@dataclass
class StreamChain:
    """The stream-producing ops of one residual chain in order, and the stream-wise ops that
    follow each of them before the next block reads the streams."""

    producers: list[fx.Node] = field(default_factory=list)
    lifted: list[list[fx.Node]] = field(default_factory=list)


def tag_recompute(graph: fx.Graph, context: PassContext) -> int:
    """Tag the joint graph's mHC nodes for the partitioner as `context.options.recompute` says;
    returns the number of chains the policy tags (0 when it is off). Each chain's replicated
    input is rebuilt whatever the setting (_tag_replicated_head)."""
    setting = context.options.recompute
    forward = _forward_nodes(graph)
    chains = _stream_chains(graph, forward)
    if setting is False:
        for chain in chains:
            _tag_replicated_head(chain, next(_group_ids))
        return 0
    for chain in chains:
        n = chain.producers[0].meta["val"].shape[-2]
        _tag_chain(chain, group_size(setting, n, len(chain.producers)))
    for node in forward:
        if (op := ops.spec_of(node.target)) is not None and op not in RECOMPUTED_OPS:
            _tag(node, CheckpointPolicy.MUST_SAVE, None)  # coefficients, pre-mix: never rebuilt
    log.debug("mhc: recompute policy %r tagged %d chains", setting, len(chains))
    return len(chains)


def _tag_chain(chain: StreamChain, group: int) -> None:
    """Block p's output streams x_{p+1} are kept where p + 1 is a multiple of L_r (the first
    streams of the next group), rebuilt elsewhere; F's output y_p feeding the rebuild is kept."""
    ids = [next(_group_ids) for _ in range(math.ceil(len(chain.producers) / group) + 1)]
    _tag_replicated_head(chain, ids[0])
    for position, (producer, lifted) in enumerate(zip(chain.producers, chain.lifted)):
        ends_group = (position + 1) % group == 0
        policy = CheckpointPolicy.MUST_SAVE if ends_group else CheckpointPolicy.MUST_RECOMPUTE
        _tag(producer, policy, ids[position // group])
        # Stream-wise ops after the kept streams are rebuilt from them (cheap), and belong to the
        # next group, so the partitioner does not save their outputs as a group boundary too.
        next_group = ids[(position + 1) // group]
        for node in lifted:
            _tag(node, CheckpointPolicy.MUST_RECOMPUTE, next_group)
        _tag(producer.args[1], CheckpointPolicy.MUST_SAVE, None)  # F's output y_p: never rebuilt


# What stream_layout.enter_streams traces to between the chain input [..., C] and its streams.
_REPLICATION_OPS = (torch.ops.aten.clone.default, torch.ops.aten.expand.default,
                    torch.ops.aten.unsqueeze.default, torch.ops.aten.permute.default)


def _tag_replicated_head(chain: StreamChain, group_id: int) -> None:
    """A chain's first streams x_0 are n copies of its input, written contiguous once
    (stream_layout.enter_streams) so that the ops reading them copy nothing. The partitioner would
    save that [T, n, C] copy for backward, n times the input it is made from: it is rebuilt instead,
    with the chain's first group."""
    head = chain.producers[0].args[0]
    replication = []
    while isinstance(head, fx.Node) and head.op == "call_function" and head.target in _REPLICATION_OPS:
        replication.append(head)
        head = head.args[0]
    if any(node.target is torch.ops.aten.expand.default for node in replication):
        for node in replication:
            _tag(node, CheckpointPolicy.MUST_RECOMPUTE, group_id)


def _tag(node: fx.Node, policy: CheckpointPolicy, group_id: int | None) -> None:
    if not isinstance(node, fx.Node) or private_apis.partitioner_tagged(node):
        return  # the user's checkpoint region (or an earlier rule) decided already
    private_apis.tag_for_partitioner(node, policy, group_id)


def _stream_chains(graph: fx.Graph, forward: set[fx.Node]) -> list[StreamChain]:
    """Link each stream-producing op to the previous one whose streams it reads, through
    stream-wise ops (same shape) only, so that separate chains are never merged."""
    chain_of: dict[fx.Node, StreamChain] = {}
    chains: list[StreamChain] = []
    for node in graph.nodes:
        if node not in forward or ops.spec_of(node.target) not in RECOMPUTED_OPS:
            continue
        previous, between = _previous_producer(node)
        chain = chain_of.get(previous)
        if chain is None or chain.producers[-1] is not previous:
            chain = StreamChain()
            chains.append(chain)
        else:
            chain.lifted[-1] = between
        chain.producers.append(node)
        chain.lifted.append([])
        chain_of[node] = chain
    return chains


def _previous_producer(node: fx.Node) -> tuple[fx.Node | None, list[fx.Node]]:
    shape = node.meta["val"].shape
    between = []
    current = node.args[0]
    while isinstance(current, fx.Node) and current.op == "call_function":
        if ops.spec_of(current.target) in RECOMPUTED_OPS:
            return current, between
        if not _has_shape(current, shape) or not current.args:
            break
        between.append(current)
        current = current.args[0]
    return None, []


def _has_shape(node: fx.Node, shape: torch.Size) -> bool:
    value = node.meta.get("val")
    if isinstance(value, (tuple, list)) and value:
        value = value[0]  # a multi-output op (native_layer_norm): its first output is the streams
    return isinstance(value, torch.Tensor) and value.shape == shape


def _forward_nodes(graph: fx.Graph) -> set[fx.Node]:
    """Nodes of the joint graph that do not depend on a tangent (the forward part)."""
    backward: set[fx.Node] = set()
    for node in graph.nodes:
        if private_apis.is_tangent(node) or any(arg in backward for arg in node.all_input_nodes):
            backward.add(node)
    return {node for node in graph.nodes if node not in backward}
