"""The runs of ``scripts/reproduce.py``: each run's stages in order, as ``python -m trainer``
overrides, and the run each one's time is compared with. ``{runs}`` and ``{tag}`` in an override
name the run directory and the variant series (filled in by ``reproduce.stage_command``)."""


def continue_at(previous: str, seqlen: int) -> list[str]:
    """183 more steps (20% of the 60M tokens) of the stage ``previous``'s model at ``seqlen``,
    65,536 tokens per step (repro_linux_s2l_stage2)."""
    return ["experiment=repro_linux_s2l_stage2", f"model.init_from={{runs}}/{previous}{{tag}}/model.pt",
            f"data.tokenizer_file={{runs}}/{previous}{{tag}}/tokenizer.json", f"data.seqlen={seqlen}",
            f"trainer.micro_batch_size={16 * 1024 // seqlen}", f"data.val_windows={32 * 1024 // seqlen}"]


def s2l_stage2(seqlen: int) -> list[str]:
    """The short-to-long recipe's last 20% at ``seqlen``."""
    return continue_at("s2l_stage1", seqlen)


S2L_STAGE2_LR = 3e-4     # configs/experiment/repro_linux_s2l_stage2.yaml


def s2l_stage2_64_sequences(seqlen: int, scale_lr: bool = False) -> list[str]:
    """The last 20% at ``seqlen`` with 64 sequences per step, as the 1K arm has, instead of 65,536
    tokens: 4x the tokens per step at 4K for a quarter of the steps (46 steps of 262,144 tokens =
    12.06M, 0.5% more than the 1K arm's 183 x 65,536), warm-up shortened in proportion. At 65,536
    tokens per step the 4K arm sees 16 independent stretches of the corpus per step, and a 1K arm
    given that diversity loses more short-range skill than the 4K arm does (the span4 control)."""
    accumulation = 4 * seqlen // 1024
    steps = -(-183 * 4 // accumulation)       # ceil(183 * 4 / accumulation)
    return continue_at("s2l_stage1", seqlen) + [
        f"trainer.grad_accum={accumulation}", f"trainer.max_steps={steps}", f"trainer.eval_interval={steps}",
        f"trainer.save_interval={steps}", f"optim.warmup_steps={max(1, 20 * 4 // accumulation)}",
        # Measured without it (2026-12-01): 4x fewer steps at the same peak rate left the 4K arm
        # behind. Square-root scaling with the batch (2x at 4K), as for Adam at larger batches.
        *([f"optim.lr={S2L_STAGE2_LR * (seqlen / 1024) ** 0.5:.3g}"] if scale_lr else [])]


def s2l_stage2_lower_lr(seqlen: int, divisor: int) -> list[str]:
    """The last 20% at ``seqlen`` at the stage's peak learning rate / ``divisor``, every arm alike.
    Measured (2026-12-02): raising the 4K arm's rate (the sqrtlr arms) widened its loss at 1K of
    context, the short-range skill it gives up after the switch (7.33 against the 1K arm's 5.98);
    halving it narrowed that loss to 0.05 nats and the 4K arm's lag behind 2K to 0.04 (5.85 against
    5.81), so a quarter of the rate is the next step in that direction."""
    return continue_at("s2l_stage1", seqlen) + [f"optim.lr={S2L_STAGE2_LR / divisor:.3g}"]


def s2l_stage2_mixed(seqlen: int, fraction: float = 0.5) -> list[str]:
    """The half-rate last 20% at ``seqlen`` with a ``fraction`` of the micro-batches at 1K context
    (4x the sequences at 4K, equal tokens; data.mix_seqlen): every other one at 0.5. Measured (2026-12-02): at every rate tried, the 4K
    arm gives up 0.05-0.08 nats of short-range skill (scored with 1K of context) against the 1K arm,
    about as much as its longer context gains over the 2K arm, and the span4 control traces that
    loss to the 16 stretches of the corpus per step at 4K against 64 at 1K. Half of each step at 1K
    restores 40 stretches per step (2 x 16 + 2 x 4 at 4K) while half the tokens still teach the long
    context. The 1K arm has nothing to mix in: it is the halflr 1K arm. Measured (2026-12-02): at 0.75
    with ``--extra model.extend_method=ntk`` the order is 1K > 2K > 4K in two seeds, the 4K arm's
    short-range loss gone (configs/experiment/finetune_long_rope.yaml packages that arm)."""
    mix = ["data.mix_seqlen=1024", f"data.mix_fraction={fraction}"] if seqlen > 1024 else []
    return s2l_stage2_lower_lr(seqlen, 2) + mix


def long_context_stage2(seqlen: int) -> list[str]:
    """The recipe that gave 1K > 2K > 4K on the shared targets in two seeds (2026-12-02, recorded as
    s2l_*_mix75 and s2l_1k_mix run with ``--extra model.extend_method=ntk``): the half-rate last 20%
    with three micro-batches in four at 1K and the rotary base raised (NTK) rather than the
    positions interpolated. configs/experiment/finetune_long_rope.yaml packages its 4K arm."""
    return s2l_stage2_mixed(seqlen, 0.75) + (["model.extend_method=ntk"] if seqlen > 1024 else [])


# The progressive recipe: 60% of the tokens at 1K, then two stages of 20% each. The 4K arm doubles
# its context twice (1K -> 2K -> 4K, positions interpolated 2x at each step) instead of once by 4x;
# the 1K and 2K arms run the same two stages at their own context, so all three arms follow the
# same learning-rate schedule and share the first stage (the 2K and 4K arms also the second).
P2L_STAGE1 = ("p2l_stage1", ["experiment=repro_linux_s2l_stage1", "trainer.max_steps=549",
                             "trainer.save_interval=549"])


# Table 2 analog: the 1K run, 300 steps (19.7M tokens), with each attention at its users' best:
# flash and SDPA (is_causal, PyTorch's fastest backend) compiled, eager uncompiled (the Hugging
# Face way). No document masking, so SDPA needs no explicit mask; validation every 25 steps.
TABLE2 = ["experiment=repro_linux_1k", "data.document_aware=false", "trainer.max_steps=300",
          "optim.warmup_steps=30", "trainer.eval_interval=25", "trainer.save_interval=300"]

# Each run: its stages in order (name, overrides). A stage that several runs share (s2l_stage1)
# is trained once per --runs directory.
STAGES = {
    "1k": [("1k", ["experiment=repro_linux_1k"])],
    "2k": [("2k", ["experiment=repro_linux_2k"])],
    "4k": [("4k", ["experiment=repro_linux_4k"])],
    "1k_to_4k": [("1k_stage1", ["experiment=repro_linux_1k", "trainer.max_steps=686",
                                "trainer.save_interval=686"]),
                 ("1k_to_4k", ["experiment=repro_linux_1k_to_4k", "model.init_from={runs}/1k_stage1{tag}/model.pt",
                               "data.tokenizer_file={runs}/1k_stage1{tag}/tokenizer.json"])],
    "s2l_1k": [("s2l_stage1", ["experiment=repro_linux_s2l_stage1"]), ("s2l_1k", s2l_stage2(1024))],
    "s2l_2k": [("s2l_stage1", ["experiment=repro_linux_s2l_stage1"]), ("s2l_2k", s2l_stage2(2048))],
    "s2l_4k": [("s2l_stage1", ["experiment=repro_linux_s2l_stage1"]), ("s2l_4k", s2l_stage2(4096))],
    "s2l_2k_seq64": [("s2l_stage1", ["experiment=repro_linux_s2l_stage1"]),
                     ("s2l_2k_seq64", s2l_stage2_64_sequences(2048))],
    "s2l_4k_seq64": [("s2l_stage1", ["experiment=repro_linux_s2l_stage1"]),
                     ("s2l_4k_seq64", s2l_stage2_64_sequences(4096))],
    "s2l_2k_seq64_sqrtlr": [("s2l_stage1", ["experiment=repro_linux_s2l_stage1"]),
                            ("s2l_2k_seq64_sqrtlr", s2l_stage2_64_sequences(2048, scale_lr=True))],
    "s2l_4k_seq64_sqrtlr": [("s2l_stage1", ["experiment=repro_linux_s2l_stage1"]),
                            ("s2l_4k_seq64_sqrtlr", s2l_stage2_64_sequences(4096, scale_lr=True))],
    **{f"s2l_{k}k_{name}": [("s2l_stage1", ["experiment=repro_linux_s2l_stage1"]),
                            (f"s2l_{k}k_{name}", s2l_stage2_lower_lr(k * 1024, divisor))]
       for k in (1, 2, 4) for name, divisor in (("halflr", 2), ("quarterlr", 4))},
    **{f"s2l_{k}k_mix": [("s2l_stage1", ["experiment=repro_linux_s2l_stage1"]),
                         (f"s2l_{k}k_mix", s2l_stage2_mixed(k * 1024))] for k in (1, 2, 4)},
    # Three quarters of the micro-batches at 1K; its 1K arm would be s2l_1k_mix again.
    **{f"s2l_{k}k_mix75": [("s2l_stage1", ["experiment=repro_linux_s2l_stage1"]),
                           (f"s2l_{k}k_mix75", s2l_stage2_mixed(k * 1024, 0.75))] for k in (2, 4)},
    # The long-context recipe under a short name (long_context_stage2).
    **{f"lc_{k}k": [("s2l_stage1", ["experiment=repro_linux_s2l_stage1"]),
                    (f"lc_{k}k", long_context_stage2(k * 1024))] for k in (1, 2, 4)},
    "p2l_1k": [P2L_STAGE1, ("p2l_mid1k", continue_at("p2l_stage1", 1024)),
               ("p2l_1k", continue_at("p2l_mid1k", 1024))],
    "p2l_2k": [P2L_STAGE1, ("p2l_mid2k", continue_at("p2l_stage1", 2048)),
               ("p2l_2k", continue_at("p2l_mid2k", 2048))],
    "p2l_4k": [P2L_STAGE1, ("p2l_mid2k", continue_at("p2l_stage1", 2048)),
               ("p2l_4k", continue_at("p2l_mid2k", 4096))],
    "t2_flash": [("t2_flash", TABLE2 + ["model.attention=flash"])],
    "t2_sdpa": [("t2_sdpa", TABLE2 + ["model.attention=sdpa"])],
    "t2_eager": [("t2_eager", TABLE2 + ["model.attention=eager", "trainer.compile=false"])],
}
# The run a row's "time / 1K run" divides by (default: 1k of the same variant series).
BASELINE = {f"{recipe}_{context}": f"{recipe}_1k" for recipe in ("s2l", "p2l") for context in ("1k", "2k", "4k")}
BASELINE.update({run: "s2l_1k" for run in ("s2l_2k_seq64", "s2l_4k_seq64", "s2l_2k_seq64_sqrtlr",
                                            "s2l_4k_seq64_sqrtlr")})   # 64 x 1K is the s2l_1k arm
BASELINE.update({f"s2l_{k}k_{name}": f"s2l_1k_{name}" for k in (1, 2, 4) for name in ("halflr", "quarterlr", "mix")})
BASELINE.update({run: "s2l_1k_mix" for run in ("s2l_2k_mix75", "s2l_4k_mix75")})
BASELINE.update({"lc_2k": "lc_1k", "lc_4k": "lc_1k"})
TABLE2_RUNS = ("t2_flash", "t2_sdpa", "t2_eager")
# What ``reproduce.py run`` trains without --only: the paper's Table 4 at one-GPU scale.
DEFAULT_RUNS = ["1k", "2k", "4k", "1k_to_4k"]
# Stages that other stages continue from: trained once per --runs directory and series, then reused.
EARLIER_STAGES = {name for stages in STAGES.values() for name, _ in stages[:-1]}
