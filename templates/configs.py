"""Autotune configs of every kernel stage, keyed on (n, C, dtype), and how to force one.

Each stage's configs are built by a comprehension over block sizes and warps; a prune function
drops those that would spill registers for the given n (or that are far wider than C);
triton.autotune benchmarks the rest once per key (n, C, and the dtypes of the tensor arguments,
which Triton appends to the key) and keeps the choice in memory and in Triton's disk cache.

Where an autotuning table (_TUNED_TABLES) holds a kernel's choice for the GPU and the arguments
(n, C), that one config is compiled and nothing is benchmarked: at a cold start every candidate
costs a Triton compile. MHC_TRITON_CONFIG (read when the kernels are first imported) changes that:

    autotune                              benchmark every candidate, tables or not (`mhc-compile autotune`)
    default                               every stage's first config, no benchmarking (CI, quick starts)
    BLOCK_C=512,num_warps=4               these values over the first config of every stage that has them
    pre_mix_fwd:BLOCK_C=512;post_res_mix_bwd:BLOCK_T=2    per stage; the stages not named autotune

Under TRITON_INTERPRET=1 every stage uses its first config: the interpreter cannot benchmark.
The first config of every stage is valid for every n in 1..8.

How a launch runs on the host (tracing, logging, reusing a binary) is mhc_compile/kernel_launch.py's.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch
import triton

from mhc_compile import spec

ENV_VAR = "MHC_TRITON_CONFIG"
# Triton's own switch: the interpreter runs kernels on CPU tensors and cannot time configs.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# Live fp32 elements per thread (see _live_elements) above which a config is pruned as spilling.
_REGISTERS_PER_THREAD = 64


# Host-side arithmetic of grids and buffer sizes. Not triton.cdiv / triton.next_power_of_2: in
# Triton 3.6 those are constexpr functions whose calls cost microseconds each on the host, several
# per launch.
def next_power_of_2(value: int) -> int:
    return 1 << max(value - 1, 0).bit_length()


def ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


def padded_streams(n: int) -> int:
    """n rounded up to a power of two: the stream axis of every register tile."""
    return next_power_of_2(n)


def padded_phi_columns(n: int) -> int:
    """The n*n + 2n columns of phi rounded up to a power of two, at least 16 for tl.dot."""
    return max(16, next_power_of_2(spec.coefficient_count(n)))


def _config(num_warps: int, num_stages: int, **blocks: int) -> triton.Config:
    return triton.Config(blocks, num_warps=num_warps, num_stages=num_stages)


# The first config of every stage is the default (interpreter, MHC_TRITON_CONFIG=default) and must
# fit n = 8; the prune function below drops, per n, the configs whose tiles would spill. Each stage
# keeps four candidates, because every candidate costs a Triton compile at a cold start and a cold
# start must stay close to Inductor's own. Among them are the choices that full sweeps on an H100
# made at C = 1024..4096 (bench/RESULTS.md, kernel run 3: block sizes 16..2048, warps 2..8, stages
# 3..4), e.g. projection (128, 64, 8 warps, 3 stages) and mixes (1024, 1, 4 warps) and
# (2048, 1, 8 warps). The others are neighbours of those choices, plus a mix for narrow C where one
# token's row is too short to keep a program busy (512 channels, 4 tokens, 4 warps).
_MIX_CONFIGS = [  # (BLOCK_C, BLOCK_T, warps): memory-bound mixes over wide channel blocks
    _config(num_warps, 2, BLOCK_T=block_t, BLOCK_C=block_c)
    for block_c, block_t, num_warps in ((256, 1, 8), (1024, 1, 4), (2048, 1, 8), (512, 4, 4))
]
_STAGE_CONFIGS: dict[str, list[triton.Config]] = {
    # Memory-bound pass over the streams; one program projects BLOCK_T tokens over a column range,
    # and larger BLOCK_T reads phi (from L2) fewer times.
    "projection": [
        _config(num_warps, num_stages, BLOCK_T=block_t, BLOCK_K=block_k)
        for block_t, block_k, num_warps, num_stages in (
            (32, 64, 4, 3), (128, 64, 8, 3), (64, 64, 8, 3), (64, 128, 8, 4))
    ],
    # Latency-bound coefficient math (gates, Sinkhorn) on BLOCK_T tokens; little memory traffic.
    "coefficients": [
        _config(num_warps, 1, BLOCK_T=block_t)
        for block_t, num_warps in ((16, 4), (32, 4), (64, 8), (32, 2))
    ],
    # Grid over (column blocks of each stream, token splits): g_streams tiles and per-split grad
    # phi partials. Its own key for the column block, not BLOCK_C: a dot tile of 64-128 columns,
    # which the mixes' BLOCK_C (256-2048 channels) forced for every stage must not reach.
    "coefficients_bwd_streams": [
        _config(num_warps, 3, BLOCK_T=block_t, BLOCK_COLUMNS=block_columns)
        for block_columns, block_t, num_warps in ((64, 32, 8), (64, 64, 8), (64, 32, 4), (128, 32, 8))
    ],
    **{stage: _MIX_CONFIGS
       for stage in ("pre_mix_fwd", "pre_mix_grad_h_pre", "post_res_mix_fwd", "post_res_mix_bwd")},
}
STAGES = tuple(_STAGE_CONFIGS)

# Autotuning tables: per CUDA compute capability, the config each kernel chose for (n, C) with
# bf16 streams, where every autotuning run measured there chose the same (bench/results/
# kernels_*.json: H100 runs of 2026-11-23 (run 12, C = 1024, 2048, 4096) and of 2026-12-06
# (C = 1024, 4096), H200 of 2026-12-06 (C = 1024); the grad-streams kernel's and the pre-mix
# backward's at C = 2048 from the e2e logs since its candidates changed (749c8b4): 27 runs at
# C = 1024, 2048 and 4096 on H100s and an H200, bench/results/e2e_*.log). Only those (n, C) are
# tabled; any other n, C, stream dtype or GPU autotunes its candidates.
_MIX_1024 = _config(4, 2, BLOCK_T=1, BLOCK_C=1024)
_MIX_2048 = _config(8, 2, BLOCK_T=1, BLOCK_C=2048)
_TUNED_TABLES: dict[tuple[int, int], dict[tuple[str, int, int], triton.Config]] = {
    (9, 0): {  # sm_90: H100, H200; keys (kernel, n, C)
        **{(kernel, 4, channels): config
           for channels, pre_mix in ((1024, _MIX_1024), (2048, _MIX_2048), (4096, _MIX_2048))
           for kernel, config in (
               ("mhc_projection", _config(8, 3, BLOCK_T=128, BLOCK_K=64)),
               ("mhc_coefficients_fwd", _config(8, 1, BLOCK_T=64)),
               # Measured at C = 1024 alone (bench/RESULTS.md, session 19: 0.075 ms at 16384
               # tokens, 0.109 with BLOCK_T=32); it reads no streams, so C does not change it.
               ("mhc_coefficients_bwd", _config(4, 1, BLOCK_T=16)),
               ("mhc_post_res_mix_fwd", _MIX_1024),
               ("mhc_post_res_mix_bwd", _MIX_1024),
               ("mhc_pre_mix_fwd", pre_mix),
               ("mhc_pre_mix_grad_h_pre", pre_mix),
               ("mhc_coefficients_bwd_streams", _config(8, 3, BLOCK_T=64, BLOCK_COLUMNS=64)))},
    },
}


def _live_elements(stage: str, config: triton.Config, n: int) -> int:
    """fp32 elements a program keeps live under `config`: a register-pressure model calibrated
    against `ptxas -v` for sm_90 at n = 4 and 8 (configs kept at 64 per thread did not spill)."""
    blocks, streams = config.kwargs, padded_streams(n)
    if stage == "projection":  # x tile [BLOCK_T, BLOCK_K] and accumulator (phi goes to shared)
        return blocks["BLOCK_T"] * (blocks["BLOCK_K"] + padded_phi_columns(n))
    if stage == "coefficients":  # the backward's live Sinkhorn iterates and gradients [BLOCK_T, n, n]
        return 6 * blocks["BLOCK_T"] * streams * streams
    if stage == "coefficients_bwd_streams":
        # phi slice and grad phi [BLOCK_COLUMNS, KP]; the x tile and the du (or accumulate) tile
        # [BLOCK_T, BLOCK_COLUMNS]
        return blocks["BLOCK_COLUMNS"] * (padded_phi_columns(n) + 2 * blocks["BLOCK_T"])
    tile = blocks["BLOCK_T"] * streams * blocks["BLOCK_C"]  # [BLOCK_T, n, BLOCK_C]
    if stage.startswith("post_res"):
        # x and the mixed tile; mixing several tokens' n x n matrices at once spills for n = 8.
        return 2 * tile * (blocks["BLOCK_T"] if streams >= 8 else 1)
    return tile


def _prune(stage: str, kernel_name: str = "") -> Callable:
    """The candidates for (n, C): those that fit n's registers and C's width, or the tabled choice
    alone where the table of the launching GPU (select_device) has one among them."""
    def prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        args = {**named_args, **kwargs}
        n, channels = args["n"], args["C"]
        kept = [
            c
            for c in configs
            if _live_elements(stage, c, n) <= _REGISTERS_PER_THREAD * 32 * c.num_warps
            # A block over twice as wide as C only adds masked lanes.
            and c.kwargs.get("BLOCK_C", 0) <= max(256, 2 * next_power_of_2(channels))
        ]
        tabled = tabled_config(kernel_name, args)
        if tabled is not None and any(describe(c) == describe(tabled) for c in kept):
            return [tabled]
        return kept or configs[:1]

    return prune


# Kernels that never read the streams (they take the projection's fp32 partials, the coefficients
# and their gradients): their table entries hold whatever the streams' dtype.
_STREAMLESS_KERNELS = frozenset({"mhc_coefficients_fwd", "mhc_coefficients_bwd"})


def tabled_config(kernel_name: str, args: dict) -> triton.Config | None:
    """The autotuning table's config for a launch of `kernel_name` with these arguments (n, C and
    the tensors) on the selected GPU, or None: the table holds bf16 streams only, so a launch of a
    kernel that reads the streams with no bf16 tensor among its arguments is not tabled."""
    if kernel_name not in _STREAMLESS_KERNELS and not any(
            getattr(value, "dtype", None) == torch.bfloat16 for value in args.values()):
        return None
    return _selected_table.get((kernel_name, args["n"], args["C"]))


# The table of the GPU whose launch is being prepared: kernel_launch.launch selects it before the
# autotuner prunes (the prune function sees only the kernel's arguments, and under a tracer it
# must not query the device itself).
_selected_table: dict[tuple[str, int, int], triton.Config] = {}


def select_device(device: torch.device) -> None:
    """Make the autotuning table of `device`'s GPU the one the prune functions read."""
    global _selected_table
    _selected_table = {} if AUTOTUNE_ALL or device.type != "cuda" else _table_of(device.index)


