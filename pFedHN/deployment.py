"""The ServerApp and ClientApp for Flower's deployment engine (``flwr run``).

The same strategy, client and results code as ``python -m pFedHN.main``; only the
way the config arrives differs. ``flwr run`` passes the run config of
``[tool.flwr.app.config]`` in ``pyproject.toml``:

- ``overrides``: Hydra overrides, exactly as on the ``python -m pFedHN.main``
  command line (e.g. ``"dataset.data=mnist model.n_kernels=7 num_rounds=100"``);
- ``run-dir``: where the server writes ``results.json``, the plot and the
  checkpoints; empty: ``outputs/deployment/<run id>`` under the SuperLink's
  working directory.

Each SuperNode names its partition with ``--node-config "partition-id=<i>"``.
Its data lives at ``dataset.root`` on that machine; the server's machine needs
no data. pFedHN-PC heads stay on the SuperNodes, in ``Context.state``.
"""

from __future__ import annotations

import functools
import logging
import shlex
from pathlib import Path

from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.server import ServerApp, ServerAppComponents
from omegaconf import DictConfig

from pFedHN.client import client_builder
from pFedHN.config import compose_config, load_settings

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=4)
def _config(overrides: str) -> DictConfig:
    """The run config's ``overrides`` (one string, as on a command line), composed."""
    return compose_config(shlex.split(overrides))


def _server_fn(context: Context) -> ServerAppComponents:
    # Here, not at the top: a SuperNode's ClientApp process (one per message)
    # need not import the simulation engine and the results' plotting.
    from pFedHN.main import prepare, start_experiment

    settings = prepare(_config(str(context.run_config["overrides"])), check_data=False)
    run_dir = str(context.run_config.get("run-dir", "")) or \
        f"outputs/deployment/{context.run_id}"
    experiment = start_experiment(settings, Path(run_dir).expanduser().resolve())
    return experiment.components(on_finish=experiment.finish)


@functools.lru_cache(maxsize=4)
def _builder(overrides: str):
    # A bad override fails on the node with the same message as in simulation.
    settings = load_settings(_config(overrides))
    # Decided on this node: e.g. device=auto picks the node's own GPU, if any.
    return client_builder(settings, data_cache=True)


def _client_fn(context: Context):
    return _builder(str(context.run_config["overrides"]))(context).to_client()


server_app = ServerApp(server_fn=_server_fn)
client_app = ClientApp(client_fn=_client_fn)
