"""The training loop: one explicit step function, evaluation, checkpoints, logging."""

import contextlib
import math
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from models import generate, lm_loss, save_model
from models.attention import resolve as resolve_attention

from .build import make_model, model_config_dict, resolve_device
from .checkpoint import (CheckpointError, check_compatible, latest_checkpoint, load_checkpoint,
                         save_checkpoint, set_rng_state)
from .config import RunConfig
from .data import build_data
from .distributed import init_distributed, shutdown, wrap_model
from .metrics import MetricsWriter, close_logging, log, setup_logging
from .optim import build_optimizer, build_scheduler

# Dense bf16 tensor-core rates (datasheets), for MFU when trainer.peak_tflops is not given.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the message names the step."""


def _peak_flops(config: RunConfig, device: torch.device) -> float | None:
    if config.trainer.peak_tflops:
        return config.trainer.peak_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in PEAK_TFLOPS.items() if key in name), None)


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    def __init__(self, config: RunConfig, run_dir: Path):
        self.config = config
        trainer = config.trainer
        self.device = resolve_device(trainer.device)
        self.context = init_distributed(self.device)
        if self.context.enabled and self.device.type == "cuda":
            self.device = torch.device(f"cuda:{self.context.local_rank}")
        # One run directory for all ranks: rank 0's. Without an explicit hydra.run.dir, the other
        # ranks' Hydra may have made timestamped directories of their own; drop them if that is all.
        self.run_dir = Path(self.context.broadcast(str(run_dir)))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if Path(run_dir) != self.run_dir and Path(run_dir).is_dir() \
                and set(os.listdir(run_dir)) <= {".hydra"}:
            shutil.rmtree(run_dir, ignore_errors=True)
        setup_logging(self.run_dir, self.context.is_main)
        seed_everything(trainer.seed + self.context.rank)   # dropout differs per rank; weights do not

        # Rank 0 trains the tokenizer and writes the token cache; the others then read it.
        quiet = lambda *_: None
        if self.context.is_main:
            self.data = build_data(config.data, trainer.micro_batch_size, trainer.seed, 0,
                                   self.context.world_size, log=log.info)
        self.context.barrier()
        if not self.context.is_main:
            self.data = build_data(config.data, trainer.micro_batch_size, trainer.seed,
                                   self.context.rank, self.context.world_size, log=quiet)

        self.model = make_model(config, self.data.vocab_size, trainer.seed).to(self.device)
        self.optimizer = build_optimizer(self.model, config.optim, self.device)
        self.scheduler = build_scheduler(self.optimizer, config.optim, trainer.max_steps)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=trainer.precision == "fp16")
        self.step, self.tokens, self.skipped = 0, 0, 0
        self._restore_or_refuse()
        self.wrapped = wrap_model(self.model, self.context, self.device)
        self.forward = torch.compile(self.wrapped) if trainer.compile else self.wrapped
        self.autocast_dtype = DTYPES[trainer.precision]
        self.peak_flops = _peak_flops(config, self.device)
        self.metrics = MetricsWriter(self.run_dir, config.logger, OmegaConf.to_container(
            OmegaConf.structured(config)), self.context.is_main)

    # -- checkpoints -------------------------------------------------------------------------
    def _restore_or_refuse(self):
        path = latest_checkpoint(self.run_dir)
        if path is None:
            if self.config.resume:
                log.info(f"resume=true but {self.run_dir} has no checkpoint yet: starting fresh")
            return
        if not self.config.resume:
            raise CheckpointError(f"{self.run_dir} already holds checkpoints; pass resume=true to "
                                  "continue it, or choose a new hydra.run.dir")
        state, rng = load_checkpoint(path, self.context.rank)
        check_compatible(state["model_config"], model_config_dict(self.model), path)
        if state["world_size"] != self.context.world_size:
            raise CheckpointError(f"{path} was saved by {state['world_size']} processes; this run has "
                                  f"{self.context.world_size} (exact resume needs the same number)")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.data.train.load_state_dict(state["sampler"])
        self.step, self.tokens, self.skipped = state["step"], state["tokens"], state["skipped"]
        set_rng_state(rng)
        log.info(f"resumed from {path} at step {self.step}")

    def save(self):
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                 "sampler": self.data.train.state_dict(), "step": self.step, "tokens": self.tokens,
                 "skipped": self.skipped, "world_size": self.context.world_size,
                 "model_config": model_config_dict(self.model),
                 "config": OmegaConf.to_container(OmegaConf.structured(self.config))}
        path = save_checkpoint(self.run_dir, self.step, state, self.context, self.config.trainer.keep_checkpoints)
        log.info(f"step {self.step}: saved {path}")

    # -- one optimizer step ------------------------------------------------------------------
    def _autocast(self):
        if self.config.trainer.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _loss(self, batch):
        with self._autocast():
            logits = self.forward(batch.input_ids, batch.attention_mask, cu_seqlens=batch.cu_seqlens,
                                  max_seqlen=batch.max_seqlen) if batch.cu_seqlens is not None \
                else self.forward(batch.input_ids, batch.attention_mask)
        return lm_loss(logits, batch.targets)

    def train_step(self) -> dict:
        trainer = self.config.trainer
        self.wrapped.train()
        total = torch.zeros((), device=self.device)
        tokens = 0
        for micro in range(trainer.grad_accum):
            batch = next(self.data.train).to(self.device)
            tokens += batch.num_tokens
            last = micro == trainer.grad_accum - 1
            sync = contextlib.nullcontext() if last or not self.context.enabled else self.wrapped.no_sync()
            with sync:
                loss = self._loss(batch) / trainer.grad_accum
                self.scaler.scale(loss).backward()
            total += loss.detach()
        loss_value = float(self.context.all_reduce_mean(total))
        if not math.isfinite(loss_value):
            self.optimizer.zero_grad(set_to_none=True)
            if not trainer.skip_nonfinite:
                raise NonFiniteLoss(f"loss is {loss_value} at step {self.step + 1}; stopping (set "
                                    "trainer.skip_nonfinite=true to skip such steps)")
            self.skipped += 1
            self.step += 1
            self.scheduler.step()
            return {"loss": loss_value, "grad_norm": None, "skipped": True}
        self.scaler.unscale_(self.optimizer)
        clip = self.config.optim.grad_clip or float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        self.tokens += tokens * self.context.world_size
        return {"loss": loss_value, "grad_norm": grad_norm, "skipped": False}

    @torch.no_grad()
    def evaluate(self) -> dict:
        self.wrapped.eval()
        loss_sum, count = 0.0, 0
        for batch in self.data.validation:
            batch = batch.to(self.device)
            n = batch.num_tokens
            loss_sum += float(self._loss(batch)) * n
            count += n
        val_loss = loss_sum / max(count, 1)
        return {"step": self.step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}

    # -- the run -----------------------------------------------------------------------------
    def fit(self) -> dict:
        trainer = self.config.trainer
        tokens_per_step = trainer.micro_batch_size * trainer.grad_accum * self.context.world_size * self.config.data.seqlen
        flops_per_token = self.model.flops_per_token(self.config.data.seqlen)
        params = sum(p.numel() for p in self.model.parameters())
        attention = resolve_attention(self.model.config.attention, self.device)
        log.info(f"run {self.run_dir}: {self.config.model.name} ({params / 1e6:.2f}M parameters, "
                 f"{attention} attention), "
                 f"{self.device}, {trainer.precision}, {self.context.world_size} process(es), "
                 f"{tokens_per_step} tokens per step, steps {self.step}..{trainer.max_steps}")
        bar = tqdm(total=trainer.max_steps, initial=self.step, disable=not self.context.is_main,
                   desc="train", dynamic_ncols=True)
        last_eval = None
        window_start, window_tokens, losses = time.time(), 0, []
        started = time.time()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        while self.step < trainer.max_steps:
            result = self.train_step()
            window_tokens += tokens_per_step
            losses.append(result["loss"])
            bar.update(1)
            if self.step % trainer.log_interval == 0 or self.step == trainer.max_steps:
                elapsed = time.time() - window_start
                tokens_per_s = window_tokens / elapsed
                record = {"step": self.step, "tokens": self.tokens, "loss": result["loss"],
                          "lr": self.scheduler.get_last_lr()[0], "grad_norm": result["grad_norm"],
                          "tokens_per_s": tokens_per_s,
                          "mfu": tokens_per_s * flops_per_token / self.context.world_size / self.peak_flops
                          if self.peak_flops else None,
                          "mem_gb": torch.cuda.max_memory_allocated(self.device) / 1e9
                          if self.device.type == "cuda" else None}
                if self.skipped:
                    record["skipped_steps"] = self.skipped
                self.metrics.write(record)
                bar.set_postfix(loss=f"{result['loss']:.3f}", tok_s=f"{tokens_per_s:,.0f}")
                window_start, window_tokens = time.time(), 0
            if self.step % trainer.eval_interval == 0 or self.step == trainer.max_steps:
                last_eval = self.evaluate()
                self.metrics.write(last_eval)
                log.info(f"step {self.step}: val_loss {last_eval['val_loss']:.4f}, "
                         f"val_ppl {last_eval['val_ppl']:.2f}")
            if self.step % trainer.save_interval == 0 or self.step == trainer.max_steps:
                self.save()
        bar.close()
        if self.context.is_main:
            # The trained model and its tokenizer, ready for scripts/sample.py and model.init_from.
            save_model(self.model, self.run_dir / "model.pt")
            self.data.tokenizer.save(str(self.run_dir / "tokenizer.json"))
        summary = {"steps": self.step, "tokens": self.tokens, "seconds": time.time() - started,
                   "final_loss": losses[-1] if losses else None,
                   "val_loss": last_eval["val_loss"] if last_eval else None,
                   "val_ppl": last_eval["val_ppl"] if last_eval else None, "skipped_steps": self.skipped}
        log.info("done: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                      for k, v in summary.items()))
        if self.context.is_main and trainer.sample_tokens and self.model.config.causal:
            log.info("sample:\n" + self.sample(trainer.sample_tokens))
        return summary

    def sample(self, new_tokens: int) -> str:
        prompt = self.data.validation[0].input_ids[:1, :16].to(self.device)
        generator = torch.Generator(device=self.device).manual_seed(self.config.trainer.seed)
        with self._autocast():
            out = generate(self.model, prompt, new_tokens, temperature=0.8, top_k=50, generator=generator)
        return self.data.tokenizer.decode(out[0].tolist())

    def close(self):
        self.metrics.close()
        close_logging()
        shutdown(self.context)


def run(config: RunConfig, run_dir: Path) -> dict:
    trainer = Trainer(config, run_dir)
    try:
        return trainer.fit()
    finally:
        trainer.close()
