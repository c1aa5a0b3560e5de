"""Data parallelism: backend="mhc" under DDP or FSDP2 trains the model one process trains.

Two gloo processes, each with half of the batch, against the single-process run of the same
rewritten model on the whole batch (float64): the loss's gradients of every parameter, the mHC
parameters among them, after DDP's all-reduce or FSDP2's reduce-scatter. FSDP2 shards either the
compiled model as one unit or, per block, the units mhc_compile.fsdp_units cuts the rewritten model
into; torch.distributed.checkpoint round-trips the sharded mHC parameters of both. And the ways
data parallelism would train another model, each a clear error: Dynamo's DDP graph splitting
(torch._dynamo.config.optimize_ddp, on by default), mHC parameters created after DDP was built,
fully_shard (FSDP2) on the model's own submodules, which Dynamo compiles one graph each, and
fsdp_units called at another shape than it was traced at.
"""

import copy
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

import mhc_compile
from mhc_compile.examples import gpt
from mhc_compile.parameters import MHCParameters
from single_process import (
    attention_that_compiles_in_float64, example_model, loss_of, single_process_run,
)

SIZES = dict(depth=2, batch=4, seq=8, width=32, heads=2)


def _model(prepared=True, seed=0):
    return example_model(gpt, seed=seed, prepared=prepared, **SIZES)


def _ddp_step(rank, wrap, eager):
    """One step on this rank's half of the batch; the parameters' gradients by name (whole, where
    FSDP2 shards them), and the single-process ones."""
    model, ids, target = _model()
    _, expected = single_process_run(model, ids, target)
    torch._dynamo.reset()
    backend = mhc_compile.backend(eager=eager)
    if wrap == "compile(DDP)":
        run = torch.compile(DDP(model), backend=backend)
    elif wrap == "DDP(compile)":
        run = DDP(torch.compile(model, backend=backend))
    elif wrap == "FSDP2, one unit":
        run = torch.compile(fully_shard(model), backend=backend)
    else:  # "FSDP2 per block"
        run = _sharded_units(model, ids[:2], eager)
    half = slice(2 * rank, 2 * rank + 2)  # both average the two halves' gradients
    loss_of(run(ids[half]), target[half]).backward()
    return {name: _whole(p.grad) for name, p in _trained_parameters(run, model)}, expected


def _sharded_units(model, ids, eager):
    units = mhc_compile.fsdp_units(model, (ids,), eager=eager)
    assert len(units.units) == SIZES["depth"], "not one unit per transformer block"
    for unit in units.units:
        fully_shard(unit)
    return fully_shard(units)


def _trained_parameters(run, model):
    """The trained parameters under the model's names (fsdp_units's are "units.{i}.{name}")."""
    if isinstance(run, mhc_compile.FSDPUnits):
        return [(name.split(".", 2)[2], p) for name, p in run.named_parameters()]
    return model.named_parameters()


def _whole(grad):
    return grad.full_tensor() if grad is not None and hasattr(grad, "full_tensor") else grad


def _assert_same_training(rank, wrap, eager):
    grads, expected = _ddp_step(rank, wrap, eager)
    assert set(grads) == set(expected)
    for name, grad in grads.items():
        assert grad is not None, f"{wrap}: {name} got no gradient"
        torch.testing.assert_close(grad, expected[name], rtol=1e-9, atol=1e-12,
                                   msg=lambda message: f"{wrap}, {name}: {message}")


def _ddp(model):
    return DDP(model)


def _fully_sharded(model):
    for block in model.blocks:
        fully_shard(block)
    return fully_shard(model)


def _assert_refused(rank, prepared, expected_text, wrap=_ddp):
    model, ids, target = _model(prepared=prepared)
    torch._dynamo.reset()
    run = torch.compile(wrap(model), backend=mhc_compile.backend(eager=True))
    with pytest.raises(Exception) as error:
        run(ids[2 * rank: 2 * rank + 2])
    assert "mhc:" in str(error.value) and expected_text in str(error.value), str(error.value)
    left = [m for m in model.modules() if isinstance(m, MHCParameters)]
    assert prepared or not left, "a refused compile left mHC parameters behind"


def _one_unit(model, ids):
    return fully_shard(model)


def _per_block(model, ids):
    return _sharded_units(model, ids, eager=True)


