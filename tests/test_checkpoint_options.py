"""n, constraint and sinkhorn_iters travel with every block's mHC parameters in the state_dict:
a checkpoint made with other options than the model it is loaded into, or a compile with other
options than the blocks were made with, is a clear error, never another function computed
silently. Outputs are checked against a hand-written mHC forward on fresh random inputs."""

import re
import warnings

import pytest
import torch
import torch._dynamo

import mhc_compile
from hand_mhc import TanhBlocks, hand_written_mhc, randomize_mhc


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each prepare/gain/compile below adds a Dynamo cache entry for TanhBlocks.forward."""
    torch._dynamo.reset()


def _inputs(seed, tokens=5):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, tokens, 6, dtype=torch.float64, generator=generator)


def _prepared(seed=0, **options):
    """A TanhBlocks with its own weights (seed), prepared with `options`."""
    torch.manual_seed(seed)
    model = TanhBlocks().double()
    mhc_compile.prepare(model, _inputs(100), options=options)
    return model


def _run_compiled(model, x, **options):
    torch._dynamo.reset()
    with torch.no_grad():
        return torch.compile(model, backend="mhc", options={"eager": True, **options})(x)


def _saved(model, tmp_path, drop_settings=False):
    """model's state_dict through a file, as a checkpoint is; without the settings entries (as
    saved before they existed) when drop_settings."""
    state = {k: v for k, v in model.state_dict().items()
             if not (drop_settings and k.endswith("._extra_state"))}
    torch.save(state, tmp_path / "checkpoint.pt")
    return torch.load(tmp_path / "checkpoint.pt", weights_only=True)


def test_hc_checkpoint_into_a_sinkhorn_prepared_model_is_a_clear_error(tmp_path):
    checkpoint = _saved(randomize_mhc(_prepared(constraint="none")), tmp_path)
    model = _prepared(seed=2)  # defaults: constraint="sinkhorn"
    with pytest.raises(RuntimeError, match=re.escape(
            "mhc: checkpoint entry 'mhc.blocks.fcs-0' (block 'fcs.0') was saved with n=4, C=6, "
            "constraint='none', sinkhorn_iters=20, but this model's block has n=4, C=6, "
            "constraint='sinkhorn', sinkhorn_iters=20: loaded, it would compute another "
            "function. Prepare the model with the checkpoint's options before loading it: "
            "mhc_compile.prepare(model, *example_args, options={'constraint': 'none'}).")):
        model.load_state_dict(checkpoint)
    with pytest.raises(RuntimeError, match=re.escape(  # strict=False is about keys, not settings
            "mhc: checkpoint entry 'mhc.blocks.fcs-0' (block 'fcs.0') was saved with n=4, C=6, "
            "constraint='none'")):
        model.load_state_dict(checkpoint, strict=False)


@pytest.mark.parametrize("saved, prepared, expected", [
    ({"n": 2}, {}, "was saved with n=2, C=6, constraint='sinkhorn', sinkhorn_iters=20, but this "
     "model's block has n=4, C=6, constraint='sinkhorn', sinkhorn_iters=20: loaded, it would "
     "compute another function. Prepare the model with the checkpoint's options before loading "
     "it: mhc_compile.prepare(model, *example_args, options={'n': 2})."),
    ({"sinkhorn_iters": 5, "constraint": "sinkhorn"}, {"n": 4}, "was saved with n=4, C=6, "
     "constraint='sinkhorn', sinkhorn_iters=5, but this model's block has n=4, C=6, "
     "constraint='sinkhorn', sinkhorn_iters=20: loaded, it would compute another function. "
     "Prepare the model with the checkpoint's options before loading it: "
     "mhc_compile.prepare(model, *example_args, options={'sinkhorn_iters': 5})."),
], ids=["n", "sinkhorn_iters"])
def test_other_n_or_sinkhorn_iters_in_the_checkpoint_is_a_clear_error(saved, prepared, expected,
                                                                     tmp_path):
    checkpoint = _saved(randomize_mhc(_prepared(**saved)), tmp_path)
    with pytest.raises(RuntimeError, match=re.escape(
            "mhc: checkpoint entry 'mhc.blocks.fcs-0' (block 'fcs.0') " + expected)):
        _prepared(seed=2, **prepared).load_state_dict(checkpoint)


def test_matching_options_load_and_compute_the_checkpoints_function(tmp_path):
    source = randomize_mhc(_prepared(n=3, constraint="none", sinkhorn_iters=7))
    checkpoint = _saved(source, tmp_path)
    assert torch.equal(checkpoint["mhc.blocks.fcs-1._extra_state"],
                       torch.tensor([1, 3, 6, 0, 7]))  # [format, n, C, constraint code, iters]
    model = _prepared(seed=2, constraint="none", n=3, sinkhorn_iters=7)
    assert model.load_state_dict(checkpoint).missing_keys == []

    x = _inputs(7, tokens=4)  # fresh, and another shape than prepare traced
    expected = hand_written_mhc(source, x, n=3, constraint="none")[1]
    loaded = _run_compiled(model, x, n=3, constraint="none", sinkhorn_iters=7)
    torch.testing.assert_close(loaded, expected)
    torch.testing.assert_close(_run_compiled(source, x, n=3, constraint="none", sinkhorn_iters=7),
                               expected)
    # HC and mHC differ here, so the equalities above tell the constraint apart.
    assert not torch.allclose(expected, hand_written_mhc(source, x, n=3, constraint="sinkhorn")[1])
    report = mhc_compile.gain(model, x)
    assert (report.n, report.constraint, report.sinkhorn_iters) == (3, "none", 7)


def test_checkpoint_saved_before_the_settings_loads_with_a_warning(tmp_path):
    source = randomize_mhc(_prepared(constraint="none"))
    checkpoint = _saved(source, tmp_path, drop_settings=True)
    assert not any(key.endswith("_extra_state") for key in checkpoint)
    model = _prepared(seed=2, constraint="none")
    warning = re.escape(
        "mhc: the checkpoint's mHC parameters for 3 block(s) under 'mhc.blocks' carry no settings "
        "(saved before mhc_compile stored n, constraint and sinkhorn_iters with them), so they are "
        "loaded unchecked into blocks made with n=4, constraint='none', sinkhorn_iters=20. If the "
        "checkpoint was trained with other options (constraint='none' for hyper-connections), "
        "prepare the model with those: mhc_compile.prepare(model, *example_args, options=...). "
        "Saving the model again stores the settings.")
    with pytest.warns(UserWarning, match=warning) as caught:
        result = model.load_state_dict(checkpoint)  # strict: the missing settings are forgiven
    assert (result.missing_keys, result.unexpected_keys) == ([], [])
    assert [w.filename for w in caught if "carry no settings" in str(w.message)] == [__file__]
    with pytest.warns(UserWarning, match=warning):
        model.load_state_dict(checkpoint, strict=False)

    x = _inputs(8)
    torch.testing.assert_close(_run_compiled(model, x, constraint="none"),
                               hand_written_mhc(source, x, n=4, constraint="none")[1])
    # Saved again, the checkpoint carries the settings and loads without a warning.
    again = _saved(model, tmp_path)
    assert torch.equal(again["mhc.blocks.fcs-2._extra_state"], torch.tensor([1, 4, 6, 0, 20]))
    with pytest.raises(RuntimeError, match=re.escape(
            "mhc: checkpoint entry 'mhc.blocks.fcs-0' (block 'fcs.0') was saved with n=4, C=6, "
            "constraint='none', sinkhorn_iters=20, but this model's block has n=4, C=6, "
            "constraint='sinkhorn'")):
        _prepared(seed=3).load_state_dict(again)


def test_a_missing_block_is_still_a_missing_key(tmp_path):
    checkpoint = _saved(_prepared(), tmp_path, drop_settings=True)
    for name in ("phi", "alpha", "b_pre", "b_post", "b_res"):
        del checkpoint[f"mhc.blocks.fcs-2.{name}"]
    model = _prepared(seed=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError, match=re.escape(
                'Missing key(s) in state_dict: "mhc.blocks.fcs-2.phi", "mhc.blocks.fcs-2.alpha", '
                '"mhc.blocks.fcs-2.b_pre", "mhc.blocks.fcs-2.b_post", "mhc.blocks.fcs-2.b_res", '
                '"mhc.blocks.fcs-2._extra_state".')):
            model.load_state_dict(checkpoint)
    assert ["for 2 block(s) under 'mhc.blocks'" in str(w.message) for w in caught] == [True]


def test_unreadable_settings_are_a_clear_error(tmp_path):
    checkpoint = _saved(_prepared(), tmp_path)
    checkpoint["mhc.blocks.fcs-1._extra_state"] = torch.tensor([2, 4, 6, 1, 20])
    with pytest.raises(RuntimeError, match=re.escape(
            "mhc: checkpoint entry 'mhc.blocks.fcs-1' (block 'fcs.1') holds mHC settings this "
            "version of mhc_compile cannot read (tensor([ 2,  4,  6,  1, 20])); expected an int64 "
            "tensor [1, n, C, constraint code, sinkhorn_iters]. Was it saved by a newer "
            "mhc_compile?")):
        _prepared(seed=2).load_state_dict(checkpoint)


def test_compiling_with_other_options_than_the_blocks_is_a_clear_error():
    model = randomize_mhc(_prepared(constraint="none"))
    x = _inputs(9)
    with pytest.raises(Exception, match=re.escape(
            "mhc: block 'fcs.0' has mHC parameters made with constraint='none', sinkhorn_iters=20, "
            "but this compilation uses constraint='sinkhorn', sinkhorn_iters=20: the block would "
            "compute another function. Compile the model with the options it was prepared with "
            "(or its checkpoint was saved with): torch.compile(model, backend='mhc', "
            "options={'constraint': 'none'}).")):
        _run_compiled(model, x)  # the backend's default options: constraint="sinkhorn"
    with pytest.raises(Exception, match=re.escape(
            "this compilation uses constraint='none', sinkhorn_iters=3: the block would compute "
            "another function. Compile the model with the options it was prepared with (or its "
            "checkpoint was saved with): torch.compile(model, backend='mhc', "
            "options={'sinkhorn_iters': 20}).")):
        _run_compiled(model, x, constraint="none", sinkhorn_iters=3)
    torch.testing.assert_close(_run_compiled(model, x, constraint="none"),
                               hand_written_mhc(model, x, n=4, constraint="none")[1])


def test_settings_in_state_dict_keep_tensor_only_code_working():
    """The settings are a tensor: code that clones or compares a state_dict's values still runs."""
    model = _prepared(n=2)
    state = {key: value.clone() for key, value in model.state_dict().items()}
    assert sorted(k for k in state if k.startswith("mhc.blocks.fcs-0.")) == [
        "mhc.blocks.fcs-0._extra_state", "mhc.blocks.fcs-0.alpha", "mhc.blocks.fcs-0.b_post",
        "mhc.blocks.fcs-0.b_pre", "mhc.blocks.fcs-0.b_res", "mhc.blocks.fcs-0.phi"]
    assert torch.equal(state["mhc.blocks.fcs-0._extra_state"], torch.tensor([1, 2, 6, 1, 20]))
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in state.items())
