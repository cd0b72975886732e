"""Lost client visits: retried within the round, or the round is not kept.

The server's real round (``PFedHNServer.fit_round``, Flower's ``fit_clients``)
against stand-in client proxies that fail on chosen visits.
"""

import copy

import numpy as np
import pytest
import torch
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy

from pFedHN.core import PFedHNCore
from pFedHN.models import CNNHyper, MHHyper
from pFedHN.server import PFedHNServer
from pFedHN.strategy import PFedHNStrategy, RoundsFailingError
from tests.conftest import tiny_settings

NUM_CLIENTS = 4


def local_training(theta: np.ndarray) -> np.ndarray:
    """A stand-in client whose delta depends on the theta it got."""
    return (0.3 * np.tanh(theta) + 0.01).astype(np.float32)


class FlakyProxy(ClientProxy):
    """A client that fails its first ``fail[round]`` visits of a round, or sends ``bad``."""

    def __init__(self, cid: str, fail: dict[int, int] | None = None, bad: bool = False):
        super().__init__(cid)
        self.fail, self.bad = dict(fail or {}), bad
        self.visits: list[int] = []

    def fit(self, ins, timeout, group_id):
        self.visits.append(group_id)
        if self.fail.get(group_id, 0) > 0:
            self.fail[group_id] -= 1
            raise RuntimeError("worker lost")
        delta_theta = [local_training(t) for t in parameters_to_ndarrays(ins.parameters)]
        if self.bad:
            delta_theta[0][...] = np.nan
        return FitRes(Status(Code.OK, ""), ndarrays_to_parameters(delta_theta), 10,
                      {"steps": 1})

    def get_properties(self, ins, timeout, group_id):
        raise NotImplementedError

    def get_parameters(self, ins, timeout, group_id):
        raise NotImplementedError

    def evaluate(self, ins, timeout, group_id):
        raise NotImplementedError

    def reconnect(self, ins, timeout, group_id):
        raise NotImplementedError


def hypernetwork(kind: str) -> CNNHyper | MHHyper:
    torch.manual_seed(0)
    if kind == "mh-sequential":
        return MHHyper([1000, 3000, 1000, 700], chunk_size=256, embedding_dim=8, hidden_dim=16)
    shapes = {"w": torch.Size([6, 5]), "b": torch.Size([6])}
    return CNNHyper(NUM_CLIENTS, shapes, embedding_dim=4, hidden_dim=16, n_hidden=1)


def make_server(kind: str, proxies: list[FlakyProxy], *overrides: str):
    """The package's server and strategy, its nodes already known (no discovery)."""
    sequential = kind == "mh-sequential"
    settings = tiny_settings(
        f"num_clients={NUM_CLIENTS}", "seed=7", "server.lr=1e-2", "server.wd=1e-3",
        f"server.clients_per_round={NUM_CLIENTS if sequential else 2}",
        f"server.optimizer={'adam' if sequential else 'sgd'}", f"server.sequential={sequential}",
        *overrides)
    strategy = PFedHNStrategy(settings, PFedHNCore(hypernetwork(kind), settings.server))
    server = PFedHNServer(client_manager=SimpleClientManager(), strategy=strategy)
    strategy.nodes.know(server.client_manager(), dict(enumerate(proxies)))
    records = []
    strategy.on_fit = lambda r, clients, server_metrics: records.append(
        (r, len(clients), server_metrics))
    steps = []
    update = strategy.core.update
    strategy.core.update = lambda ids, deltas: (steps.append(list(ids)), update(ids, deltas))
    return server, strategy, records, steps


def proxies(**faults) -> list[FlakyProxy]:
    return [FlakyProxy(str(i), **faults.get(f"c{i}", {})) for i in range(NUM_CLIENTS)]


