"""What the backend found and did: data first (filled during compilation), rendered separately."""

from __future__ import annotations

import dataclasses
import enum
import json
from dataclasses import dataclass, field
from typing import Any


class SkipReason(enum.Enum):
    """Why a residual block stays a plain residual. The value is the sentence the report prints."""

    EXCLUDED = "excluded by the include/exclude options"
    PROJECTION_SHORTCUT = "projection shortcut: the skip path is conv(x), not x, so no stream passes"
    BROADCAST = "x and f(x) differ in shape (broadcasting add)"
    DTYPE_MISMATCH = "x and f(x) differ in dtype"
    NESTED = "f contains other residual blocks (those are rewritten instead)"
    SHARED_BODY = "f shares nodes with another residual block"
    INPLACE_INPUT = "in-place add mutates a graph input; rewriting it would drop the mutation"
    INPLACE_ALIAS = "in-place add whose target is read again after the add"
    DYNAMIC_CHANNELS = "the channel dimension is dynamic; mHC parameters need a fixed width"
    SCALAR_SHAPE = "x is a scalar; there is no channel dimension to widen"
    NO_OWNER_MODULE = (
        "f's weights belong to no module this compile can see, so there is nowhere to keep mHC "
        "parameters: compile the nn.Module itself, or call mhc_compile.prepare(model, ...) first")
    GRAPH_BREAK = (
        "x + f(x) is split by a graph break: f(x) was computed in an earlier graph and this add "
        "only sees two graph inputs. Remove the break between f and the add (print, .item(), "
        "data-dependent Python; TORCH_LOGS=graph_breaks lists them) to have it rewritten")
    HYPER_CONNECTION = (
        "the model already has hyper-connections here (its own n residual streams, mixed by a "
        "learned n x n matrix); left as the model wrote it")


@dataclass
class BlockReport:
    """One residual block `x + f(x)` found in a traced graph."""

    path: str  # module path of the add, from the graph's nn_module_stack ("" is the root)
    key: str  # stable site key: module path of f's first parameterised op; names the parameters
    status: str  # "rewritten", "lowered" (the model's own hyper-connection) or "skipped"
    reason: str  # why skipped, or what was lowered ("" when rewritten)
    graph: int  # index of the traced graph (graph breaks make several)
    chain: int | None  # chain index within its graph (None when skipped)
    position: int | None  # position within its chain
    shape: tuple[int | str, ...]
    dtype: str
    pattern: str  # "residual", "parallel residual", "scaled residual", "in-place residual"
    contains: tuple[str, ...]  # what f holds: attention, mlp, moe, conv, linear, norm
    params_added: int
    extra_bytes_per_token: int  # forward, as the fused kernels move it, less the plain add (spec.py)
    extra_flops_per_token: int  # forward: projection, Sinkhorn, mixes
    ops: str = ""  # what the mhc:: ops run: "triton kernels" or "reference (why)"; "" when skipped
    where: str = ""  # the user's source line of the add ("model.py:42"), where Dynamo recorded it


@dataclass
class Report:
    """Every residual block of every graph one compilation traced."""

    n: int
    constraint: str
    blocks: list[BlockReport] = field(default_factory=list)

    @property
    def rewritten(self) -> list[BlockReport]:
        return [b for b in self.blocks if b.status == "rewritten"]

    @property
    def skipped(self) -> list[BlockReport]:
        return [b for b in self.blocks if b.status == "skipped"]

    @property
    def lowered(self) -> list[BlockReport]:
        """The model's own hyper-connections, run on the mhc:: ops."""
        return [b for b in self.blocks if b.status == "lowered"]

    @property
    def params_added(self) -> int:
        return sum(b.params_added for b in self.rewritten)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def summary(self) -> str:
        chains = len({(b.graph, b.chain) for b in self.rewritten})
        lowered = (f", {_count(len(self.lowered), 'existing hyper-connection')} lowered"
                   if self.lowered else "")
        return (
            f"mHC n={self.n} ({self.constraint}): {_count(len(self.rewritten), 'block')} rewritten "
            f"in {_count(chains, 'chain')}{lowered}, {len(self.skipped)} skipped, "
            f"{self.params_added:,} parameters added"
        )

    def __rich__(self):
        table = rich_table(self.summary(), ("path", "f", "status", "chain", "shape", "contains",
                                            "params", "+B/tok", "+flop/tok", "ops", "reason"))
        for block in self.blocks:
            chain = "" if block.chain is None else f"g{block.graph}.c{block.chain}[{block.position}]"
            table.add_row(
                block.path or "<root>", block.key, block.status, chain,
                "x".join(map(str, block.shape)) + f" {block.dtype}", ", ".join(block.contains),
                f"{block.params_added:,}", f"{block.extra_bytes_per_token:,}",
                f"{block.extra_flops_per_token:,}", block.ops,
                f"{block.reason} (at {block.where})" if block.reason and block.where else block.reason,
            )
        return table

    def print(self, file=None) -> None:
        print_rich(self, file)


def rich_table(title: str, columns: tuple[str, ...]):
    """A rich Table with a left-aligned title and columns that fold long cells."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column, overflow="fold")
    return table


def print_rich(renderable: Any, file=None) -> None:
    import sys

    from rich.console import Console

    stream = file or sys.stdout
    # Piped output (CI logs, files) gets a wide table instead of rich's 80-column default.
    Console(file=stream, width=None if stream.isatty() else 180).print(renderable)


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")
