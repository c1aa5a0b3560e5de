"""The mHC paper's stability instrument: the Amax gain magnitude of H_res across depth.

mHC paper (arXiv 2512.24880, Sec. 3.1, Fig. 3 and 7): for the single-layer mapping H_res of block l
and for the composite mapping H_res^{L-1} ... H_res^{l+1} H_res^{l} (from block l to the chain's
last block), the forward gain is the maximum absolute row sum (how much a signal entering the
streams can grow on its way to the end) and the backward gain the maximum absolute column sum (the
same for a gradient flowing back). Doubly stochastic matrices have both equal to 1, and so do their
products; unconstrained hyper-connections' can grow with depth (paper: ~3000 at 27B).

Choices where the paper is terse:
- H_res depends on the token (it is computed from that token's streams), so every gain is computed
  per token of the batch, and reported as the mean over tokens (the paper's Fig. 3 averages over
  the tokens of a sequence, as we read its caption) and as the max over tokens (the worst token).
  The product runs per token: the token's own H_res at every block.
- The coefficients are those the model computes: the rewritten graph runs once (eager, without
  Inductor; the mhc:: ops, so the GPU kernels on CUDA) with a tap after every block's
  mhc::coefficients_pre_mix op, on the real streams of the batch. Nothing is re-derived.
- A chain is the unit: its streams are reduced at its tail, so no product crosses a chain's end
  (a graph break ends a chain). A chain that runs several times in one forward (a compiled frame
  Dynamo reuses for several module instances) gives one ChainGain per run.

    report = mhc_compile.gain(model, *example_args)   # a prepared, compiled or loaded model
    report.print()                                    # rich table; report.to_json() for data
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import torch
from torch import fx, nn

from mhc_compile import ops, private_apis, spec
from mhc_compile.backend import GraphRecord, GraphTracer, bind_and_rewrite, compile_graph
from mhc_compile.options import MHCOptions
from mhc_compile.parameters import SUBMODULE, MHCParameters
from mhc_compile.quiet import run_without_side_effects, split_keywords
from mhc_compile.report import print_rich, rich_table

log = logging.getLogger("mhc_compile")

# The options that decide what a block's coefficients are, besides its tensors.
_STORED_OPTIONS = ("n", "constraint", "sinkhorn_iters")


# --- the measure -----------------------------------------------------------------------------------


def amax_gain(h_res: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """h_res [..., n, n] -> (forward [...], backward [...]): max |row sum|, max |column sum|.

    Row i of H_res says how stream i of the output mixes the inputs (forward signal); column j how
    the gradient of every output reaches input stream j (backward).
    """
    magnitude = h_res.abs()
    return magnitude.sum(dim=-1).amax(dim=-1), magnitude.sum(dim=-2).amax(dim=-1)


def composite_mappings(h_res: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Per block l of a chain of L blocks, H_res^{L-1} @ ... @ H_res^{l}: [tokens, n, n], float64.

    h_res holds each block's [tokens, n, n] in chain order; x_{l+1} = H_res^{l} x_l + ..., so the
    mapping from block l's input to the chain's output multiplies the later blocks on the left.
    """
    products: list[torch.Tensor] = []
    for mapping in reversed(h_res):
        mapping = mapping.to(torch.float64)
        products.append(mapping if not products else products[-1] @ mapping)
    return products[::-1]


# --- the data (rendered by rich separately) --------------------------------------------------------


@dataclass
class Gain:
    """Amax gain of one mapping over the tokens of a batch."""

    forward_mean: float  # max |row sum|, mean over tokens
    forward_max: float  # max |row sum|, worst token
    backward_mean: float  # max |column sum|, mean over tokens
    backward_max: float  # max |column sum|, worst token

    @property
    def largest_mean(self) -> float:
        return max(self.forward_mean, self.backward_mean)

    @property
    def largest_max(self) -> float:
        return max(self.forward_max, self.backward_max)


@dataclass
class Spread:
    """How one coefficient (H_pre or H_post) spreads over all tokens and streams of the batch."""

    min: float
    mean: float
    max: float
    std: float


