"""Data pipeline speed: tokenizer training and sharding, the cached restart, the sampler.

    python scripts/bench_data.py --path /data/linux-6.1 --cache /tmp/flashtrain-bench

Runs the pipeline twice on the Linux-kernel corpus (first: train the BPE, tokenize, write shards;
second: everything from the cache), then draws batches from the GPT window sampler (plain and
document-aware). Prints a Markdown summary.
"""

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.data import DataConfig, build_data  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--path", required=True, help="directory with train/validation.parquet")
    parser.add_argument("--cache", default="/tmp/flashtrain-bench-cache")
    parser.add_argument("--vocab-size", type=int, default=32768)
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--num-proc", type=int, default=os.cpu_count())
    args = parser.parse_args()
    shutil.rmtree(args.cache, ignore_errors=True)
    config = DataConfig(source="linux", path=args.path, vocab_size=args.vocab_size, seqlen=args.seqlen,
                        cache_dir=args.cache, num_proc=args.num_proc)
    lines = []
    started = time.time()
    data = build_data(config, args.batch, log=lines.append)
    cold = time.time() - started
    started = time.time()
    build_data(config, args.batch, log=lines.append)
    warm = time.time() - started
    results = {"cold start (train BPE, tokenize, write shards)": f"{cold:.1f} s",
               "warm start (everything cached)": f"{warm:.2f} s"}
    for aware in (False, True):
        config.document_aware = aware
        data = build_data(config, args.batch, log=lambda *_: None)
        next(data.train)
        count, started = 200, time.time()
        for _ in range(count):
            next(data.train)
        rate = count * args.batch * args.seqlen / (time.time() - started)
        results[f"sampler, {'document-aware' if aware else 'plain'} windows of {args.seqlen}, "
                f"batch {args.batch}"] = f"{rate / 1e6:.1f} M tokens/s"
    print("\n".join(lines))
    print(f"\n| measure ({os.cpu_count()} CPU cores, {args.num_proc} tokenizer processes) | value |\n|---|---|")
    for key, value in results.items():
        print(f"| {key} | {value} |")


if __name__ == "__main__":
    main()
