"""Plot and compare runs: a thin wrapper of ``python -m trainer.plot_metrics`` (see its help)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.plot_metrics import main  # noqa: E402

if __name__ == "__main__":
    main()
