"""Training throughput: the flashtrain trainer against stock PyTorch, on one GPU, in one process.

    python scripts/bench_train.py --part grid --corpus /data/linux-6.1 --out grid.json
    python scripts/bench_train.py --part long --corpus /data/linux-6.1 --out long.json
    python scripts/bench_train.py --part bert --corpus /data/linux-6.1 --out bert.json
    python scripts/bench_train.py --part agree --corpus /data/linux-6.1 --out agree.json
    python scripts/report_train.py grid.json long.json bert.json agree.json   # Markdown + PNG

flashtrain systems run the real ``Trainer``: batches from the data pipeline (the Linux corpus with
a GPT-2-sized BPE of 50257 tokens, padded to 50304), gradient accumulation, clipping, the
non-finite check and the loss read back once per log window, exactly as ``python -m trainer``
runs a step. ``stock_sdpa`` is ``scripts/stock_gpt2.py`` (plain PyTorch) fed the same windows.

Parts:
  grid   GPT-2 small at 1024 x 16 and 4096 x 4, attention dropout 0.1 and 0: stock_sdpa,
         flashtrain_flash and flashtrain_sdpa compiled, flashtrain_eager uncompiled (materialized
         attention, the Hugging Face way and the paper's baseline); on request
         flashtrain_flash_two_pass (with dropout: the backward without its fused pass), and
         flashtrain_flash_graphs and stock_sdpa_graphs (compile mode reduce-overhead: the step
         captured in CUDA graphs; with dropout, flash draws its seeds on the device).
  long   micro-batch 1 at 8K..64K context (position table sized to the context): flashtrain_flash
         (activation checkpointing only where the plain run is out of memory), and how far
         stock_sdpa and flashtrain_eager get before running out of memory.
  bert   BERT-large MLM at 512 on chunks of the corpus: flash unpadded (varlen) against SDPA with a
         padding mask and eager; tokens/s counts real (non-padding) tokens.
  agree  200 steps of flashtrain_flash, flashtrain_sdpa and stock_sdpa on the same batches, and
         flash again with another seed (run-to-run noise): the loss curves.

Timing: ``--windows`` windows of ``--window`` steps after one warm-up window (compilation); each
window ends by reading the loss back (which waits for the GPU), its tokens/s = tokens / wall time;
the median window is reported. With ``--interleave`` the systems of a setting are built and warmed
up together and then timed in alternating windows, each with its ratio to the first system's rate
in the same round (``paired_ratio``), for machines whose speed drifts during a run. MFU = tokens/s x model FLOPs per token over the dense bf16 rate
(989 TFLOP/s, H100 SXM) and, as ``mfu_measured``, over an 8192^3 bf16 matmul measured here.
"""

import argparse
import functools
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import stock_gpt2  # noqa: E402  (scripts/ is on sys.path when run as a script)
from train_timing import matmul_ceiling, measure, measure_interleaved  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from kernels import _backward  # noqa: E402
from trainer.config import register_configs  # noqa: E402
from trainer.data import build_data  # noqa: E402
from trainer.fit_report import flops_per_token  # noqa: E402
from trainer.loop import Trainer  # noqa: E402
from trainer.environment import benchmark_header  # noqa: E402

CONFIGS = str(Path(__file__).resolve().parents[1] / "configs")


def run_config(overrides: list[str]):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return OmegaConf.to_object(compose(config_name="config", overrides=overrides))


def gpt2_overrides(args, seqlen, batch, attention, compiled, attn_dropout, seed=1337, extra=()):
    return ["model=gpt2_small", "data=linux", f"data.path={args.corpus}", "data.vocab_size=50257",
            f"data.seqlen={seqlen}", f"data.cache_dir={args.cache}", f"data.num_proc={args.num_proc}",
            "data.val_windows=2", f"model.attention={attention}", f"model.attn_dropout={attn_dropout}",
            "model.dropout=0.0", f"trainer.micro_batch_size={batch}", f"trainer.compile={compiled}",
            "trainer.sample_tokens=0", "trainer.device=cuda", f"trainer.seed={seed}", "logger=none",
            "optim.lr=6e-4", "optim.warmup_steps=20", *extra]