@dataclass
class BlockGain:
    key: str  # the block's site key (its parameters' name: `blocks.3.attn.qkv`)
    position: int  # position in its chain
    single: Gain  # this block's H_res alone
    composite: Gain  # H_res from this block to the chain's last block
    h_pre: Spread
    h_post: Spread


@dataclass
class ChainGain:
    graph: int  # index of the traced graph (graph breaks make several)
    chain: int  # chain index within its graph
    run: int  # which execution of this chain in the forward (frames reused for several modules)
    tokens: int  # tokens of the batch the gains are taken over
    blocks: list[BlockGain]

    @property
    def whole(self) -> Gain:
        """The composite mapping of the whole chain, first block to last."""
        return self.blocks[0].composite

    @property
    def label(self) -> str:
        return f"g{self.graph}.c{self.chain}" + (f"#{self.run}" if self.run else "")


@dataclass
class GainReport:
    """The Amax gains of every chain a model ran on one batch."""

    n: int
    constraint: str
    sinkhorn_iters: int
    chains: list[ChainGain] = field(default_factory=list)

    @property
    def largest_mean(self) -> float:
        """The largest composite gain (forward or backward, any block) averaged over tokens."""
        return max(b.composite.largest_mean for c in self.chains for b in c.blocks)

    @property
    def largest_max(self) -> float:
        """The largest composite gain of any single token."""
        return max(b.composite.largest_max for c in self.chains for b in c.blocks)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["largest_mean"], data["largest_max"] = self.largest_mean, self.largest_max
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def summary(self) -> str:
        blocks = sum(len(c.blocks) for c in self.chains)
        return (
            f"mHC gain n={self.n} ({self.constraint}), {blocks} blocks in {len(self.chains)} "
            f"chain run(s): largest composite Amax gain {self.largest_mean:.4g} (mean over tokens), "
            f"{self.largest_max:.4g} (worst token)"
        )

    def __rich__(self):
        table = rich_table(self.summary(), (
            "chain", "block", "H_res fwd/bwd", "to end fwd/bwd (mean)", "to end fwd/bwd (worst)",
            "H_pre min/mean/max", "H_post min/mean/max"))
        for chain in self.chains:
            for block in chain.blocks:
                table.add_row(
                    f"{chain.label}[{block.position}]", block.key or "<root>",
                    _pair(block.single.forward_mean, block.single.backward_mean),
                    _pair(block.composite.forward_mean, block.composite.backward_mean),
                    _pair(block.composite.forward_max, block.composite.backward_max),
                    _spread(block.h_pre), _spread(block.h_post),
                )
        return table

    def print(self, file=None) -> None:
        print_rich(self, file)


def _pair(forward: float, backward: float) -> str:
    return f"{forward:.4g} / {backward:.4g}"


def _spread(spread: Spread) -> str:
    return f"{spread.min:.3f} / {spread.mean:.3f} / {spread.max:.3f}"


# --- recording the coefficients the model computes -------------------------------------------------


class _Tapped(NamedTuple):
    graph: int
    chain: int
    position: int
    key: str  # of the instance that ran: one compiled frame may serve several (a reused frame)
    h_pre: torch.Tensor  # [..., n]
    h_post: torch.Tensor  # [..., n]
    h_res: torch.Tensor  # [..., n, n]


