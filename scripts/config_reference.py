"""Write docs/config.md, the reference of every configuration key (``trainer.config_reference``).

    python scripts/config_reference.py            # rewrite docs/config.md
    python scripts/config_reference.py --check    # exit 1 if docs/config.md is out of date
"""

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.config_reference import config_keys, render_markdown  # noqa: E402

DEFAULT_PATH = ROOT / "docs" / "config.md"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_PATH, help="where to write (default: docs/config.md)")
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if the file differs")
    args = parser.parse_args(argv)
    text = render_markdown(config_keys())
    if args.check:
        current = args.out.read_text() if args.out.exists() else ""
        if current != text:
            print(f"{args.out} is out of date: run python scripts/config_reference.py", file=sys.stderr)
            return 1
        print(f"{args.out} is up to date")
        return 0
    staging = args.out.with_name(f".{args.out.name}.tmp")
    staging.write_text(text)
    os.replace(staging, args.out)
    print(f"wrote {args.out} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