class TrainerSystem:
    """A flashtrain ``Trainer`` driven step by step as ``Trainer.fit`` drives it (the loss read
    back and checked once per window, as at a log line)."""

    def __init__(self, overrides, workdir, two_pass: bool = False):
        """``two_pass``: the attention backward without the fused dK/dV pass, where that is the
        default (head dim 64 with dropout, long calls at head dims 64 and 128): an A/B of the
        default in the same process."""
        self.trainer = Trainer(run_config(overrides), Path(tempfile.mkdtemp(dir=workdir)))
        config = self.trainer.config
        self.tokens_per_step = config.trainer.micro_batch_size * config.trainer.grad_accum * config.data.seqlen
        self.flops_per_token = flops_per_token(self.trainer.model, config.data)
        self.last = None
        self.two_pass = two_pass

    def step(self):
        if not self.two_pass:
            self.last = self.trainer.train_step()
            return
        # The attention backward's tiles are chosen at every call (inside the compiled graph too),
        # so swapping the chooser for this step's calls swaps the kernel for this system alone.
        # The two passes' tiles are the ones the default gives under deterministic algorithms.
        default = _backward.dkdv_tiles
        _backward.dkdv_tiles = lambda *args, **kwargs: default(*args, **{**kwargs,
                                                                      "deterministic": True})
        try:
            self.last = self.trainer.train_step()
        finally:
            _backward.dkdv_tiles = default

    def sync(self):
        self.trainer.check_finite()
        return float(self.last["loss"])

    def close(self):
        self.trainer.close()
        self.trainer = self.last = None


class StockSystem:
    """scripts/stock_gpt2.py, compiled, fed the windows of flashtrain's sampler (same data)."""

    def __init__(self, windows, batch, vocab_size, seqlen, attn_dropout, seed=1337, lr=6e-4, warmup=20,
                 mode="default"):
        torch.manual_seed(seed)
        config = stock_gpt2.StockConfig(vocab_size=vocab_size, seqlen=seqlen, attn_dropout=attn_dropout)
        self.model = stock_gpt2.StockGPT(config).cuda().train()
        self.optimizer = stock_gpt2.make_optimizer(self.model, lr)
        # The trainer's schedule with optim.schedule=constant: linear warm-up, then flat.
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                          lambda step: min(1.0, (step + 1) / warmup))
        self.forward = torch.compile(self.model, mode=mode)
        self.cuda_graphs = mode == "reduce-overhead"
        self.windows = windows
        self.tokens_per_step = seqlen * batch
        matmul = sum(p.numel() for name, p in self.model.named_parameters() if name != "wpe.weight"
                     and p.dim() == 2)
        # models.flops' count: 6 x matmul parameters + causal attention's two products.
        self.flops_per_token = 6 * matmul + 12 * config.n_layer * config.d_model * (seqlen + 1) / 2
        self.last = None

    def step(self):
        batch = next(self.windows)
        inputs, targets = stock_gpt2.to_device(batch.input_ids, batch.targets, "cuda")
        if self.cuda_graphs:
            # The next replay overwrites this step's loss: mark the step, keep a copy.
            torch.compiler.cudagraph_mark_step_begin()
        loss = stock_gpt2.train_step(self.forward, self.model, self.optimizer, inputs, targets)
        self.last = loss.clone() if self.cuda_graphs else loss
        self.schedule.step()

    def sync(self):
        return float(self.last)

    def close(self):
        self.model = self.optimizer = self.forward = self.last = None


