"""``python -m trainer [overrides]``: launch a run from the Hydra configs in configs/.

With no arguments it runs the quickstart. Errors in the configuration or the data exit with a short
message naming the problem (set HYDRA_FULL_ERROR=1 for the traceback).
"""

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from .checkpoint import CheckpointError
from .config import register_configs, unknown_keys
from .data import DataError
from .loop import NonFiniteLoss, run
from .run_lock import RunDirectoryBusy

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")
register_configs()


def _fail(message: str):
    if os.environ.get("HYDRA_FULL_ERROR") == "1" and sys.exc_info()[0] is not None:
        raise
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def main(cfg) -> None:
    unknown = unknown_keys(cfg)
    if unknown:
        _fail("unknown configuration key(s): " + ", ".join(unknown))
    try:
        config = OmegaConf.to_object(cfg)        # builds the dataclasses: their checks run here
    except Exception as error:  # noqa: BLE001 - Hydra/OmegaConf raise several kinds; all are config errors
        message = str(error).strip().splitlines()
        _fail("invalid configuration: " + " ".join(message[:4]))
    try:
        run(config, Path(HydraConfig.get().runtime.output_dir))
    except (DataError, CheckpointError, NonFiniteLoss, RunDirectoryBusy, ValueError,
            FileNotFoundError) as error:
        _fail(str(error))


def entry_point():
    main()


if __name__ == "__main__":
    main()
