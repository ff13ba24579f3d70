"""Scaling on several GPUs: DDP and FSDP2 against one GPU, and a kill-and-resume, through torchrun.

    python scripts/bench_distributed.py --corpus /data/linux-6.1 --nproc 1 2 4 8 \\
        --out docs/results/multigpu_h200.json --md docs/results/multigpu_h200.md

For every model x setting (context:micro-batch per GPU) x strategy x number of processes it runs
``torchrun --standalone --nproc_per_node=N -m trainer ...`` (weak scaling: the micro-batch per GPU
is fixed, the global batch grows with N; gradient accumulation 1), and reads the run's metrics:
tokens/s (the median of the log windows after the first, which holds compilation), tokens/s per
GPU, scaling efficiency (per-GPU tokens/s over the one-process run's), and rank 0's peak memory.
One process is run once per model and setting, with no wrapper, as the baseline.

``--kill-resume``: for each strategy at the largest N (first model and setting), the same run
with a checkpoint every ``--steps / 2`` steps is killed with SIGKILL (the whole process group, as
a failed node would) once its first checkpoint is complete, resumed with ``resume=true``, and its
losses after the checkpoint are compared with the uninterrupted run's: equal bit for bit, or the
largest relative difference. The JSON is rewritten after every run, atomically, so a run cut short
keeps what it measured.
"""

import argparse
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.metrics import read_metrics  # noqa: E402
from trainer.environment import benchmark_header  # noqa: E402


def run_overrides(args, model: str, seqlen: int, micro_batch: int, strategy: str | None) -> list[str]:
    """The trainer overrides of one measured run; ``strategy`` None for the one-process baseline."""
    overrides = [f"model={model}", f"data={args.data}", f"data.path={args.corpus}",
                 f"data.seqlen={seqlen}", f"data.cache_dir={args.cache}", f"data.num_proc={args.num_proc}",
                 f"trainer.micro_batch_size={micro_batch}", "trainer.grad_accum=1",
                 f"trainer.max_steps={args.steps}", f"trainer.log_interval={args.log_interval}",
                 f"trainer.eval_interval={args.steps}", f"trainer.save_interval={args.steps}",
                 f"trainer.device={args.device}", "trainer.sample_tokens=0", "logger=none"]
    if strategy is not None:
        overrides.append(f"trainer.distributed={strategy}")
    return overrides + list(args.extra)


def launch_command(nproc: int, overrides: list[str], run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "trainer", *overrides, f"hydra.run.dir={run_dir}"]


def steady_tokens_per_s(train_lines: list[dict]) -> float | None:
    """The median over log windows after the first (compilation and warm-up), or the only one."""
    rates = [line["tokens_per_s"] for line in train_lines if line.get("tokens_per_s")]
    return statistics.median(rates[1:] or rates) if rates else None


def run_once(args, name: str, nproc: int, overrides: list[str]) -> dict:
    run_dir = args.workdir / name
    command = launch_command(nproc, overrides, run_dir)
    print(" ".join(shlex.quote(c) for c in command), flush=True)
    started = time.time()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                            env=dict(os.environ, WANDB_SILENT="true"))
    record = {"name": name, "nproc": nproc, "returncode": result.returncode,
              "wall_s": time.time() - started, "run_dir": str(run_dir)}
    if result.returncode != 0:
        record["error"] = result.stderr.strip()[-2000:]
        return record
    train = read_metrics(run_dir)["train"]
    memory = [line["mem_gb"] for line in train if line.get("mem_gb") is not None]
    record.update(tokens_per_s=steady_tokens_per_s(train),
                  window_tokens_per_s=[line.get("tokens_per_s") for line in train],
                  peak_mem_gb=max(memory) if memory else None,
                  losses={line["step"]: line["loss"] for line in train})
    if record["tokens_per_s"]:
        record["tokens_per_s_per_gpu"] = record["tokens_per_s"] / nproc
    return record


