"""Does mHC help? The paper's comparison, small: plain residual vs HC vs mHC (n = 4) on real text.

A byte-level LLaMA-style decoder (mhc_compile.examples.LLaMA, vocabulary 256) learns to predict
the Python standard library's own source (`sysconfig.get_paths()["stdlib"]`, every *.py outside
site-packages; no download). Files are split into train and validation by a hash of their path
(deterministic, ~10% validation), so no validation text is seen in training.

Variants, trained from the same initial weights (per seed), on the same batches in the same
order, for the same number of tokens, with the same optimiser and schedule:
    plain   the unmodified model, torch.compile (Inductor)
    HC      backend="mhc", constraint="none" (unconstrained hyper-connections), n = 4
    mHC     backend="mhc" (Sinkhorn-constrained H_res), n = 4

Steps of one run (one command):
1. Load the corpus; build each variant; check the rewrite (2 * depth blocks rewritten, outputs at
   init equal to the plain model's); compile and time a few steps of each (calibration).
2. Learning rate: a short sweep of the plain model (seed 0, a quarter of the main run) over a grid;
   the chosen rate is the largest whose final validation loss is within 3% of the sweep's best:
   beyond it the plain model trains worse, so it sits at the edge of where it trains well.
3. Main runs, seed-major (seed 0: plain, HC, mHC; then seed 1 ...); the number of steps is set from
   the calibration so that everything fits --budget-s, and is the same for every run. Logged:
   validation loss at 11 points, training loss and pre-clip gradient norm every step, the Amax gain
   (mhc_compile.GainLogger, outside the compiled step) every --probe-every steps, step time.
4. Table (stdout), quality.json (written after every run, so a cut-off run leaves its part) and
   quality.png (validation loss, gradient norm, largest composite gain over training, per-block
   composite gain at the end) under --out (default bench/out).

    python bench/quality.py                # GPU: the full comparison, ~7 minutes on one H100
    python bench/quality.py --tiny         # CPU smoke test of the same code path, ~1 minute

Gradient-norm spike: a step after warm-up whose pre-clip gradient norm exceeds 3x the median of the
previous 50 steps. "Largest Amax gain": the largest composite gain (any block to the chain's end,
forward or backward) seen at any probe, as the mean over the probe batch's tokens and for the
worst token (see mhc_compile/gain.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import statistics
import sys
import sysconfig
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

import mhc_compile
from mhc_compile import private_apis
from common import log, pyplot, synchronize, versions, write_json
from mhc_compile.examples import LLaMA

VARIANTS: dict[str, dict[str, Any] | None] = {
    "plain": None,
    "HC": {"constraint": "none"},
    "mHC": {"constraint": "sinkhorn"},
}
VOCAB = 256  # bytes
VALIDATION_SHARE = 10  # one file in ten (by path hash) is validation
SPIKE_WINDOW, SPIKE_FACTOR = 50, 3.0
SWEEP_TOLERANCE = 0.03  # the chosen rate's sweep loss is within 3% of the best


@dataclass(frozen=True)
class Config:
    device: str
    width: int
    depth: int
    heads: int
    seq: int
    batch: int
    n: int = 4
    seeds: tuple[int, ...] = (0, 1)
    lr_grid: tuple[float, ...] = (2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2, 6.4e-2)
    sweep_fraction: float = 0.25  # sweep runs last this share of the main runs' steps
    evals: int = 10  # validation points per run besides step 0
    val_batches: int = 16
    probe_every: int = 50
    probe_sequences: int = 4  # the gain probe's batch: this many validation sequences
    budget_s: float = 430.0  # wall time the whole script aims at
    min_steps: int = 300
    max_steps: int = 6000
    step_multiple: int = 50
    steps: int | None = None  # fixed step count (no calibration-based sizing)
    warmup_fraction: float = 0.05
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    clip: float = 1.0
    inductor: bool = True
    max_files: int | None = None  # corpus: only the first files (sorted by path)
    calibration_steps: int = 20


FULL = Config(device="cuda", width=256, depth=8, heads=4, seq=256, batch=32)
TINY = Config(device="cpu", width=32, depth=2, heads=2, seq=32, batch=4, lr_grid=(3e-3, 3e-2),
              evals=2, val_batches=2, probe_every=5, probe_sequences=2, steps=20, min_steps=10,
              step_multiple=5, inductor=False, max_files=80, calibration_steps=3)


# --- corpus ----------------------------------------------------------------------------------------


@dataclass
class Corpus:
    root: str
    train: torch.Tensor  # uint8 [bytes]
    validation: torch.Tensor  # uint8 [bytes]
    train_files: int
    validation_files: int


def is_validation_file(relative_path: str) -> bool:
    """Deterministic split by file: the same on every machine and Python version."""
    return zlib.crc32(relative_path.encode()) % VALIDATION_SHARE == 0


def stdlib_sources(root: Path, max_files: int | None) -> list[Path]:
    """Every *.py below the standard library, sorted, without installed third-party packages."""
    files = sorted(
        path for path in root.rglob("*.py")
        if not {"site-packages", "dist-packages"} & set(path.relative_to(root).parts)
    )
    return files[:max_files] if max_files else files


def load_corpus(max_files: int | None) -> Corpus:
    root = Path(sysconfig.get_paths()["stdlib"])
    parts: dict[bool, list[bytes]] = {False: [], True: []}
    for path in stdlib_sources(root, max_files):
        try:
            parts[is_validation_file(path.relative_to(root).as_posix())].append(path.read_bytes())
        except OSError:
            continue  # unreadable files are left out (same choice on every run)
    if not parts[False] or not parts[True]:
        raise RuntimeError(f"no train or no validation files under {root}")
    as_tensor = lambda chunks: torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)
    return Corpus(str(root), as_tensor(parts[False]), as_tensor(parts[True]),
                  len(parts[False]), len(parts[True]))


class TrainBatches:
    """Random windows of the training bytes, in an order fixed by the seed: ids [batch, seq]."""

    def __init__(self, data: torch.Tensor, batch: int, seq: int, seed: int):
        self.data, self.batch, self.seq = data, batch, seq
        self.offsets = torch.arange(seq + 1, device=data.device)
        self.generator = torch.Generator().manual_seed(seed)

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, len(self.data) - self.seq - 1, (self.batch,), generator=self.generator)
        window = self.data[starts.to(self.data.device)[:, None] + self.offsets].long()
        return window[:, :-1], window[:, 1:]


def validation_batches(data: torch.Tensor, batch: int, seq: int, count: int):
    """`count` batches of windows spread evenly over the validation bytes (the same every time)."""
    starts = torch.linspace(0, len(data) - seq - 2, batch * count).long().to(data.device)
    windows = data[starts[:, None] + torch.arange(seq + 1, device=data.device)].long()
    return [(w[:, :-1], w[:, 1:]) for w in windows.split(batch)]


# --- models ----------------------------------------------------------------------------------------


def initial_weights(cfg: Config, seed: int) -> dict[str, torch.Tensor]:
    """The plain model's initial weights for a seed: every variant starts from these."""
    torch.manual_seed(seed)
    return LLaMA(VOCAB, cfg.seq, cfg.width, cfg.depth, cfg.heads).state_dict()


