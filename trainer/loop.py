"""The training loop: one explicit step function, evaluation, checkpoints, logging."""

import contextlib
import math
import os
import shutil
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from kernels.flash_attention import device_dropout_seeds
from models import save_model

from .best_model import BestModel
from .build import (adopt_init_tokenizer, check_attention_runs, compile_model, fit_batches_to_run, make_model,
                    model_config_dict, resolve_device, seed_everything)
from .checkpoint import (CheckpointError, check_compatible, config_changes, latest_checkpoint,
                         load_checkpoint, load_sharded, resumable_checkpoint, save_checkpoint,
                         set_rng_state, sharded_state)
from .config import CUDA_GRAPH_MODES, RunConfig
from .data import build_data
from .data.tokenizer import write_tokenizer
from .fit_report import announce, final_sample, flops_per_token, next_steps, window_line, window_record
from .environment import describe_environment, environment_line, record_environment
from .distributed import (full_model_state, gradient_sync, init_distributed, local_value, shutdown,
                          wrap_model)
from .early_stop import stop_reason, stop_run
from .console import WINDOW_LINE, data_progress_bars, show_progress_bar, wants_progress_bar
from .metrics import MetricsWriter, close_logging, log, read_metrics, setup_logging
from .optim import build_optimizer, build_scheduler
from .out_of_memory import explained as explain_out_of_memory
from .precision import DTYPES, resolve_precision
from .run_lock import RunLock
from .run_summary import format_summary, peak_flops, summarize
from .step_profiler import StepProfiler
from .stop_signals import StopSignals
from .time_budget import TimeBudget