def wait_for_checkpoint_then_kill(process: subprocess.Popen, run_dir: Path, poll_s: float = 0.02) -> int | None:
    """SIGKILL the run's process group once ``checkpoints/latest`` names a complete checkpoint;
    returns that checkpoint's step, or None if the run ended first (nothing was killed)."""
    pointer = run_dir / "checkpoints" / "latest"
    while process.poll() is None:
        if pointer.exists():
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return int(pointer.read_text().strip().removeprefix("step_"))
        time.sleep(poll_s)
    return None


def kill_and_resume(args, reference: dict, overrides: list[str]) -> dict:
    """The reference run again, killed after its first checkpoint and resumed; losses compared."""
    name = reference["name"] + "_killed"
    run_dir = args.workdir / name
    every = max(1, args.steps // 2)
    overrides = [o for o in overrides if not o.startswith("trainer.save_interval=")]
    overrides.append(f"trainer.save_interval={every}")
    command = launch_command(reference["nproc"], overrides, run_dir)
    print(" ".join(shlex.quote(c) for c in command), flush=True)
    with open(args.workdir / f"{name}.log", "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True, env=dict(os.environ, WANDB_SILENT="true"))
        killed_at = wait_for_checkpoint_then_kill(process, run_dir)
    record = {"name": name, "nproc": reference["nproc"], "killed_after_checkpoint": killed_at,
              "checkpoint_every": every}
    if killed_at is None:
        record["error"] = f"the run ended (exit {process.returncode}) before a checkpoint to kill after"
        return record
    resumed = run_once(args, name, reference["nproc"], overrides + ["resume=true"])
    record.update(returncode=resumed["returncode"], error=resumed.get("error"),
                  resume_wall_s=resumed["wall_s"])
    if resumed["returncode"] != 0:
        return record
    after = {step: loss for step, loss in resumed["losses"].items() if step > killed_at}
    expected = {step: reference["losses"][step] for step in after if step in reference["losses"]}
    record.update(
        compared_steps=len(expected),
        final_step=max(resumed["losses"]),
        bitwise_equal=bool(expected) and all(after[s] == expected[s] for s in expected),
        max_loss_rel_diff=max((abs(after[s] - expected[s]) / max(abs(expected[s]), 1e-12)
                               for s in expected), default=None))
    return record


def settings_of(values: list[str]) -> list[tuple[int, int]]:
    try:
        return [tuple(int(x) for x in value.split(":")) for value in values]
    except ValueError:
        raise SystemExit(f"--settings takes CONTEXT:MICRO_BATCH pairs such as 1024:16; got {values}") from None


def measure_all(args, write) -> list[dict]:
    records = []
    largest = max(args.nproc)
    for model in args.models:
        for seqlen, micro_batch in settings_of(args.settings):
            key = f"{model}_{seqlen}"
            single = None
            if 1 in args.nproc:
                single = run_once(args, f"{key}_single", 1, run_overrides(args, model, seqlen, micro_batch, None))
                single.update(model=model, seqlen=seqlen, micro_batch=micro_batch, strategy="single")
                records.append(single)
                write(records)
            for strategy in args.strategies:
                for nproc in sorted(n for n in args.nproc if n > 1):
                    overrides = run_overrides(args, model, seqlen, micro_batch, strategy)
                    record = run_once(args, f"{key}_{strategy}{nproc}", nproc, overrides)
                    record.update(model=model, seqlen=seqlen, micro_batch=micro_batch, strategy=strategy)
                    if single and single.get("tokens_per_s_per_gpu") and record.get("tokens_per_s_per_gpu"):
                        record["scaling_efficiency"] = record["tokens_per_s_per_gpu"] / single["tokens_per_s_per_gpu"]
                    records.append(record)
                    write(records)
                    first_setting = model == args.models[0] and (seqlen, micro_batch) == settings_of(args.settings)[0]
                    if args.kill_resume and nproc == largest and first_setting and record["returncode"] == 0:
                        resumed = kill_and_resume(args, record, overrides)
                        resumed.update(model=model, seqlen=seqlen, micro_batch=micro_batch, strategy=strategy)
                        records.append(resumed)
                        write(records)
    return records


def markdown(result: dict) -> str:
    lines = [f"{result['card']}, PyTorch {result['torch']}, {result['date']}: `{result['command']}`", "",
             "| model | context | micro-batch per GPU | strategy | GPUs | tokens/s | tokens/s per GPU | "
             "scaling efficiency | peak memory (rank 0) |",
             "|---|---|---|---|---|---|---|---|---|"]
    resumes = []
    for r in result["records"]:
        if "killed_after_checkpoint" in r:
            resumes.append(r)
            continue
        if r.get("returncode") != 0:
            lines.append(f"| {r['model']} | {r['seqlen']} | {r['micro_batch']} | {r['strategy']} | "
                         f"{r['nproc']} | failed (exit {r['returncode']}) | | | |")
            continue
        efficiency = f"{r['scaling_efficiency']:.2f}" if "scaling_efficiency" in r else "–"
        memory = f"{r['peak_mem_gb']:.1f} GB" if r.get("peak_mem_gb") is not None else "–"
        lines.append(f"| {r['model']} | {r['seqlen']} | {r['micro_batch']} | {r['strategy']} | {r['nproc']} | "
                     f"{r['tokens_per_s']:,.0f} | {r['tokens_per_s_per_gpu']:,.0f} | {efficiency} | {memory} |")
    for r in resumes:
        if r.get("error"):
            outcome = f"failed: {r['error'].splitlines()[-1][:200]}"
        else:
            same = "equal bit for bit" if r["bitwise_equal"] else f"largest relative difference {r['max_loss_rel_diff']:.2e}"
            outcome = (f"killed after the step-{r['killed_after_checkpoint']} checkpoint, resumed to step "
                       f"{r['final_step']}; losses on {r['compared_steps']} logged steps after it {same}")
        lines.append(f"\nKill and resume, {r['model']} {r['seqlen']}, {r['strategy']} on {r['nproc']}: {outcome}.")
    return "\n".join(lines) + "\n"


def write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    temporary.replace(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--corpus", required=True, help="the data.path of every run")
    parser.add_argument("--data", default="linux", help="data config (configs/data)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--md", type=Path, help="also write the Markdown table here")
    parser.add_argument("--nproc", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--models", nargs="+", default=["gpt2_small", "gpt2_medium"])
    parser.add_argument("--settings", nargs="+", default=["1024:16", "4096:4"],
                        help="CONTEXT:MICRO_BATCH per GPU")
    parser.add_argument("--strategies", nargs="+", choices=["ddp", "fsdp"], default=["ddp", "fsdp"])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--log-interval", type=int, default=10)
    parser.add_argument("--kill-resume", action="store_true")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--cache", default="/tmp/flashtrain-cache", help="token cache directory")
    parser.add_argument("--num-proc", type=int, default=12)
    parser.add_argument("--workdir", type=Path, help="run directories (default: a temporary one)")
    parser.add_argument("--extra", nargs="*", default=[], help="more trainer overrides for every run")
    args = parser.parse_args()
    if args.device == "cuda" and torch.cuda.device_count() < max(args.nproc):
        raise SystemExit(f"--nproc {max(args.nproc)} needs that many GPUs; this machine has "
                         f"{torch.cuda.device_count()}")
    if args.kill_resume and args.steps < 2:
        raise SystemExit("--kill-resume needs --steps of at least 2 (a checkpoint before the end)")
    header = dict(benchmark_header(), card=torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                  gpus=torch.cuda.device_count() if args.device == "cuda" else 0)

    def write(records):
        result = dict(header, records=records)
        write_atomically(args.out, json.dumps(result, indent=1))
        if args.md:
            write_atomically(args.md, markdown(result))

    with tempfile.TemporaryDirectory(prefix="bench-distributed-") as scratch:
        args.workdir = args.workdir or Path(scratch)
        measure_all(args, write)


if __name__ == "__main__":
    main()
