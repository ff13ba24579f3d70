"""Every experiment config trains: each, shrunk to a tiny model on a tiny local corpus, runs two
steps with everything else it sets (model family, objective, packing, document-aware batches,
mixed context lengths, a model to start from) and finishes with a model file. Composing alone
(tests/trainer/test_run_config.py) would not catch a combination that only fails once built.

The experiments that pack documents with ``cu_seqlens`` run flash attention, under the Triton
interpreter without a GPU; the others the default attention of the device."""

import math

import pytest
import torch

from trainer.loop import run

from ..trainer.helpers import ROOT, compose_run, tiny_overrides

EXPERIMENTS = sorted(p.stem for p in (ROOT / "configs" / "experiment").glob("*.yaml"))
# Experiments that continue a trained model (``model.init_from: ???``), and the experiment whose
# shrunk run gives them one of the right family.
STARTS_FROM = {"repro_linux_1k_to_4k": "repro_linux_1k", "repro_linux_s2l_stage2": "repro_linux_s2l_stage1",
               "finetune_long": "gpt2s_owt_1k", "finetune_long_rope": "repro_linux_s2l_stage1"}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _shrunk(experiment: str, root) -> list[str]:
    """The experiment with a 2-layer, 32-wide model (4 heads: the rotary decoder's key/value
    heads divide them), 32-token windows and two steps; its other settings stay."""
    text = (ROOT / "configs" / "experiment" / f"{experiment}.yaml").read_text()
    overrides = tiny_overrides(root, **{"trainer.max_steps": 2, "trainer.grad_accum": 1,
                                        "trainer.compile": "false", "trainer.device": DEVICE,
                                        "model.n_head": 4})
    overrides = [o for o in overrides if not o.startswith(("model.dropout=", "model.attn_dropout="))]
    if "mix_seqlen:" in text:
        overrides.append("data.mix_seqlen=16")
    return [f"experiment={experiment}", *overrides]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Run directories of finished shrunk experiments, each run once on first request."""
    root = tmp_path_factory.mktemp("experiments")
    runs = {}

    def train(experiment: str):
        if experiment not in runs:
            overrides = _shrunk(experiment, root)
            if experiment in STARTS_FROM:
                start = train(STARTS_FROM[experiment])
                overrides += [f"model.init_from={start}", f"data.tokenizer_file={start / 'tokenizer.json'}"]
            config = compose_run(overrides)
            if config.data.document_aware or config.data.mlm_pack_sequences:
                # packed with cu_seqlens: flash attention, as on a card (the interpreter here)
                config = compose_run(overrides + ["model.attention=flash"])
            summary = run(config, root / experiment / "run")
            runs[experiment] = root / experiment / "run"
            runs[experiment, "config"], runs[experiment, "summary"] = config, summary
        return runs[experiment]
    train.runs = runs
    return train


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_trains_two_steps_shrunk(trained, experiment):
    run_dir = trained(experiment)
    config, summary = trained.runs[experiment, "config"], trained.runs[experiment, "summary"]
    assert config.experiment == experiment and config.data.seqlen == 32
    assert summary["steps"] == 2 and "interrupted" not in summary
    assert math.isfinite(summary["final_loss"]) and math.isfinite(summary["val_loss"])
    assert (run_dir / "model.pt").exists()
