"""On a GPU: the flash path matches sdpa in bf16 for gpt2_small at 1K and 4K, forward and backward."""

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