class _CoefficientTaps:
    """The probe's step on each rewritten graph: after every block's mhc::coefficients_pre_mix
    node, a call that keeps the op's coefficients. It runs in the eager rewritten graph only
    (never under Inductor)."""

    def __init__(self, model: nn.Module):
        self.records: list[_Tapped] = []
        self.model = model
        self.keys: dict[int, str] = {}

    def key_of(self, phi: torch.Tensor) -> str:
        """The site key of the block whose phi this is, in whichever instance ran."""
        if id(phi) not in self.keys:  # created during this run (GainProbe reports it)
            self.keys = {id(block.phi): block.key for store in _stores(self.model)
                         for block in store.blocks.values()}
        return self.keys[id(phi)]

    def __call__(self, record: GraphRecord) -> Callable:
        """Bind, rewrite and tap the record's graph; returns it, to run eagerly."""
        bind_and_rewrite(record)
        if record.rewritten:
            self._tap_coefficients(record.graph_module, record.index, record.analysis.chains,
                                   record.context.parameter_nodes)
        return compile_graph(record)

    def _tap_coefficients(self, graph_module: fx.GraphModule, graph_index: int, chains,
                          parameter_nodes) -> None:
        site_of = {
            parameter_nodes[block].phi: (chain_index, position, block.key)
            for chain_index, chain in enumerate(chains)
            for position, block in enumerate(chain.blocks)
        }
        graph = graph_module.graph
        for node in list(graph.nodes):
            if ops.spec_of(node.target) is not spec.COEFFICIENTS_PRE_MIX:
                continue
            phi = next(arg for arg in node.args if arg in site_of)
            with graph.inserting_after(node):
                graph.call_function(self._tap(graph_index, *site_of.pop(phi)[:2]), (node, phi))
        if site_of:
            raise RuntimeError(
                "mhc gain: no coefficients op found in the rewritten graph for block(s) "
                f"{', '.join(key for _, _, key in site_of.values())}; the rewrite and gain.py disagree"
            )
        graph_module.recompile()

    def _tap(self, graph_index: int, chain: int, position: int) -> Callable:
        records, key_of = self.records, self.key_of

        def mhc_gain_tap(outputs, phi):
            h_pre, h_post, h_res = outputs[:3]
            records.append(_Tapped(graph_index, chain, position, key_of(phi), h_pre, h_post, h_res))

        return mhc_gain_tap


def _chain_runs(records: Sequence[_Tapped]) -> list[list[_Tapped]]:
    """Group the taps of one forward into chain executions (a chain starts at position 0)."""
    runs: list[list[_Tapped]] = []
    open_runs: dict[tuple[int, int], list[_Tapped]] = {}
    for record in records:
        site = (record.graph, record.chain)
        if record.position == 0:
            open_runs[site] = []
            runs.append(open_runs[site])
        run = open_runs.get(site)
        if run is None or record.position != len(run):
            raise RuntimeError(f"mhc gain: block {record.key!r} ran out of its chain's order")
        run.append(record)
    return runs


def _summarize(records: Sequence[_Tapped], options: MHCOptions) -> GainReport:
    report = GainReport(options.n, options.constraint, options.sinkhorn_iters)
    executions: dict[tuple[int, int], int] = {}
    for run in _chain_runs(records):
        site = (run[0].graph, run[0].chain)
        executions[site] = executions.get(site, -1) + 1
        report.chains.append(_chain_gain(run, executions[site], options.n))
    return report


def _chain_gain(run: Sequence[_Tapped], execution: int, n: int) -> ChainGain:
    h_res = [record.h_res.reshape(-1, n, n) for record in run]
    rows = [
        torch.cat([_gain_figures(single), _gain_figures(composite),
                   _spread_figures(record.h_pre), _spread_figures(record.h_post)])
        for record, single, composite in zip(run, h_res, composite_mappings(h_res))
    ]
    table = torch.stack(rows).tolist()  # one device sync for the whole chain
    blocks = [
        BlockGain(record.key, record.position, Gain(*row[0:4]), Gain(*row[4:8]),
                  Spread(*row[8:12]), Spread(*row[12:16]))
        for record, row in zip(run, table)
    ]
    return ChainGain(run[0].graph, run[0].chain, execution, h_res[0].shape[0], blocks)


def _gain_figures(mapping: torch.Tensor) -> torch.Tensor:
    forward, backward = amax_gain(mapping.to(torch.float64))
    return torch.stack([forward.mean(), forward.amax(), backward.mean(), backward.amax()])


def _spread_figures(coefficient: torch.Tensor) -> torch.Tensor:
    values = coefficient.to(torch.float64).flatten()
    return torch.stack([values.amin(), values.mean(), values.amax(), values.std(correction=0)])


