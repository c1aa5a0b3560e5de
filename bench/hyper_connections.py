"""A model that already has hyper-connections: a small random DeepSeek-V4 from transformers (no
download), one training step (forward + backward) eager, under default torch.compile (Inductor)
and under backend="mhc", which lowers its hyper-connections onto our kernels
(passes/lower_hyper_connections.py).

    python bench/hyper_connections.py [--sizes C1024 C2048] [--steps 10]
    python bench/hyper_connections.py --tiny --device cpu          # CPU smoke run of the script
    python bench/hyper_connections.py --sizes C512 --profile       # + GPU ms by kernel family

Variants: eager, default Inductor, backend="mhc", and backend="mhc" with the recompute policy off
(`--variants` picks; eager always runs: it is the reference the others are checked against).

Per size and variant: the first step's seconds (compile), the median step ms, peak memory over the
steps after the first (and the first step's, which holds compile-time buffers), and
the loss and gradient norm against eager's at the same weights (correctness first: the model's
hyper-connections computed by the ops must give the eager model's loss within bf16 tolerance).
Writes hyper_connections.json under $OUT (or bench/out) and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

from common import (log, median_seconds, out_dir, profile_steps, profile_text, synchronize,
                    take_peak_gib, versions, write_json, write_table)

# This folder is on sys.path (the script's own), and its kernels.py would shadow the `kernels`
# package that transformers imports when it is installed.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != _HERE]

# name: DeepseekV4Config sizes (hc_mult 4, 20 Sinkhorn iterations: the config's defaults). Two
# layers each: the 4-layer C1024 model's Inductor compile alone took over 200 s on the H100.
SIZES = {
    "C512": dict(hidden_size=512, intermediate_size=1024, moe_intermediate_size=256,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=64,
                 q_lora_rank=128, o_lora_rank=128, n_routed_experts=4, num_experts_per_tok=2,
                 index_head_dim=32, qk_rope_head_dim=32, vocab_size=4096),
    "C1024": dict(hidden_size=1024, intermediate_size=2048, moe_intermediate_size=512,
                  num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=1, head_dim=128,
                  q_lora_rank=256, o_lora_rank=256, n_routed_experts=8, num_experts_per_tok=2,
                  index_head_dim=64, qk_rope_head_dim=64, vocab_size=8192),
    "C2048": dict(hidden_size=2048, intermediate_size=4096, moe_intermediate_size=1024,
                  num_hidden_layers=2, num_attention_heads=16, num_key_value_heads=1, head_dim=128,
                  q_lora_rank=512, o_lora_rank=512, n_routed_experts=8, num_experts_per_tok=2,
                  index_head_dim=64, qk_rope_head_dim=64, vocab_size=8192),
}
TINY = {"tiny": dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                     head_dim=16, q_lora_rank=16, o_lora_rank=16, n_routed_experts=4,
                     num_experts_per_tok=2, index_head_dim=8, qk_rope_head_dim=8, vocab_size=101)}
VARIANTS = ("eager", "inductor", "mhc", "mhc_no_recompute")


def build(config: dict, device: torch.device, dtype: torch.dtype, batch: int, seq: int):
    import transformers

    torch.manual_seed(0)
    model = transformers.DeepseekV4ForCausalLM(transformers.DeepseekV4Config(**config))
    with torch.no_grad():  # transformers leaves the hyper-connection weights to a checkpoint
        for name, param in model.named_parameters():
            if "hc" in name:
                param.normal_(0.0, 0.5 if "base" in name or "scale" in name else 0.02)
    model = model.to(device=device, dtype=dtype).train()
    for module in model.modules():  # as from_pretrained keeps them (_keep_in_fp32_modules_strict)
        if type(module).__name__ in ("DeepseekV4HyperConnection", "DeepseekV4HyperHead"):
            module.float()
    ids = torch.randint(0, config["vocab_size"], (batch, seq), device=device)
    return model, ids


def compiled(model, variant: str):
    if variant == "eager":
        return model
    if variant == "inductor":
        return torch.compile(model)
    import mhc_compile

    report = mhc_compile.report(model, torch.zeros(1, 8, dtype=torch.long,
                                                   device=next(model.parameters()).device))
    log(f"  {report.summary()}")
    expected = 2 * model.config.num_hidden_layers
    if len(report.lowered) != expected:  # else the row would time plain Inductor
        raise AssertionError(f"{len(report.lowered)} of {expected} hyper-connections lowered: "
                             f"{[b.reason for b in report.blocks if b.status != 'lowered']}")
    return torch.compile(model, backend="mhc",
                         options={"recompute": False} if variant == "mhc_no_recompute" else None)


def run_variant(base_model, ids, variant: str, device, args) -> dict:
    torch.compiler.reset()
    model = copy.deepcopy(base_model)
    run = compiled(model, variant)

    def step():
        loss = run(ids, labels=ids).loss
        loss.backward()
        return loss

    take_peak_gib(device)  # the peaks below start here
    synchronize(device)
    started = time.perf_counter()
    loss = step()
    synchronize(device)
    first_s = time.perf_counter() - started
    grad_norm = torch.linalg.vector_norm(
        torch.stack([p.grad.float().norm() for p in model.parameters() if p.grad is not None])).item()
    model.zero_grad(set_to_none=True)
    # The first step's peak holds compile-time buffers (the autotuners' copies of kernel
    # arguments); training's own peak is the steps' after it.
    first_peak = take_peak_gib(device)
    step_ms = 1e3 * median_seconds(lambda: (step(), model.zero_grad(set_to_none=True)), device,
                                   args.steps, warmup=2)
    peak = take_peak_gib(device)
    row = {"variant": variant, "first_step_s": first_s, "step_ms": step_ms, "peak_gib": peak,
           "first_step_peak_gib": first_peak, "loss": loss.item(), "grad_norm": grad_norm}
    profiled = profile_steps(lambda: (step(), model.zero_grad(set_to_none=True)), device) \
        if args.profile else None
    if profiled is not None:
        row["profile"] = profiled
        log(profile_text(profiled))
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--tiny", action="store_true", help="a tiny model (CPU smoke run)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS[1:]), choices=VARIANTS[1:])
    parser.add_argument("--profile", action="store_true",
                        help="profile two steps per variant: GPU ms by kernel family (JSON, log)")
    parser.add_argument("--out", help="output folder (default $OUT, else bench/out)")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sizes = TINY if args.tiny else {name: SIZES[name] for name in args.sizes}
    batch, seq = (2, 16) if args.tiny else (args.batch, args.seq)
    results = {**versions(), "device": torch.cuda.get_device_name(device) if device.type == "cuda"
               else "cpu", "dtype": str(dtype), "batch": batch, "seq": seq, "rows": []}
    for name, config in sizes.items():
        base_model, ids = build(config, device, dtype, batch, seq)
        rows = []
        for variant in ("eager", *args.variants):
            log(f"{name} {variant}")
            rows.append({"size": name, **run_variant(base_model, ids, variant, device, args)})
        eager = rows[0]
        inductor = next((row for row in rows if row["variant"] == "inductor"), None)
        for row in rows:
            row["vs_eager"] = row["step_ms"] / eager["step_ms"]
            row["vs_inductor"] = row["step_ms"] / inductor["step_ms"] if inductor else float("nan")
            row["loss_diff"] = abs(row["loss"] - eager["loss"])
            row["grad_norm_ratio"] = row["grad_norm"] / eager["grad_norm"]
        # bf16: Inductor's own reordering moves the loss by ~1e-3 relative (its row shows it)
        tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-5
        for row in rows:
            if row["loss_diff"] > tolerance * abs(eager["loss"]) or abs(row["grad_norm_ratio"] - 1) > 5 * tolerance:
                raise AssertionError(f"{name}: {row['variant']} loss {row['loss']} (eager {eager['loss']}), "
                                     f"grad norm {row['grad_norm_ratio']:.4f} of eager's")
        results["rows"].extend(rows)
        write_json(out_dir(args.out) / "hyper_connections.json", results)
    lines = ["| size | variant | first step s | step ms | vs eager | vs inductor | peak GiB | first step peak GiB | loss | |loss - eager| | grad norm / eager |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in results["rows"]:
        lines.append(f"| {row['size']} | {row['variant']} | {row['first_step_s']:.1f} | {row['step_ms']:.2f} | "
                     f"{row['vs_eager']:.3f} | {row['vs_inductor']:.3f} | {row['peak_gib']:.2f} | {row['first_step_peak_gib']:.2f} | "
                     f"{row['loss']:.4f} | {row['loss_diff']:.2e} | {row['grad_norm_ratio']:.4f} |")
    write_table(out_dir(args.out) / "hyper_connections.md", "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