@functools.cache
def _table_of(device_index: int | None) -> dict[tuple[str, int, int], triton.Config]:
    return _TUNED_TABLES.get(torch.cuda.get_device_capability(device_index), {})


def _parse_assignments(text: str) -> dict[str, int]:
    pairs = [item.split("=") for item in text.split(",") if item.strip()]
    if any(len(pair) != 2 for pair in pairs):
        raise ValueError(f"{ENV_VAR}: expected key=value pairs separated by commas, got {text!r}")
    return {key.strip(): int(value) for key, value in pairs}


def _overridden(config: triton.Config, values: dict[str, int]) -> triton.Config:
    blocks = {**config.kwargs, **{k: v for k, v in values.items() if k in config.kwargs}}
    return triton.Config(
        blocks,
        num_warps=values.get("num_warps", config.num_warps),
        num_stages=values.get("num_stages", config.num_stages),
    )


def forced_configs(setting: str | None) -> dict[str, triton.Config]:
    """The config each stage is forced to by an MHC_TRITON_CONFIG value (empty: autotune all)."""
    setting = (setting or "").strip()
    if not setting or setting == "autotune":
        return {}
    if setting == "default":
        return {stage: configs[0] for stage, configs in _STAGE_CONFIGS.items()}
    if ":" not in setting:
        values = _parse_assignments(setting)
        known = {"num_warps", "num_stages"}.union(*(c[0].kwargs for c in _STAGE_CONFIGS.values()))
        if unknown := set(values) - known:
            raise ValueError(f"{ENV_VAR}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
        return {stage: _overridden(c[0], values) for stage, c in _STAGE_CONFIGS.items()}
    forced = {}
    for part in filter(str.strip, setting.split(";")):
        stage, _, assignments = part.partition(":")
        stage = stage.strip()
        if stage not in _STAGE_CONFIGS:
            raise ValueError(f"{ENV_VAR}: unknown stage {stage!r}; stages: {', '.join(STAGES)}")
        values = _parse_assignments(assignments)
        default = _STAGE_CONFIGS[stage][0]
        if unknown := set(values) - set(default.kwargs) - {"num_warps", "num_stages"}:
            raise ValueError(f"{ENV_VAR}: stage {stage} has no {sorted(unknown)}")
        forced[stage] = _overridden(default, values)
    return forced


_FORCED = forced_configs(os.environ.get(ENV_VAR))
# Benchmark every candidate, ignoring the autotuning tables (`mhc-compile autotune` sets it too).
AUTOTUNE_ALL = os.environ.get(ENV_VAR, "").strip() == "autotune"
TUNED: dict[str, triton.runtime.Autotuner] = {}  # kernel name -> autotuner (kernel_launch runs it)


def active_configs(stage: str) -> list[triton.Config]:
    """The configs `stage` chooses among: the forced one, the first under the interpreter, or all."""
    if stage in _FORCED or INTERPRETING:
        return [_FORCED.get(stage, _STAGE_CONFIGS[stage][0])]
    return _STAGE_CONFIGS[stage]


def smallest(kernel_name: str, name: str) -> int:
    """The smallest value of block parameter `name` among the configs kernel `kernel_name` chooses
    from: sizes the buffers whose extent depends on the config chosen later, at launch."""
    return min(config.kwargs[name] for config in TUNED[kernel_name].configs)


def _time_candidate(kernel_call: Callable, quantiles) -> list[float]:
    """triton.testing.do_bench with windows of 5 ms warm-up and 25 ms of timing instead of Triton's
    25 and 100: candidates run 0.03-1 ms, so the median still rests on 25 to 800 runs. With
    Triton's windows the timing alone took 0.4-0.5 s per kernel of 3-4 candidates on the H100
    (bench/RESULTS.md, kernel run 6: the shapes whose binaries were compiled already), paid in
    every cold start's first step for each of the 8 kernels."""
    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


def autotune(stage: str, kernel_name: str) -> Callable:
    """triton.autotune for one kernel of `stage`, keyed on (n, C) and the dtypes of the tensors.

    One config (forced, or the default under the interpreter) means no benchmarking at all. The
    choice is kept in memory and in Triton's cache directory (cache_results), so a later process
    with the same Triton and kernels reuses it (`mhc-compile autotune` fills that cache).

    No restore_value or reset_to_zero: benchmarking runs every candidate on the real buffers, and
    under Inductor those options are lost (torch's traced launch rebuilds the autotuner from its
    pruned configs alone), so each kernel writes all of every output whatever its config.
    """

    def decorate(kernel):
        tuned = triton.autotune(
            active_configs(stage),
            key=["n", "C"],
            prune_configs_by={"early_config_prune": _prune(stage, kernel_name)},
            do_bench=_time_candidate,
            cache_results=True,
        )(kernel)
        TUNED[kernel_name] = tuned
        return tuned

    return decorate


def describe(config: triton.Config) -> str:
    """A config in one short line: "BLOCK_T=32 BLOCK_K=64 warps=4 stages=3"."""
    blocks = " ".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"{blocks} warps={config.num_warps} stages={config.num_stages}"


def chosen_configs() -> dict[str, str]:
    """The config each kernel ran with last (for reports and benchmarks)."""
    return {
        name: describe(tuned.best_config)
        for name, tuned in TUNED.items()
        if getattr(tuned, "best_config", None) is not None
    }


def config_timings() -> dict[str, dict[str, float]]:
    """Per kernel, the median ms of every config benchmarked for its last tuned key (diagnosis)."""
    return {
        name: {describe(c): ms[0] if isinstance(ms, list) else ms for c, ms in timings.items()}
        for name, tuned in TUNED.items()
        if (timings := getattr(tuned, "configs_timings", None))
    }