@dataclass
class Variant:
    name: str
    model: torch.nn.Module
    compiled: Callable
    mhc_initial: dict[str, torch.Tensor]  # the mHC parameters right after prepare (seed-free)
    logger: mhc_compile.GainLogger | None
    rewritten: int

    def reset(self, weights: dict[str, torch.Tensor]) -> None:
        """In place (the compiled graphs keep their parameters): no recompilation."""
        self.model.load_state_dict({**weights, **self.mhc_initial})


def build_variant(name: str, cfg: Config, example: torch.Tensor, weights) -> Variant:
    options = VARIANTS[name]
    model = LLaMA(VOCAB, cfg.seq, cfg.width, cfg.depth, cfg.heads).to(cfg.device)
    model.load_state_dict(weights)
    if options is None:
        compiled = torch.compile(model) if cfg.inductor else model
        return Variant(name, model, compiled, {}, None, 0)
    report = mhc_compile.prepare(model, example, options={"n": cfg.n, **options})
    backend = mhc_compile.backend(n=cfg.n, eager=not cfg.inductor, **options)
    mhc_initial = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("mhc.")}
    logger = mhc_compile.GainLogger(model, every=cfg.probe_every, log=lambda step, report: None)
    return Variant(name, model, torch.compile(model, backend=backend), mhc_initial, logger,
                   len(report.rewritten))


def make_optimizer(model: torch.nn.Module, lr: float, cfg: Config) -> torch.optim.AdamW:
    """AdamW; weight decay on the model's matrices only. mHC parameters are not decayed: decay
    would pull HC's H_res = b_res = I towards 0 and the gates towards 0, changing the method."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        (decay if parameter.dim() >= 2 and not name.startswith("mhc.") else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=cfg.device == "cuda")


def learning_rate(step: int, steps: int, peak: float, cfg: Config) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio of the peak."""
    warmup = max(1, int(cfg.warmup_fraction * steps))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# --- one training run ------------------------------------------------------------------------------


