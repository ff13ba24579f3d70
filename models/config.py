"""Model configuration: one dataclass describes every model of the zoo."""

from dataclasses import dataclass, field, replace
from typing import Literal

Arch = Literal["gpt2", "bert", "rope"]
AttentionImpl = Literal["auto", "flash", "sdpa", "eager"]


@dataclass(frozen=True)
class ModelConfig:
    arch: Arch                      # gpt2: causal, learned positions; bert: MLM encoder; rope: rotary decoder
    vocab_size: int
    max_seqlen: int                 # learned position table size (gpt2/bert); rope: trained context
    d_model: int
    n_layer: int
    n_head: int
    n_kv_head: int | None = None    # grouped-query attention (rope); None = n_head
    d_ff: int | None = None         # MLP width; None = 4·d_model (gpt2/bert), ~8/3·d_model (rope, SwiGLU)
    dropout: float = 0.1            # embedding and residual dropout
    attn_dropout: float = 0.1       # dropout on attention probabilities (in the kernel)
    norm_eps: float | None = None   # None = 1e-5 (gpt2, rope) or 1e-12 (bert)
    attention: AttentionImpl = "auto"   # auto = flash on CUDA, sdpa elsewhere
    type_vocab_size: int = 2        # bert token types
    rope_theta: float = 10000.0
    rope_scaling: float = 1.0       # position interpolation factor for context extension
    # Llama 3's per-frequency rotary scaling, as its checkpoints carry it: (factor, low_freq_factor,
    # high_freq_factor, original context). Wavelengths longer than original / low_freq_factor are
    # divided by factor, shorter than original / high_freq_factor kept, those between blended.
    rope_llama3: tuple | None = None
    # The output head shares the input embedding's weights (GPT-2, BERT, most small decoders);
    # False gives the rotary decoder a head of its own, as Llama 2 and Llama 3 8B have.
    tie_embeddings: bool = True
    qkv_bias: bool = False          # rotary decoder: biases on the q, k and v projections (Qwen2)
    pad_vocab_multiple: int = 1     # round the embedding table up (64 helps matmul speed)
    checkpoint_blocks: bool = False  # recompute each block in the backward (activation checkpointing)
    # Sliding-window (local) attention, decoders only: in a local layer each token sees itself and
    # the attn_window - 1 tokens before it. None: every layer attends globally. global_every = k
    # keeps every k-th layer (k-th, 2k-th, ...) global, as Gemma-style models mix local and global
    # layers; 0 makes every layer local.
    attn_window: int | None = None
    global_every: int = 0
    # bert with flash attention and a padding mask: True packs the real tokens (no compute on
    # padding; the token count depends on the data); False keeps the padded layout and gives the
    # kernel each row's real tokens and its padding as separate documents (static shapes, as
    # torch.compile prefers; padding is computed and ignored). Measured on an H200, BERT-large at
    # 512 with 5 % padding, compiled with dynamic output shapes captured: False ran at 0.75x the
    # speed of True (train_h100.md); without the capture (now the default for flash) not measured.
    unpad: bool = True
    extra: dict = field(default_factory=dict, compare=False)   # unused keys kept for round trips

    def __post_init__(self):
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.kv_heads:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.kv_heads})")
        for name in ("dropout", "attn_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1); got {getattr(self, name)}")
        if self.arch != "rope" and self.kv_heads != self.n_head:
            raise ValueError(f"{self.arch} uses multi-head attention: n_kv_head must equal n_head")
        if min(self.vocab_size, self.max_seqlen, self.n_layer, self.pad_vocab_multiple) < 1:
            raise ValueError("vocab_size, max_seqlen, n_layer and pad_vocab_multiple must be >= 1")
        if self.attn_window is not None:
            if self.arch == "bert":
                raise ValueError("attn_window (sliding-window attention) is for the causal decoders "
                                 "(gpt2, rope), not bert")
            if self.attn_window < 1:
                raise ValueError(f"attn_window must be >= 1 (tokens a query sees, itself included) or "
                                 f"None; got {self.attn_window}")
        if self.global_every < 0:
            raise ValueError(f"global_every must be >= 0; got {self.global_every}")
        if self.qkv_bias and self.arch != "rope":
            raise ValueError(f"{self.arch} always has projection biases; qkv_bias is for the rotary decoder")
        if not self.tie_embeddings and self.arch != "rope":
            raise ValueError(f"{self.arch} ties its output head to the embedding; tie_embeddings=False "
                             "is for the rotary decoder")
        if self.rope_llama3 is not None:
            if self.arch != "rope" or len(self.rope_llama3) != 4:
                raise ValueError("rope_llama3 is (factor, low_freq_factor, high_freq_factor, original "
                                 f"context), for the rotary decoder; got {self.rope_llama3!r}")
            factor, low, high, original = self.rope_llama3
            if not (factor >= 1 and 0 < low < high and original >= 1):
                raise ValueError(f"rope_llama3 {self.rope_llama3!r}: needs factor >= 1, "
                                 "0 < low_freq_factor < high_freq_factor and original context >= 1")
            # A tuple however it arrives (a checkpoint's dict may hold a list): configs compare equal.
            object.__setattr__(self, "rope_llama3", tuple(self.rope_llama3))

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def causal(self) -> bool:
        return self.arch != "bert"

    @property
    def ff_dim(self) -> int:
        if self.d_ff:
            return self.d_ff
        if self.arch == "rope":   # SwiGLU keeps the parameter count of a 4x MLP: 2/3 of 4x, rounded
            return (int(8 * self.d_model / 3) + 63) // 64 * 64
        return 4 * self.d_model

    def layer_window(self, layer: int) -> int | None:
        """Keys before the query that layer ``layer`` (0-based) sees, or None for global attention."""
        if self.attn_window is None or (self.global_every and (layer + 1) % self.global_every == 0):
            return None
        return self.attn_window - 1

    @property
    def eps(self) -> float:
        return self.norm_eps if self.norm_eps is not None else (1e-12 if self.arch == "bert" else 1e-5)

    @property
    def padded_vocab(self) -> int:
        return -(-self.vocab_size // self.pad_vocab_multiple) * self.pad_vocab_multiple

    def with_(self, **changes) -> "ModelConfig":
        return replace(self, **changes)
