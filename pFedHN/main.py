"""Entry point: ``python -m pFedHN.main`` with Hydra overrides."""

from __future__ import annotations

import logging
import shlex

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from pFedHN.checkpoint import CheckpointError
from pFedHN.dataset import DataNotFoundError
from pFedHN.experiment import run
from pFedHN.settings import ConfigError
from pFedHN.signals import RunStoppedError
from pFedHN.strategy import RoundsFailingError

log = logging.getLogger(__name__)


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Run the config Hydra composed, in Hydra's run directory."""
    try:
        run(cfg, HydraConfig.get().runtime.output_dir)
    except (ConfigError, DataNotFoundError, CheckpointError, RoundsFailingError) as error:
        # A one-line message, not a traceback: the user's input, or the clients, at fault.
        log.error("%s", error)
        raise SystemExit(f"error: {error}") from None
    except RunStoppedError as stopped:
        overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith("resume=")]
        command = shlex.join(["python", "-m", "pFedHN.main", *overrides,
                              f"resume={stopped.run_dir}"])
        log.warning("%s%s", stopped, f"; resume with: {command}" if stopped.saved else "")
        raise SystemExit(stopped.exit_code) from None


if __name__ == "__main__":
    main()
