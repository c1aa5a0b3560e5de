"""Analysis: which of the model's own hyper-connections the mhc:: ops can run.

find_residual_blocks reports a block `H_res x + H_post f(H_pre x)` that the model writes itself as
an existing hyper-connection and leaves it. Here each one is checked, op by op, against the
formulation the ops implement besides the paper's: DeepSeek-V4's as transformers writes it
(DeepseekV4HyperConnection, the decoder layer's update): per sublayer, with x the streams
[..., n, C],
    flat = x.view(..., n*C).float();  v = flat * rsqrt(mean(flat^2) + rms_eps)
    pre_w, post_w, comb_w = split(linear(v, fn), [n, n, n*n]);  base and scale likewise
    pre  = sigmoid(pre_w * scale[0] + base_pre) + eps
    post = 2 * sigmoid(post_w * scale[1] + base_post)
    comb = softmax(comb_w * scale[2] + base_comb, -1) + eps, then divided by its column sums
           (+ eps), then iters - 1 times by its row sums and its column sums (+ eps)
    collapsed = sum(pre[..., None] * x, stream axis)                     (f's input)
    x' = post[..., None] * f(...)[..., None, :] + comb^T @ x
which is reference.coefficients_pre_mix with constraint "deepseek_v4:<eps>" and the parameters
mapped by reference.deepseek_v4_parameters (tests/test_reference.py checks it against
transformers). A match is a DeepseekV4Site for passes/lower_hyper_connections.py; anything else
stays as the model wrote it, and the report says which part did not match.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx

from mhc_compile import reference
from mhc_compile.passes import graph_facts
from mhc_compile.passes.context import PassContext
from mhc_compile.report import SkipReason


@dataclass(eq=False)
class DeepseekV4Site:
    """The nodes of one recognised hyper-connection and its formulation's settings."""

    add: fx.Node  # x' = update + mix
    streams: fx.Node  # x [..., n, C]
    fn: fx.Node
    base: fx.Node
    scale: fx.Node
    collapsed: fx.Node  # H_pre x, what f reads
    written: fx.Node  # f's output [..., C]
    n: int
    sinkhorn_iters: int
    eps: float

    @property
    def constraint(self) -> str:
        return reference.deepseek_v4_constraint(self.eps)

    def describe(self) -> str:
        return (f"existing hyper-connection, lowered onto the mhc ops (DeepSeek-V4's "
                f"formulation, n={self.n}, {self.sinkhorn_iters} Sinkhorn iterations, "
                f"eps={self.eps:g})")


class _NoMatch(Exception):
    """Which part of a hyper-connection is not the formulation (the report's reason)."""


def match_hyper_connections(graph_module: fx.GraphModule, context: PassContext) -> int:
    """Analysis: for every block reported as an existing hyper-connection, its DeepseekV4Site or
    the reason it is not one (context.hyper_connections); returns how many match."""
    found = {}
    for block in context.analysis.blocks:
        if block.skip_reason is SkipReason.HYPER_CONNECTION:
            try:
                found[block] = _match(block.add, block.skip, context.parameter_inputs)
            except _NoMatch as problem:
                found[block] = str(problem)
            except Exception as error:  # noqa: BLE001 (a spelling the matcher does not read)
                # A block the model wrote in a way this matcher cannot read stays as written, as
                # before lowering existed: the compile goes on, the report says why.
                found[block] = f"its ops could not be read ({type(error).__name__}: {error})"
    context.hyper_connections = found
    return sum(isinstance(site, DeepseekV4Site) for site in found.values())


# --- matching ---------------------------------------------------------------------------------