class PausableTimer:
    """Wall time of the training steps alone (evaluation and probes excluded), device-synced."""

    def __init__(self, device: str):
        self.device, self.total, self.started = device, 0.0, None

    def resume(self) -> None:
        synchronize(self.device)
        self.started = time.perf_counter()

    def pause(self) -> None:
        synchronize(self.device)
        if self.started is not None:
            self.total += time.perf_counter() - self.started
        self.started = None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def evaluate(variant: Variant, batches) -> float:
    """Mean validation loss. Runs the compiled training graph with autograd on (no backward):
    under no_grad Dynamo would compile a second, inference graph for every variant."""
    total = torch.zeros((), device=batches[0][0].device)
    for inputs, targets in batches:
        total += cross_entropy(variant.compiled(inputs), targets).detach()
    return (total / len(batches)).item()


def train(variant: Variant, cfg: Config, corpus_train: torch.Tensor, weights, seed: int, lr: float,
          steps: int, val_batches, probe_inputs, evals: int) -> dict[str, Any]:
    variant.reset(weights)
    model = variant.model
    optimizer = make_optimizer(model, lr, cfg)
    batches = TrainBatches(corpus_train, cfg.batch, cfg.seq, seed)
    losses = torch.full((steps,), float("nan"), device=cfg.device)
    norms = torch.full((steps,), float("nan"), device=cfg.device)
    eval_steps = sorted({round(i * steps / evals) for i in range(evals + 1)})
    curve, gains, timer, diverged, done = [], [], PausableTimer(cfg.device), False, 0
    if variant.logger is not None:
        variant.logger.history.clear()

    def checkpoint(step: int) -> None:  # evaluation and gain probe, outside the timed steps
        if step in eval_steps:
            curve.append((step, evaluate(variant, val_batches)))
        if variant.logger is not None and (variant.logger(step, probe_inputs) is not None):
            report = variant.logger.history[-1][1]
            whole = report.chains[0].whole
            gains.append({"step": step, "largest_mean": report.largest_mean,
                          "largest_max": report.largest_max, "whole_forward": whole.forward_mean,
                          "whole_backward": whole.backward_mean})

    for step in range(steps):
        if step in eval_steps or step % cfg.probe_every == 0:
            timer.pause()
            checkpoint(step)
            if step and not math.isfinite(losses[step - 1].item()):
                diverged = True
                break
            timer.resume()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, lr, cfg)
        inputs, targets = next(batches)
        loss = cross_entropy(variant.compiled(inputs), targets)
        loss.backward()
        norms[step] = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses[step] = loss.detach()
        done = step + 1
    timer.pause()
    if not diverged:
        checkpoint(steps)
    optimizer.zero_grad(set_to_none=True)
    losses_list, norms_list = losses[:done].tolist(), norms[:done].tolist()
    result = {
        "variant": variant.name, "seed": seed, "lr": lr, "steps": steps, "steps_done": done,
        "tokens": done * cfg.batch * cfg.seq, "diverged": diverged or not all(map(math.isfinite, losses_list)),
        "val_curve": curve, "final_val_loss": curve[-1][1] if curve else float("nan"),
        "best_val_loss": min((v for _, v in curve), default=float("nan")),
        "train_loss": _every(losses_list, max(1, done // 500)),
        "grad_norm": _every(norms_list, max(1, done // 500)),
        "spikes": grad_norm_spikes(norms_list, max(1, int(cfg.warmup_fraction * steps))),
        "gain": gains,
        "largest_gain_mean": max((g["largest_mean"] for g in gains), default=None),
        "largest_gain_max": max((g["largest_max"] for g in gains), default=None),
        "ms_per_step": 1e3 * timer.total / max(1, done),
        "tokens_per_s": done * cfg.batch * cfg.seq / max(timer.total, 1e-9),
    }
    if variant.logger is not None and variant.logger.history:
        last = variant.logger.history[-1][1].chains[0]
        result["final_block_gain"] = [dataclasses.asdict(b.composite) for b in last.blocks]
    return result


def _every(values: list[float], stride: int) -> list[tuple[int, float]]:
    return [(i, values[i]) for i in range(0, len(values), stride)]


def grad_norm_spikes(norms: list[float], warmup: int) -> dict[str, Any]:
    """Steps after warm-up whose norm exceeds SPIKE_FACTOR x the median of the previous window."""
    spikes, worst = [], 0.0
    for step in range(max(warmup, SPIKE_WINDOW), len(norms)):
        median = statistics.median(norms[step - SPIKE_WINDOW : step])
        if median > 0 and math.isfinite(norms[step]):
            ratio = norms[step] / median
            worst = max(worst, ratio)
            if ratio > SPIKE_FACTOR:
                spikes.append(step)
    finite = [x for x in norms if math.isfinite(x)]
    return {"count": len(spikes), "steps": spikes[:50], "worst_ratio": worst,
            "max_norm": max(finite, default=float("nan"))}


# --- sizing, sweep, main runs ----------------------------------------------------------------------


def calibrate(variant: Variant, cfg: Config, data, weights, val_batches, probe_inputs) -> dict:
    """First-step (compile) time, then per-step, per-evaluation and per-probe times."""
    variant.reset(weights)
    optimizer = make_optimizer(variant.model, cfg.lr_grid[0], cfg)
    batches = TrainBatches(data, cfg.batch, cfg.seq, seed=12345)
    timer = PausableTimer(cfg.device)
    times = []
    for _ in range(cfg.calibration_steps + 1):
        timer.resume()
        inputs, targets = next(batches)
        cross_entropy(variant.compiled(inputs), targets).backward()
        torch.nn.utils.clip_grad_norm_(variant.model.parameters(), cfg.clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        timer.pause()
        times.append(timer.total)
        timer.total = 0.0
    started = time.perf_counter()
    evaluate(variant, val_batches)
    evaluation = time.perf_counter() - started
    probe = 0.0
    if variant.logger is not None:
        variant.logger.probe(probe_inputs)  # the first call traces
        started = time.perf_counter()
        variant.logger.probe(probe_inputs)
        probe = time.perf_counter() - started
    return {"first_step_s": times[0], "step_s": statistics.median(times[1:]),
            "eval_s": evaluation, "probe_s": probe}


def choose_steps(cfg: Config, timing: dict[str, dict], remaining_s: float) -> int:
    """Largest step count (same for every run) whose main runs and sweep fit the remaining time."""
    if cfg.steps is not None:
        return cfg.steps
    per_step = fixed = 0.0
    for name, t in timing.items():
        probes_per_step = 1 / cfg.probe_every if VARIANTS[name] else 0.0
        per_step += len(cfg.seeds) * (t["step_s"] + probes_per_step * t["probe_s"])
        fixed += len(cfg.seeds) * (cfg.evals + 1) * t["eval_s"]
    plain = timing["plain"]
    per_step += len(cfg.lr_grid) * cfg.sweep_fraction * plain["step_s"]
    fixed += len(cfg.lr_grid) * 4 * plain["eval_s"]
    steps = int((remaining_s - fixed) / per_step) // cfg.step_multiple * cfg.step_multiple
    return max(cfg.min_steps, min(cfg.max_steps, steps))


def sweep(variant: Variant, cfg: Config, data, weights, steps: int, val_batches) -> dict:
    """Plain model, seed 0: final validation loss per learning rate; choose the stability edge."""
    sweep_steps = max(cfg.step_multiple, int(cfg.sweep_fraction * steps))
    rows = []
    for lr in cfg.lr_grid:
        result = train(variant, cfg, data, weights, 0, lr, sweep_steps, val_batches, None, evals=3)
        rows.append({"lr": lr, "final_val_loss": result["final_val_loss"],
                     "diverged": result["diverged"], "spikes": result["spikes"]["count"],
                     "max_grad_norm": result["spikes"]["max_norm"]})
        log(f"  sweep lr {lr:.2e}: val {result['final_val_loss']:.4f}  "
            f"spikes {result['spikes']['count']}  diverged {result['diverged']}")
    finite = [r for r in rows if math.isfinite(r["final_val_loss"]) and not r["diverged"]]
    if not finite:
        raise RuntimeError(f"the plain model diverged at every learning rate of {cfg.lr_grid}")
    best = min(r["final_val_loss"] for r in finite)
    chosen = max(r["lr"] for r in finite if r["final_val_loss"] <= best * (1 + SWEEP_TOLERANCE))
    edge_inside = chosen < max(cfg.lr_grid)
    return {"steps": sweep_steps, "rows": rows, "chosen_lr": chosen, "edge_inside_grid": edge_inside}


# --- output ----------------------------------------------------------------------------------------


def table(runs: list[dict]) -> str:
    lines = ["| variant | seed | final val loss | best val loss | grad-norm spikes | max grad norm | "
             "largest Amax gain (token mean / worst) | ms/step | diverged |",
             "|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        gain = ("-" if run["largest_gain_mean"] is None
                else f"{run['largest_gain_mean']:.4g} / {run['largest_gain_max']:.4g}")
        lines.append(
            f"| {run['variant']} | {run['seed']} | {run['final_val_loss']:.4f} | "
            f"{run['best_val_loss']:.4f} | {run['spikes']['count']} | {run['spikes']['max_norm']:.3g} | "
            f"{gain} | {run['ms_per_step']:.1f} | {run['diverged']} |")
    return "\n".join(lines)


def summary(runs: list[dict], seeds) -> str:
    lines = []
    for seed in seeds:
        by_name = {r["variant"]: r for r in runs if r["seed"] == seed}
        if "plain" not in by_name:
            continue
        base = by_name["plain"]["final_val_loss"]
        gaps = ", ".join(f"{name} {by_name[name]['final_val_loss'] - base:+.4f}"
                         for name in ("HC", "mHC") if name in by_name)
        lines.append(f"seed {seed}: final val loss minus plain's: {gaps}")
    return "\n".join(lines)


def plot(runs: list[dict], path: Path) -> None:
    plt = pyplot()  # main() refuses to start without matplotlib
    colors = {"plain": "tab:gray", "HC": "tab:red", "mHC": "tab:blue"}
    figure, axes = plt.subplots(2, 2, figsize=(13, 9))
    for run in runs:
        style = dict(color=colors[run["variant"]], linestyle="-" if run["seed"] == 0 else "--",
                     label=f"{run['variant']} seed {run['seed']}")
        steps, values = zip(*run["val_curve"]) if run["val_curve"] else ((), ())
        axes[0, 0].plot(steps, values, marker="o", markersize=3, **style)
        steps, values = zip(*run["grad_norm"]) if run["grad_norm"] else ((), ())
        axes[0, 1].plot(steps, values, linewidth=0.7, **style)
        if run["gain"]:
            axes[1, 0].plot([g["step"] for g in run["gain"]], [g["largest_mean"] for g in run["gain"]], **style)
        if run.get("final_block_gain"):
            blocks = run["final_block_gain"]
            axes[1, 1].plot(range(len(blocks)), [b["forward_mean"] for b in blocks], marker=".", **style)
    finals = [r["final_val_loss"] for r in runs if math.isfinite(r["final_val_loss"])]
    if finals:  # zoom on the end of training, where the variants differ
        axes[0, 0].set_ylim(min(finals) - 0.1, max(finals) + 0.6)
    titles = ("validation loss (nats/byte)", "pre-clip gradient norm",
              "largest composite Amax gain (token mean)", "composite forward gain, block l to end (final)")
    for axis, title in zip(axes.flat, titles):
        axis.set_title(title)
        axis.grid(alpha=0.3)
    for axis in (axes[0, 1], axes[1, 0], axes[1, 1]):
        axis.set_yscale("log")
    axes[0, 0].set_xlabel("step"), axes[0, 1].set_xlabel("step"), axes[1, 0].set_xlabel("step")
    axes[1, 1].set_xlabel("block l (chain position)")
    axes[0, 0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def environment(cfg: Config) -> dict[str, Any]:
    info = {**versions(), "device": cfg.device}
    if cfg.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


# --- main ------------------------------------------------------------------------------------------


def run(cfg: Config, out: Path) -> dict[str, Any]:
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    if cfg.device == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls; parameters and streams fp32
    # Each variant adds Dynamo cache entries on LLaMA.forward (prepare, training graph, probe).
    private_apis.raise_recompile_limit(64)
    corpus = load_corpus(cfg.max_files)
    train_data, val_data = corpus.train.to(cfg.device), corpus.validation.to(cfg.device)
    log(f"corpus {corpus.root}: train {len(corpus.train):,} bytes ({corpus.train_files} files), "
        f"validation {len(corpus.validation):,} bytes ({corpus.validation_files} files)")
    val = validation_batches(val_data, cfg.batch, cfg.seq, cfg.val_batches)
    probe_inputs = val[0][0][: cfg.probe_sequences]
    weights = {seed: initial_weights(cfg, seed) for seed in cfg.seeds}
    result: dict[str, Any] = {
        "config": dataclasses.asdict(cfg), "environment": environment(cfg),
        "corpus": {"root": corpus.root, "train_bytes": len(corpus.train),
                   "validation_bytes": len(corpus.validation), "train_files": corpus.train_files,
                   "validation_files": corpus.validation_files},
        "checks": {}, "timing": {}, "runs": [],
    }
    save = lambda: write_json(out / "quality.json", result)

    example = train_data[: cfg.batch * cfg.seq].long().view(cfg.batch, cfg.seq)
    variants = {name: build_variant(name, cfg, example, weights[cfg.seeds[0]]) for name in VARIANTS}
    # Checks: the rewrite happened, and the function at init is the plain model's.
    reference_logits = variants["plain"].model(val[0][0]).detach()
    for name, variant in variants.items():
        if VARIANTS[name] is not None and variant.rewritten != 2 * cfg.depth:
            raise RuntimeError(f"{name}: {variant.rewritten} blocks rewritten, expected {2 * cfg.depth}")
        variant.reset(weights[cfg.seeds[0]])
        first_call = time.perf_counter()  # compiles the forward and backward graphs
        difference = (variant.compiled(val[0][0]) - reference_logits).abs().max().item()
        result["checks"][name] = {"rewritten_blocks": variant.rewritten,
                                  "max_logit_difference_at_init": difference,
                                  "compile_s": time.perf_counter() - first_call}
        log(f"check {name}: {variant.rewritten} blocks rewritten, max |logit - plain| at init "
            f"{difference:.2e}, first call (compile) {result['checks'][name]['compile_s']:.1f} s")
        result["timing"][name] = calibrate(variant, cfg, train_data, weights[cfg.seeds[0]], val, probe_inputs)
        log(f"calibrate {name}: {result['timing'][name]}")
    save()

    steps = choose_steps(cfg, result["timing"], cfg.budget_s - (time.perf_counter() - started) - 20)
    result["steps"] = steps
    result["tokens_per_run"] = steps * cfg.batch * cfg.seq
    log(f"{steps} steps per run ({result['tokens_per_run']:,} tokens); sweeping the plain model's lr")
    result["sweep"] = sweep(variants["plain"], cfg, train_data, weights[cfg.seeds[0]], steps, val)
    lr = result["sweep"]["chosen_lr"]
    log(f"learning rate {lr:.2e} (edge inside the grid: {result['sweep']['edge_inside_grid']})")
    save()

    for seed in cfg.seeds:
        for name, variant in variants.items():
            elapsed = time.perf_counter() - started
            if elapsed > cfg.budget_s + 45:
                log(f"skipping {name} seed {seed}: {elapsed:.0f} s used of a {cfg.budget_s:.0f} s budget")
                result.setdefault("skipped", []).append(f"{name} seed {seed}")
                continue
            run_result = train(variant, cfg, train_data, weights[seed], seed, lr, steps, val,
                               probe_inputs, cfg.evals)
            result["runs"].append(run_result)
            log(f"{name} seed {seed}: final val {run_result['final_val_loss']:.4f}, "
                f"spikes {run_result['spikes']['count']}, largest gain {run_result['largest_gain_mean']}, "
                f"{run_result['ms_per_step']:.1f} ms/step ({time.perf_counter() - started:.0f} s)")
            save()
    result["wall_s"] = time.perf_counter() - started
    save()
    plot(result["runs"], out / "quality.png")
    log(table(result["runs"]))
    log(summary(result["runs"], cfg.seeds))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny model, few steps")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
    parser.add_argument("--budget-s", type=float, help="wall time to fit everything in")
    parser.add_argument("--steps", type=int, help="fixed steps per run (skips the sizing)")
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--inductor", action="store_true", help="with --tiny: compile with Inductor")
    args = parser.parse_args(argv)
    cfg = TINY if args.tiny else FULL
    changes = {"budget_s": args.budget_s, "steps": args.steps,
               "seeds": tuple(args.seeds) if args.seeds else None, "inductor": True if args.inductor else None}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in changes.items() if v is not None})
    if cfg.device == "cuda" and not torch.cuda.is_available():
        print("bench/quality.py: no CUDA device; use --tiny for the CPU smoke test", file=sys.stderr)
        return 2
    if importlib.util.find_spec("matplotlib") is None:
        # Checked before hours of training, not after: the plot is part of this benchmark's output.
        print("bench/quality.py: matplotlib is needed for the plot; pip install 'mhc-compile[bench]'",
              file=sys.stderr)
        return 2
    run(cfg, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
