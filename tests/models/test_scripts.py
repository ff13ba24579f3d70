"""convert_hf.py and sample.py, end to end on local files."""

import subprocess
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from models import build_model, load_model, save_model

ROOT = Path(__file__).resolve().parents[2]


def _run(*args):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)


def test_convert_round_trip(tmp_path):
    model = build_model("gpt2_tiny", vocab_size=50, max_seqlen=32, seed=1).eval()
    save_model(model, tmp_path / "model.pt")
    exported = _run("scripts/convert_hf.py", "export", tmp_path / "model.pt", tmp_path / "hf")
    assert exported.returncode == 0, exported.stderr
    imported = _run("scripts/convert_hf.py", "import", tmp_path / "hf", tmp_path / "back.pt")
    assert imported.returncode == 0, imported.stderr
    tokens = torch.randint(0, 50, (1, 12))
    assert torch.equal(load_model(tmp_path / "back.pt").eval()(tokens), model(tokens))


def test_convert_names_a_corrupt_file(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    result = _run("scripts/convert_hf.py", "export", tmp_path / "bad.pt", tmp_path / "hf")
    assert result.returncode != 0 and "bad.pt" in result.stderr and "corrupt" in result.stderr
    assert "Traceback" not in result.stderr
    # the unpickler's reason, not torch's advice to retry with weights_only=False
    assert "Unsupported operand" in result.stderr and "weights_only" not in result.stderr


def test_sample_from_a_model_file(tmp_path):
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(["def main():\n    return 0\n"] * 20,
                                  trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"]))
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    save_model(build_model("gpt2_tiny", vocab_size=tokenizer.get_vocab_size(), max_seqlen=64),
               tmp_path / "model.pt")
    result = _run("scripts/sample.py", tmp_path / "model.pt", "--tokenizer", tmp_path / "tokenizer.json",
                  "--prompt", "def", "--max-new-tokens", "5", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("def")