def _match(add: fx.Node, streams: fx.Node, parameters: set[fx.Node]) -> DeepseekV4Site:
    operands = graph_facts.add_operands(add)
    mix, update = operands if graph_facts.is_matmul(operands[0]) else operands[::-1]
    value = graph_facts.example_value(streams)
    n, channels = value.shape[-2], value.shape[-1]
    matrix = _other_operand(mix, streams, "the n x n mix")
    comb = _transposed(graph_facts.cast_source(matrix))
    softmaxed, steps = _sinkhorn_steps(comb)
    sinkhorn_iters, eps = _iterations(steps, softmaxed)
    logits = _expect(softmaxed.args[0] if softmaxed.args else None, "softmax's input")
    comb_w, comb_scale, comb_b = _gate_terms(logits, "comb logits")
    split_proj, unbound, split_base = _projection_parts(comb_w, comb_scale, comb_b, index=2)
    fn = _projection_weight(split_proj, streams, n)
    post, written = _post_and_written(update)
    post_w, post_scale, post_b = _gate_terms(_two_sigmoid(post), "post logits")
    if (_part(post_w, split_proj), _part(post_scale, unbound), _part(post_b, split_base)) != (1, 1, 1):
        raise _NoMatch("post's gate does not read the projection, scale and base of the comb's")
    collapsed = _collapsed(streams, split_proj, unbound, split_base, eps, mix)
    for node, what in ((collapsed, "the pre-mix f reads"), (add, "the updated streams")):
        if graph_facts.example_value(node).dtype != value.dtype:
            raise _NoMatch(f"{what} are not in the streams' dtype ({value.dtype}), which the "
                           "ops keep")
    base, scale = split_base.args[0], unbound.args[0]
    _check_parameters(parameters, fn, base, scale, n, channels)
    return DeepseekV4Site(add, streams, fn, base, scale, collapsed, written, n, sinkhorn_iters, eps)


def _is(node, functions=(), methods=()) -> bool:
    return isinstance(node, fx.Node) and (
        (node.op == "call_function" and node.target in functions)
        or (node.op == "call_method" and node.target in methods))


def _argument(node: fx.Node, position: int, name: str, default=None):
    return node.args[position] if len(node.args) > position else node.kwargs.get(name, default)


def _expect(node, what: str) -> fx.Node:
    if not isinstance(node, fx.Node):
        raise _NoMatch(f"{what} is not a tensor of the graph")
    return node


def _dim(node: fx.Node, dim) -> int:
    """`dim` as a non-negative axis of node's value; a reduction over several axes (or all) is
    not one of the formulation's."""
    if isinstance(dim, (list, tuple)) and len(dim) == 1:
        dim = dim[0]
    if not isinstance(dim, int):
        raise _NoMatch(f"{node.name} does not work along one axis")
    return dim % graph_facts.example_value(node).dim()


def _other_operand(node: fx.Node, known: fx.Node, what: str) -> fx.Node:
    inputs = [a for a in node.args if isinstance(a, fx.Node)]
    if len(inputs) != 2 or known not in inputs:
        raise _NoMatch(f"{what} does not multiply the streams")
    return inputs[1] if inputs[0] is known else inputs[0]


def _transposed(node: fx.Node) -> fx.Node:
    """comb for comb^T (transpose of the last two axes)."""
    if _is(node, {torch.transpose}, {"transpose"}):
        dims = {_dim(node, _argument(node, 1, "dim0")), _dim(node, _argument(node, 2, "dim1"))}
        rank = graph_facts.example_value(node).dim()
        if dims == {rank - 1, rank - 2}:
            return graph_facts.cast_source(node.args[0])
    raise _NoMatch("the streams are not mixed by the transpose of the comb matrix (comb^T @ x)")


def _plus_constant(node) -> tuple[fx.Node, float] | None:
    """(tensor, c) for `tensor + c` with a Python number c."""
    if not (isinstance(node, fx.Node) and graph_facts.is_add(node)) or len(node.args) != 2:
        return None
    left, right = node.args
    if isinstance(left, fx.Node) and isinstance(right, (int, float)):
        return left, float(right)
    if isinstance(right, fx.Node) and isinstance(left, (int, float)):
        return right, float(left)
    return None


