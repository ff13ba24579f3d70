"""Sampling from a causal LM with a KV cache.

The prompt is processed in one call (prefill), then one token per call; the kernel's bottom-right
causal alignment makes each decode step attend exactly to every cached position. A model with
learned positions (GPT-2) cannot read past its position table: when prompt + new tokens exceed it,
each step reads only the last ``max_seqlen`` tokens (a sliding window, recomputed without a cache).
"""

import torch


def _filter_logits(logits, top_k, top_p):
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token when the ones ranked above it already reach top_p (always keep the first).
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


@torch.no_grad()
def generate(model, input_ids, max_new_tokens: int, *, temperature: float = 1.0, top_k=None,
             top_p=None, eos_token_id=None, generator=None, use_cache: bool = True):
    """Extend ``input_ids`` (B, N) by up to ``max_new_tokens``; temperature 0 is greedy.

    Sequences that produced ``eos_token_id`` are padded with it; generation stops when all have.
    ``use_cache=False`` recomputes the whole sequence each step (a reference for tests).
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0; got {temperature}")
    was_training = model.training
    model.eval()
    tokens = input_ids
    total = input_ids.shape[1] + max_new_tokens
    config = getattr(model, "config", None)
    window = config.max_seqlen if getattr(config, "arch", None) == "gpt2" and total > config.max_seqlen \
        else None
    use_cache = use_cache and window is None
    caches = model.make_caches(input_ids.shape[0], total) if use_cache else None
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    step_input = input_ids
    for _ in range(max_new_tokens):
        visible = tokens if window is None else tokens[:, -window:]
        logits = model(step_input if use_cache else visible, caches=caches)[:, -1].float()
        if temperature == 0:
            next_token = logits.argmax(dim=-1)
        else:
            probs = torch.softmax(_filter_logits(logits / temperature, top_k, top_p), dim=-1)
            next_token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        if eos_token_id is not None:
            next_token = torch.where(finished, torch.full_like(next_token, eos_token_id), next_token)
            finished |= next_token == eos_token_id
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)
        step_input = next_token[:, None]
        if eos_token_id is not None and bool(finished.all()):
            break
    model.train(was_training)
    return tokens
