"""Run configuration on the CPU: every experiment composes, and bad settings are refused with a
short message that names them, before any data or model work."""

import re

import pytest
import torch

from trainer.loop import Trainer

from .helpers import ROOT, compose_run, run_cli, tiny_overrides

EXPERIMENTS = sorted(p.stem for p in (ROOT / "configs" / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_validates(experiment, tmp_path):
    overrides = [f"experiment={experiment}"]
    text = (ROOT / "configs" / "experiment" / f"{experiment}.yaml").read_text()
    if "init_from: ???" in text:
        overrides.append(f"model.init_from={tmp_path / 'model.pt'}")
    if "override /data: linux" in text:
        overrides.append(f"data.path={tmp_path}")
    config = compose_run(overrides)
    assert config.experiment == experiment
    assert config.trainer.max_steps >= 1 and config.data.seqlen >= 2


def test_paper_setups_have_the_paper_numbers():
    one_k, four_k = compose_run(["experiment=gpt2s_owt_1k"]), compose_run(["experiment=gpt2s_owt_4k"])
    assert one_k.model.name == "gpt2_small" and one_k.data.seqlen == 1024 and one_k.optim.lr == 6e-4
    assert one_k.trainer.micro_batch_size * one_k.trainer.grad_accum == 512
    tokens = lambda c: c.trainer.micro_batch_size * c.trainer.grad_accum * c.data.seqlen
    assert tokens(one_k) == tokens(four_k) and four_k.data.seqlen == 4096
    assert compose_run(["experiment=gpt2m_owt_1k"]).optim.lr == 1.5e-4


@pytest.mark.parametrize("override, words", [
    ("trainer.no_such_key=1", "no_such_key"),
    ("trainer.max_steps=many", "max_steps"),
    ("model=bert_tiny", "objective"),
    ("trainer.precision=fp8", "trainer.precision"),
])
def test_bad_configs_exit_with_a_short_message(override, words):
    result = run_cli([override, "logger=none"])
    assert result.returncode != 0
    assert words in result.stderr and "Traceback" not in result.stderr


def test_help_says_how_to_run_and_lists_the_choices():
    result = run_cli(["--help"])
    assert result.returncode == 0
    assert result.stdout.startswith("flashtrain: ") and "Usage: python -m trainer" in result.stdout
    assert re.search(r"^experiment: .*gpt2s_owt_4k", result.stdout, re.M)
    assert re.search(r"^trainer:\n  max_steps: \d+", result.stdout, re.M)   # the composed config
    from trainer.time_budget import EXIT_TIME_BUDGET
    assert f"Exit status: 0 finished; {EXIT_TIME_BUDGET} stopped and saved at trainer.max_minutes" \
        in result.stdout


def test_a_path_starting_with_a_tilde_gets_the_quoting_it_needs(tmp_path, monkeypatch):
    result = run_cli(["data=files", "data.path=~/corpus", "logger=none"])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "write data.path='\"~/corpus\"'" in result.stderr
    # quoted, it reaches the run; the cache directory's ~ is expanded as the data paths' are
    monkeypatch.setenv("HOME", str(tmp_path))
    assert compose_run(['data.cache_dir="~/cache"']).data.cache_dir == str(tmp_path / "cache")


def test_missing_data_path_is_named(tmp_path):
    result = run_cli(["data=files", f"data.path={tmp_path / 'absent'}", "logger=none",
                      f"hydra.run.dir={tmp_path / 'run'}"])
    assert result.returncode != 0 and "absent" in result.stderr and "Traceback" not in result.stderr


def test_a_chosen_model_is_not_overridden_by_the_default_experiment():
    small = compose_run(["model=gpt2_small"])
    assert (small.model.name, small.model.d_model, small.model.n_layer) == ("gpt2_small", None, None)
    quickstart = compose_run([])
    assert (quickstart.model.d_model, quickstart.model.n_layer, quickstart.model.n_head) == (256, 4, 4)


def test_compile_modes_that_capture_cuda_graphs_take_dropout_but_not_accumulation():
    # Flash attention then draws its dropout seeds on the device (tests/kernels/test_device_seeds.py).
    with_dropout = compose_run(["model=gpt2_small", "trainer.compile=true",
                                "trainer.compile_mode=reduce-overhead"])
    assert with_dropout.trainer.compile_mode == "reduce-overhead"   # gpt2_small: attention dropout 0.1
    config = compose_run(["model=gpt2_small_nodropout", "trainer.compile=true",
                          "trainer.compile_mode=reduce-overhead"])
    assert config.trainer.compile_mode == "reduce-overhead"
    with pytest.raises(Exception, match="lose gradients accumulated over micro-batches"):
        compose_run(["model=gpt2_small_nodropout", "trainer.compile=true",
                     "trainer.compile_mode=reduce-overhead", "trainer.grad_accum=2"])
    with pytest.raises(Exception, match="compile_mode"):
        compose_run(["trainer.compile_mode=fastest"])


def test_cuda_graphs_with_masked_lm_need_a_fixed_target_count_and_fix_the_segment_count(tmp_path):
    from types import SimpleNamespace

    from trainer.build import fit_batches_to_run
    from trainer.data import build_data
    graphs = {"model": "bert_tiny", "data.objective": "mlm", "data.tokenizer": "wordpiece",
              "trainer.compile": "true", "trainer.compile_mode": "reduce-overhead",
              "data.mlm_pack_sequences": "true"}
    with pytest.raises(Exception, match="MLM head's target count changes from batch to batch; set "
                                        "data.mlm_max_predictions"):
        compose_run(tiny_overrides(tmp_path, **graphs))
    config = compose_run(tiny_overrides(tmp_path, **graphs, **{"data.mlm_max_predictions": 3}))
    data = build_data(config.data, batch_size=2, log=lambda *_: None)
    bert = SimpleNamespace(config=SimpleNamespace(arch="bert"))
    assert "cu_seqlens fixed" in " ".join(fit_batches_to_run(data, bert, config))
    assert len({next(data.train).cu_seqlens.numel() for _ in range(6)}) == 1
    default_mode = compose_run(tiny_overrides(tmp_path, **{**graphs, "trainer.compile_mode": "default",
                                                           "data.mlm_max_predictions": 3}))
    data = build_data(default_mode.data, batch_size=2, log=lambda *_: None)
    assert fit_batches_to_run(data, bert, default_mode) == [] and data.train.cu_length is None


@pytest.mark.parametrize("override,message", [
    ("+trainer.max_step=10", "unknown configuration key.*trainer.max_step \\(did you mean trainer.max_steps"),
    ("data.path=/x", "data.path is set but data.source=python_stdlib"),
    ("optim.grad_clip=-1", "optim.grad_clip=-1"),
    ("data.vocab_size=10", "minimum of 257"),
    ("trainer.device=tpu", "expected auto, cpu, cuda or cuda:N"),
])
def test_silently_accepted_input_is_now_refused(override, message, tmp_path):
    result = run_cli([override, "trainer.max_steps=1", "logger=none", f"hydra.run.dir={tmp_path / 'run'}"])
    assert result.returncode == 2, result.stderr
    assert re.search(message, result.stderr) and "Traceback" not in result.stderr


def test_fp16_and_flash_on_a_cpu_are_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if torch.cuda.is_available():
        pytest.skip("device=auto picks the GPU here")
    for extra, message in (({"trainer.device": "auto", "trainer.precision": "fp16"}, "fp16 needs a GPU"),
                           ({"model.attention": "flash"}, "flash runs the Triton kernels")):
        with pytest.raises(ValueError, match=message):
            Trainer(compose_run(tiny_overrides(tmp_path, **extra)), tmp_path / "run")


def test_errors_are_named_before_any_data_work(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if torch.cuda.is_available():
        pytest.skip("attention=auto resolves to flash here")
    with pytest.raises(ValueError, match="document_aware=true .* resolves to sdpa"):
        Trainer(compose_run(tiny_overrides(tmp_path, **{"data.document_aware": "true"})), tmp_path / "b")
    assert not (tmp_path / "cache").exists()          # refused before tokenizing anything
    with pytest.raises(ValueError, match="model.init_from=.*does not exist"):
        Trainer(compose_run(tiny_overrides(tmp_path, **{"model.init_from": str(tmp_path / "none.pt")})),
                tmp_path / "a")
