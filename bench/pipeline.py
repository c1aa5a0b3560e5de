"""Pipeline parallelism of a LLaMA-style decoder over 2 stages: plain residual vs mHC n=4, without
and with overlap. Launch one process per GPU:

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \\
        torchrun --nproc-per-node 2 bench/pipeline.py --out bench/out
    torchrun --nproc-per-node 2 bench/pipeline.py --device cpu --smoke     # gloo, tiny, no GPU

Stage modules run compiled, as mhc_compile.pipeline runs them (Inductor with our kernels and the
recompute policy per stage; the plain model's halves and single-GPU step through torch.compile's
default Inductor); `--eager` runs every one of them uncompiled, as before the stages compiled.
With overlap, the mix whose streams stage 0 sends runs on the high-priority stream.

Per model size it measures, on every rank at once (each on its own GPU):
  single GPU   one training step (forward + backward of every microbatch, no optimizer) of the
               plain model and of the mHC model (the same stage modules the pipeline runs,
               chained in one process): mHC's single-GPU overhead;
  per stage    forward + backward of one microbatch of each stage alone (busy time);
  transfer     the boundary tensors of one microbatch sent forward and back alone (NCCL P2P);
  pipeline     steps of the 2-stage pipeline (schedule 1F1B): plain with torch's Schedule1F1B
               ("sync") and on the action runtime ("async"); mHC with no overlap (Schedule1F1B,
               default stream), with the async exchange only, and with overlap (async exchange
               + post/res mixes on the high-priority stream).
Columns: step time (median over ranks' max), mHC / plain with the same exchange, idle share of the
busiest rank (1 - its busy time / step: bubble plus exposed communication), exposed communication
(step minus the makespan of the measured stage times, sum_s t_s + (m-1) max_s t_s), bytes sent per
step (forward activations and backward gradients, both ranks), and for overlap the share of the
no-overlap exposed communication it hides. Correctness comes first: the pipelined gradients (both
overlap settings) against the same stage modules run microbatch by microbatch in one process.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

# NVLink multicast stays off on shared machines (see the device notes); torchrun's env keeps these.
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import mhc_compile  # noqa: E402
from common import log, median_seconds, out_dir, synchronize, versions, write_json  # noqa: E402
from mhc_compile import private_apis  # noqa: E402
from mhc_compile.examples import llama  # noqa: E402
from mhc_compile.pipeline import build_stage_modules, compile_stage_modules  # noqa: E402

SIZES = {  # name: (width, depth, heads, seq, microbatch size, microbatches, vocab)
    "C1024-L4": (1024, 4, 8, 2048, 2, 8, 8192),
    "C2048-L8": (2048, 8, 16, 2048, 1, 8, 8192),
}
SMOKE = {"C64-L4": (64, 4, 4, 32, 2, 4, 96)}


def loss_fn(logits, target):
    return F.cross_entropy(logits.float().flatten(0, 1), target.flatten())


class PlainStage(nn.Module):
    """Layers [start, end) of the plain LLaMA, with the embeddings if start is 0 and the norm and
    head if end is its depth."""

    def __init__(self, model, start: int, end: int):
        super().__init__()
        self.first, self.last = start == 0, end == len(model.layers)
        self.layers = nn.ModuleList(model.layers[start:end])
        self.embed = model.tok_embeddings if self.first else None
        self.norm, self.output = (model.norm, model.output) if self.last else (None, None)
        self.register_buffer("cos", model.cos, persistent=False)
        self.register_buffer("sin", model.sin, persistent=False)

    def forward(self, x):
        seq = x.shape[1]
        cos, sin = self.cos[:seq], self.sin[:seq]
        if self.first:
            x = self.embed(x)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.output(self.norm(x)) if self.last else x


def build(size, device, dtype, seed=0):
    width, depth, heads, seq, micro, microbatches, vocab = size
    model, (ids,) = llama(seed=seed, batch=micro * microbatches, seq=seq, width=width, depth=depth,
                          heads=heads, vocab=vocab)
    model = model.to(device=device, dtype=dtype)
    ids = ids.to(device)
    return model, ids, torch.roll(ids, 1, dims=1)


def microbatches(tensor, count):
    return tensor.tensor_split(count, dim=0)


def single_gpu_step(forward, ids, target, count):
    """Forward and backward of every microbatch in turn, gradients accumulated (loss / count)."""
    def step():
        for mb_ids, mb_target in zip(microbatches(ids, count), microbatches(target, count)):
            (loss_fn(forward(mb_ids), mb_target) / count).backward()
    return step


def chained(modules):
    def forward(ids):
        outputs = modules[0](ids)
        for module in modules[1:]:
            outputs = module(*(outputs if isinstance(outputs, tuple) else (outputs,)))
        return outputs
    return forward


def stage_times(modules, ids, target, device, repeats):
    """Forward + backward ms of one microbatch through each stage alone (busy time per stage)."""
    times, inputs = [], (ids,)
    for index, module in enumerate(modules):
        last = index == len(modules) - 1
        leaves = tuple(t.detach().requires_grad_(t.is_floating_point()) for t in inputs)

        def run(module=module, leaves=leaves, last=last):
            out = module(*leaves)
            outs = out if isinstance(out, tuple) else (out,)
            if last:
                loss_fn(outs[0], target).backward()
            else:
                pairs = [(o, torch.ones_like(o)) for o in outs if o.requires_grad]
                torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
            return outs

        times.append(1e3 * median_seconds(run, device, repeats))
        with torch.no_grad():
            out = module(*leaves)
        inputs = out if isinstance(out, tuple) else (out,)
    return times


def transfer_ms(tensors, device, rank, repeats):
    """One microbatch's boundary tensors sent 0 -> 1 and back (the gradients' size), alone."""
    buffers = [t.detach().clone() for t in tensors]

    def exchange():
        for buffer in buffers:
            if rank == 0:
                dist.send(buffer, 1)
                dist.recv(buffer, 1)
            else:
                dist.recv(buffer, 0)
                dist.send(buffer, 0)
    return 1e3 * median_seconds(exchange, device, repeats)


def max_over_ranks(value, device):
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.item()


def pipeline_step_ms(step, model, device, warmup, steps):
    for _ in range(warmup):
        step()
        model.zero_grad(set_to_none=True)
    times = []
    for _ in range(steps):
        synchronize(device)
        dist.barrier()
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(1e3 * (time.perf_counter() - start))
        model.zero_grad(set_to_none=True)
    return max_over_ranks(statistics.median(times), device)


def run_step(run, ids, target, rank):
    def step():
        run.step(*((ids,) if 0 in run.stage_indices else ()), target=target)
    return step


# --- correctness ----------------------------------------------------------------------------------


def gradients(model) -> dict:
    """Each parameter's gradient (a copy), by name; parameters without one are left out."""
    return {name: param.grad.clone() for name, param in model.named_parameters()
            if param.grad is not None}


