"""Unmodified Hugging Face transformers models (tiny configs, random weights, nothing downloaded)
through backend="mhc": every residual block rewritten, outputs equal at init (eval, and train mode
with dropout under the same seed), a few AdamW steps lower the loss. The rewritten graphs run
eagerly (eager=True); one model goes through Inductor."""

import copy

import pytest
import torch
import transformers  # the `test` extra: missing, these tests fail rather than skip

import mhc_compile

VOCAB = 101
SMALL = dict(num_hidden_layers=2, num_attention_heads=4)
DECODER = dict(SMALL, hidden_size=32, intermediate_size=64)


def _config(kind: str):
    """(model class, config) for each architecture family; `blocks` = residual adds expected."""
    t = transformers
    return {
        "gpt2": (t.GPT2LMHeadModel, t.GPT2Config(n_embd=32, n_layer=3, n_head=4, n_positions=64)),
        "llama": (t.LlamaForCausalLM, t.LlamaConfig(**DECODER, num_key_value_heads=2)),
        "mistral": (t.MistralForCausalLM, t.MistralConfig(**DECODER, num_key_value_heads=2)),
        "gemma": (t.GemmaForCausalLM, t.GemmaConfig(**DECODER, num_key_value_heads=1, head_dim=8)),
        "mixtral_moe": (
            t.MixtralForCausalLM,
            t.MixtralConfig(**DECODER, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
        ),
        "neox_parallel": (t.GPTNeoXForCausalLM, t.GPTNeoXConfig(**DECODER)),
        "phi_parallel": (t.PhiForCausalLM, t.PhiConfig(**DECODER)),
        "opt": (t.OPTForCausalLM, t.OPTConfig(**SMALL, hidden_size=32, ffn_dim=64, word_embed_proj_dim=32)),
        "bert_post_norm": (t.BertModel, t.BertConfig(**DECODER)),
        "t5_encoder": (t.T5EncoderModel, t.T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8)),
        "vit": (
            t.ViTModel,
            t.ViTConfig(**DECODER, image_size=16, patch_size=4),
        ),
    }[kind]


# Residual adds per model: two per layer, one per layer for the parallel-residual families.
EXPECTED_BLOCKS = {
    "gpt2": 6, "llama": 4, "mistral": 4, "gemma": 4, "mixtral_moe": 4, "neox_parallel": 2,
    "phi_parallel": 2, "opt": 4, "bert_post_norm": 4, "t5_encoder": 4, "vit": 4,
}


def _build(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    model_class, config = _config(kind)
    config.vocab_size = VOCAB
    config._attn_implementation = "sdpa"
    model = model_class(config)
    if kind == "vit":
        return model, (torch.randn(2, 3, 16, 16),)
    return model, (torch.randint(0, VOCAB, (2, 16)),)


def _main_output(output) -> torch.Tensor:
    logits = getattr(output, "logits", None)
    return logits if logits is not None else output.last_hidden_state


def _loss(kind: str, output, args) -> torch.Tensor:
    main = _main_output(output)
    if main.shape[-1] == VOCAB:  # language models: next-token loss on the inputs themselves
        return torch.nn.functional.cross_entropy(main[:, :-1].reshape(-1, VOCAB), args[0][:, 1:].reshape(-1))
    return (main - 1).pow(2).mean()  # encoders: pull every hidden value towards 1


def _compiled(model, **options):
    torch._dynamo.reset()
    return torch.compile(model, backend=mhc_compile.backend(eager=True, **options))


@pytest.mark.parametrize("kind", list(EXPECTED_BLOCKS))
def test_third_party_model_rewritten_equal_at_init_and_trains(kind):
    model, args = _build(kind)
    model.eval()
    plain = copy.deepcopy(model)
    report = mhc_compile.prepare(model, *args)
    assert len(report.rewritten) == EXPECTED_BLOCKS[kind], report.summary()
    assert report.skipped == []
    compiled = _compiled(model)
    torch.testing.assert_close(_main_output(compiled(*args)), _main_output(plain(*args)), rtol=1e-5, atol=1e-5)

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with torch.no_grad():
        loss_before = _loss(kind, compiled(*args), args).item()
    for _ in range(3):
        _loss(kind, compiled(*args), args).backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        assert _loss(kind, compiled(*args), args).item() < loss_before


def test_dropout_in_train_mode_matches_under_the_same_seed():
    model, args = _build("gpt2")  # GPT-2's configs default to dropout 0.1 everywhere
    model.train()
    plain = copy.deepcopy(model)
    compiled = _compiled(model)
    torch.manual_seed(1)
    rewritten = _main_output(compiled(*args))
    torch.manual_seed(1)
    torch.testing.assert_close(rewritten, _main_output(plain(*args)), rtol=1e-5, atol=1e-5)


def test_llama_through_inductor_matches_eager_and_trains():
    model, args = _build("llama")
    plain = copy.deepcopy(model)
    mhc_compile.prepare(model, *args)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="mhc")
    torch.testing.assert_close(_main_output(compiled(*args)), _main_output(plain(*args)), rtol=1e-4, atol=1e-4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(3):
        loss = _loss("llama", compiled(*args), args)
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < losses[0]