def _assert_checkpoint_round_trip(directory, shard):
    """FSDP2: torch.distributed.checkpoint saves the sharded mHC parameters with the others and
    loads them into a fresh prepared model sharded the same way, each rank its shard."""
    import torch.distributed.checkpoint as dcp

    model, ids, _ = _model(seed=0)
    original = shard(model, ids[:2])
    dcp.save({"model": original.state_dict()}, checkpoint_id=directory)
    model, _, _ = _model(seed=5)  # other weights and mHC parameters
    fresh = shard(model, ids[:2])
    state = {"model": fresh.state_dict()}
    dcp.load(state, checkpoint_id=directory)
    fresh.load_state_dict(state["model"])
    saved = {name: _whole(p.detach()) for name, p in original.named_parameters()}
    loaded = {name: _whole(p.detach()) for name, p in fresh.named_parameters()}
    assert any(".mhc." in f".{name}" for name in loaded)
    for name, tensor in loaded.items():
        torch.testing.assert_close(tensor, saved[name], rtol=0, atol=0, msg=name)


def _assert_units_refuse_other_shapes():
    model, ids, _ = _model()
    units = mhc_compile.fsdp_units(model, (ids[:2],), eager=True)
    with pytest.raises(ValueError, match=r"traced with \(\(2, 8\) int64 on cpu\).*drop_last=True"):
        units(ids[:1])
    with pytest.raises(ValueError, match="traced in training mode"):
        units.eval()(ids[:2])


def _assert_transformers_model_per_block(rank):
    """A transformers LLaMA (KV cache off: a cache computed from the streams would cross every
    cut) sharded per block through fsdp_units trains the one-process model; its units return
    the logits, what the traced graph returns."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=101,
                                      use_cache=False)
    model = transformers.LlamaForCausalLM(config).double()
    ids = torch.randint(0, 101, (4, 8), generator=torch.Generator().manual_seed(1))
    target = torch.roll(ids, 1, dims=1)
    mhc_compile.prepare(model, ids[:2])
    reference = copy.deepcopy(model)
    torch._dynamo.reset()
    loss_of(torch.compile(reference, backend=mhc_compile.backend(eager=True))(ids).logits,
            target).backward()
    units = _sharded_units(model, ids[:2], eager=True)
    half = slice(2 * rank, 2 * rank + 2)
    loss_of(units(ids[half]), target[half]).backward()
    expected = dict(reference.named_parameters())
    for name, param in _trained_parameters(units, model):
        torch.testing.assert_close(_whole(param.grad), expected[name].grad, rtol=1e-9, atol=1e-12,
                                   msg=name)


def _assert_units_refuse_mixed_precision():
    """FSDP2's MixedPrecisionPolicy hands the units parameters of another dtype than traced."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    model, ids, _ = _model()
    units = mhc_compile.fsdp_units(model, (ids[:2],), eager=True)
    policy = MixedPrecisionPolicy(param_dtype=torch.float32)
    for unit in units.units:
        fully_shard(unit, mp_policy=policy)
    fully_shard(units, mp_policy=policy)
    with pytest.raises(ValueError, match="MixedPrecisionPolicy.*Cast the model"):
        units(ids[:2])


def _worker(rank, port, directory):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        with torch._dynamo.config.patch(optimize_ddp=False), attention_that_compiles_in_float64():
            _assert_same_training(rank, "compile(DDP)", eager=True)
            _assert_same_training(rank, "DDP(compile)", eager=False)  # through Inductor
            _assert_same_training(rank, "FSDP2, one unit", eager=True)
            _assert_same_training(rank, "FSDP2 per block", eager=False)  # through Inductor
            _assert_checkpoint_round_trip(f"{directory}/one_unit", _one_unit)
            _assert_checkpoint_round_trip(f"{directory}/per_block", _per_block)
            _assert_units_refuse_other_shapes()
            _assert_units_refuse_mixed_precision()
            _assert_transformers_model_per_block(rank)
            _assert_refused(rank, prepared=False, expected_text="mhc_compile.prepare(model")
        # Dynamo's default for DDP graphs: split at gradient-bucket boundaries.
        _assert_refused(rank, prepared=True, expected_text="torch._dynamo.config.optimize_ddp = False")
        _assert_refused(rank, prepared=True, expected_text="fully_shard (FSDP2) applied to submodules",
                        wrap=_fully_sharded)
    finally:
        dist.destroy_process_group()


def test_ddp_trains_the_single_process_model_and_what_would_not_is_refused(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_worker, args=(port, str(tmp_path / "checkpoint")), nprocs=2, join=True)
