"""On a GPU: the flash path matches sdpa in bf16, forward and backward, for gpt2_small at 1K and 4K
and for Llama-shaped rotary decoders (grouped-query heads, Llama 3 rotary scaling, an untied head,
Qwen2's q/k/v biases) at 4K."""

import pytest
import torch

from models import build_model, lm_loss

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("seqlen", [1024, 4096])
def test_gpt2_small_flash_matches_sdpa_bf16(seqlen):
    torch.manual_seed(0)
    tokens = torch.randint(0, 50257, (2, seqlen + 1), device="cuda")
    results = {}
    for impl in ("flash", "sdpa"):
        model = build_model("gpt2_small", seed=0, max_seqlen=seqlen, attention=impl).cuda().eval()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(tokens[:, :-1])
            loss = lm_loss(logits, tokens[:, 1:])
        loss.backward()
        grads = torch.cat([p.grad.float().flatten() for p in model.parameters()])
        results[impl] = (logits.float(), loss.item(), grads)
    (logits_f, loss_f, grads_f), (logits_s, loss_s, grads_s) = results["flash"], results["sdpa"]
    assert (logits_f - logits_s).norm() / logits_s.norm() < 1e-2
    assert abs(loss_f - loss_s) < 1e-2 * abs(loss_s)
    assert (grads_f - grads_s).norm() / grads_s.norm() < 2e-2


@pytest.mark.parametrize("head_dim, qkv_bias", [(64, False), (128, True)])
def test_llama_shaped_decoder_flash_matches_sdpa_bf16(head_dim, qkv_bias):
    seqlen, heads = 4096, 1024 // head_dim
    settings = dict(vocab_size=32000, max_seqlen=seqlen, d_model=1024, n_layer=4, n_head=heads,
                    n_kv_head=heads // 4, dropout=0.0, attn_dropout=0.0, tie_embeddings=False,
                    qkv_bias=qkv_bias, rope_theta=5e5, rope_llama3=(8.0, 1.0, 4.0, 1024))
    torch.manual_seed(0)
    tokens = torch.randint(0, 32000, (1, seqlen + 1), device="cuda")
    results = {}
    for impl in ("flash", "sdpa"):
        model = build_model("rope_small", seed=0, attention=impl, **settings).cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(tokens[:, :-1], targets=tokens[:, 1:])
        loss.backward()
        grads = torch.cat([p.grad.float().flatten() for p in model.parameters()])
        results[impl] = (loss.item(), grads)
    (loss_f, grads_f), (loss_s, grads_s) = results["flash"], results["sdpa"]
    assert abs(loss_f - loss_s) < 1e-2 * abs(loss_s)
    assert (grads_f - grads_s).norm() / grads_s.norm() < 2e-2