def worst_relative_error(actual: dict, expected: dict) -> float:
    """The largest ||actual - expected|| / ||expected|| over the tensors of `actual` (NaN if any
    is NaN)."""
    errors = [(actual[name] - expected[name]).norm().item() / max(expected[name].norm().item(), 1e-30)
              for name in actual]
    return float("nan") if any(e != e for e in errors) else max(errors)


def grad_tolerance(dtype) -> float:
    """Relative gradient agreement between two runs of the same model: float32 or bf16."""
    return 1e-5 if dtype == torch.float32 else 2e-2


def check_correctness(device, dtype, rank, cut, eager):
    """Pipelined gradients (overlap off and on) vs the same stage modules run in one process."""
    size = (64, 2, 4, 64, 2, 4, 96) if device.type == "cpu" else (256, 2, 4, 256, 2, 4, 512)
    count = size[5]
    rows = []
    for overlap in (False, True):
        torch.compiler.reset()
        model, ids, target = build(size, device, dtype, seed=1)
        mhc_compile.prepare(model, ids[:1])
        with torch.no_grad():
            for param in model.mhc.parameters():
                param.add_(0.05 * torch.randn_like(param))
        run = mhc_compile.pipeline(model, (ids,), 2, "1F1B", loss_fn=loss_fn, n_microbatches=count,
                                   cuts=[cut], overlap=overlap, async_exchange=overlap, eager=eager)
        losses = []
        run.step(*((ids,) if rank == 0 else ()), target=target, losses=losses)
        got = {name: p.grad.clone() for m in run.modules for name, p in m.named_parameters()}
        model.zero_grad(set_to_none=True)
        reference = build_stage_modules(run.plan, range(2))
        compile_stage_modules(reference, run.plan.captured.options)  # as the pipeline's are
        single_gpu_step(chained(reference), ids, target, count)()
        worst = worst_relative_error(got, gradients(model))
        rows.append({"overlap": overlap, "rank": rank, "params": len(got),
                     "worst_relative_grad_error": max_over_ranks(worst, device)})
        if not worst <= grad_tolerance(dtype):
            raise AssertionError(f"pipelined gradients differ (overlap={overlap}): {worst}")
    return rows


