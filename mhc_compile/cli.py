"""`mhc-compile`: report which residual blocks are rewritten, train a built-in example, and
autotune the Triton kernels for the shapes a model will run."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from mhc_compile.options import STREAM_DTYPES, MHCOptions
from mhc_compile.reference import CONSTRAINTS


class UsageError(Exception):
    """Bad command-line input: a TARGET that names no factory, an invalid option."""


def load_target(target: str) -> tuple[torch.nn.Module, tuple]:
    """`pkg.module:factory` or `path/to/file.py:factory` -> factory() = (model, example_args)."""
    location, sep, name = target.rpartition(":")
    if not sep or not location or not name:
        raise UsageError(f"TARGET must look like 'pkg.module:factory' or 'file.py:factory', got {target!r}")
    module = _import_location(location)
    factory = getattr(module, name, None)
    if not callable(factory):
        raise UsageError(f"{location} has no callable named {name!r}")
    return _checked(factory(), target)


def _import_location(location: str):
    path = Path(location)
    if location.endswith(".py") or path.exists():
        if not path.is_file():
            raise UsageError(f"no such file: {location}")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        sys.path.insert(0, str(path.parent.resolve()))
        try:
            spec.loader.exec_module(module)
        finally:
            sys.path.pop(0)
        return module
    try:
        return importlib.import_module(location)
    except ModuleNotFoundError as error:
        raise UsageError(f"cannot import {location!r}: {error}") from error


def _checked(result: Any, target: str) -> tuple[torch.nn.Module, tuple]:
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], torch.nn.Module)):
        raise UsageError(f"{target} must return (model, example_args), got {type(result).__name__}")
    model, example_args = result
    return model, tuple(example_args) if isinstance(example_args, (tuple, list)) else (example_args,)


def _example(name: str) -> tuple[torch.nn.Module, tuple]:
    from mhc_compile.examples import EXAMPLES

    return EXAMPLES[name]()


def _options(args: argparse.Namespace) -> dict[str, Any]:
    options = {"n": args.n, "sinkhorn_iters": args.sinkhorn_iters, "constraint": args.constraint,
               "include": tuple(args.include), "exclude": tuple(args.exclude),
               "stream_dtype": args.stream_dtype}
    try:
        MHCOptions.from_kwargs(**options)  # fail before any tracing
    except (TypeError, ValueError) as error:
        raise UsageError(str(error)) from error
    return options


def _model(args: argparse.Namespace) -> tuple[torch.nn.Module, tuple]:
    if args.example:
        return _example(args.example)
    if not args.target:
        raise UsageError("give a TARGET (pkg.module:factory or file.py:factory) or --example NAME")
    return load_target(args.target)


def command_report(args: argparse.Namespace) -> int:
    import mhc_compile

    options = _options(args)
    model, example_args = _model(args)
    if args.checkpoint and not args.gain:
        raise UsageError("--checkpoint is read by --gain; add --gain")
    if args.gain:
        report = mhc_compile.prepare(model, *example_args, options=options)  # the parameters to measure
        if args.checkpoint:
            _load_checkpoint(model, args.checkpoint)
        gains = mhc_compile.gain(model, *example_args, options={
            "include": options["include"], "exclude": options["exclude"]})
        report.print()
        gains.print()
        record = {**report.to_dict(), "gain": gains.to_dict()}
    else:
        report = mhc_compile.report(model, *example_args, options=options)
        report.print()
        record = report.to_dict()
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2))
    if args.stages:
        _print_stages(model, example_args, args.stages, options)
    return 0


def _print_stages(model: torch.nn.Module, example_args: tuple, stages: int, options: dict) -> None:
    import copy

    import mhc_compile
    from mhc_compile.pipeline_plan import PipelineError

    try:  # on a copy: planning traces the rewrite, which adds mHC parameters
        mhc_compile.plan_pipeline(copy.deepcopy(model), example_args, stages, **options).print()
    except PipelineError as error:
        raise UsageError(str(error)) from error


def _load_checkpoint(model: torch.nn.Module, path: str) -> None:
    """A state_dict saved from a model prepared the same way (torch.save(model.state_dict()))."""
    if not Path(path).is_file():
        raise UsageError(f"no such checkpoint: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as error:
        raise UsageError(f"checkpoint {path} does not fit the prepared model: {error}") from error


def command_train(args: argparse.Namespace) -> int:
    """The end-to-end job: prepare, report, then a short training run of the compiled model."""
    import mhc_compile
    from mhc_compile.examples import EXAMPLES

    options = _options(args)
    model, (example_ids,) = EXAMPLES[args.example]()
    with torch.no_grad():
        vocab_size = model(example_ids).shape[-1]
    batches = byte_batches(vocab_size, *example_ids.shape)
    example_args = (next(batches)[0],)
    report = mhc_compile.prepare(model, *example_args, options=options)
    report.print()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    compiled = torch.compile(model, backend=mhc_compile.backend(**options, eager=args.eager))
    print(f"training {args.example} for {args.steps} steps "
          f"({'eager rewritten graph' if args.eager else 'Inductor'}); the first step compiles")
    for step in range(args.steps):
        inputs, targets = next(batches)
        started = time.perf_counter()
        logits = compiled(inputs)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        print(f"step {step:3d}  loss {loss.item():.4f}  {1e3 * (time.perf_counter() - started):8.1f} ms")
    return 0


def byte_batches(vocab_size: int, batch: int, seq: int, seed: int = 0):
    """Next-byte prediction on the Python standard library's own source: real text, no download.

    Bytes outside printable ASCII share one id, so any vocabulary of 96 or more fits.
    """
    import os

    files = sorted(Path(os.__file__).parent.glob("*.py"))[:40]
    text = b"".join(f.read_bytes() for f in files)
    ids = torch.tensor([b - 32 if 32 <= b < 127 else 95 for b in text], dtype=torch.long)
    ids = ids.clamp(max=vocab_size - 1)
    generator = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, len(ids) - seq - 1, (batch,), generator=generator)
        window = torch.stack([ids[s : s + seq + 1] for s in starts.tolist()])
        yield window[:, :-1], window[:, 1:]


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def command_autotune(args: argparse.Namespace) -> int:
    """Time every kernel config for each (n, C, dtype) and keep the fastest (memory and Triton's
    cache directory, reused by later processes), printing the progress and the choices."""
    import logging

    from mhc_compile import templates

    if not templates.kernels_active("cuda"):
        triton = "installed" if templates.triton_available() else "missing"
        raise UsageError(
            "autotune needs a CUDA GPU and Triton: kernels are tuned by timing them on the GPU they "
            f"will run on (torch.cuda.is_available() is {torch.cuda.is_available()}, Triton {triton})"
        )
    if not 1 <= args.n <= templates.MAX_STREAMS:
        raise UsageError(f"autotune: the kernels take 1 <= n <= {templates.MAX_STREAMS}, got {args.n}")
    from mhc_compile.templates import configs
    progress = logging.getLogger("mhc_compile.templates")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("  %(message)s"))
    progress.addHandler(handler)
    progress.setLevel(logging.INFO)
    forced = configs.forced_configs(os.environ.get(configs.ENV_VAR))
    if forced:
        print(f"{configs.ENV_VAR} forces the configs of {', '.join(sorted(forced))}: not timed")
    tables_on, configs.AUTOTUNE_ALL = configs.AUTOTUNE_ALL, True  # time what the tables would skip
    try:
        for channels in args.C:
            print(f"n={args.n} C={channels} {args.dtype}, {args.tokens} tokens:")
            started = time.perf_counter()
            chosen = templates.tune_sublayer(args.n, channels, args.tokens, DTYPES[args.dtype],
                                             args.sinkhorn_iters)
            print(f"  done in {time.perf_counter() - started:.1f} s; chosen:")
            for kernel, config in sorted(chosen.items()):
                print(f"    {kernel:32s} {config}")
    finally:
        progress.removeHandler(handler)
        configs.AUTOTUNE_ALL = tables_on
    return 0


def build_parser() -> argparse.ArgumentParser:
    from mhc_compile.examples import EXAMPLES

    parser = argparse.ArgumentParser(prog="mhc-compile", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--n", type=int, default=4, help="number of residual streams (default 4)")
    common.add_argument("--sinkhorn-iters", type=int, default=20)
    common.add_argument("--constraint", choices=CONSTRAINTS, default="sinkhorn")
    common.add_argument("--include", action="append", default=[], metavar="GLOB",
                        help="only rewrite blocks whose module path matches (repeatable)")
    common.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                        help="keep blocks whose module path matches as plain residuals (repeatable)")
    common.add_argument("--stream-dtype", choices=STREAM_DTYPES,
                        help="store the streams in this dtype (default: the residual's)")
    report = commands.add_parser("report", parents=[common],
                                 help="which residual blocks are rewritten or skipped, and why")
    report.add_argument("target", nargs="?", help="pkg.module:factory or file.py:factory, "
                        "where factory() returns (model, example_args)")
    report.add_argument("--example", choices=sorted(EXAMPLES), help="a built-in example model")
    report.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    report.add_argument("--gain", action="store_true",
                        help="also measure the Amax gain of H_res across depth on the example "
                        "args (prepares the model with the options given)")
    report.add_argument("--checkpoint", metavar="FILE",
                        help="with --gain: load this state_dict after preparing (give the options "
                        "it was trained with, e.g. --constraint none)")
    report.add_argument("--stages", type=int, metavar="K",
                        help="also propose pipeline stage cuts for K stages (mhc_compile.pipeline)")
    report.set_defaults(run=command_report)
    train = commands.add_parser("train", parents=[common],
                                help="prepare, report and train a built-in example for a few steps")
    train.add_argument("--example", choices=["gpt", "llama"], default="gpt")
    train.add_argument("--steps", type=int, default=20)
    train.add_argument("--lr", type=float, default=3e-3)
    train.add_argument("--eager", action="store_true", help="run the rewritten graph without Inductor")
    train.set_defaults(run=command_train)
    autotune = commands.add_parser("autotune", help="time the Triton kernels' configs on this GPU "
                                   "for the given shapes and keep the fastest (needs CUDA)")
    autotune.add_argument("--n", type=int, default=4, help="number of residual streams (default 4)")
    autotune.add_argument("--C", type=int, nargs="+", default=[1024, 2048, 4096], metavar="C",
                          help="channel widths (default 1024 2048 4096)")
    autotune.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="stream dtype")
    autotune.add_argument("--tokens", type=int, default=16384, help="tokens per call (default 16384)")
    autotune.add_argument("--sinkhorn-iters", type=int, default=20)
    autotune.set_defaults(run=command_autotune)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except UsageError as error:
        print(f"mhc-compile: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
