"""What the passes need to know about the nodes of a Dynamo graph (torch-level FX).

Dynamo records Python-level calls: `operator.add`, `torch.nn.functional.linear`, `Tensor.add_`
as call_method, and so on. These tables name the ones the passes treat specially.
"""

from __future__ import annotations

import operator
import re

import torch
import torch.nn.functional as F
from torch import fx

_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add, torch.Tensor.add, torch.Tensor.add_}
_ADD_METHODS = {"add", "add_", "__add__", "__iadd__"}
_INPLACE = {operator.iadd, torch.Tensor.add_, "add_", "__iadd__"}

_WEIGHTED_FUNCTIONS = {
    F.linear, F.bilinear, torch.matmul, operator.matmul, torch.mm, torch.bmm, torch.addmm,
    torch.baddbmm, torch.einsum, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d,
    F.conv_transpose2d, F.conv_transpose3d,
    F.multi_head_attention_forward,  # nn.MultiheadAttention: its projections inside one call
}
_WEIGHTED_METHODS = {"matmul", "mm", "bmm", "__matmul__", "addmm", "baddbmm"}
_CONV_FUNCTIONS = {F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d,
                   F.conv_transpose3d}
_CONV_TRANSPOSE_FUNCTIONS = {F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d}
_LINEAR_FUNCTIONS = {F.linear}
_NORM_FUNCTIONS = {F.layer_norm, F.group_norm, F.batch_norm, F.instance_norm, F.rms_norm}
_ATTENTION_FUNCTIONS = {F.scaled_dot_product_attention, F.softmax, torch.softmax,
                        F.multi_head_attention_forward}
_ROUTING_FUNCTIONS = {torch.topk}

# Elementwise ops that commute with replicating a tensor into n streams: applied to each stream,
# equal streams stay equal and their mean is the original result. Dropout is left out on purpose:
# n independent masks would change the function.
_STREAMWISE_FUNCTIONS = {
    torch.relu, F.relu, F.gelu, F.silu, F.mish, F.elu, F.leaky_relu, F.hardtanh, F.relu6,
    torch.tanh, torch.sigmoid, F.tanh, F.sigmoid,
}
_STREAMWISE_METHODS = {"relu", "relu_", "tanh", "sigmoid"}
_CHANNEL_NORMS = {F.layer_norm, F.rms_norm}


