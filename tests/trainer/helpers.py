"""Compose run configs like the command line does, on tiny local corpora."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from trainer.config import register_configs

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = str(ROOT / "configs")
register_configs()


def make_corpus(root: Path, documents: int = 30) -> Path:
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    root.mkdir(parents=True, exist_ok=True)
    for index in range(documents):
        text = " ".join(words[(index * 7 + k * 3) % len(words)] for k in range(80))
        (root / f"doc{index:03d}.txt").write_text(f"# document {index}\n{text}\n")
    return root


def tiny_overrides(tmp_path: Path, **extra) -> list[str]:
    corpus = make_corpus(tmp_path / "corpus")
    settings = {"data": "files", "data.path": str(corpus), "data.vocab_size": 300, "data.seqlen": 32,
                "data.num_proc": 1, "data.val_windows": 4, "data.cache_dir": str(tmp_path / "cache"),
                "data.validation_fraction": 0.2,
                "model.d_model": 32, "model.n_layer": 2, "model.n_head": 2, "trainer.micro_batch_size": 2,
                "trainer.max_steps": 6, "trainer.log_interval": 1, "trainer.eval_interval": 3,
                "trainer.save_interval": 3, "trainer.precision": "fp32", "trainer.sample_tokens": 0,
                "trainer.device": "cpu", "logger": "none", "optim.warmup_steps": 2,
                "model.dropout": 0.1, "model.attn_dropout": 0.1}
    settings.update(extra)
    return [f"{key}={value}" for key, value in settings.items()]


def compose_run(overrides: list[str]):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    return OmegaConf.to_object(cfg)


def run_cli(args: list[str], env_extra: dict | None = None, module: str = "trainer", timeout: int = 600):
    """Run ``python -m <module> args``. Unless the args name them, Hydra's run and sweep directories
    go to a new temporary directory: a test never writes into the repository's outputs/."""
    if module == "trainer":
        scratch = tempfile.mkdtemp(prefix="flashtrain-test-")
        if not any(a.startswith("hydra.run.dir=") for a in args):
            args = [*args, f"hydra.run.dir={scratch}/run"]
        if not any(a.startswith("hydra.sweep.dir=") for a in args):
            args = [*args, f"hydra.sweep.dir={scratch}/sweep"]
    env = dict(os.environ, WANDB_SILENT="true", **(env_extra or {}))
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=timeout)


def fit_with_hook(trainer, before_step) -> dict:
    """``trainer.fit()`` with ``before_step()`` called ahead of every optimizer step (to send a
    signal, or move a stand-in clock), then the trainer closed; returns fit's summary."""
    real_step = trainer.train_step

    def step():
        before_step()
        return real_step()

    trainer.train_step = step
    try:
        return trainer.fit()
    finally:
        trainer.close()
