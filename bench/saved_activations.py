"""What one training forward keeps for backward, by kind of tensor: where mHC's memory goes.

Builds bench/e2e.py's LLaMA of one size (the same layers and width, fewer tokens: saved activations
scale with tokens), runs one bf16-autocast forward of each variant through torch.compile, and sums
the bytes of the distinct tensors autograd saves (torch.autograd.graph.saved_tensors_hooks), by kind:

    streams      [..., n, C]  the residual streams the recompute policy keeps
    residual     [..., C]     residual-sized tensors: F's inputs and outputs, norms' inputs
    weights      tensors shaped like a parameter (autocast's bf16 copies of the weights)
    other        attention, MLP hiddens, coefficients, ...

The model's own parameters (the mHC ones included) are saved too but cost nothing extra: left out.

It runs on any device (CPU included: the bytes saved do not depend on the allocator), so the peak
memory that bench/e2e.py measures on a GPU can be explained by bytes.

    python bench/saved_activations.py [--size C1024] [--tokens 256]
                                      [--variants baseline mhc mhc_bf16 mhc_no_recompute]
"""

from __future__ import annotations

import argparse
import collections

import torch

import e2e
from common import log, out_dir, write_json


def saved_bytes_by_kind(forward, ids: torch.Tensor, model: torch.nn.Module, width: int,
                        n: int) -> dict[str, int]:
    """Bytes of the distinct storages one autocast forward saves for backward, by kind (the
    model's parameters left out)."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    parameter_shapes = {tuple(p.shape) for p in model.parameters()}
    saved: dict[int, tuple[tuple, int]] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        saved[storage.data_ptr()] = (tuple(tensor.shape), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), \
            torch.autocast(ids.device.type, dtype=torch.bfloat16):
        forward(ids)
    kinds: dict[str, int] = collections.Counter()
    for storage, (shape, nbytes) in saved.items():
        if storage not in parameters:
            kinds[_kind(shape, parameter_shapes, width, n)] += nbytes
    return dict(kinds)


def _kind(shape: tuple, parameter_shapes: set, width: int, n: int) -> str:
    if shape in parameter_shapes:
        return "weights"
    if shape[-2:] == (n, width):
        return "streams"
    if shape and shape[-1] == width:
        return "residual"
    return "other"


SIZES = {**e2e.SIZES, **e2e.TINY}


def measure(size_name: str, tokens: int, variant: str, device: torch.device) -> dict[str, int]:
    size = dict(SIZES[size_name], batch=1, seq=tokens)
    model, ids = e2e.build_llama(size, device)
    torch.compiler.reset()
    _, forward, _ = e2e.prepare_variant(variant, model, ids, device)
    inputs = ids[:, :-1]
    with torch.autocast(device.type, dtype=torch.bfloat16):
        forward(inputs)  # compile outside the measurement
    return saved_bytes_by_kind(forward, inputs, model, size["width"], e2e.N_STREAMS)


def table(size_name: str, tokens: int, rows: dict[str, dict[str, int]]) -> str:
    """MiB saved per kind at `tokens`, and the activations (weights left out) scaled to the e2e
    batch's tokens, against the baseline."""
    size = SIZES[size_name]
    scale = size["batch"] * size["seq"] / tokens
    kinds = ("streams", "residual", "other", "weights")
    lines = [f"| variant | {' | '.join(f'{kind} MiB' for kind in kinds)} | activations at "
             f"{size['batch']}x{size['seq']} tokens, GiB | vs baseline |",
             "|---|" + "---|" * (len(kinds) + 2)]
    baseline = None
    for variant, kinds_saved in rows.items():
        activations = (sum(kinds_saved.values()) - kinds_saved.get("weights", 0)) * scale / 2**30
        baseline = activations if variant == "baseline" else baseline
        versus = f"+{activations - baseline:.2f} GiB" if baseline is not None else ""
        lines.append(f"| {variant} | "
                     + " | ".join(f"{kinds_saved.get(kind, 0) / 2**20:.1f}" for kind in kinds)
                     + f" | {activations:.2f} | {versus} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="C1024", choices=list(SIZES))
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--variants", nargs="+", default=["baseline", "mhc", "mhc_bf16",
                                                          "mhc_no_recompute"],
                        choices=["baseline", *e2e.MHC_VARIANTS])
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = {variant: measure(args.size, args.tokens, variant, device) for variant in args.variants}
    log(table(args.size, args.tokens, rows))
    path = out_dir() / f"saved_activations_{args.size}_{device.type}.json"
    write_json(path, {"size": args.size, "tokens": args.tokens, "device": device.type, "bytes": rows})
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
