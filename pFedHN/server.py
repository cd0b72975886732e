"""The ServerApp: Flower's legacy Server driving the pFedHN strategy."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from flwr.server import Server, ServerApp, ServerAppComponents, ServerConfig
from flwr.server.client_manager import ClientManager, SimpleClientManager
from flwr.server.history import History
from omegaconf import DictConfig

from pFedHN.config import data_spec, num_partitions, target_kwargs, variant_of
from pFedHN.device import resolve_device
from pFedHN.models import CNNHyper, MHHyper, make_target, parameter_shapes
from pFedHN.strategy import PFedHNStrategy
from pFedHN.zoo import make_client_model


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

    def fit_round(self, server_round: int, timeout: float | None):  # noqa: ANN201 (Flower's)
        """One training round: the strategy's exchanges in turn, recorded once.

        What the exchanges are (the phases of MH-pFedHNGD, one per client when
        sequential) is laid out in ``PFedHNStrategy.begin_round``.
        """
        strategy = self.strategy
        for exchange in strategy.begin_round():
            strategy.exchange = exchange
            result = super().fit_round(server_round, timeout)
        strategy.end_round(server_round)
        return result


def build_hypernetwork(cfg: DictConfig) -> CNNHyper:
    """CNNHyper for this config, initialised from ``cfg.seed``."""
    torch.manual_seed(cfg.seed)
    if variant_of(cfg).multi_head:
        raise ValueError("MH-pFedHN's hypernetwork needs the clients' sizes: "
                         "build_multihead_hypernetwork")
    target_shapes = parameter_shapes(make_target(**target_kwargs(cfg)))
    return CNNHyper(
        num_partitions(cfg), target_shapes, embedding_dim=cfg.model.embed_dim,
        hidden_dim=cfg.model.hidden_dim, n_hidden=cfg.model.n_hidden,
    )


def global_model_size(cfg: DictConfig) -> int:
    """MH-pFedHNGD: parameters of the global model, whose architecture is public."""
    model = make_client_model(cfg.model.global_model, cfg.model.in_channels,
                              cfg.model.out_dim, data_spec(cfg, on_disk=False).image_size)
    return sum(p.numel() for p in model.parameters())


def build_multihead_hypernetwork(cfg: DictConfig, client_sizes: list[int]) -> MHHyper:
    """MHHyper for the parameter counts the clients reported (+ the global model's).

    The server never sees ``model.architectures``: only these counts.
    """
    torch.manual_seed(cfg.seed)
    sizes = client_sizes + ([global_model_size(cfg)] if variant_of(cfg).global_model else [])
    return MHHyper(sizes, chunk_size=cfg.model.chunk_size, embedding_dim=cfg.model.embed_dim
                   or 64, hidden_dim=cfg.model.hidden_dim, n_hidden=cfg.model.n_hidden)


def build_strategy(cfg: DictConfig, **callbacks) -> PFedHNStrategy:
    """The strategy with the config's server settings."""
    variant = variant_of(cfg)
    return PFedHNStrategy(
        None if variant.multi_head else build_hypernetwork(cfg),
        num_clients=num_partitions(cfg), num_rounds=cfg.num_rounds,
        eval_every=cfg.eval_every, clients_per_round=cfg.server.clients_per_round,
        lr=cfg.server.lr, momentum=cfg.server.momentum, weight_decay=cfg.server.wd,
        clip_norm=cfg.server.clip_norm, seed=cfg.seed, device=resolve_device(cfg.device),
        training_clients=cfg.num_clients, optimizer=cfg.server.optimizer,
        make_hnet=partial(build_multihead_hypernetwork, cfg) if variant.multi_head else None,
        global_model=variant.global_model, sequential=cfg.server.sequential,
        node_timeout=cfg.server.node_timeout, fused_adam=cfg.server.fused_adam, **callbacks,
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