def is_add(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _ADD_FUNCTIONS
    return node.op == "call_method" and node.target in _ADD_METHODS


def is_mul(node: fx.Node) -> bool:
    """`gamma * f(x)`: the branch of a scaled residual (LayerScale, ReZero)."""
    if node.op == "call_function":
        return node.target in (operator.mul, torch.mul)
    return node.op == "call_method" and node.target in ("mul", "__mul__")


def is_inplace(node: fx.Node) -> bool:
    return node.target in _INPLACE


_VIEW_METHODS = {"view", "reshape", "transpose", "permute", "unsqueeze", "squeeze", "flatten",
                 "expand", "narrow", "select", "t", "unflatten", "view_as", "__getitem__"}
_VIEW_FUNCTIONS = {operator.getitem, torch.reshape, torch.transpose, torch.permute,
                   torch.unsqueeze, torch.squeeze, torch.flatten, torch.narrow, torch.select}


def aliases_graph_input(node: fx.Node) -> bool:
    """True if `node` may share storage with a graph input: the input itself, a view of it, or the
    result of an in-place op on it. Mutating such a node mutates the caller's tensor."""
    while True:
        if node.op == "placeholder":
            return True
        through = (
            is_inplace(node)
            or (node.op == "call_method" and node.target in _VIEW_METHODS)
            or (node.op == "call_function" and node.target in _VIEW_FUNCTIONS)
        )
        if not through or not node.args or not isinstance(node.args[0], fx.Node):
            return False
        node = node.args[0]


def add_operands(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """The two tensor operands of an add, or None (a scalar operand, an `alpha`, an `out=`)."""
    if len(node.args) != 2 or set(node.kwargs) - {"alpha"}:
        return None
    if node.kwargs.get("alpha", 1) != 1:
        return None
    left, right = node.args
    if isinstance(left, fx.Node) and isinstance(right, fx.Node):
        return left, right
    return None


_MATMUL_FUNCTIONS = {torch.matmul, operator.matmul, torch.bmm}
_MATMUL_METHODS = {"matmul", "bmm", "__matmul__"}


def is_matmul(node: fx.Node) -> bool:
    """A batched matrix product of two tensors (`a @ b`), no linear or convolution."""
    if node.op == "call_function":
        return node.target in _MATMUL_FUNCTIONS
    return node.op == "call_method" and node.target in _MATMUL_METHODS


def is_weighted(node: fx.Node, graph_module: fx.GraphModule) -> bool:
    """A matmul, linear or convolution (a call_module when Dynamo kept modules as such)."""
    if node.op == "call_function":
        return node.target in _WEIGHTED_FUNCTIONS
    if node.op == "call_method":
        return node.target in _WEIGHTED_METHODS
    if node.op == "call_module":
        return any(True for _ in graph_module.get_submodule(node.target).parameters())
    return False


def kinds_of(nodes, graph_module: fx.GraphModule) -> tuple[str, ...]:
    """What a block's f holds, for the report: attention, moe, conv, mlp, linear, norm."""
    kinds = set()
    linears = 0
    for node in nodes:
        target = node.target
        if node.op == "call_module":
            module = graph_module.get_submodule(target)
            target = {torch.nn.Linear: F.linear, torch.nn.Conv2d: F.conv2d}.get(type(module))
        if target in _ATTENTION_FUNCTIONS or target == "softmax":
            kinds.add("attention")
        if target in _ROUTING_FUNCTIONS or target == "topk":
            kinds.add("moe")
        if target in _CONV_FUNCTIONS:
            kinds.add("conv")
        if target in _NORM_FUNCTIONS:
            kinds.add("norm")
        linears += target in _LINEAR_FUNCTIONS
    if linears:
        kinds.add("mlp" if linears >= 2 and not kinds & {"attention", "moe"} else "linear")
    order = ("attention", "moe", "mlp", "conv", "linear", "norm")
    return tuple(kind for kind in order if kind in kinds)


def projection_source(node: fx.Node) -> fx.Node | None:
    """x for a shortcut `conv(x)` or `norm(conv(x))`; None for anything else."""
    if node.op == "call_function" and node.target in _NORM_FUNCTIONS and node.args:
        node = node.args[0]
    if node.op == "call_function" and node.target in _CONV_FUNCTIONS and node.args:
        source = node.args[0]
        return source if isinstance(source, fx.Node) else None
    return None


def convolves_channels_first(nodes, value) -> bool:
    """Whether a convolution among `nodes` reads a tensor shaped like `value` with its channels on
    dim 1 (ResNet, ConvNeXt: [B, C, H, W]). A token mixer's causal Conv1d (Mamba, LFM2,
    Qwen3-Next) convolves a transposed [B, C', T] copy of a [B, T, C] residual, which is not."""
    for node in nodes:
        if node.op != "call_function" or node.target not in _CONV_FUNCTIONS or len(node.args) < 2:
            continue
        source, weight = (example_value(a) if isinstance(a, fx.Node) else None for a in node.args[:2])
        if source is None or weight is None or tuple(source.shape) != tuple(value.shape):
            continue
        groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
        transposed = node.target in _CONV_TRANSPOSE_FUNCTIONS
        in_channels = weight.shape[0] if transposed else weight.shape[1] * groups
        if in_channels == value.shape[1]:
            return True
    return False


def is_streamwise(node: fx.Node, channels_last: bool, channels: int) -> bool:
    """True if `node` applied to each stream of [..., n, C] gives the per-stream result."""
    if node.op == "call_method":
        return node.target in _STREAMWISE_METHODS and len(node.args) == 1
    if node.op != "call_function":
        return False
    if node.target in _STREAMWISE_FUNCTIONS:
        return True
    if node.target in _CHANNEL_NORMS and channels_last:
        normalized_shape = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")
        return tuple(normalized_shape or ()) == (channels,)
    return False


_VIEW_METHODS = {"view", "reshape", "contiguous", "to", "type_as", "flatten", "squeeze", "unsqueeze"}
_VIEW_FUNCTIONS = {torch.reshape, torch.flatten, torch.squeeze, torch.unsqueeze}


def view_source(node: fx.Node) -> fx.Node:
    """The node a chain of reshapes, views and casts starts from (`out.reshape(x.shape)` -> out)."""
    while ((node.op == "call_method" and node.target in _VIEW_METHODS)
           or (node.op == "call_function" and node.target in _VIEW_FUNCTIONS)):
        if not node.args or not isinstance(node.args[0], fx.Node):
            break
        node = node.args[0]
    return node


_CAST_METHODS = {"to", "type_as", "float", "double", "half", "bfloat16"}


def cast_source(node: fx.Node) -> fx.Node:
    """x for `x.to(dtype)` and its spellings (`residual.to(torch.float32) + f(x)`: Mamba keeps
    its residual in float32), else the node itself."""
    if node.op == "call_method" and node.target in _CAST_METHODS and node.args:
        source = node.args[0]
        if isinstance(source, fx.Node):
            return source
    return node


def example_value(node: fx.Node):
    """Dynamo's fake tensor for a node (`example_value`), or the post-trace `val`."""
    return node.meta.get("example_value", node.meta.get("val"))


# Dynamo's name of the object a module path starts from: "L['self']", "G['model']", or
# "L['args'][0]" when a decorator's wrapper is the frame (transformers 5 wraps forward so).
_ROOT = re.compile(r"^(?:L|G)\[['\"][^'\"]+['\"]\](?:\[[^\]]+\])*")


def module_path(node: fx.Node) -> str | None:
    """Dotted path of the innermost module whose forward made `node`, below the object the
    compiled frame reached it through ("layers.0.attn"). For reports and include/exclude
    patterns only: which module owns a weight is decided by identity (mhc_compile/owners.py)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    qualified, _ = list(stack.values())[-1]
    return dotted_path(qualified)


def dotted_path(qualified: str) -> str | None:
    """"L['self'].layers.0" or "L['args'][0]._modules['layers']._modules['0']" -> "layers.0"."""
    match = _ROOT.match(qualified)
    if match is None:
        return None
    rest = qualified[match.end():]
    rest = re.sub(r"\._modules\[['\"]([^'\"]+)['\"]\]", r".\1", rest)
    rest = re.sub(r"\[(\d+)\]", r".\1", rest)
    return rest.lstrip(".")


_FRAME_LINE = re.compile(r'File "([^"]+)", line (\d+)')


def source_line(node: fx.Node) -> str:
    """"file.py:42": the innermost user frame Dynamo recorded for the node, or ""."""
    frames = _FRAME_LINE.findall(node.meta.get("stack_trace") or "")
    if not frames:
        return ""
    path, line = frames[-1]
    return f"{path.rsplit('/', 1)[-1]}:{line}"
