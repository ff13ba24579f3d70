"""Convert between Hugging Face model directories and flashtrain model files.

    python scripts/convert_hf.py import path/to/hf_gpt2_dir model.pt
    python scripts/convert_hf.py export outputs/run1 path/to/hf_dir     # or a checkpoint, or model.pt

Import reads a local GPT-2, BERT or Llama directory (config.json + model.safetensors or
pytorch_model.bin, or their shards and index); a Llama model becomes the rotary decoder. Export
writes one that transformers' AutoTokenizer and AutoModelForCausalLM / AutoModelForMaskedLM load
(the rotary decoder as a Llama model): the weights, config.json with the special token ids, and
the tokenizer files.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import load_hf, save_hf, save_model  # noqa: E402
from trainer.model_source import ModelSourceError, find_model  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("direction", choices=["import", "export"])
    parser.add_argument("source", type=Path)
    parser.add_argument("destination", type=Path)
    parser.add_argument("--tokenizer", type=Path, help="export: tokenizer.json to include (default: the "
                        "one next to the model or in its run directory)")
    args = parser.parse_args()
    try:
        if args.direction == "import":
            model = load_hf(args.source)
            save_model(model, args.destination)
        else:
            source = find_model(args.source)
            model = source.load()
            tokenizer = args.tokenizer or source.tokenizer
            if tokenizer is None:
                print(f"convert_hf: no tokenizer.json next to {source.path}; the export holds the model "
                      "only (pass --tokenizer to include one)", file=sys.stderr)
            save_hf(model, args.destination, tokenizer=tokenizer)
    except (FileNotFoundError, ValueError, ModelSourceError) as error:
        sys.exit(f"convert_hf: {error}")
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.direction}: {model.config.arch}, {params / 1e6:.1f}M parameters -> {args.destination}")


if __name__ == "__main__":
    main()