class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the message names the step."""


class Trainer:
    def __init__(self, config: RunConfig, run_dir: Path):
        self.config = config
        trainer = config.trainer
        self.budget = TimeBudget(trainer.max_minutes)
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
        self.lock = RunLock(self.run_dir) if self.context.is_main else None
        try:
            self._build(config, trainer)
        except BaseException:
            # A refused run leaves nothing behind: not its lock, nor its train.log handler (which
            # a later run in the same process would otherwise keep writing to).
            self._release_lock()
            close_logging()
            raise

    def _release_lock(self):
        if self.lock is not None:
            self.lock.release()

    def _build(self, config: RunConfig, trainer):
        setup_logging(self.run_dir, self.context.is_main)
        self.precision, warning = resolve_precision(trainer.precision, self.device)
        if warning:
            log.warning(warning)
        # What a checkpoint records and a resume compares is the format the run computed in.
        trainer.precision = self.precision
        check_attention_runs(config, self.device)
        seed_everything(trainer.seed + self.context.rank)   # dropout differs per rank; weights do not

        adopted = adopt_init_tokenizer(config)
        if adopted:
            log.info(f"data.tokenizer_file: {adopted} (model.init_from's own tokenizer)")
        # Rank 0 trains the tokenizer and writes the token cache; the others then read it.
        quiet = lambda *_: None
        if self.context.is_main:
            with data_progress_bars(wants_progress_bar(trainer.progress)):
                self.data = build_data(config.data, trainer.micro_batch_size, trainer.seed, 0,
                                       self.context.world_size, log=log.info)
        self.context.barrier()
        if not self.context.is_main:
            self.data = build_data(config.data, trainer.micro_batch_size, trainer.seed,
                                   self.context.rank, self.context.world_size, log=quiet)

        self.model = make_model(config, self.data.vocab_size, trainer.seed).to(self.device)
        for change in fit_batches_to_run(self.data, self.model, config):
            log.info(change)
        self.sharded = self.context.enabled and trainer.distributed == "fsdp"
        if self.sharded:    # FSDP shards the parameters in place; the optimizer must see the shards
            self.wrapped = wrap_model(self.model, self.context, self.device, "fsdp",
                                      DTYPES[self.precision] if self.precision == "bf16" else None)
        self.optimizer = build_optimizer(self.model, config.optim, self.device)
        self.scheduler = build_scheduler(self.optimizer, config.optim, trainer.max_steps)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.step, self.tokens, self.skipped = 0, 0, 0
        self.resumed_from = None
        self._unchecked = []             # (step, loss on the device) not yet checked for NaN/inf
        self._restore_or_refuse()
        if not self.sharded:
            self.wrapped = wrap_model(self.model, self.context, self.device)
        self.forward = compile_model(self.wrapped, self.model, trainer.compile_mode) if trainer.compile \
            else self.wrapped
        self.cuda_graphs = trainer.compile and trainer.compile_mode in CUDA_GRAPH_MODES
        self.autocast_dtype = DTYPES[self.precision]
        # With a cap on targets per sequence the MLM head runs on a fixed number of positions.
        self.loss_options = ({"max_targets": config.data.mlm_max_predictions}
                             if config.data.objective == "mlm" and config.data.mlm_max_predictions
                             else {})
        self.peak_flops = peak_flops(config.trainer.peak_tflops, self.device)
        self.step_profiler = StepProfiler(trainer.profile_steps, self.run_dir, self.device,
                                          self.context.rank)
        self.best = BestModel(self.run_dir, trainer.save_best, resuming=self.resumed_from is not None)
        self.metrics = MetricsWriter(self.run_dir, config.logger, OmegaConf.to_container(
            OmegaConf.structured(config)), self.context.is_main)
        if self.context.is_main:
            # Written once the run is accepted (a refused resume must not replace the run's
            # tokenizer) and before the first step: every checkpoint is usable with it at once.
            write_tokenizer(self.data.tokenizer, self.run_dir / "tokenizer.json")
            environment = describe_environment(self.device, self.context.world_size)
            record_environment(self.run_dir, environment)
            log.info(environment_line(environment))
        if self.resumed_from is not None:
            # Steps after the checkpoint are replayed and logged again; readers keep the last line
            # of each step (trainer.metrics.read_metrics), and this line says where replay began.
            self.metrics.write({"event": "resume", "step": self.step, "checkpoint": str(self.resumed_from)})

    # -- checkpoints -------------------------------------------------------------------------
    def _restore_or_refuse(self):
        if latest_checkpoint(self.run_dir) is None:
            if self.config.resume:
                log.info(f"resume=true but {self.run_dir} has no checkpoint yet: starting fresh")
            return
        if not self.config.resume:
            raise CheckpointError(f"{self.run_dir} already holds checkpoints; pass resume=true to "
                                  "continue it, or choose a new hydra.run.dir")
        path = resumable_checkpoint(self.run_dir, self.context.rank)
        state, rng = load_checkpoint(path, self.context.rank)
        check_compatible(state["model_config"], model_config_dict(self.model), path)
        if "config" in state:
            current = OmegaConf.to_container(OmegaConf.structured(self.config))
            for change in config_changes(state["config"], current, path):
                log.info(f"resume: {change}")
        if state["world_size"] != self.context.world_size:
            raise CheckpointError(f"{path} was saved by {state['world_size']} processes; this run has "
                                  f"{self.context.world_size} (exact resume needs the same number)")
        if self.sharded:
            load_sharded(path, self.model, self.optimizer)
        else:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.data.train.load_state_dict(state["sampler"])
        self.step, self.tokens, self.skipped = state["step"], state["tokens"], state["skipped"]
        set_rng_state(rng)
        self.resumed_from = path
        log.info(f"resumed from {path} at step {self.step}")

    def save(self):
        """A checkpoint (collective). Under FSDP the model and optimizer go to a sharded
        torch.distributed.checkpoint directory inside it, each process writing its own shards."""
        sharded = None
        if self.sharded:
            sharded = sharded_state(self.model, self.optimizer)
            state = {}
        else:
            state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}
        state |= {"scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                 "sampler": self.data.train.state_dict(), "step": self.step, "tokens": self.tokens,
                 "skipped": self.skipped, "world_size": self.context.world_size,
                 "model_config": model_config_dict(self.model),
                 "config": OmegaConf.to_container(OmegaConf.structured(self.config))}
        path = save_checkpoint(self.run_dir, self.step, state, self.context,
                               self.config.trainer.keep_checkpoints, sharded=sharded)
        self.last_saved = time.time()
        log.info(f"step {self.step}: saved {path}")

    def _save_due(self, logged: bool) -> bool:
        """``trainer.save_minutes`` have passed since the last checkpoint (or the start). Checked at
        log steps, where the loop waits for the GPU anyway; several processes agree, as on a stop."""
        minutes = self.config.trainer.save_minutes
        if minutes is None or not logged:
            return False
        return self.context.any(time.time() - self.last_saved >= 60 * minutes, self.device)

    # -- one optimizer step ------------------------------------------------------------------
    def autocast(self):
        """The run's precision as an autocast context (none in fp32)."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _loss(self, batch):
        """Mean loss of one micro-batch. The model computes it from the targets, so a compiled model
        fuses the head's matmul output with the cross entropy (no float32 logits in memory)."""
        documents = {}
        if self.config.data.mix_seqlen:
            # Two batch shapes (B x L and kB x L/k, unless fit_batches_to_run packed the short ones
            # as B x L): each its own static graph. Unmarked, dynamo's second compilation would
            # make both dimensions dynamic and serve both shapes with it.
            torch._dynamo.mark_static(batch.input_ids)
            torch._dynamo.mark_static(batch.targets)
        if batch.cu_seqlens is not None:
            # The number of documents changes from batch to batch. Told so up front, a compiled
            # model compiles once; otherwise it compiles the first batch's count, then again with
            # the count dynamic (tests/trainer/test_trainer.py).
            torch._dynamo.maybe_mark_dynamic(batch.cu_seqlens, 0)
            documents = {"cu_seqlens": batch.cu_seqlens, "max_seqlen": batch.max_seqlen}
        if self.cuda_graphs:
            # Graph replays write their outputs into the same memory. Each call's start marks the
            # last call's outputs consumed: its loss is already added into the step's total, and its
            # gradients were used by the optimizer step (one micro-batch per step in these modes).
            torch.compiler.cudagraph_mark_step_begin()
        # Captured graphs need dropout seeds drawn on the device (a host seed would replay one mask).
        with self.autocast(), device_dropout_seeds(self.cuda_graphs):
            return self.forward(batch.input_ids, batch.attention_mask, targets=batch.targets,
                                **documents, **self.loss_options)

    def _next_batch(self):
        """The next micro-batch on the device, and its loss-bearing token count (counted on the
        host copy: reading it from the device would wait for the GPU)."""
        batch = next(self.data.train)
        return batch.to(self.device), batch.num_tokens

    def train_step(self) -> dict:
        """One optimizer step. ``loss`` and ``grad_norm`` come back as device tensors and nothing
        here waits for the GPU, so the host queues the next steps while this one runs; ``fit``
        reads them back at log intervals. Skipping non-finite steps (trainer.skip_nonfinite) and
        fp16 loss scaling decide on the host, so they wait for each step's loss."""
        trainer = self.config.trainer
        self.wrapped.train()
        total = torch.zeros((), device=self.device)
        tokens = 0
        for micro in range(trainer.grad_accum):
            batch, batch_tokens = self._next_batch()
            tokens += batch_tokens
            last = micro == trainer.grad_accum - 1
            with gradient_sync(self.wrapped, self.context, trainer.distributed, sync=last):
                loss = self._loss(batch) / trainer.grad_accum
                self.scaler.scale(loss).backward()
            total += loss.detach()
        total = self.context.all_reduce_mean(total)
        if trainer.skip_nonfinite and not bool(torch.isfinite(total)):
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped += 1
            self.step += 1
            self.scheduler.step()
            return {"loss": total, "grad_norm": None, "skipped": True}
        self.scaler.unscale_(self.optimizer)
        clip = self.config.optim.grad_clip or float("inf")
        grad_norm = local_value(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        self.tokens += tokens * self.context.world_size
        self._unchecked.append((self.step, total))
        return {"loss": total, "grad_norm": grad_norm, "skipped": False}

    def check_finite(self):
        """Stop on the first step since the last check whose loss was NaN or infinite (one read
        of the GPU for all of them). Runs before every log line, evaluation and checkpoint, so a
        non-finite model is never evaluated or saved."""
        if not self._unchecked:
            return
        steps = [step for step, _ in self._unchecked]
        values = torch.stack([loss for _, loss in self._unchecked]).tolist()
        self._unchecked.clear()
        for step, value in zip(steps, values):
            if not math.isfinite(value):
                raise NonFiniteLoss(f"loss is {value} at step {step}; stopping (set "
                                    "trainer.skip_nonfinite=true to skip such steps)")

    @torch.no_grad()
    def evaluate(self) -> dict:
        self.wrapped.eval()
        loss_sum, count = torch.zeros((), device=self.device, dtype=torch.float64), 0
        for batch in self.data.validation:
            n = batch.num_tokens
            loss_sum += self._loss(batch.to(self.device)).double() * n
            count += n
        val_loss = float(loss_sum) / max(count, 1)
        return {"step": self.step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}

    # -- the run -----------------------------------------------------------------------------
    def fit(self) -> dict:
        trainer = self.config.trainer
        tokens_per_step = (trainer.micro_batch_size * trainer.grad_accum * self.context.world_size
                           * self.config.data.seqlen)
        flops = flops_per_token(self.model, self.config.data)
        corpus_tokens = max(1, len(self.data.splits["train"].tokens))
        announce(self, tokens_per_step, corpus_tokens)
        unprofiled = self.step_profiler.unreachable(self.step + 1, trainer.max_steps)
        if unprofiled and self.context.is_main:
            log.warning(unprofiled)
        bar_shown = self.context.is_main and wants_progress_bar(trainer.progress)
        bar = tqdm(total=trainer.max_steps, initial=self.step, disable=not bar_shown,
                   desc="train", dynamic_ncols=True)
        show_progress_bar(log, bar_shown)
        last_eval, final_loss = None, None
        window_start, window_tokens = time.time(), 0
        started = self.last_saved = time.time()
        self.budget.training_started()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        interrupted = None
        with StopSignals() as stop:
            while self.step < trainer.max_steps:
                self.step_profiler.before_step(self.step + 1)
                with explain_out_of_memory(self, f"training step {self.step + 1}"):
                    result = self.train_step()
                self.step_profiler.after_step(self.step)
                window_tokens += tokens_per_step
                bar.update(1)
                at_end = self.step == trainer.max_steps
                logged = self.step % trainer.log_interval == 0
                if logged or at_end:
                    self.check_finite()          # waits for the GPU: the window's time is then exact
                    elapsed = time.time() - window_start
                    tokens_per_s = window_tokens / elapsed
                    record = window_record(self, result, tokens_per_s, corpus_tokens, flops)
                    final_loss = record["loss"]
                    self.metrics.write(record)
                    log.info(window_line(record, trainer.max_steps, tokens_per_step), extra=WINDOW_LINE)
                    bar.set_postfix(loss=f"{final_loss:.3f}", tok_s=f"{tokens_per_s:,.0f}")
                    window_start, window_tokens = time.time(), 0
                evaluate = self.step % trainer.eval_interval == 0 or at_end
                save = self.step % trainer.save_interval == 0 or at_end or self._save_due(logged)
                if evaluate or save:
                    self.check_finite()          # never evaluate or save a non-finite model
                    paused = time.time()         # evaluation and saving are not training throughput
                    if evaluate:
                        with explain_out_of_memory(self, f"the evaluation at step {self.step}"):
                            last_eval = self.evaluate()
                        self.metrics.write(last_eval)
                        log.info(f"step {self.step}: val_loss {last_eval['val_loss']:.4f}, "
                                 f"val_ppl {last_eval['val_ppl']:.2f}")
                        self.best.after_evaluation(self, last_eval)
                    if save:
                        self.save()
                    window_start += time.time() - paused
                reason = stop_reason(self, stop, logged, at_end)
                if reason is not None:
                    interrupted = stop_run(self, reason, saved=save)
                    break
        bar.close()
        show_progress_bar(log, False)
        if not interrupted:
            # The trained model (its tokenizer was written at the start), for every tool. Under
            # FSDP, gathering the full weights is a collective: every process takes part.
            weights = full_model_state(self.model, trainer.distributed, self.context)
            if self.context.is_main:
                save_model(self.model, self.run_dir / "model.pt", state_dict=weights)
        summary = {"steps": self.step, "tokens": self.tokens, "seconds": time.time() - started,
                   "final_loss": final_loss,
                   "val_loss": last_eval["val_loss"] if last_eval else None,
                   "val_ppl": last_eval["val_ppl"] if last_eval else None, "skipped_steps": self.skipped}
        if interrupted:
            summary["interrupted"] = interrupted
            return summary
        log.info("done: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                      for k, v in summary.items()))
        if self.context.is_main:
            # The whole run, resumed parts included: read back from metrics.jsonl.
            self.metrics.flush()
            whole_run = summarize(read_metrics(self.run_dir))
            self.metrics.write_summary(whole_run)
            log.info(format_summary(str(self.run_dir), whole_run))
        if trainer.sample_tokens and self.model.config.causal and (self.context.is_main or self.sharded):
            text = final_sample(self, trainer.sample_tokens)   # under FSDP every process runs the model
            if self.context.is_main:
                log.info("sample:\n" + text)
        if self.context.is_main:
            log.info(next_steps(self.run_dir, self.model.config.causal, self.config.data.seqlen, self.best))
        return summary

    def close(self, finished: bool = False):
        self.step_profiler.close(self.step)     # a window the run stopped inside
        self.metrics.close()
        close_logging()
        self._release_lock()
        shutdown(self.context, finished)


def run(config: RunConfig, run_dir: Path, on_start=None) -> dict:
    """Build the run and train it. ``on_start(trainer)`` runs once the run is accepted (data,
    model and any resume checked), before the first step."""
    trainer = Trainer(config, run_dir)
    finished = False
    try:
        if on_start is not None and trainer.context.is_main:
            on_start(trainer)
        summary, finished = trainer.fit(), True
        return summary
    finally:
        trainer.close(finished)