# --- the probe, the API and the training callback ---------------------------------------------------


class GainProbe:
    """Measures the Amax gains of a model that has mHC parameters, on any batch, repeatedly.

    The model must have been prepared (`mhc_compile.prepare`, then any checkpoint loaded) or run
    compiled with backend="mhc". n, constraint and sinkhorn_iters are read from its parameters;
    pass include/exclude if the model was prepared with them. The probe compiles the model once
    per input shape with a recording backend (eager rewritten graph, no Inductor), beside any
    compiled copy used for training (Dynamo keeps one cache entry per backend).
    """

    def __init__(self, model: nn.Module, **options: Any):
        if not isinstance(model, nn.Module):
            raise TypeError(f"mhc gain expects an nn.Module, got {type(model).__name__}")
        if private_apis.is_compiled_module(model):
            raise TypeError(
                "mhc gain: pass the model itself, not the module torch.compile returned; "
                "the probe compiles the model with its own recording backend"
            )
        self.model = model
        self.options = _stored_options(model, options).replace(eager=True)
        self._taps = _CoefficientTaps(model)
        backend = GraphTracer(self.options, self._taps, top_module=model)
        self.backend = backend  # its .report lists the blocks of every trace
        self._compiled = torch.compile(model, backend=backend, dynamic=False)

    def __call__(self, /, *args: Any, **kwargs: Any) -> GainReport:
        """The gains on this batch; args and kwargs are the model's forward arguments (its
        keywords too: attention_mask, pixel_values); the options were given to the probe."""
        stores_before = _block_names(self.model)
        self._taps.records.clear()
        try:
            with private_apis.falling_back_past_recompile_limit():
                run_without_side_effects(self.model, self._compiled, args, kwargs)
        finally:
            created = _remove_created_blocks(self.model, stores_before)
        records = list(self._taps.records)  # the taps keep appending to this same list
        self._taps.records.clear()
        if created:
            raise ValueError(
                f"mhc gain: block(s) {', '.join(created)} have no mHC parameters on this model: "
                "this batch took a code path the model was not prepared with, or include/exclude "
                "differ from the ones it was prepared with. Prepare the model with such a batch "
                "and the same options (mhc_compile.prepare) before measuring."
            )
        if not records:
            raise RuntimeError(
                "mhc gain: no mHC coefficients were recorded: the model ran without the rewrite. "
                "torch.compile falls back to eager past its recompile limit (8 entries per "
                "forward): each mhc_compile.gain/prepare/report call and each batch shape adds "
                "one. Reuse one GainProbe or GainLogger on batches of one shape, or call "
                "torch.compiler.reset() first."
            )
        return _summarize(records, self.options)


class GainLogger:
    """Training callback: every `every` steps, the Amax gains of the model on a batch you pass.

    Cheap by construction: it runs outside the compiled training step, which stays one graph and
    is not changed (no side outputs, no graph break, no extra work on the other steps). On the
    steps it logs it runs one forward pass under no_grad through the eager rewritten graph; a few
    sequences suffice. Pass the same shape every time (the probe is traced once per shape).

        logger = GainLogger(model, every=50)
        for step, (inputs, targets) in enumerate(batches):
            logger(step, inputs[:8], attention_mask=mask[:8])   # the model's arguments
            ...train step with the compiled model...
        logger.largest_mean, logger.history

    log: called as log(step, report) on each measurement; by default a line at INFO level on
    the "mhc_compile" logger.
    """

    def __init__(self, model: nn.Module, every: int,
                 log: Callable[[int, GainReport], None] | None = None, **options: Any):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"mhc GainLogger: every must be a positive integer, got {every!r}")
        self.every = every
        self.probe = GainProbe(model, **options)
        self.log = log or _log_summary
        self.history: list[tuple[int, GainReport]] = []

    def __call__(self, step: int, /, *args: Any, **kwargs: Any) -> GainReport | None:
        """Measure on the model's forward arguments `args` and `kwargs` if `step` is a multiple
        of `every`; returns the report, else None."""
        if step % self.every:
            return None
        report = self.probe(*args, **kwargs)
        self.history.append((step, report))
        self.log(step, report)
        return report

    @property
    def largest_mean(self) -> float:
        """The largest composite gain (mean over tokens) seen so far; 0 before any measurement."""
        return max((report.largest_mean for _, report in self.history), default=0.0)

    @property
    def largest_max(self) -> float:
        """The largest composite gain of any token seen so far."""
        return max((report.largest_max for _, report in self.history), default=0.0)