_DIVIDE = ({operator.truediv, torch.div, torch.true_divide}, {"div", "__truediv__", "true_divide"})
_SUM = ({torch.sum}, {"sum"})
_SOFTMAX = ({torch.softmax, F.softmax}, {"softmax"})


def _sinkhorn_steps(node: fx.Node) -> tuple[fx.Node, list[tuple[int, float]]]:
    """Walk back `m / (m.sum(dim, keepdim=True) + eps)` steps to `softmax(...) + eps`; returns
    that softmax and the (axis, eps) of each step, first step first."""
    steps = []
    while _is(node, *_DIVIDE):
        numerator, denominator = node.args[0], _plus_constant(node.args[1])
        if denominator is None or not _is(denominator[0], *_SUM):
            break
        total = denominator[0]
        if total.args[0] is not numerator or not _argument(total, 2, "keepdim", False):
            raise _NoMatch("a Sinkhorn step does not divide by its own sums (keepdim)")
        steps.append((_dim(total, _argument(total, 1, "dim")), denominator[1]))
        node = numerator
    shifted = _plus_constant(node)
    if shifted is None or not _is(shifted[0], *_SOFTMAX):
        raise _NoMatch("the comb matrix is not softmax(...) + eps normalised by Sinkhorn steps")
    softmaxed = shifted[0]
    if _dim(softmaxed, _argument(softmaxed, 1, "dim")) != graph_facts.example_value(softmaxed).dim() - 1:
        raise _NoMatch("the comb's softmax is not over its last axis")
    steps.append((-1, shifted[1]))  # the softmax's own "+ eps"
    return softmaxed, steps[::-1]


