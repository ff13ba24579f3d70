"""What ``Trainer.fit`` tells the user: the run's opening line (and a warning when it would
re-read its data too often), the metrics record of each log window and its line, and the sample
the final model writes."""

import shlex

import torch

from models import generate
from models.attention import resolve as resolve_attention

from .console import duration_text
from .metrics import log

# More passes over the training split than this draw a warning: past ~4 epochs repeated data is
# worth much less than new data (Muennighoff et al. 2023, "Scaling Data-Constrained Language Models").
MAX_QUIET_EPOCHS = 4


def head_fraction(data) -> float:
    """The share of positions a training step runs the output head on: every one for a causal LM;
    for a masked LM its targets, each token with ``mlm_probability``, or a fixed K per row."""
    if data.objective != "mlm":
        return 1.0
    if data.mlm_max_predictions is not None:
        return min(data.mlm_max_predictions, data.seqlen) / data.seqlen
    return data.mlm_probability


def flops_per_token(model, data) -> float:
    """Model FLOPs per trained token at ``data.seqlen``, or the mix of two lengths the run trains."""
    if data.objective == "mlm":
        return model.flops_per_token(data.seqlen, head_fraction(data))
    flops = model.flops_per_token(data.seqlen)
    if data.mix_seqlen:      # the mixed-in short micro-batches attend over fewer keys
        flops = (1 - data.mix_fraction) * flops + data.mix_fraction * model.flops_per_token(data.mix_seqlen)
    return flops


def announce(trainer, tokens_per_step: int, corpus_tokens: int):
    """Log the run's opening line; warn if ``max_steps`` reads the training split too many times."""
    config, steps = trainer.config, trainer.config.trainer.max_steps
    params = sum(p.numel() for p in trainer.model.parameters())
    attention = resolve_attention(trainer.model.config.attention, trainer.device)
    log.info(f"run {trainer.run_dir}: {config.model.name} ({params / 1e6:.2f}M parameters, "
             f"{attention} attention), {trainer.device}, {trainer.precision}, "
             f"{trainer.context.world_size} process(es), {tokens_per_step} tokens per step, "
             f"steps {trainer.step}..{steps}")
    budget = config.trainer.max_minutes
    if budget is not None:
        log.info(f"time budget: this invocation stops at a log step before {budget:g} min from its "
                 "start (trainer.max_minutes), saved, with exit status 75")
    epochs = steps * tokens_per_step / corpus_tokens
    if epochs > MAX_QUIET_EPOCHS:
        log.warning(f"this run reads its {corpus_tokens:,}-token training split {epochs:.1f} times "
                    f"(max_steps {steps} x {tokens_per_step} tokens): expect validation "
                    "loss to rise from overfitting; add data or lower trainer.max_steps")


def window_record(trainer, result: dict, tokens_per_s: float, corpus_tokens: int,
                  flops: float) -> dict:
    """The metrics line of a log window that ended with the step whose ``result`` is given (its
    loss and gradient norm are read back here: the caller has already waited for the GPU)."""
    grad_norm = result["grad_norm"]
    cuda = trainer.device.type == "cuda"
    record = {"step": trainer.step, "tokens": trainer.tokens,
              "epoch": round(trainer.tokens / corpus_tokens, 4), "loss": float(result["loss"]),
              "lr": trainer.scheduler.get_last_lr()[0],
              "grad_norm": None if grad_norm is None else float(grad_norm),
              "tokens_per_s": tokens_per_s,
              "mfu": (tokens_per_s * flops / trainer.context.world_size / trainer.peak_flops
                      if trainer.peak_flops else None),
              "mem_gb": torch.cuda.max_memory_allocated(trainer.device) / 1e9 if cuda else None}
    if trainer.skipped:
        record["skipped_steps"] = trainer.skipped
    return record


def window_line(record: dict, max_steps: int, tokens_per_step: int | None = None) -> str:
    """A log window's record as one line of train.log (and of the console without a bar); with
    ``tokens_per_step``, how long the remaining steps take at this window's rate (evaluations and
    checkpoints not counted)."""
    parts = [f"loss {record['loss']:.4f}", f"lr {record['lr']:.3g}"]
    if record["grad_norm"] is not None:
        parts.append(f"grad_norm {record['grad_norm']:.3g}")
    parts.append(f"{record['tokens_per_s']:,.0f} tokens/s")
    if record["mfu"] is not None:
        parts.append(f"MFU {100 * record['mfu']:.1f} %")
    if record["mem_gb"] is not None:
        parts.append(f"{record['mem_gb']:.1f} GB")
    if record.get("skipped_steps"):
        parts.append(f"{record['skipped_steps']} steps skipped")
    if tokens_per_step and record["step"] < max_steps:
        left = (max_steps - record["step"]) * tokens_per_step / record["tokens_per_s"]
        parts.append(f"about {duration_text(left)} left")
    return f"step {record['step']}/{max_steps}: " + ", ".join(parts)


def final_sample(trainer, new_tokens: int) -> str:
    """Text the trained model continues a validation window's first 16 tokens with (seeded)."""
    prompt = trainer.data.validation[0].input_ids[:1, :16].to(trainer.device)
    config = trainer.model.config
    if config.arch == "gpt2":     # learned positions: the sample must fit the table
        room = config.max_seqlen - prompt.shape[1]
        if new_tokens > room:
            log.info(f"sample: {room} new tokens, not {new_tokens}: the model has "
                     f"{config.max_seqlen} positions")
            new_tokens = room
    generator = torch.Generator(device=trainer.device).manual_seed(trainer.config.trainer.seed)
    with trainer.autocast():
        out = generate(trainer.model, prompt, new_tokens, temperature=0.8, top_k=50, generator=generator)
    return trainer.data.tokenizer.decode(out[0].tolist())


def next_steps(run_dir, causal: bool, seqlen: int, best=None) -> str:
    """What a finished run's directory is good for, as the commands that use it (README: Using a
    run); with ``best`` (``best_model.BestModel``) that wrote its file, where those weights are."""
    run = shlex.quote(str(run_dir))
    lines = ["use this run:"]
    if best is not None and best.step is not None:
        lines.append(f"  (its lowest validation loss, {best.loss:.4f} at step {best.step}: "
                     f"{shlex.quote(str(best.path))}, which each command takes in place of the run)")
    if causal:
        lines.append(f"  python scripts/sample.py {run} --prompt 'TEXT' --max-new-tokens 200")
        lines.append(f"  python -m trainer.evaluate {run} --documents CORPUS --contexts {seqlen} --out eval.json")
    lines.append(f"  python scripts/convert_hf.py export {run} hf_model/       # for Hugging Face transformers")
    return "\n".join(lines)
