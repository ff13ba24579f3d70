"""Training FLOPs per token, for MFU."""

from .config import ModelConfig


def head_matmul_params(config: ModelConfig) -> int:
    """The output head's: the vocabulary projection (tied to the embedding or not), and BERT's
    transform before it."""
    d = config.d_model
    return config.padded_vocab * d + (d * d if config.arch == "bert" else 0)


def matmul_params(config: ModelConfig) -> int:
    """Parameters that multiply each token once: blocks and the output head; position and
    token-type tables are lookups and cost no FLOPs."""
    d, ff, head_dim = config.d_model, config.ff_dim, config.head_dim
    attention = d * (config.n_head + 2 * config.kv_heads) * head_dim + d * d
    mlp = d * ff * (3 if config.arch == "rope" else 2)
    return config.n_layer * (attention + mlp) + head_matmul_params(config)


def flops_per_token(config: ModelConfig, seqlen: int, head_fraction: float = 1.0) -> float:
    """6 · matmul parameters (forward + backward) plus attention's score and value products:
    2 matmuls x 2 FLOPs x d_model per key a query sees, x3 for forward + backward. A causal query
    sees (seqlen + 1) / 2 keys on average, counted as such (not as a full square); a local layer
    (sliding window) fewer. ``head_fraction``: the share of positions the output head runs on (a
    masked LM's head runs on its scored positions only; BERT-large's head is ~9 % of its matmuls)."""
    attention = sum(_keys_seen(config.causal, seqlen, config.layer_window(layer))
                    for layer in range(config.n_layer))
    dense = matmul_params(config) - (1 - head_fraction) * head_matmul_params(config)
    return 6 * dense + 3 * 2 * 2 * config.d_model * attention


def _keys_seen(causal: bool, seqlen: int, window: int | None) -> float:
    """Keys a query sees on average: (N + 1) / 2 causal; with a sliding window of w = window + 1
    keys, row i sees min(i + 1, w)."""
    if not causal:
        return seqlen
    if window is None or window + 1 >= seqlen:
        return (seqlen + 1) / 2
    w = window + 1
    return (w * seqlen - w * (w - 1) / 2) / seqlen