def _iterations(steps: list[tuple[int, float]], softmaxed: fx.Node) -> tuple[int, float]:
    """Sinkhorn iterations and eps of DeepSeek-V4's step order: softmax + eps, columns, then
    (rows, columns) repeated, every step with the same eps."""
    rank = graph_facts.example_value(softmaxed).dim()
    rows, columns = rank - 1, rank - 2
    axes = [axis for axis, _ in steps[1:]]
    expected = [columns] + [rows, columns] * ((len(axes) - 1) // 2)
    eps = {value for _, value in steps}
    if axes != expected or len(eps) != 1:
        raise _NoMatch("the comb's Sinkhorn steps are not DeepSeek-V4's (column sums first, then "
                       "rows and columns in turn, one eps)")
    return (len(axes) + 1) // 2, eps.pop()


def _gate_terms(node, what: str) -> tuple[fx.Node, fx.Node, fx.Node]:
    """(w, scale, b) of `w * scale + b`."""
    if not (isinstance(node, fx.Node) and graph_facts.is_add(node)) or graph_facts.add_operands(node) is None:
        raise _NoMatch(f"the {what} are not w * scale + base")
    for product, bias in (graph_facts.add_operands(node), graph_facts.add_operands(node)[::-1]):
        if graph_facts.is_mul(product) and len(product.args) == 2:
            left, right = (graph_facts.view_source(a) if isinstance(a, fx.Node) else a
                           for a in product.args)
            for weight, scale in ((left, right), (right, left)):
                if _is(scale, {operator.getitem}) and _is(scale.args[0], {torch.unbind}, {"unbind"}):
                    return weight, scale, graph_facts.view_source(bias)
    raise _NoMatch(f"the {what} are not w * scale + base")


def _part(node: fx.Node, container: fx.Node) -> int | None:
    """i for `container[i]` (a getitem of a split or unbind), else None."""
    if _is(node, {operator.getitem}) and node.args[0] is container:
        return node.args[1]
    return None


def _projection_parts(weight: fx.Node, scale: fx.Node, bias: fx.Node, index: int):
    """The split projection, the unbound scale and the split base the gate terms come from, each
    checked to be part `index` of [n, n, n*n] (scale: of 3)."""
    if not all(_is(node, {operator.getitem}) for node in (weight, bias)):
        raise _NoMatch("the gates do not take the (pre, post, comb) parts of one projection")
    split_proj, unbound, split_base = weight.args[0], scale.args[0], bias.args[0]
    if any(
            _part(part, whole) != index for part, whole in
            ((weight, split_proj), (scale, unbound), (bias, split_base))):
        raise _NoMatch("the gates do not take the (pre, post, comb) parts of one projection")
    for split in (split_proj, split_base):
        if not _is(split, {torch.split}, {"split"}):
            raise _NoMatch("the projection and the base are not split into (pre, post, comb)")
    if _argument(split_base, 1, "split_size") != _argument(split_proj, 1, "split_size"):
        raise _NoMatch("the base is not split as the projection is")
    return split_proj, unbound, split_base


def _projection_weight(split_proj: fx.Node, streams: fx.Node, n: int) -> fx.Node:
    """fn of `linear(rms_normalised(flatten(x)), fn)`, split into [n, n, n*n]."""
    sizes = list(_argument(split_proj, 1, "split_size", ()) or ())
    projected = split_proj.args[0]
    if sizes != [n, n, n * n] or _dim(projected, _argument(split_proj, 2, "dim", 0)) != \
            graph_facts.example_value(projected).dim() - 1:
        raise _NoMatch(f"the projection is not split into [n, n, n*n] = [{n}, {n}, {n * n}]")
    if not _is(projected, {F.linear}) or _argument(projected, 2, "bias") is not None:
        raise _NoMatch("the coefficients are not a linear projection (without bias)")
    normalised, weight = projected.args[0], graph_facts.cast_source(projected.args[1])
    _check_rms_normalised(normalised, streams)
    return weight


def _views_of(node, streams: fx.Node) -> bool:
    """Whether `node` is `streams` through views and casts (one at a time: the streams may
    themselves be a view, the chain head's expand)."""
    while isinstance(node, fx.Node) and node is not streams:
        source = graph_facts.cast_source(node)
        if source is node and node.args and (
                (node.op == "call_method" and node.target in ("view", "reshape", "flatten"))
                or (node.op == "call_function" and node.target in (torch.reshape, torch.flatten))):
            source = node.args[0]
        if source is node:
            return False
        node = source
    return node is streams


def _check_rms_normalised(node: fx.Node, streams: fx.Node) -> None:
    """`flat * rsqrt(mean(flat^2, -1) + eps)` (casts allowed) of the flattened streams, with the
    kernels' eps."""
    if graph_facts.is_mul(node) and len(node.args) == 2:
        for flat, inverse in (node.args, node.args[::-1]):
            inverse = graph_facts.cast_source(inverse) if isinstance(inverse, fx.Node) else None
            if not _views_of(flat, streams) or not _is(inverse, {torch.rsqrt}, {"rsqrt"}):
                continue
            shifted = _plus_constant(inverse.args[0])
            if shifted is None or not _is(shifted[0], {torch.mean}, {"mean"}):
                break
            mean = shifted[0]
            if _dim(mean, _argument(mean, 1, "dim")) != graph_facts.example_value(mean).dim() - 1:
                break
            squared = graph_facts.cast_source(mean.args[0])
            if (_is(squared, {torch.square}, {"square"}) or (
                    _is(squared, {torch.pow, operator.pow}, {"pow"}) and squared.args[1] == 2)) \
                    and _views_of(squared.args[0], streams):
                if shifted[1] != reference.RMS_EPS:
                    raise _NoMatch(f"the RMS norm's eps is {shifted[1]:g}; the kernels use "
                                   f"{reference.RMS_EPS:g}")
                return
    raise _NoMatch("the projection's input is not the RMS-normalised flattened streams")


def _post_and_written(update: fx.Node) -> tuple[fx.Node, fx.Node]:
    """(post, f's output) of `post[..., None] * out[..., None, :]`."""
    if graph_facts.is_mul(update) and len(update.args) == 2:
        for left, right in (update.args, update.args[::-1]):
            if _is(left, {torch.unsqueeze}, {"unsqueeze"}) and _is(right, {torch.unsqueeze}, {"unsqueeze"}):
                if _dim(left, _argument(left, 1, "dim")) == graph_facts.example_value(left).dim() - 1 and \
                        _dim(right, _argument(right, 1, "dim")) == graph_facts.example_value(right).dim() - 2:
                    return graph_facts.cast_source(left.args[0]), right.args[0]
    raise _NoMatch("the update is not post[..., None] * f(...)[..., None, :]")


def _two_sigmoid(post: fx.Node) -> fx.Node:
    if graph_facts.is_mul(post) and len(post.args) == 2:
        for constant, sigmoid in (post.args, post.args[::-1]):
            if constant == 2 and _is(sigmoid, {torch.sigmoid, F.sigmoid}, {"sigmoid"}):
                return sigmoid.args[0]
    raise _NoMatch("post is not 2 * sigmoid(...)")


def _collapsed(streams: fx.Node, split_proj: fx.Node, unbound: fx.Node, split_base: fx.Node,
               eps: float, mix: fx.Node) -> fx.Node:
    """f's input `sum(pre[..., None] * x, stream axis)` with pre = sigmoid(pre logits) + eps; the
    streams read by nothing else than it, the projection and the mix."""
    stream_axis = graph_facts.example_value(streams).dim() - 2
    for product in streams.users:
        if not graph_facts.is_mul(product) or len(product.args) != 2:
            continue
        gate = product.args[1] if product.args[0] is streams else product.args[0]
        if not _is(gate, {torch.unsqueeze}, {"unsqueeze"}):
            continue
        shifted = _plus_constant(gate.args[0])
        if shifted is None or shifted[1] != eps or not _is(shifted[0], {torch.sigmoid, F.sigmoid}, {"sigmoid"}):
            raise _NoMatch("pre is not sigmoid(...) + eps with the comb's eps")
        pre_w, pre_scale, pre_b = _gate_terms(shifted[0].args[0], "pre logits")
        if (_part(pre_w, split_proj), _part(pre_scale, unbound), _part(pre_b, split_base)) != (0, 0, 0):
            raise _NoMatch("pre's gate does not read the projection, scale and base of the comb's")
        users = list(product.users)
        if len(users) != 1 or not _is(users[0], *_SUM) or \
                _dim(product, _argument(users[0], 1, "dim")) != stream_axis:
            raise _NoMatch("the pre-mix is not a sum over the streams")
        collapsed = users[0]
        cast = list(collapsed.users)
        if len(cast) == 1 and graph_facts.cast_source(cast[0]) is collapsed:
            collapsed = cast[0]
        readers = set(streams.users) - {product, mix}
        if len(readers) != 1 or not _is(next(iter(readers)), {torch.reshape, torch.flatten},
                                         {"view", "reshape", "flatten"}):
            raise _NoMatch("the streams are read by more than the coefficients, the pre-mix and "
                           "the mix")
        return collapsed
    raise _NoMatch("no pre-mix sum(pre[..., None] * x) reads the streams")


def _check_parameters(parameters: set[fx.Node], fn: fx.Node, base: fx.Node, scale: fx.Node,
                      n: int, channels: int) -> None:
    """fn [(n+2)n, nC], base [(n+2)n], scale [3]: the model's parameters (graph inputs)."""
    expected = {fn: ((n + 2) * n, n * channels), base: ((n + 2) * n,), scale: (3,)}
    for node, shape in expected.items():
        if node not in parameters or tuple(graph_facts.example_value(node).shape) != shape:
            raise _NoMatch(f"the hyper-connection's weights are not parameters of shapes "
                           f"fn {expected[fn]}, base {expected[base]}, scale (3,)")