@pytest.mark.parametrize("kind", ["mh-sequential", "pfedhn-averaged"])
def test_failed_visits_are_retried_and_the_rounds_equal_an_unbroken_run(kind):
    """MH-pFedHN's sequential round (every client, one step each) and pFedHN's averaged
    round (two clients, one step): visits that failed are sent again, and the
    hypernetwork ends bit for bit where an unbroken run leaves it, step for step."""
    flaky = proxies(c2={"fail": {1: 2}}, c0={"fail": {2: 1, 3: 1}}, c3={"fail": {3: 2}})
    server, strategy, records, steps = make_server(kind, flaky)
    unbroken_server, unbroken, unbroken_records, unbroken_steps = make_server(kind, proxies())
    for server_round in (1, 2, 3):
        server.fit_round(server_round, None)
        unbroken_server.fit_round(server_round, None)
    for ours, reference in zip(strategy.core.hnet.parameters(), unbroken.core.hnet.parameters(),
                               strict=True):
        assert torch.equal(ours, reference)
    assert steps == unbroken_steps  # the same steps, on the same clients, in the same order
    per_round = NUM_CLIENTS if kind == "mh-sequential" else 2
    assert [(r, n) for r, n, _ in records] == [(r, per_round) for r in (1, 2, 3)]
    assert sum(len(s) for s in steps) == 3 * per_round  # every sampled visit stepped
    retried = [(r, x["partition_id"]) for r, _, m in records for x in m["retried"]]
    # The clients each round sampled: every one (sequential), or the two it stepped on.
    sampled = {r: set(range(NUM_CLIENTS)) if kind == "mh-sequential"
               else set(unbroken_steps[r - 1]) for r in (1, 2, 3)}
    expected = [(r, i) for r, i, times in ((1, 2, 2), (2, 0, 1), (3, 0, 1), (3, 3, 2))
                if i in sampled[r] for _ in range(times)]
    assert sorted(retried) == sorted(expected)
    assert all(x["reason"].endswith("worker lost") for _, _, m in records for x in m["retried"])
    assert all(not m["rejected"] for _, _, m in records)


def test_a_visit_lost_after_its_retries_fails_the_round_before_it_is_recorded():
    always = {r: 99 for r in range(1, 6)}
    flaky = proxies(**{f"c{i}": {"fail": always} for i in range(NUM_CLIENTS)})
    server, strategy, records, steps = make_server("mh-sequential", flaky)
    with pytest.raises(RoundsFailingError, match=r"round 1 lost the visits of clients \[\d\] "
                       r"\(RuntimeError: worker lost\), after server.visit_retries=2") as error:
        server.fit_round(1, None)
    assert error.value.redo  # a restart from the checkpoint may heal it
    assert records == [] and steps == []  # not recorded: no checkpoint follows it
    assert sorted(len(p.visits) for p in flaky) == [0, 0, 0, 3]  # one visit, two retries


def test_a_delta_that_cannot_be_used_is_not_retried_and_a_redo_would_not_help():
    flaky = proxies(c1={"bad": True})
    server, _, records, _ = make_server("pfedhn-averaged", flaky)
    with pytest.raises(RoundsFailingError, match=r"non-finite.*same weights would give") as error:
        for server_round in range(1, 6):  # until client 1 is sampled
            server.fit_round(server_round, None)
    assert not error.value.redo
    assert len(flaky[1].visits) == 1


def test_accepted_lost_visits_leave_the_round_with_the_others_and_are_counted():
    always = {r: 99 for r in range(1, 4)}
    flaky = proxies(c2={"fail": always})
    server, strategy, records, steps = make_server(
        "mh-sequential", flaky, "server.visit_retries=1", "server.accept_lost_visits=true")
    reference = copy.deepcopy(strategy.core.hnet)
    for server_round in (1, 2, 3):
        server.fit_round(server_round, None)
    assert [(r, n) for r, n, _ in records] == [(r, NUM_CLIENTS - 1) for r in (1, 2, 3)]
    assert all(2 not in s for s in steps) and len(steps) == 3 * (NUM_CLIENTS - 1)
    lost = [(r, x["partition_id"], x["kind"]) for r, _, m in records for x in m["rejected"]]
    assert lost == [(r, 2, "failed") for r in (1, 2, 3)]
    assert len(flaky[2].visits) == 3 * 2  # each round: the visit and one retry
    # Client 2's embedding and head never got a gradient: unchanged.
    assert torch.equal(strategy.core.hnet.embeddings[2], reference.embeddings[2])
