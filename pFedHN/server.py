"""The ServerApp: Flower's legacy Server driving the pFedHN strategy."""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
from flwr.server import Server, ServerApp, ServerAppComponents, ServerConfig
from flwr.server.client_manager import ClientManager, SimpleClientManager
from flwr.server.history import History
from flwr.server.server import fit_clients

from pFedHN.core import PFedHNCore
from pFedHN.device import resolve_device
from pFedHN.models import CNNHyper, MHHyper, parameter_shapes
from pFedHN.networks import client_network, global_network
from pFedHN.settings import Settings
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
        self.rounds_thread: int | None = None  # the thread running the rounds, once started
        self.ended = threading.Event()  # set once the rounds have ended, however

    def fit(self, num_rounds: int, timeout: float | None) -> tuple[History, float]:
        """Evaluate the starting point, then run Flower's usual training loop."""
        self.rounds_thread = threading.get_ident()
        try:
            self.evaluate_round(server_round=0, timeout=timeout)
            history = super().fit(num_rounds, timeout)
            if self.on_finish is not None:
                self.on_finish()
            return history
        finally:
            self.ended.set()

    def fit_round(self, server_round: int, timeout: float | None):  # noqa: ANN201 (Flower's)
        """One training round: the exchanges the strategy's round yields, each visit retried.

        A visit that failed is sent again, up to ``server.visit_retries`` times,
        before the exchange's deltas step phi (``FailurePolicy``).
        """
        strategy = self.strategy
        for _ in strategy.round(server_round):
            instructions = strategy.configure_fit(server_round, self.parameters,
                                                  self._client_manager)
            results, failures = fit_clients(instructions, self.max_workers, timeout,
                                            server_round)
            for _ in range(strategy.failures.visit_retries):
                retry = strategy.visits_to_retry(server_round, instructions, results, failures)
                if not retry:
                    break
                more, failures = fit_clients(retry, self.max_workers, timeout, server_round)
                results += more
            strategy.aggregate_fit(server_round, results, failures)
        return None, {}, ([], [])


def build_hypernetwork(settings: Settings) -> CNNHyper:
    """CNNHyper for these settings, initialised from ``settings.seed``."""
    torch.manual_seed(settings.seed)
    if settings.variant.multi_head:
        raise ValueError("MH-pFedHN's hypernetwork needs the clients' sizes: "
                         "build_multihead_hypernetwork")
    target_shapes = parameter_shapes(client_network(settings, 0).build())
    return CNNHyper(
        settings.partitions, target_shapes, embedding_dim=settings.model.embed_dim,
        hidden_dim=settings.model.hidden_dim, n_hidden=settings.model.n_hidden,
    )


def global_model_size(settings: Settings) -> int:
    """MH-pFedHNGD: parameters of the global model, whose architecture is public."""
    model = global_network(settings).build()
    return sum(p.numel() for p in model.parameters())


def build_multihead_hypernetwork(settings: Settings, client_sizes: list[int]) -> MHHyper:
    """MHHyper for the parameter counts the clients reported (+ the global model's).

    The server never sees ``model.architectures``: only these counts.
    """
    torch.manual_seed(settings.seed)
    model = settings.model
    extra = [global_model_size(settings)] if settings.variant.global_model else []
    return MHHyper(client_sizes + extra, chunk_size=model.chunk_size,
                   embedding_dim=model.embed_dim or 64, hidden_dim=model.hidden_dim,
                   n_hidden=model.n_hidden)


def build_strategy(settings: Settings, **callbacks: Callable) -> PFedHNStrategy:
    """The strategy for these settings, its phi initialised from ``settings.seed``.

    MH-pFedHN: phi is built once the clients have reported their sizes.
    """
    device = resolve_device(settings.device)
    if settings.variant.multi_head:
        return PFedHNStrategy(settings, make_core=lambda sizes: PFedHNCore(
            build_multihead_hypernetwork(settings, sizes), settings.server, device,
            dict(enumerate(sizes))), **callbacks)
    core = PFedHNCore(build_hypernetwork(settings), settings.server, device)
    return PFedHNStrategy(settings, core, **callbacks)


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
        config=ServerConfig(num_rounds=num_rounds - strategy.schedule.start_round,
                            round_timeout=round_timeout),
    )


def make_server_app(
    strategy: PFedHNStrategy, num_rounds: int, round_timeout: float | None = None
) -> ServerApp:
    """A ServerApp around an existing strategy (simulation, tests)."""
    return ServerApp(server_fn=lambda context: server_components(strategy, num_rounds,
                                                                 round_timeout))
