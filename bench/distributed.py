"""The LLaMA of bench/e2e.py trained on K GPUs by PyTorch's own engines, plain and with
backend="mhc" (n = 4, bf16 streams): DDP, FSDP2 per block, and the pipeline with compiled stages.
Launch one process per GPU:

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \\
        torchrun --nproc-per-node K bench/distributed.py [--engines ddp fsdp 1F1B Interleaved1F1B DualPipeV]
    torchrun --nproc-per-node 2 bench/distributed.py --device cpu --smoke      # gloo, tiny, no GPU
    bench/multi_gpu.sh K OUT     # this, then bench/pipeline.py's overlap with and without NVLink

Every run trains `--steps` AdamW steps under bf16 autocast on the same global batch (K x batch
sequences: each data-parallel rank its own share, the pipeline the whole batch in microbatches,
see `microbatches`), after one untimed step that compiles. Correctness first: rank 0
trains the same model on one device on the same global batch (gradient accumulation over the
same shares), and every engine's loss after the steps must match that run's within bf16 rounding.

Per engine and variant: step ms (median over steps of the slowest rank), tokens/s, peak memory
per GPU (the largest), bytes sent per step by the engine's collectives (ring all-reduce of the
gradients for DDP, all-gather of the parameters in forward and backward plus reduce-scatter of the
gradients for FSDP2, the boundary tensors forward and back for the pipeline: counted from the
sizes, not measured), the final loss and its difference from the one-device run. mHC's overhead
under each engine is its step time over the plain one's with the same engine; the one-device
overheads come from bench/e2e.py on the same model (issue 22 compares the two).
Writes distributed.json under $OUT (or bench/out) and prints a table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

# NVLink multicast stays off on shared machines (see the device notes); torchrun's env keeps these.
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import mhc_compile  # noqa: E402
from common import (  # noqa: E402
    log, out_dir, synchronize, take_peak_gib, versions, write_json, write_table,
)
from mhc_compile import private_apis  # noqa: E402
from mhc_compile.examples import LLaMA  # noqa: E402
from mhc_compile.pipeline import splits_backward, stage_indices  # noqa: E402
from pipeline import PlainStage, loss_fn, max_over_ranks  # noqa: E402

SIZES = {  # the e2e bench's C2048 LLaMA; batch is per data-parallel rank
    "C2048": dict(width=2048, depth=16, heads=16, batch=4, seq=2048, vocab=32000),
}
SMOKE = {"tiny": dict(width=64, depth=4, heads=4, batch=2, seq=32, vocab=128)}
ENGINES = ("ddp", "fsdp", "1F1B", "Interleaved1F1B", "DualPipeV")
MHC_OPTIONS = {"n": 4, "stream_dtype": "bfloat16"}
# Loss after the steps against the one-device run: bf16 autocast, and a different summation order
# of the gradients (all-reduce, reduce-scatter, microbatches).
LOSS_TOLERANCE = 2e-2


def build(size: dict, device: torch.device):
    torch.manual_seed(0)
    model = LLaMA(size["vocab"], size["seq"], size["width"], size["depth"], size["heads"])
    world = dist.get_world_size()
    ids = torch.randint(0, size["vocab"], (world * size["batch"], size["seq"] + 1),
                        generator=torch.Generator().manual_seed(1))
    return model.to(device), ids.to(device)


def autocast(device):
    return torch.autocast(device.type, dtype=torch.bfloat16)


def parameter_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


# --- engines: each returns (step() -> loss or None, model whose parameters train, bytes per step)


def one_device_losses(size, device, variant, steps) -> list[float]:
    """The same model and global batch on one device: gradient accumulation over the ranks'
    shares (DDP's and FSDP2's average), the same optimizer."""
    model, ids = build(size, device)
    if variant == "mhc":
        mhc_compile.prepare(model, ids[: size["batch"], :-1], options=MHC_OPTIONS)
        run = torch.compile(model, backend=mhc_compile.backend(**MHC_OPTIONS))
    else:
        run = torch.compile(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    shares = ids.tensor_split(dist.get_world_size())
    losses = []
    for _ in range(steps + 1):
        total = 0.0
        for share in shares:
            with autocast(device):
                loss = loss_fn(run(share[:, :-1]), share[:, 1:]) / len(shares)
            loss.backward()
            total += loss.item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total)
    return losses


def data_parallel(engine, size, device, variant):
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    model, ids = build(size, device)
    rank, world = dist.get_rank(), dist.get_world_size()
    share = ids.tensor_split(world)[rank]
    inputs, targets = share[:, :-1], share[:, 1:]
    if variant == "mhc":
        mhc_compile.prepare(model, inputs, options=MHC_OPTIONS)
    if engine == "ddp":
        wrapped = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        run = torch.compile(wrapped, backend=mhc_compile.backend(**MHC_OPTIONS)
                            if variant == "mhc" else "inductor")
        trained = model
        sent = 2 * (world - 1) / world * parameter_bytes(model)  # ring all-reduce of the grads
    elif variant == "mhc":
        with autocast(device):  # the units are traced as they will run
            trained = mhc_compile.fsdp_units(model, (inputs,), **MHC_OPTIONS)
        del model
        for unit in trained.units:
            fully_shard(unit)
        run = fully_shard(trained)
        sent = 3 * (world - 1) / world * parameter_bytes(trained)
    else:
        for layer in model.layers:
            fully_shard(layer)
        trained = fully_shard(model)
        run = torch.compile(trained)
        sent = 3 * (world - 1) / world * parameter_bytes(trained)
    optimizer = torch.optim.AdamW(trained.parameters(), lr=1e-4)

    def step():
        with autocast(device):
            loss = loss_fn(run(inputs), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # the global batch's loss: the mean over the ranks' shares
        total = loss.detach().clone()
        dist.all_reduce(total)
        return total.item() / world

    return step, sent


def microbatches(schedule: str, global_batch: int) -> int:
    """Twice the stages where the global batch divides into that many, else one per stage."""
    stages = stages_of(schedule)
    return 2 * stages if global_batch % (2 * stages) == 0 else stages


def stages_of(schedule: str) -> int:
    return dist.get_world_size() * (1 if schedule == "1F1B" else 2)


def pipelined(schedule, size, device, variant):
    from torch.distributed.pipelining import PipelineStage

    model, ids = build(size, device)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    rank, world = dist.get_rank(), dist.get_world_size()
    num_stages, count = stages_of(schedule), microbatches(schedule, inputs.shape[0])
    if variant == "mhc":
        mhc_compile.prepare(model, inputs[: inputs.shape[0] // count], options=MHC_OPTIONS)
        with autocast(device):
            run = mhc_compile.pipeline(model, (inputs,), num_stages, schedule, loss_fn=loss_fn,
                                       n_microbatches=count, **MHC_OPTIONS)
        trained, local = run.parameters(), run.stage_indices
        # forward sends, and their gradients back (the same sizes), summed over the ranks
        sent = sum(run.bytes_per_microbatch.values()) * count * 2
        total = torch.tensor([float(sent)], dtype=torch.float64, device=device)
        dist.all_reduce(total)
        sent = total.item()
        schedule_step = run.step
    else:
        depth = size["depth"]
        bounds = [round(i * depth / num_stages) for i in range(num_stages + 1)]
        local = stage_indices(schedule, num_stages, world, rank)
        modules = [PlainStage(model, bounds[i], bounds[i + 1]) for i in local]
        if not splits_backward(schedule):  # as mhc_compile.pipeline compiles its stages
            for module in modules:
                module.compile()
        stages = [PipelineStage(m, i, num_stages, device) for m, i in zip(modules, local)]
        from torch.distributed import pipelining

        schedule_class = getattr(pipelining, f"Schedule{schedule}")
        built = private_apis.build_schedule(schedule_class, stages, count, loss_fn=loss_fn,
                                            scale_grads=True, async_exchange=False)
        trained = [p for m in modules for p in m.parameters()]
        micro = inputs.shape[0] // count
        with torch.no_grad():
            boundary = PlainStage(model, 0, bounds[1])(inputs[:micro])
        sent = boundary.numel() * boundary.element_size() * (num_stages - 1) * count * 2
        schedule_step = built.step
    optimizer = torch.optim.AdamW(trained, lr=1e-4)
    holds_first, holds_last = 0 in local, num_stages - 1 in local

    def step():
        losses = []
        with autocast(device):
            schedule_step(*((inputs,) if holds_first else ()), target=targets if holds_last else None,
                          losses=losses)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        total = torch.tensor([sum(l.item() for l in losses) / count if holds_last else 0.0],
                             device=device)
        dist.all_reduce(total)  # the rank holding the last stage has it
        return total.item()

    return step, sent


# --- measuring ------------------------------------------------------------------------------------


def run_engine(engine, size, device, variant, steps) -> dict:
    torch.compiler.reset()
    # mHC needs DDP's graph whole (one chain); the plain model keeps Dynamo's default, which
    # splits it at gradient buckets to overlap the all-reduce with the backward.
    torch._dynamo.config.optimize_ddp = variant != "mhc"
    take_peak_gib(device)  # the peak below starts here
    build_engine = data_parallel if engine in ("ddp", "fsdp") else pipelined
    step, sent = build_engine(engine, size, device, variant)
    losses, times = [step()], []  # the first step compiles
    for _ in range(steps):
        synchronize(device)
        dist.barrier()
        started = time.perf_counter()
        losses.append(step())
        synchronize(device)
        times.append(time.perf_counter() - started)
    step_s = max_over_ranks(statistics.median(times), device)
    tokens = dist.get_world_size() * size["batch"] * size["seq"]
    peak = take_peak_gib(device)
    return {"engine": engine, "variant": variant, "step_ms": 1e3 * step_s,
            "tokens_per_s": tokens / step_s, "peak_gib": max_over_ranks(peak, device),
            "bytes_sent_per_step": sent, "losses": losses}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny model (CPU check of the script)")
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", help="output folder (default $OUT, else bench/out)")
    args = parser.parse_args()
    if args.device == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    (name, size), = (SMOKE if args.smoke else SIZES).items()
    results = {**versions(), "world": world, "size": name, **size, "options": MHC_OPTIONS,
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "env": {k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "NCCL_P2P_DISABLE")},
               "rows": []}
    for variant in ("plain", "mhc"):
        reference = one_device_losses(size, device, variant, args.steps) if rank == 0 else []
        reference = [max_over_ranks(v, device) for v in (reference or [0.0] * (args.steps + 1))]
        for engine in args.engines:
            row = run_engine(engine, size, device, variant, args.steps)
            row["one_device_loss"] = reference[-1]
            row["loss_diff"] = abs(row["losses"][-1] - reference[-1])
            results["rows"].append(row)
            if rank == 0:
                log(f"{engine} {variant}: {row['step_ms']:.1f} ms, loss {row['losses'][-1]:.4f} "
                    f"(one device {reference[-1]:.4f})")
                write_json(out_dir(args.out) / "distributed.json", results)
            if row["loss_diff"] > LOSS_TOLERANCE * abs(reference[-1]):
                raise AssertionError(f"{engine} {variant}: loss {row['losses'][-1]} after "
                                     f"{args.steps} steps, one device {reference[-1]}")
    if rank == 0:
        plain = {row["engine"]: row for row in results["rows"] if row["variant"] == "plain"}
        lines = ["| engine | variant | step ms | mHC / plain | tokens/s | peak GiB | MB sent/step | loss | one device |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for row in results["rows"]:
            ratio = row["step_ms"] / plain[row["engine"]]["step_ms"]
            lines.append(f"| {row['engine']} | {row['variant']} | {row['step_ms']:.1f} | {ratio:.3f} | "
                         f"{row['tokens_per_s']:,.0f} | {row['peak_gib']:.1f} | "
                         f"{row['bytes_sent_per_step'] / 2**20:,.1f} | {row['losses'][-1]:.4f} | "
                         f"{row['one_device_loss']:.4f} |")
        write_table(out_dir(args.out) / "distributed.md", "\n".join(lines))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