def _log_summary(step: int, report: GainReport) -> None:
    log.info("step %d: %s", step, report.summary())


def _stores(model: nn.Module) -> list[MHCParameters]:
    return [module for module in model.modules() if isinstance(module, MHCParameters)]


def _stored_options(model: nn.Module, options: dict[str, Any]) -> MHCOptions:
    """The options the model's mHC parameters were created with, checked against `options`."""
    blocks = [block for store in _stores(model) for block in store.blocks.values()]
    if not blocks:
        raise ValueError(
            f"mhc gain: {type(model).__name__} has no mHC parameters. Call "
            "mhc_compile.prepare(model, *example_args, options=...) first (then load a checkpoint, "
            "if any), or run the model compiled with backend='mhc' once."
        )
    settings = {tuple(getattr(block, name) for name in _STORED_OPTIONS) for block in blocks}
    if len(settings) > 1:
        raise ValueError(
            f"mhc gain: the model's mHC blocks were created with different (n, constraint, "
            f"sinkhorn_iters): {sorted(settings)}; the gain of their chain is not defined"
        )
    stored = dict(zip(_STORED_OPTIONS, settings.pop()))
    for name, value in stored.items():
        if name in options and options[name] != value:
            raise ValueError(
                f"mhc gain: the model's mHC parameters were created with {name}={value!r}, but "
                f"{name}={options[name]!r} was asked for; the gain is measured on the mapping the "
                "model computes. Leave the option out."
            )
    return MHCOptions.from_kwargs(**{**options, **stored})


def _block_names(model: nn.Module) -> dict[int, set[str]]:
    return {id(store): set(store.blocks) for store in _stores(model)}


def _remove_created_blocks(model: nn.Module, before: dict[int, set[str]]) -> list[str]:
    """Undo parameters the probe's trace created (a diagnostic must not add any); their names."""
    created = []
    for owner in list(model.modules()):
        store = getattr(owner, SUBMODULE, None)
        if not isinstance(store, MHCParameters):
            continue
        new = sorted(set(store.blocks) - before.get(id(store), set()))
        for name in new:
            del store.blocks[name]
        created.extend(new)
        if id(store) not in before:
            delattr(owner, SUBMODULE)
    return created


def gain(model: nn.Module, /, *example_args: Any, options: Mapping[str, Any] | None = None,
         **model_kwargs: Any) -> GainReport:
    """The Amax gains of `model`'s residual mappings on one batch (see the module docstring).

        mhc_compile.gain(model, ids, attention_mask=mask, options={"exclude": ["lm_head"]})

    `model` has mHC parameters (prepared, compiled and run, or prepared then loaded from a
    checkpoint); example_args and model_kwargs are its forward arguments (its keywords too:
    attention_mask, pixel_values). options: mHC options, as `prepare` takes them; n, constraint
    and sinkhorn_iters are read from the model's parameters (give them only to check them), and
    include/exclude must be those the model was prepared with. Options as keywords are
    deprecated: a keyword that names an option and that model.forward does not declare is taken
    as one, with a FutureWarning. Returns a GainReport: per chain and
    block, the gains of H_res alone and from the block to the chain's end (forward: max
    |row sum|, backward: max |column sum|; mean and worst over the tokens), and the spread of
    H_pre and H_post. The model's state is left as it was.

    Each call compiles the model anew (one Dynamo cache entry); for repeated measurements reuse
    one GainProbe, or GainLogger in training.
    """
    chosen, model_kwargs = split_keywords("gain", model, options, model_kwargs)
    return GainProbe(model, **chosen)(*example_args, **model_kwargs)