def stock_system(args, seqlen, batch, attn_dropout, seed=1337, mode="default"):
    """The stock model over the same data pipeline output as the trainer's (same vocabulary)."""
    config = run_config(gpt2_overrides(args, seqlen, batch, "flash", False, attn_dropout, seed))
    data = build_data(config.data, batch, seed, log=lambda *_: None)
    padded = -(-data.vocab_size // 64) * 64
    return StockSystem(data.train, batch, padded, seqlen, attn_dropout, seed, mode=mode)


def gpt2_record(system, seqlen, batch, compiled, attn_dropout, **extra):
    return dict(system=system, model="gpt2_small", seqlen=seqlen, batch=batch, compile=compiled,
                attn_dropout=attn_dropout, **extra)


# -- parts ----------------------------------------------------------------------------------------
def time_systems(args, systems, ceiling) -> list[dict]:
    """Each (record, build) of one setting timed in turn, or all of them in alternating windows
    (``--interleave``); returns the filled records."""
    if args.interleave:
        return measure_interleaved([record for record, _ in systems], [build for _, build in systems],
                                   args.window, args.windows, ceiling, args.profile_steps)
    return [measure(record, build, args.window, args.windows, ceiling, args.profile_steps)
            for record, build in systems]


def part_grid(args, workdir, ceiling, records):
    flashtrain = (("flash", True), ("sdpa", True), ("eager", False))
    for setting in args.settings:
        seqlen, batch = map(int, setting.split(":"))
        for p in args.dropouts:
            systems = []
            if "stock_sdpa" in args.systems:
                systems.append((gpt2_record("stock_sdpa", seqlen, batch, True, p),
                                functools.partial(stock_system, args, seqlen, batch, p)))
            for attention, compiled in flashtrain:
                if f"flashtrain_{attention}" in args.systems:
                    overrides = gpt2_overrides(args, seqlen, batch, attention, compiled, p)
                    systems.append((gpt2_record(f"flashtrain_{attention}", seqlen, batch, compiled, p),
                                    functools.partial(TrainerSystem, overrides, workdir)))
            if "flashtrain_flash_two_pass" in args.systems and p > 0:   # fused only with dropout
                overrides = gpt2_overrides(args, seqlen, batch, "flash", True, p)
                systems.append((gpt2_record("flashtrain_flash_two_pass", seqlen, batch, True, p),
                                functools.partial(TrainerSystem, overrides, workdir, two_pass=True)))
            # With dropout too: in these modes flash draws its dropout seeds on the device.
            if "stock_sdpa_graphs" in args.systems:
                systems.append((gpt2_record("stock_sdpa_graphs", seqlen, batch, True, p,
                                            compile_mode="reduce-overhead"),
                                functools.partial(stock_system, args, seqlen, batch, p,
                                                  mode="reduce-overhead")))
            if "flashtrain_flash_graphs" in args.systems:
                overrides = gpt2_overrides(args, seqlen, batch, "flash", True, p,
                                           extra=["trainer.compile_mode=reduce-overhead"])
                systems.append((gpt2_record("flashtrain_flash_graphs", seqlen, batch, True, p,
                                            compile_mode="reduce-overhead"),
                                functools.partial(TrainerSystem, overrides, workdir)))
            for record in time_systems(args, systems, ceiling):
                records.append(record)
    return records


def part_long(args, workdir, ceiling, records):
    failed = set()
    for seqlen in args.contexts:
        record = measure(gpt2_record("flashtrain_flash", seqlen, 1, True, 0.1, checkpoint_blocks=False),
                         lambda: TrainerSystem(gpt2_overrides(args, seqlen, 1, "flash", True, 0.1),
                                               workdir), 2, 3, ceiling)
        records.append(record)
        if record.get("error") == "out of memory":
            extra = ["model.checkpoint_blocks=true"]
            records.append(measure(
                gpt2_record("flashtrain_flash", seqlen, 1, True, 0.1, checkpoint_blocks=True),
                lambda: TrainerSystem(gpt2_overrides(args, seqlen, 1, "flash", True, 0.1, extra=extra),
                                      workdir), 2, 3, ceiling))
        # The baselines, until each first runs out of memory.
        if "stock" not in failed:
            record = measure(gpt2_record("stock_sdpa", seqlen, 1, True, 0.1),
                             lambda: stock_system(args, seqlen, 1, 0.1), 2, 3, ceiling)
            records.append(record)
            failed |= {"stock"} if "error" in record else set()
        if "eager" not in failed:
            record = measure(gpt2_record("flashtrain_eager", seqlen, 1, False, 0.1),
                             lambda: TrainerSystem(gpt2_overrides(args, seqlen, 1, "eager", False, 0.1),
                                                   workdir), 2, 3, ceiling)
            records.append(record)
            failed |= {"eager"} if "error" in record else set()
    return records


def part_bert(args, workdir, ceiling, records):
    base = ["model=bert_large", "data=linux", f"data.path={args.corpus}", "data.objective=mlm",
            "data.tokenizer=wordpiece", "data.vocab_size=30522", "data.seqlen=512",
            f"data.cache_dir={args.cache}", f"data.num_proc={args.num_proc}", "data.val_windows=2",
            f"trainer.micro_batch_size={args.bert_batch}", "trainer.sample_tokens=0",
            "trainer.device=cuda", "logger=none", "optim.warmup_steps=20"]
    if args.bert_max_predictions:
        base.append(f"data.mlm_max_predictions={args.bert_max_predictions}")
    real_fraction = {}                   # per data layout: one sequence per row, or packed rows
    for packed in (False, True):
        if packed and not any(run.endswith(":rows") for run in args.bert_runs):
            continue
        config = run_config(base + [f"data.mlm_pack_sequences={packed}"])
        real_fraction[packed] = build_data(config.data, args.bert_batch, 0,
                                           log=lambda *_: None).train.real_fraction
    systems = []
    for attention, mode, *layout in (run.split(":") for run in args.bert_runs):
        compiled = mode != "eager"
        rows = layout == ["rows"]
        overrides = base + [f"model.attention={attention}", f"trainer.compile={compiled}"]
        if mode == "graphs":
            overrides.append("trainer.compile_mode=reduce-overhead")
        record = dict(system=f"flashtrain_{attention}" + ("_graphs" if mode == "graphs" else ""),
                      model="bert_large", seqlen=512, batch=args.bert_batch, compile=compiled, attn_dropout=0.1,
                      padding_fraction=1 - real_fraction[rows],
                      mlm_max_predictions=args.bert_max_predictions)
        if rows:                         # flash only: several sequences per row (cu_seqlens)
            overrides.append("data.mlm_pack_sequences=true")
            record["layout"] = "rows"
        elif layout:                     # flash only: packed real tokens, or the padded layout
            overrides.append(f"model.unpad={layout[0] == 'packed'}")
            record["layout"] = layout[0]
        systems.append((record, functools.partial(TrainerSystem, overrides, workdir)))
    timed = time_systems(args, systems, ceiling)
    for record in timed:
        real = 1 - record["padding_fraction"]
        if "tokens_per_s" in record:     # count real tokens only: padding is not work done
            record["padded_tokens_per_s"] = record["tokens_per_s"]
            record["tokens_per_s"] *= real
            record["mfu"] *= real
            record["mfu_measured"] *= real
        if "paired_ratio" in record:     # the same, in the ratio to the first system
            record["paired_ratio"] *= real / (1 - timed[0]["padding_fraction"])
        records.append(record)
    return records


def part_agree(args, workdir, ceiling, records):
    """Loss every 10 steps over ``--agree-steps`` steps on identical batches (1024 x 16). Each run
    is SYSTEM:SEED[:DROPOUT_SEED]: SEED fixes the weights and the batch order; DROPOUT_SEED, if
    given, reseeds the GPU generator afterwards, which only the dropout masks draw from (weights
    are initialized on the CPU), so two runs that differ in it differ in dropout alone."""
    for spec in args.agree_runs:
        name, seed, *dropout_seed = spec.split(":")
        seed = int(seed)
        torch._dynamo.reset()
        if name == "stock_sdpa":
            system = stock_system(args, 1024, 16, args.agree_dropout, seed)
        else:
            attention = name.split("_")[1]
            system = TrainerSystem(gpt2_overrides(args, 1024, 16, attention, True, args.agree_dropout,
                                                  seed, extra=["optim.schedule=constant"]), workdir)
        if dropout_seed:
            torch.cuda.manual_seed(int(dropout_seed[0]))
        losses = []
        for step in range(1, args.agree_steps + 1):
            system.step()
            if step % 10 == 0:
                losses.append([step, system.sync()])
        system.close()
        records.append(dict(system=name, seed=seed, dropout_seed=int(dropout_seed[0]) if dropout_seed else None,
                            model="gpt2_small", seqlen=1024, batch=16, attn_dropout=args.agree_dropout,
                            compile=True, losses=losses))
        print(json.dumps({"run": spec, "last_losses": losses[-3:]}), flush=True)
    return records


class Recorder(list):
    """The records so far; each append is written out at once."""

    def __init__(self, write):
        super().__init__()
        self.write = write

    def append(self, record):
        super().append(record)
        self.write(list(self))


PARTS = {"grid": part_grid, "long": part_long, "bert": part_bert, "agree": part_agree}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--part", choices=sorted(PARTS), required=True)
    parser.add_argument("--corpus", required=True, help="the Linux corpus directory (train/validation/test.parquet)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cache", default="/tmp/flashtrain-cache", help="token cache directory")
    parser.add_argument("--num-proc", type=int, default=12)
    parser.add_argument("--settings", nargs="+", default=["1024:16", "4096:4"], help="seqlen:batch")
    parser.add_argument("--systems", nargs="+", default=["stock_sdpa", "flashtrain_flash",
                                                         "flashtrain_sdpa", "flashtrain_eager"])
    parser.add_argument("--dropouts", nargs="+", type=float, default=[0.1, 0.0])
    parser.add_argument("--contexts", nargs="+", type=int, default=[8192, 16384, 32768, 65536])
    parser.add_argument("--bert-batch", type=int, default=16)
    parser.add_argument("--bert-runs", nargs="+", choices=[f"{a}:{c}" for a in ("flash", "sdpa", "eager")
                                                           for c in ("eager", "compiled", "graphs")]
                        + [f"flash:{c}:{layout}" for c in ("eager", "compiled", "graphs")
                           for layout in ("packed", "padded", "rows")],
                        default=["flash:eager", "flash:compiled", "sdpa:eager", "sdpa:compiled", "eager:eager"],
                        help="ATTENTION:eager|compiled|graphs[:packed|padded|rows], the part bert systems "
                             "in order (graphs: compiled with trainer.compile_mode=reduce-overhead, which "
                             "needs --bert-max-predictions; flash's layout: model.unpad=true|false, or "
                             "several sequences per row, data.mlm_pack_sequences=true)")
    parser.add_argument("--bert-max-predictions", type=int, default=None,
                        help="data.mlm_max_predictions for part bert (the original BERT data's cap, "
                             "80 at 512 tokens: a fixed number of MLM head positions per batch); "
                             "default: Bernoulli targets")
    parser.add_argument("--interleave", action="store_true",
                        help="parts grid and bert: build and warm up every system of a setting, then "
                             "time them in alternating windows (robust to a machine whose speed "
                             "drifts); records get paired_ratio against the setting's first system")
    parser.add_argument("--profile-steps", type=int, default=0,
                        help="parts grid and bert: after timing, profile this many steps of each "
                             "system and record its top GPU kernels (kernel_profile) and its top "
                             "operators by host time (host_profile)")
    parser.add_argument("--window", type=int, default=10, help="steps per timed window")
    parser.add_argument("--windows", type=int, default=3, help="timed windows after the warm-up one")
    parser.add_argument("--agree-steps", type=int, default=200)
    parser.add_argument("--agree-dropout", type=float, default=0.1)
    parser.add_argument("--agree-runs", nargs="+", default=["flashtrain_flash:1337", "flashtrain_sdpa:1337",
                                                            "stock_sdpa:1337", "flashtrain_flash:2024"],
                        help="SYSTEM:SEED[:DROPOUT_SEED] (see part agree)")
    args = parser.parse_args()
    register_configs()
    ceiling = matmul_ceiling()
    print(f"bf16 8192^3 matmul: {ceiling / 1e12:.0f} TFLOP/s", flush=True)
    header = dict(benchmark_header(), part=args.part, matmul_tflops=ceiling / 1e12)
    started = time.time()

    def write(records):
        """Rewrite the output after every setting, atomically: a run cut short keeps what it did."""
        result = dict(header, seconds=time.time() - started, records=records)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        temporary = args.out.with_suffix(".tmp")
        temporary.write_text(json.dumps(result, indent=1))
        temporary.replace(args.out)

    with tempfile.TemporaryDirectory() as workdir:
        PARTS[args.part](args, workdir, ceiling, Recorder(write))

if __name__ == "__main__":
    main()
