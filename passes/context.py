"""What the passes of one graph share: the options, and what earlier passes found or added."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from torch import fx

from mhc_compile.options import MHCOptions

if TYPE_CHECKING:
    from mhc_compile.passes.find_residual_blocks import ResidualAnalysis, ResidualBlock
    from mhc_compile.spec import BlockParameters


@dataclass
class PassContext:
    """Handed to every pass with its graph.

    options: the mHC options of the compile.
    parameter_inputs: the Dynamo graph's placeholders that are the model's Parameters (analysis).
    site_key: a block's first weight -> the key its mHC parameters are stored under, or None when
        no module owns it (analysis; the backend resolves it from the call's arguments).
    analysis: the residual blocks and chains (set by find_residual_chains).
    parameter_nodes: each rewritten block's mHC parameter placeholders (set by the backend).
    hyper_connections: each block the model writes as a hyper-connection -> its match for lowering
        (match_hyper_connections.DeepseekV4Site) or why it has none (set by match_hyper_connections).
    """

    options: MHCOptions
    parameter_inputs: set[fx.Node] = field(default_factory=set)
    site_key: Callable[[fx.Node], str | None] = lambda weight: None
    analysis: ResidualAnalysis | None = None
    parameter_nodes: dict[ResidualBlock, BlockParameters[fx.Node]] = field(default_factory=dict)
    hyper_connections: dict[ResidualBlock, object] = field(default_factory=dict)
