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
import re
import shlex
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import flwr
from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.server import ServerApp, ServerAppComponents
from omegaconf import DictConfig

from pFedHN.client import client_builder
from pFedHN.config import compose_config, load_settings
from pFedHN.signals import StopRequest

log = logging.getLogger(__name__)
# Seconds a stopped run waits for its round in flight to end at a checkpoint.
STOP_WAIT_S = 120


@functools.lru_cache(maxsize=4)
def _config(overrides: str) -> DictConfig:
    """The run config's ``overrides`` (one string, as on a command line), composed."""
    return compose_config(shlex.split(overrides))


def _server_fn(context: Context) -> ServerAppComponents:
    # Here, not at the top: a SuperNode's ClientApp process (one per message)
    # need not import the simulation engine and the results' plotting.
    from pFedHN.experiment import prepare, start_experiment

    overrides = str(context.run_config["overrides"])
    settings = prepare(_config(overrides), check_data=False)
    run_dir = str(context.run_config.get("run-dir", "")) or \
        f"outputs/deployment/{context.run_id}"
    stop = StopRequest()
    experiment = start_experiment(settings, Path(run_dir).expanduser().resolve(), stop=stop)
    finished = []
    components = experiment.components(on_finish=lambda: finished.append(experiment.finish()))

    def on_exit() -> None:  # Flower ends the process: after the run, or cut short
        server = components.server
        if finished or server.ended.is_set():  # done, or ended by its own error: not a stop
            return
        # Rounds in another thread (Flower's simulation runtime): they stop at the end
        # of the one in flight, at a checkpoint. In this thread: they are paused here.
        elsewhere = server.rounds_thread not in (None, threading.get_ident())
        if elsewhere:
            stop.signum = signal.SIGINT
            server.ended.wait(STOP_WAIT_S)
        command = resume_command(overrides, experiment.run_dir)
        saved = experiment.record_stop(command, settled=not elsewhere or server.ended.is_set())
        log.warning("the run was stopped (flwr stop, or a signal to the ServerApp) after "
                    "round %d, with %s; resume it with: %s", experiment.recorder.progress.n,
                    f"a checkpoint at round {saved}" if saved else "no checkpoint yet", command)

    on_flower_exit(on_exit)
    return components


def resume_command(overrides: str, run_dir: Path) -> str:
    """``flwr run`` continuing ``run_dir``: the same overrides, ``resume=`` instead of any."""
    kept = re.sub(r"(^|\s)resume=\S*", " ", overrides).strip()  # as written, quotes and all
    run_config = f"overrides='{kept} resume={run_dir}' run-dir='{run_dir}'"
    quoted = re.sub(r'([\\"$`])', r"\\\1", run_config)  # inside a shell's double quotes
    return f'flwr run . <your federation> --run-config "{quoted}"'


def on_flower_exit(handler: Callable[[], None]) -> None:
    """Have Flower call ``handler`` when it ends this process (``flwr stop``, a signal).

    Flower's ServerApp process handles SIGINT and SIGTERM itself (``flwr stop``
    makes it send itself SIGINT) and then runs its exit handlers, the last added
    first; a handler that runs before its force-exit timer may write a checkpoint.
    """
    try:
        from flwr.supercore.exit import add_exit_handler
    except ImportError:
        log.warning("flwr %s has no exit handlers: a stopped run resumes from its last "
                    "regular checkpoint", flwr.__version__)
        return
    try:
        add_exit_handler(handler, run_before_force_exit=True)
    except TypeError:  # a Flower without the force-exit timer
        add_exit_handler(handler)


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
