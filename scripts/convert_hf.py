"""Convert between Hugging Face model directories and flashtrain model files.

    python scripts/convert_hf.py import path/to/hf_gpt2_dir model.pt
    python scripts/convert_hf.py export model.pt path/to/hf_dir

Import reads a local GPT-2 or BERT directory (config.json + model.safetensors or pytorch_model.bin);
export writes one that transformers' AutoModelForCausalLM / AutoModelForMaskedLM loads.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import load_hf, load_model, save_hf, save_model  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("direction", choices=["import", "export"])
    parser.add_argument("source", type=Path)
    parser.add_argument("destination", type=Path)
    args = parser.parse_args()
    try:
        if args.direction == "import":
            model = load_hf(args.source)
            save_model(model, args.destination)
        else:
            model = load_model(args.source)
            save_hf(model, args.destination)
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"convert_hf: {error}")
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.direction}: {model.config.arch}, {params / 1e6:.1f}M parameters -> {args.destination}")


if __name__ == "__main__":
    main()
