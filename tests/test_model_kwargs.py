"""prepare, report and gain pass the model's own keyword arguments (attention_mask, ...) to the
model and take the mHC options as one `options=` mapping; option keywords of older calls still
work with a FutureWarning. Results are checked against hand computations on fresh random inputs."""

import copy
import re
import warnings

import pytest
import torch
import torch._dynamo
import transformers  # the `test` extra: missing, these tests fail rather than skip

import mhc_compile
from hand_mhc import TanhBlocks, hand_written_mhc, randomize_mhc


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every prepare/report/gain call adds a Dynamo cache entry; Dynamo stops after 8."""
    torch._dynamo.reset()


class NamedN(TanhBlocks):
    """A forward with a parameter named like an mHC option: n, the number of blocks to run."""

    def forward(self, x, n=3):
        return super().forward(x, blocks=n)


def _model(cls=TanhBlocks, seed=0):
    torch.manual_seed(seed)
    return cls().double()


def _batch(seed, tokens=5):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, tokens, 6, dtype=torch.float64, generator=generator)
    mask = (torch.rand(2, tokens, generator=generator) > 0.4).long()
    mask[:, 0] = 1
    return x, mask


def _hand_composite_forward_gain(per_block, n):
    """Per block, the mean over tokens of max |row sum| of H_res from the block to the last."""
    h_res = [h.reshape(-1, n, n) for _, _, h in per_block]
    gains, product = [], None
    for mapping in reversed(h_res):
        product = mapping if product is None else product @ mapping
        gains.append(torch.linalg.matrix_norm(product, ord=float("inf")).mean().item())
    return gains[::-1]


def test_prepare_passes_model_keywords_and_takes_options_separately():
    model = _model()
    x, mask = _batch(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        report = mhc_compile.prepare(model, x, attention_mask=mask, blocks=2,
                                     options={"n": 2, "constraint": "none"})
    # blocks=2 reached the model: two residual blocks ran, so two were rewritten.
    assert [b.key for b in report.rewritten] == ["fcs.0", "fcs.1"]
    assert [(b.n, b.constraint) for b in model.mhc.blocks.values()] == [(2, "none")] * 2
    assert (report.n, report.constraint) == (2, "none")

    randomize_mhc(model)
    fresh_x, fresh_mask = _batch(1, tokens=4)
    masked = fresh_x * fresh_mask.unsqueeze(-1)
    compiled = torch.compile(model, backend="mhc",
                             options={"n": 2, "constraint": "none", "eager": True})
    _, expected = hand_written_mhc(model, masked, n=2, constraint="none", blocks=2)
    with torch.no_grad():
        torch.testing.assert_close(compiled(fresh_x, attention_mask=fresh_mask, blocks=2), expected)


def test_gain_takes_model_keywords():
    model = _model()
    x, mask = _batch(2)
    mhc_compile.prepare(model, x, attention_mask=mask, options={"constraint": "none", "n": 3})
    randomize_mhc(model)
    fresh_x, fresh_mask = _batch(3)
    masked = fresh_x * fresh_mask.unsqueeze(-1)
    per_block, _ = hand_written_mhc(model, masked, n=3, constraint="none")

    report = mhc_compile.gain(model, fresh_x, attention_mask=fresh_mask)
    assert (report.n, report.constraint, len(report.chains)) == (3, "none", 1)
    measured = [block.composite.forward_mean for block in report.chains[0].blocks]
    torch.testing.assert_close(measured, _hand_composite_forward_gain(per_block, 3))
    # The mask matters: without it the gains differ.
    unmasked, _ = hand_written_mhc(model, fresh_x, n=3, constraint="none")
    assert _hand_composite_forward_gain(unmasked, 3) != pytest.approx(measured)

    probe = mhc_compile.GainProbe(model)
    assert probe(fresh_x, attention_mask=fresh_mask).to_dict() == report.to_dict()
    logger = mhc_compile.GainLogger(model, every=2, log=lambda step, report: None)
    assert logger(1, fresh_x, attention_mask=fresh_mask) is None
    assert logger(2, fresh_x, attention_mask=fresh_mask).to_dict() == report.to_dict()
    with pytest.warns(FutureWarning, match=re.escape(
            "mhc_compile.gain: passing mHC options as keywords is deprecated, since keywords now "
            "go to the model: 'constraint' is taken as an mHC option because TanhBlocks.forward "
            "does not declare it. Pass options={'constraint': 'none'} instead.")):
        old_style = mhc_compile.gain(model, fresh_x, attention_mask=fresh_mask, constraint="none")
    assert old_style.to_dict() == report.to_dict()
    with pytest.raises(ValueError, match=re.escape(
            "mhc gain: the model's mHC parameters were created with n=3, but n=4 was asked for")):
        mhc_compile.gain(model, fresh_x, attention_mask=fresh_mask, options={"n": 4})


def test_option_keywords_still_work_with_a_future_warning():
    model = _model()
    x, mask = _batch(4)
    with pytest.warns(FutureWarning, match=re.escape(
            "mhc_compile.prepare: passing mHC options as keywords is deprecated, since keywords "
            "now go to the model: 'constraint', 'n' are taken as mHC options because "
            "TanhBlocks.forward does not declare them. Pass options={'constraint': 'none', "
            "'n': 2} instead.")) as caught:
        mhc_compile.prepare(model, x, attention_mask=mask, n=2, constraint="none")
    assert [w.filename for w in caught if w.category is FutureWarning] == [__file__]
    assert [(b.n, b.constraint) for b in model.mhc.blocks.values()] == [(2, "none")] * 3
    with pytest.warns(FutureWarning, match=re.escape(
            "mhc_compile.report: passing mHC options as keywords is deprecated, since keywords now "
            "go to the model: 'exclude' is taken as an mHC option because TanhBlocks.forward "
            "does not declare it. Pass options={'exclude': ['fcs.1']} instead.")):
        report = mhc_compile.report(_model(), x, exclude=["fcs.1"])
    assert [b.key for b in report.rewritten] == ["fcs.0", "fcs.2"]


def test_a_keyword_that_is_both_a_forward_parameter_and_an_option_goes_to_the_model():
    x, _ = _batch(5)
    with pytest.warns(FutureWarning, match=re.escape(
            "mhc_compile.report: 'n' is both a parameter of NamedN.forward and an mHC option; "
            "passed to the model, not taken as the option. To set the option, pass "
            "options={'n': ...} (passing options= also silences this warning).")):
        report = mhc_compile.report(_model(NamedN), x, n=2)
    assert (len(report.rewritten), report.n) == (2, 4)  # two blocks ran, each with 4 streams
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        report = mhc_compile.report(_model(NamedN), x, n=1, options={"n": 2})
    assert (len(report.rewritten), report.n) == (1, 2)


def test_bad_keywords_are_clear_errors():
    model = _model()
    x, _ = _batch(6)
    with pytest.raises(TypeError, match=re.escape(
            "mhc_compile.prepare: NamedN.forward takes no keyword argument(s) 'attention_mask', "
            "'sinkhorn_iter' (its keyword parameters: n, x). mHC options go in options=; valid "
            "options are: alpha_init, constraint, cudagraphs, eager, exclude, include, mode, n, "
            "recompute, sinkhorn_iters, stream_dtype")):
        mhc_compile.prepare(_model(NamedN), x, sinkhorn_iter=5, attention_mask=None)
    with pytest.raises(TypeError, match=re.escape(
            "mhc_compile.prepare: mHC option(s) 'n' given both in options= and as keywords; give "
            "them in options= only")):
        mhc_compile.prepare(model, x, n=2, options={"n": 3})
    with pytest.raises(TypeError, match=re.escape(
            "mhc_compile.gain: options= takes a mapping of mHC options, such as {'n': 2, "
            "'constraint': 'none'}, got list")):
        mhc_compile.gain(model, x, options=["n", 2])
    with pytest.raises(TypeError, match=re.escape(
            "unknown mhc option(s) 'streams'; valid options are: alpha_init, ")):
        mhc_compile.report(model, x, options={"streams": 2})
    assert not hasattr(model, "mhc")


def _tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=101)
    config._attn_implementation = "sdpa"
    return transformers.LlamaForCausalLM(config).eval()


def _ids_and_mask(seed, tokens=12):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 101, (2, tokens), generator=generator)
    mask = torch.ones(2, tokens, dtype=torch.long)
    mask[1, : int(torch.randint(2, tokens // 2, (1,), generator=generator))] = 0  # left padding
    return ids, mask


def test_llama_prepared_with_attention_mask_and_options():
    model = _tiny_llama()
    plain = copy.deepcopy(model)
    ids, mask = _ids_and_mask(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        report = mhc_compile.prepare(model, ids, attention_mask=mask, options={"n": 2})
    assert (len(report.rewritten), report.skipped, report.n) == (4, [], 2)
    assert {block.n for block in model.mhc.blocks.values()} == {2}

    # At init the rewrite computes the plain model's function: with the mask, which matters.
    fresh_ids, fresh_mask = _ids_and_mask(1)
    compiled = torch.compile(model, backend="mhc", options={"n": 2, "eager": True})
    with torch.no_grad():
        expected = plain(fresh_ids, attention_mask=fresh_mask).logits
        torch.testing.assert_close(compiled(fresh_ids, attention_mask=fresh_mask).logits, expected,
                                   rtol=1e-5, atol=1e-5)
        assert not torch.allclose(plain(fresh_ids).logits[1], expected[1], atol=1e-3)

    gains = mhc_compile.gain(model, fresh_ids, attention_mask=fresh_mask)
    blocks = sum(len(chain.blocks) for chain in gains.chains)
    assert (gains.n, gains.constraint, blocks) == (2, "sinkhorn", 4)
    # Llama's forward takes **kwargs but declares no `constraint`: an option, with a warning.
    with pytest.warns(FutureWarning, match=re.escape(
            "'constraint' is taken as an mHC option because LlamaForCausalLM.forward does not "
            "declare it. Pass options={'constraint': 'sinkhorn'} instead.")):
        mhc_compile.gain(model, fresh_ids, attention_mask=fresh_mask, constraint="sinkhorn")
