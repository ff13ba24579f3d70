"""Generate text from a run directory, a checkpoint, a model file or a Hugging Face GPT-2 or Llama
directory.

    python scripts/sample.py outputs/run1 --prompt "def main(" --max-new-tokens 100   # newest checkpoint
    python scripts/sample.py outputs/run1/checkpoints/step_00000300 --prompt "def main("
    python scripts/sample.py model.pt --tokenizer tokenizer.json --prompt "Hello"
    python scripts/sample.py path/to/hf_gpt2_or_llama_dir --prompt "Hello"

The tokenizer is found next to the model or in its run directory; --tokenizer overrides that.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import generate  # noqa: E402
from trainer.data.tokenizer import end_of_text_id  # noqa: E402
from trainer.model_source import ModelSourceError, find_model  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("model", type=Path, help="a run directory, a checkpoint directory or state.pt, "
                        "a model file (.pt) or a Hugging Face directory")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer.json (default: next to the model or "
                        "in its run directory)")
    parser.add_argument("--prompt", default="")
    parser.add_argument("--max-new-tokens", type=int, default=100,
                        help="any number: a GPT-2 model whose positions run out keeps reading its last "
                             "max_seqlen tokens (a sliding window, slower: no KV cache)")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    from tokenizers import Tokenizer
    try:
        source = find_model(args.model)
        tokenizer_path = args.tokenizer or source.tokenizer
        if tokenizer_path is None or not tokenizer_path.exists():
            sys.exit(f"sample: no tokenizer.json next to {source.path} or in its run directory; pass "
                     f"--tokenizer path/to/tokenizer.json" + (f" ({tokenizer_path} does not exist)"
                                                               if tokenizer_path else ""))
        model = source.load()
    except (FileNotFoundError, ValueError, ModelSourceError) as error:
        sys.exit(f"sample: {error}")
    print(f"sample: {source.kind} {source.path}", file=sys.stderr)
    if model.config.arch == "bert":
        sys.exit("sample: BERT is a masked LM; sampling needs a causal model (gpt2 or rope)")
    model.to(args.device)
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    ids = tokenizer.encode(args.prompt).ids or [0]
    eos = end_of_text_id(tokenizer)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.device == "cuda"):
        out = generate(model, torch.tensor([ids], device=args.device), args.max_new_tokens,
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                       eos_token_id=eos, generator=generator)
    print(tokenizer.decode(out[0].tolist()))


if __name__ == "__main__":
    main()
