"""GPU-only trainer checks: compile modes that capture CUDA graphs, with the flash kernel, and the
profile window's CUDA activity."""

import math

import pytest
import torch
from torch._dynamo.utils import counters

from kernels import flash_attention
from kernels.flash_attention import device_dropout_seeds
from trainer.loop import Trainer

from .helpers import compose_run, tiny_overrides

pytestmark = pytest.mark.gpu


def _losses(tmp_path, mode: str, attn_dropout: float = 0.0, **extra) -> list[float]:
    torch._dynamo.reset()
    counters.clear()
    overrides = tiny_overrides(tmp_path, **{"trainer.device": "cuda", "trainer.precision": "bf16",
                                            "model.attention": "flash", "model.dropout": 0.0,
                                            "model.attn_dropout": attn_dropout, "trainer.compile": "true",
                                            "trainer.compile_mode": mode, **extra})
    trainer = Trainer(compose_run(overrides), tmp_path / f"{mode}-{attn_dropout}-{len(extra)}")
    try:
        return [float(trainer.train_step()["loss"]) for _ in range(6)]
    finally:
        trainer.close()


def test_reduce_overhead_captures_the_flash_step_and_trains_like_the_default_mode(tmp_path):
    """Without attention dropout, no CPU tensor is left in the graph, so inductor captures it (a
    skipped capture would only show as a counter and a log line), and the losses follow the
    uncaptured mode's: each replay's outputs are consumed before the next one overwrites them."""
    default = _losses(tmp_path, "default")
    graphed = _losses(tmp_path, "reduce-overhead")
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    torch.testing.assert_close(torch.tensor(graphed), torch.tensor(default), rtol=2e-2, atol=2e-2)


def test_reduce_overhead_with_attention_dropout_captures_and_trains(tmp_path):
    """With attention dropout the trainer has the flash ops draw their seeds on the device: still no
    CPU tensor in the graph, and training follows the uncaptured mode's losses (other masks, so
    within dropout's noise rather than rounding)."""
    default = _losses(tmp_path, "default", 0.1)
    graphed = _losses(tmp_path, "reduce-overhead", 0.1)
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    assert all(math.isfinite(loss) for loss in graphed)
    torch.testing.assert_close(torch.tensor(graphed), torch.tensor(default), rtol=5e-2, atol=5e-2)


def test_reduce_overhead_captures_masked_lm_packed_rows(tmp_path):
    """Packed MLM rows under CUDA graphs: a fixed target count and cu_seqlens of one length
    (trainer.build.fit_batches_to_run): no capture is skipped, and training follows the default mode."""
    mlm = {"model": "bert_tiny", "data.objective": "mlm", "data.tokenizer": "wordpiece",
           "data.mlm_pack_sequences": "true", "data.mlm_max_predictions": 3}
    default = _losses(tmp_path, "default", 0.1, **mlm)
    graphed = _losses(tmp_path, "reduce-overhead", 0.1, **mlm)
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    assert all(math.isfinite(loss) for loss in graphed)
    torch.testing.assert_close(torch.tensor(graphed), torch.tensor(default), rtol=5e-2, atol=5e-2)


def test_captured_dropout_draws_a_new_mask_at_every_replay():
    torch._dynamo.reset()
    counters.clear()
    q, k, v = torch.randn(3, 1, 256, 4, 64, device="cuda", dtype=torch.bfloat16)
    layer = torch.compile(lambda q, k, v: flash_attention(q, k, v, causal=True, dropout_p=0.5),
                          mode="reduce-overhead")
    outputs = []
    with device_dropout_seeds():
        for _ in range(4):          # a warm-up run, the recording, then two replays
            torch.compiler.cudagraph_mark_step_begin()
            outputs.append(layer(q, k, v).clone())
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    assert not torch.equal(outputs[2], outputs[3]) and not torch.equal(outputs[1], outputs[2])


@pytest.mark.parametrize("compile_mode", [None, "reduce-overhead"], ids=["eager", "cuda-graphs"])
def test_profile_window_on_the_gpu_records_the_flash_kernels(tmp_path, compile_mode):
    """The profile window records CUDA activity, also of a step replayed from CUDA graphs: the
    table has the GPU's self time, and the trace holds the flash kernels' launches (its forward
    and dK/dV passes)."""
    import gzip
    import json

    from trainer.loop import run
    compiled = {"trainer.compile": "true", "trainer.compile_mode": compile_mode, "model.dropout": 0.0,
                "model.attn_dropout": 0.0} if compile_mode else {}
    torch._dynamo.reset()
    overrides = tiny_overrides(tmp_path, **{"trainer.device": "cuda", "trainer.precision": "bf16",
                                            "model.attention": "flash", "trainer.max_steps": 5,
                                            "trainer.profile_steps": "[4,5]", **compiled})
    run(compose_run(overrides), tmp_path / "run")
    profile = tmp_path / "run" / "profile"
    table = (profile / "steps4-5_rank0.txt").read_text()
    assert "Self CUDA" in table
    with gzip.open(profile / "steps4-5_rank0.json.gz", "rt") as trace:
        kernels = {e["name"] for e in json.load(trace)["traceEvents"] if e.get("cat") == "kernel"}
    assert any("_forward_kernel" in name for name in kernels), sorted(kernels)[:20]
    assert any("_dkdv" in name for name in kernels), sorted(kernels)[:20]
    # the run's environment names the card and the CUDA stack it ran on
    start = json.loads((tmp_path / "run" / "environment.json").read_text())["starts"][-1]
    assert start["device"] == torch.cuda.get_device_name() and start["cuda"] == torch.version.cuda
    assert start["cudnn"] == torch.backends.cudnn.version()


def test_a_real_out_of_memory_stops_with_the_explained_message(tmp_path):
    """The allocator's own error becomes the short message, with the card's memory in it: once the
    run is built, its cached blocks are released and the process is capped to a sliver of the
    card, so the first step's first new block fails. The micro-batch makes the step's logits a
    block of their own (over 1 MB: the large pool); smaller tensors may fit in the free room of
    blocks still holding the model, and then nothing fails (so it was on an H100)."""
    from trainer.out_of_memory import OutOfMemory
    overrides = tiny_overrides(tmp_path, **{"trainer.device": "cuda", "trainer.precision": "bf16",
                                            "model.attention": "flash", "trainer.max_steps": 2,
                                            "trainer.micro_batch_size": 64})
    trainer = Trainer(compose_run(overrides), tmp_path / "run")
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(1e-5)
    try:
        with pytest.raises(OutOfMemory, match=r"out of GPU memory in training step 1 (.|\n)*of the card's"):
            trainer.fit()
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        trainer.close()