# --- one model size -------------------------------------------------------------------------------


def single_device_part(name, size, device, dtype, args, over_ranks):
    """What one GPU measures alone: a training step of the plain model and of the mHC stage
    modules chained in one process, and forward + backward of one microbatch through each stage.
    `over_ranks` turns a rank's number into the one every rank records (identity on one device)."""
    width, depth, heads, seq, micro, count, vocab = size
    cut = f"layers.{depth // 2}"
    result = {"size": name, "width": width, "depth": depth, "heads": heads, "seq": seq,
              "microbatch": micro, "microbatches": count, "vocab": vocab, "n": args.n}
    torch.compiler.reset()
    plain, ids, target = build(size, device, dtype)
    mb_ids, mb_target = ids[:micro], target[:micro]
    plain_stages = [PlainStage(plain, 0, depth // 2), PlainStage(plain, depth // 2, depth)]
    if not args.eager:
        for stage in plain_stages:
            stage.compile()
    plain_step = single_gpu_step(plain if args.eager else torch.compile(plain), ids, target, count)
    result["single_gpu_plain_ms"] = over_ranks(1e3 * median_seconds(plain_step, device, args.repeats))
    result["plain_stage_ms"] = stage_times(plain_stages, mb_ids, mb_target, device, args.repeats)
    plain.zero_grad(set_to_none=True)

    mhc_model, _, _ = build(size, device, dtype)
    mhc_compile.prepare(mhc_model, mb_ids, options={"n": args.n})
    plan = mhc_compile.plan_pipeline(mhc_model, (mb_ids,), 2, cuts=[cut], n=args.n, eager=args.eager)
    modules = build_stage_modules(plan, range(2))
    compile_stage_modules(modules, plan.captured.options)
    mhc_step = single_gpu_step(chained(modules), ids, target, count)
    result["single_gpu_mhc_ms"] = over_ranks(1e3 * median_seconds(mhc_step, device, args.repeats))
    result["mhc_stage_ms"] = stage_times(modules, mb_ids, mb_target, device, args.repeats)
    mhc_model.zero_grad(set_to_none=True)
    result["mhc_sends"] = list(plan.stages[0].sends)
    result["single_gpu_overhead"] = result["single_gpu_mhc_ms"] / result["single_gpu_plain_ms"]
    parts = {"plain": plain, "plain_stages": plain_stages, "modules": modules, "mhc_model": mhc_model, "plan": plan,
             "ids": ids, "target": target, "cut": cut}
    return result, parts


def one_device(name, size, device, dtype, args):
    """The pipeline's single-GPU parts on one device: each compiled stage's mHC cost beside the
    cost of the same layers compiled whole by backend="mhc" (issue 21: the per-stage cost matches
    the single-GPU one), and each stage with overlap on (nothing to hide on one GPU: its cost),
    after checking all three give the same gradients."""
    result, parts = single_device_part(name, size, device, dtype, args, over_ranks=lambda v: v)
    count, mhc_model = result["microbatches"], parts["mhc_model"]
    with torch.no_grad():  # away from init, where some mHC gradients are exactly zero
        for param in mhc_model.mhc.parameters():
            param.add_(0.05 * torch.randn_like(param))
    chained_step = single_gpu_step(chained(parts["modules"]), parts["ids"], parts["target"], count)
    chained_step()
    staged = gradients(mhc_model)
    mhc_model.zero_grad(set_to_none=True)
    whole = torch.compile(mhc_model, backend="mhc", options={"n": args.n, "eager": args.eager})
    whole_step = single_gpu_step(whole, parts["ids"], parts["target"], count)
    whole_step()
    worst = worst_relative_error(staged, gradients(mhc_model))
    result["stages_vs_whole_worst_relative_grad_error"] = worst
    if not worst <= grad_tolerance(dtype):
        raise AssertionError(f"compiled stages and the whole compiled model differ: {worst}")
    result["whole_model_mhc_ms"] = 1e3 * median_seconds(whole_step, device, args.repeats)
    mhc_model.zero_grad(set_to_none=True)
    overlap_modules = build_stage_modules(parts["plan"], range(2), overlap=True)
    compile_stage_modules(overlap_modules, parts["plan"].captured.options)
    overlap_step = single_gpu_step(chained(overlap_modules), parts["ids"], parts["target"], count)
    overlap_step()
    worst = worst_relative_error(gradients(mhc_model), staged)
    result["overlap_vs_stages_worst_relative_grad_error"] = worst
    if not worst <= grad_tolerance(dtype):
        raise AssertionError(f"compiled stages with and without overlap differ: {worst}")
    mhc_model.zero_grad(set_to_none=True)
    # One GPU has no boundary traffic to hide: what the side-stream mix costs where it gains nothing.
    result["overlap_stage_ms"] = stage_times(overlap_modules, parts["ids"][:result["microbatch"]],
                                             parts["target"][:result["microbatch"]], device, args.repeats)
    mhc_model.zero_grad(set_to_none=True)
    stage_extra = [m - p for m, p in zip(result["mhc_stage_ms"], result["plain_stage_ms"])]
    result["stage_extra_ms_per_step"] = [count * extra for extra in stage_extra]
    result["whole_model_extra_ms"] = result["whole_model_mhc_ms"] - result["single_gpu_plain_ms"]
    result["stages_extra_vs_whole"] = sum(result["stage_extra_ms_per_step"]) / result["whole_model_extra_ms"]
    return result


def print_one_device_table(results):
    log(f"\n{'size':10} {'stage':>5} {'plain ms':>9} {'mHC ms':>8} {'x plain':>8} {'mHC extra ms/step':>18} "
        f"{'overlap ms':>11}")
    for r in results["sizes"]:
        for index, (plain_ms, mhc_ms, extra, overlap_ms) in enumerate(zip(
                r["plain_stage_ms"], r["mhc_stage_ms"], r["stage_extra_ms_per_step"], r["overlap_stage_ms"])):
            log(f"{r['size']:10} {index:5} {plain_ms:9.2f} {mhc_ms:8.2f} {mhc_ms / plain_ms:8.3f} {extra:18.2f} "
                f"{overlap_ms:11.2f}")
        log(f"{r['size']:10} step (ms): plain {r['single_gpu_plain_ms']:.2f}, compiled stages chained "
            f"{r['single_gpu_mhc_ms']:.2f} ({r['single_gpu_overhead']:.3f}x), whole model "
            f"backend=\"mhc\" {r['whole_model_mhc_ms']:.2f} "
            f"({r['whole_model_mhc_ms'] / r['single_gpu_plain_ms']:.3f}x); stages' mHC extra / whole "
            f"model's: {r['stages_extra_vs_whole']:.3f}; gradients stages vs whole "
            f"{r['stages_vs_whole_worst_relative_grad_error']:.1e}, with overlap vs without "
            f"{r['overlap_vs_stages_worst_relative_grad_error']:.1e}")


def bench_size(name, size, device, dtype, rank, args):
    result, parts = single_device_part(
        name, size, device, dtype, args, over_ranks=lambda v: max_over_ranks(v, device))
    count, micro = result["microbatches"], result["microbatch"]
    plain, plain_stages = parts["plain"], parts["plain_stages"]
    modules, mhc_model = parts["modules"], parts["mhc_model"]
    ids, target, cut = parts["ids"], parts["target"], parts["cut"]
    mb_ids = ids[:micro]
    plain_times, mhc_times = result["plain_stage_ms"], result["mhc_stage_ms"]
    with torch.no_grad():
        boundary = modules[0](mb_ids)
    stream_grad_bytes = boundary[0].numel() * boundary[0].element_size()

    with torch.no_grad():
        plain_boundary = plain_stages[0](mb_ids)
    variants = []
    for label, stage_time, tensors, bytes_per_mb in (
        ("plain", plain_times, (plain_boundary,), 2 * plain_boundary.numel() * plain_boundary.element_size()),
        ("mhc", mhc_times, boundary,
         sum(t.numel() * t.element_size() for t in boundary) + stream_grad_bytes),
    ):
        makespan = sum(stage_time) + (count - 1) * max(stage_time)
        comm = count * max_over_ranks(transfer_ms(tensors, device, rank, args.repeats), device)
        result[f"{label}_makespan_ms"] = makespan
        result[f"{label}_transfer_ms_per_step"] = comm
        result[f"{label}_bytes_per_step"] = count * bytes_per_mb
    for label, overlap, async_exchange in (
        ("plain, sync", None, False), ("plain, async", None, True),
        ("mHC, no overlap", False, False), ("mHC, async exchange only", False, True),
        ("mHC, overlap", True, True),
    ):
        torch.compiler.reset()
        if overlap is None:
            from torch.distributed.pipelining import PipelineStage, Schedule1F1B

            stage = PipelineStage(plain_stages[rank], rank, 2, device)
            schedule = private_apis.build_schedule(
                Schedule1F1B, [stage], count, loss_fn=loss_fn, scale_grads=True,
                async_exchange=async_exchange)

            def step(schedule=schedule):
                schedule.step(*((ids,) if rank == 0 else ()), target=target)
            model, kind = plain, "plain"
        else:
            run = mhc_compile.pipeline(mhc_model, (ids,), 2, "1F1B", loss_fn=loss_fn,
                                       n_microbatches=count, cuts=[cut], overlap=overlap,
                                       async_exchange=async_exchange, n=args.n, eager=args.eager)
            step, model, kind = run_step(run, ids, target, rank), mhc_model, "mhc"
        step_ms = pipeline_step_ms(step, model, device, args.warmup, args.steps)
        busiest = count * max(result[f"{kind}_stage_ms"])
        variants.append({
            "variant": label, "step_ms": step_ms,
            "idle_share": 1 - busiest / step_ms,
            "exposed_comm_ms": step_ms - result[f"{kind}_makespan_ms"],
            "bytes_per_step": result[f"{kind}_bytes_per_step"],
        })
    by_label = {v["variant"]: v for v in variants}
    for v in variants:
        plain_same = by_label["plain, async" if "async" in v["variant"] or v["variant"] == "mHC, overlap"
                              else "plain, sync"]
        v["vs_plain"] = v["step_ms"] / plain_same["step_ms"]
    no_overlap = by_label["mHC, no overlap"]["exposed_comm_ms"]
    for label in ("mHC, async exchange only", "mHC, overlap"):
        hidden = (no_overlap - by_label[label]["exposed_comm_ms"]) / no_overlap if no_overlap > 0 else 0.0
        by_label[label]["comm_hidden"] = hidden
    result["variants"] = variants
    overlap_ratio = by_label["mHC, overlap"]["vs_plain"]
    result["targets"] = {
        "pipeline_overhead_overlap": overlap_ratio,
        "ratio_within_1.2x_single_gpu": overlap_ratio <= 1.2 * result["single_gpu_overhead"],
        "excess_within_1.2x_single_gpu": (overlap_ratio - 1) <= 1.2 * (result["single_gpu_overhead"] - 1),
        "overlap_faster_than_no_overlap": by_label["mHC, overlap"]["step_ms"]
        < by_label["mHC, no overlap"]["step_ms"],
        "overlap_speedup": by_label["mHC, no overlap"]["step_ms"] / by_label["mHC, overlap"]["step_ms"],
    }
    return result


def print_table(results):
    log(f"\n{'size':10} {'variant':26} {'step ms':>9} {'vs plain':>9} {'idle':>6} "
          f"{'exposed comm ms':>16} {'MB/step':>9} {'comm hidden':>12}")
    for result in results["sizes"]:
        for v in result["variants"]:
            hidden = f"{v['comm_hidden']:.0%}" if "comm_hidden" in v else ""
            log(f"{result['size']:10} {v['variant']:26} {v['step_ms']:9.2f} {v['vs_plain']:9.3f} "
                  f"{v['idle_share']:6.0%} {v['exposed_comm_ms']:16.2f} {v['bytes_per_step'] / 2**20:9.1f} "
                  f"{hidden:>12}")
        t = result["targets"]
        log(f"{result['size']:10} single GPU: plain {result['single_gpu_plain_ms']:.2f} ms, mHC "
              f"{result['single_gpu_mhc_ms']:.2f} ms, overhead {result['single_gpu_overhead']:.3f}; "
              f"pipeline overhead with overlap {t['pipeline_overhead_overlap']:.3f} "
              f"(ratio within 1.2x: {t['ratio_within_1.2x_single_gpu']}, excess within 1.2x: "
              f"{t['excess_within_1.2x_single_gpu']}); overlap faster: "
              f"{t['overlap_faster_than_no_overlap']} ({t['overlap_speedup']:.3f}x); transfer alone "
              f"{result['mhc_transfer_ms_per_step']:.2f} ms/step mHC, {result['plain_transfer_ms_per_step']:.2f} plain")


def main_one_device(args):
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sizes = SMOKE if args.smoke else {k: SIZES[k] for k in (args.sizes or SIZES)}
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
               **versions(), "dtype": str(dtype), "mode": "one device", "compiled": not args.eager,
               "sizes": [], "skipped_sizes": []}
    started, out = time.perf_counter(), out_dir(args.out)
    for name, size in sizes.items():
        if time.perf_counter() - started > args.budget_s:
            results["skipped_sizes"].append(name)
            continue
        results["sizes"].append(one_device(name, size, device, dtype, args))
        log(f"{name} done at {time.perf_counter() - started:.0f} s")
        write_json(out / "pipeline_one_device.json", results)
    print_one_device_table(results)
    log(f"wrote {out / 'pipeline_one_device.json'}; skipped for time: {results['skipped_sizes']}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny model (CPU check of the script)")
    parser.add_argument("--sizes", nargs="*", default=None, help=f"of {list(SIZES)}")
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--eager", action="store_true",
                        help="stage modules and the plain model uncompiled (the default compiles them)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", help="output folder (default $OUT, else bench/out)")
    parser.add_argument("--budget-s", type=float, default=1e9,
                        help="start no further size after this many seconds (device time limits)")
    parser.add_argument("--one-device", action="store_true",
                        help="one process, no pipeline: each compiled stage's cost beside the same "
                             "layers compiled whole (python bench/pipeline.py --one-device)")
    args = parser.parse_args()
    if args.one_device:
        return main_one_device(args)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if world != 2:
        raise SystemExit("bench/pipeline.py runs 2 stages on 2 ranks: torchrun --nproc-per-node 2")
    if args.device == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
        dtype = torch.bfloat16
    else:
        device, dtype = torch.device("cpu"), torch.float32
        torch.set_num_threads(1)
        dist.init_process_group("gloo")
    sizes = SMOKE if args.smoke else {k: SIZES[k] for k in (args.sizes or SIZES)}
    results = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        **versions(), "dtype": str(dtype),
        "env": {k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST")},
        "schedule": "1F1B", "stages": 2, "compiled": not args.eager,
    }
    started = time.perf_counter()
    results["correctness"] = check_correctness(device, dtype, rank, "layers.1", args.eager)
    if rank == 0:
        log(f"correctness: {results['correctness']}")
    results["sizes"], results["skipped_sizes"] = [], []
    out = out_dir(args.out)
    for name, size in sizes.items():
        # decided together (the slowest rank's clock), or one rank would wait alone in a collective
        if max_over_ranks(time.perf_counter() - started, device) > args.budget_s:
            results["skipped_sizes"].append(name)
            continue
        results["sizes"].append(bench_size(name, size, device, dtype, rank, args))
        if rank == 0:
            log(f"{name} done at {time.perf_counter() - started:.0f} s")
            write_json(out / "pipeline.json", results)
    if rank == 0:
        print_table(results)
        log(f"wrote {out / 'pipeline.json'}; skipped for time: {results['skipped_sizes']}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
