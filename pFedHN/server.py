"""The ServerApp: Flower's legacy Server driving the pFedHN strategy."""

from __future__ import annotations

import torch
from flwr.app import Context
from flwr.server import Server, ServerApp, ServerAppComponents, ServerConfig
from flwr.server.client_manager import SimpleClientManager
from flwr.server.history import History
from omegaconf import DictConfig

from pFedHN.config import target_kwargs
from pFedHN.device import resolve_device
from pFedHN.models import CNNHyper, CNNTarget, parameter_shapes
from pFedHN.strategy import PFedHNStrategy


class PFedHNServer(Server):
    """Flower's Server, plus an evaluation before the first round.

    Flower evaluates only after each training round; the paper's curves start
    from the hypernetwork's initial weights (round 0), and a resumed run first
    evaluates the round it resumes from (when that is an evaluation round).
    """

    def fit(self, num_rounds: int, timeout: float | None) -> tuple[History, float]:
        """Evaluate the starting point, then run Flower's usual training loop."""
        self.evaluate_round(server_round=0, timeout=timeout)
        return super().fit(num_rounds, timeout)


def build_hypernetwork(cfg: DictConfig) -> CNNHyper:
    """CNNHyper for this config, initialised from ``cfg.seed``."""
    torch.manual_seed(cfg.seed)
    target_shapes = parameter_shapes(CNNTarget(**target_kwargs(cfg)))
    return CNNHyper(
        cfg.num_clients, target_shapes, embedding_dim=cfg.model.embed_dim,
        hidden_dim=cfg.model.hidden_dim, n_hidden=cfg.model.n_hidden,
    )


def build_strategy(cfg: DictConfig, **callbacks) -> PFedHNStrategy:
    """The strategy with the config's server settings."""
    return PFedHNStrategy(
        build_hypernetwork(cfg), num_clients=cfg.num_clients, num_rounds=cfg.num_rounds,
        eval_every=cfg.eval_every, clients_per_round=cfg.server.clients_per_round,
        lr=cfg.server.lr, momentum=cfg.server.momentum, weight_decay=cfg.server.wd,
        clip_norm=cfg.server.clip_norm, seed=cfg.seed, device=resolve_device(cfg.device),
        **callbacks,
    )


def make_server_app(
    strategy: PFedHNStrategy, num_rounds: int, round_timeout: float | None = None
) -> ServerApp:
    """A ServerApp running ``strategy`` up to round ``num_rounds`` (from its start round).

    ``round_timeout``: seconds a round waits for its clients; a client that does
    not answer in time counts as failed.
    """

    def server_fn(context: Context) -> ServerAppComponents:
        return ServerAppComponents(
            server=PFedHNServer(client_manager=SimpleClientManager(), strategy=strategy),
            config=ServerConfig(num_rounds=num_rounds - strategy.start_round,
                                round_timeout=round_timeout),
        )

    return ServerApp(server_fn=server_fn)
