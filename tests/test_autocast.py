"""Residual blocks under bf16 autocast: f(x) comes out bf16 while x stays float32 (the embedding
output), so the add promotes to x's dtype; such blocks must be rewritten, not skipped."""

import copy

import torch
from torch import nn

import mhc_compile
from mhc_compile import SkipReason
from mhc_compile.examples import llama


def test_llama_under_autocast_is_rewritten_and_matches_the_plain_model():
    model, args = llama(seed=0, depth=2)
    plain = copy.deepcopy(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        report = mhc_compile.report(model, *args)
        assert [b.status for b in report.blocks] == ["rewritten"] * 4
        mhc_compile.prepare(model, *args)
        torch._dynamo.reset()
        output = torch.compile(model, backend=mhc_compile.backend(eager=True))(*args)
        expected = plain(*args)
    assert output.dtype == expected.dtype == torch.bfloat16
    # At init the rewritten model computes what the plain one did; bf16 matmuls round alike.
    torch.testing.assert_close(output.float(), expected.float(), rtol=2e-2, atol=2e-2)


class Float32Update(nn.Module):
    """x (bf16) + f(x) (float32): the add promotes to float32, no longer x's dtype."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return x + self.fc(x.float())


def test_add_promoting_past_the_skip_dtype_is_skipped_with_its_reason():
    report = mhc_compile.report(Float32Update(), torch.randn(2, 3, 8, dtype=torch.bfloat16))
    assert [(b.status, b.reason) for b in report.blocks] == [
        ("skipped", SkipReason.DTYPE_MISMATCH.value)]
