"""Paths a training step and sampling take: the loss inside the model (padded vocabulary exact), SDPA's
causal fast path, and generation past a learned position table."""

import torch

from models import build_model, lm_loss


def test_masked_padding_equals_sliced_logits_in_value_and_gradient():
    torch.manual_seed(0)
    vocab, padded = 61, 64
    logits = torch.randn(3, 17, padded, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, vocab, (3, 17))
    targets[0, :5] = -100
    reference = torch.nn.functional.cross_entropy(logits[..., :vocab].flatten(0, 1), targets.flatten(),
                                                  ignore_index=-100)
    expected_grad, = torch.autograd.grad(reference, logits)
    for aligned in (False, True):
        loss = lm_loss(logits, targets, vocab, aligned=aligned)
        grad, = torch.autograd.grad(loss, logits)
        torch.testing.assert_close(loss, reference, rtol=1e-12, atol=1e-12)   # float64 kept
        torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-14)
        assert torch.all(grad[..., vocab:] == 0)


def test_models_return_the_loss_of_their_logits_when_given_targets():
    for name in ("gpt2_tiny", "bert_tiny", "rope_tiny"):
        model = build_model(name, vocab_size=100, pad_vocab_multiple=64, max_seqlen=32,
                            attention="sdpa", seed=0).eval()
        tokens = torch.randint(0, 100, (2, 32))
        targets = torch.randint(0, 100, (2, 32))
        logits = model(tokens)
        assert logits.shape == (2, 32, 100)
        torch.testing.assert_close(model(tokens, targets=targets), lm_loss(logits, targets))


def _padded_causal_model(name, dtype=torch.float32):
    """A tiny causal model whose 100 tokens are padded to 128 (the masked path), without dropout,
    and a batch with targets."""
    model = build_model(name, vocab_size=100, pad_vocab_multiple=64, max_seqlen=32,
                        attention="sdpa", seed=0).to(dtype).eval()
    assert model.vocab_padding is not None
    tokens, targets = torch.randint(0, 100, (2, 32)), torch.randint(0, 100, (2, 32))
    targets[0, :3] = -100
    return model, tokens, targets


def _loss_and_embedding_grad(forward, model, tokens, targets):
    model.zero_grad()
    loss = forward(tokens, targets=targets)
    loss.backward()
    return loss.detach(), model.embed.weight.grad.clone()


def test_the_compiled_head_bias_mask_gives_the_sliced_loss_and_gradients(monkeypatch):
    # Compiled, the causal models mask the padded vocabulary with the head matmul's bias;
    # is_compiling is faked so that the comparison runs eagerly, in float64.
    for name in ("gpt2_tiny", "rope_tiny"):
        model, tokens, targets = _padded_causal_model(name, torch.float64)
        loss, grad = _loss_and_embedding_grad(model, model, tokens, targets)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        masked_loss, masked_grad = _loss_and_embedding_grad(model, model, tokens, targets)
        monkeypatch.undo()
        torch.testing.assert_close(masked_loss, loss, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(masked_grad, grad, rtol=1e-12, atol=1e-14)
        assert torch.all(masked_grad[100:] == 0)     # the padding rows learn nothing


def test_a_compiled_causal_model_takes_the_bias_mask_and_gives_the_eager_loss():
    # Traced by dynamo (aot_eager: no code generation), the loss takes the head-bias branch.
    torch._dynamo.reset()
    model, tokens, targets = _padded_causal_model("gpt2_tiny")
    loss, grad = _loss_and_embedding_grad(model, model, tokens, targets)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    compiled_loss, compiled_grad = _loss_and_embedding_grad(compiled, model, tokens, targets)
    torch.testing.assert_close(compiled_loss, loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled_grad, grad, rtol=1e-5, atol=1e-7)
    assert torch.all(compiled_grad[100:] == 0)


def test_sdpa_uses_is_causal_without_a_mask_and_a_mask_only_where_needed(monkeypatch):
    from kernels import attention_reference
    from models import attention as attention_module

    calls = []
    real = attention_module.F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention", spy)
    torch.manual_seed(0)
    q = torch.randn(2, 17, 4, 8, dtype=torch.float64)
    k, v = torch.randn(2, 17, 2, 8, dtype=torch.float64), torch.randn(2, 17, 2, 8, dtype=torch.float64)
    out = attention_module.attention(q, k, v, impl="sdpa", causal=True, dropout_p=0.0)
    assert calls[-1]["attn_mask"] is None and calls[-1]["is_causal"] and calls[-1]["enable_gqa"]
    torch.testing.assert_close(out, attention_reference(q, k, v, causal=True))
    # A query block at the end of a KV cache: causal aligned bottom-right needs an explicit mask.
    out = attention_module.attention(q[:, -5:], k, v, impl="sdpa", causal=True, dropout_p=0.0)
    assert calls[-1]["attn_mask"] is not None and not calls[-1]["is_causal"]
    torch.testing.assert_close(out, attention_reference(q[:, -5:], k, v, causal=True))


def test_generation_past_the_position_table_slides_its_window():
    from models import generate
    model = build_model("gpt2_tiny", vocab_size=50, max_seqlen=32, attention="sdpa", dropout=0.0,
                        attn_dropout=0.0, seed=1).eval()
    prompt = torch.randint(0, 50, (2, 8))
    long = generate(model, prompt, 40, temperature=0)
    assert long.shape == (2, 48)
    torch.testing.assert_close(long[:, :32], generate(model, prompt, 24, temperature=0))
    with torch.no_grad():
        for position in range(32, 48):       # each later token: greedy over the last 32 tokens
            expected = model(long[:, position - 32:position])[:, -1].argmax(-1)
            assert torch.equal(long[:, position], expected)
