"""The ServerApp: Flower's legacy Server driving the pFedHN strategy."""

from __future__ import annotations

from collections.abc import Callable

import torch
from flwr.server import Server, ServerApp, ServerAppComponents, ServerConfig
from flwr.server.client_manager import ClientManager, SimpleClientManager
from flwr.server.history import History
from omegaconf import DictConfig

from pFedHN.config import num_partitions, target_kwargs
from pFedHN.device import resolve_device
from pFedHN.models import CNNHyper, make_target, parameter_shapes
from pFedHN.strategy import PFedHNStrategy


class PFedHNServer(Server):
    """Flower's Server, plus an evaluation before the first round and a hook after the last.

    Flower evaluates only after each training round; the paper's curves start
    from the hypernetwork's initial weights (round 0), and a resumed run first
    evaluates the round it resumes from (when that is an evaluation round).
    """

    def __init__(
        self,
        *,
        client_manager: ClientManager,
        strategy: PFedHNStrategy,
        on_finish: Callable[[], object] | None = None,
    ) -> None:
        super().__init__(client_manager=client_manager, strategy=strategy)
        self.on_finish = on_finish

    def fit(self, num_rounds: int, timeout: float | None) -> tuple[History, float]:
        """Evaluate the starting point, then run Flower's usual training loop."""
        self.evaluate_round(server_round=0, timeout=timeout)
        history = super().fit(num_rounds, timeout)
        if self.on_finish is not None:
            self.on_finish()
        return history


def build_hypernetwork(cfg: DictConfig) -> CNNHyper:
    """CNNHyper for this config, initialised from ``cfg.seed``."""
    torch.manual_seed(cfg.seed)
    target_shapes = parameter_shapes(make_target(**target_kwargs(cfg)))
    return CNNHyper(
        num_partitions(cfg), target_shapes, embedding_dim=cfg.model.embed_dim,
        hidden_dim=cfg.model.hidden_dim, n_hidden=cfg.model.n_hidden,
    )


def build_strategy(cfg: DictConfig, **callbacks) -> PFedHNStrategy:
    """The strategy with the config's server settings."""
    return PFedHNStrategy(
        build_hypernetwork(cfg), num_clients=num_partitions(cfg), num_rounds=cfg.num_rounds,
        eval_every=cfg.eval_every, clients_per_round=cfg.server.clients_per_round,
        lr=cfg.server.lr, momentum=cfg.server.momentum, weight_decay=cfg.server.wd,
        clip_norm=cfg.server.clip_norm, seed=cfg.seed, device=resolve_device(cfg.device),
        training_clients=cfg.num_clients, **callbacks,
    )


def server_components(
    strategy: PFedHNStrategy,
    num_rounds: int,
    round_timeout: float | None = None,
    on_finish: Callable[[], object] | None = None,
) -> ServerAppComponents:
    """What a ServerApp runs: ``strategy`` up to round ``num_rounds`` (from its start round).

    ``round_timeout``: seconds a round waits for its clients; a client that does
    not answer in time counts as failed. ``on_finish``: called after the last round.
    """
    return ServerAppComponents(
        server=PFedHNServer(client_manager=SimpleClientManager(), strategy=strategy,
                            on_finish=on_finish),
        config=ServerConfig(num_rounds=num_rounds - strategy.start_round,
                            round_timeout=round_timeout),
    )


def make_server_app(
    strategy: PFedHNStrategy, num_rounds: int, round_timeout: float | None = None
) -> ServerApp:
    """A ServerApp around an existing strategy (simulation, tests)."""
    return ServerApp(server_fn=lambda context: server_components(strategy, num_rounds,
                                                                 round_timeout))
