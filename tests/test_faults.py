"""Faults injected into a real Flower simulation never touch the hypernetwork.

With lost visits accepted and no retries, as a user may choose (tests/test_retries.py:
the default, retries and rounds that are not kept)."""

import json
import sys
import time
import zlib

import numpy as np
import pytest
from flwr.client import NumPyClient
from flwr.clientapp import ClientApp
from flwr.simulation import run_simulation
from ray import cloudpickle

from pFedHN.client import client_builder
from pFedHN.experiment import prepare
from pFedHN.recorder import RunRecorder
from pFedHN.server import build_strategy, make_server_app
from tests.conftest import TINY_OVERRIDES, compose_config

pytestmark = pytest.mark.simulation
# Ray ships the ClientApp to its workers; send this module's code along by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

FAULTS = {2: "raise", 3: "nan", 4: "shape", 5: "slow", 6: "missing"}
TIMEOUT_S, SLOW_S = 3.0, 6.0


class FaultyClient(NumPyClient):
    """The real client, with one fault injected per round of FAULTS."""

    def __init__(self, inner):
        self.inner = inner

    def get_properties(self, config):
        return self.inner.get_properties(config)

    def evaluate(self, parameters, config):
        return self.inner.evaluate(parameters, config)

    def fit(self, parameters, config):
        fault = FAULTS.get(int(config["server-round"]))
        if fault == "raise":
            raise RuntimeError("injected failure")
        if fault == "slow":
            time.sleep(SLOW_S)
        delta_theta, n, metrics = self.inner.fit(parameters, config)
        if fault == "nan":
            delta_theta[0][0] = np.nan
        elif fault == "shape":
            delta_theta[2] = delta_theta[2][:1]
        elif fault == "missing":
            delta_theta = delta_theta[:-1]
        return delta_theta, n, metrics


def fingerprint(module):
    crc = 0
    for tensor in module.state_dict().values():
        crc = zlib.crc32(tensor.detach().numpy().tobytes(), crc)
    return crc


def test_failing_clients_are_logged_counted_and_never_update_the_hypernetwork(tmp_path):
    cfg = prepare(compose_config(TINY_OVERRIDES + [
        "num_clients=2", "num_rounds=8", "eval_every=8", "client.inner_steps=5",
        "simulation.num_cpus_per_client=1",  # two workers: a slow one does not block
        "server.max_failed_rounds=null",  # five failed rounds in a row: go on regardless
        "server.accept_lost_visits=true", "server.visit_retries=0",  # each fault loses its visit
    ]))
    recorder = RunRecorder(tmp_path, cfg.num_rounds, "faults")
    after_round = {}

    def on_fit(server_round, client_metrics, server_metrics):
        recorder.on_fit(server_round, client_metrics, server_metrics)
        after_round[server_round] = fingerprint(strategy.core.hnet)

    strategy = build_strategy(cfg, on_fit=on_fit, on_evaluate=recorder.on_evaluate)
    before = fingerprint(strategy.core.hnet)
    build_client = client_builder(cfg)
    run_simulation(
        server_app=make_server_app(strategy, cfg.num_rounds, round_timeout=TIMEOUT_S),
        client_app=ClientApp(client_fn=lambda ctx: FaultyClient(build_client(ctx)).to_client()),
        num_supernodes=cfg.num_clients,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    recorder.close()

    assert sorted(after_round) == list(range(1, 9))  # the run went on to the end
    previous = [before] + [after_round[r] for r in range(1, 8)]
    for server_round in range(1, 9):
        unchanged = after_round[server_round] == previous[server_round - 1]
        assert unchanged == (server_round in FAULTS), server_round

    results = json.loads((tmp_path / "results.json").read_text())
    assert results["failed_rounds"] == sorted(FAULTS)
    reasons = {f["round"]: f["reason"] for f in results["client_failures"]}
    assert sorted(reasons) == sorted(FAULTS)
    assert all(f["partition_id"] in (0, 1) for f in results["client_failures"])
    assert "injected failure" in reasons[2]
    assert "non-finite" in reasons[3]
    assert "shape" in reasons[4]
    assert "expired" in reasons[5]  # timed out: Flower's message TTL ran out
    assert "expected 10" in reasons[6]
    kinds = {f["round"]: f["kind"] for f in results["client_failures"]}
    assert kinds == {2: "failed", 3: "rejected", 4: "rejected", 5: "failed", 6: "rejected"}
    assert results["lost_visits"] == len(FAULTS) and results["retried_visits"] == []
    assert all(len(reason) <= 300 and "\n" not in reason for reason in reasons.values())
    assert [e["round"] for e in results["evaluations"]] == [0, 8]


class OnceFailingClient(FaultyClient):
    """The real client, failing its first visit of the rounds in ``fail_rounds``."""

    def __init__(self, inner, marks, fail_rounds):
        super().__init__(inner)
        self.marks, self.fail_rounds = marks, fail_rounds

    def fit(self, parameters, config):
        server_round = int(config["server-round"])
        mark = self.marks / f"{server_round}-{self.inner.partition_id}"
        if server_round in self.fail_rounds and not mark.exists():
            mark.touch()  # the retry, in another message (and maybe another worker), succeeds
            raise RuntimeError("injected failure")
        return self.inner.fit(parameters, config)


def once_failing(cfg, marks, fail_rounds):
    build_client = client_builder(cfg)

    def client_fn(context):
        return OnceFailingClient(build_client(context), marks, fail_rounds).to_client()

    return client_fn


def test_a_visit_that_failed_once_is_sent_again_and_the_run_is_an_unbroken_ones(tmp_path):
    cfg = prepare(compose_config(TINY_OVERRIDES + [
        "num_clients=2", "num_rounds=4", "eval_every=4", "client.inner_steps=5"]))
    marks = tmp_path / "marks"
    marks.mkdir()
    runs = {}
    for name, fail_rounds in (("flaky", {2, 3}), ("unbroken", set())):
        recorder = RunRecorder(tmp_path / name, cfg.num_rounds, name)
        strategy = build_strategy(cfg, on_fit=recorder.on_fit, on_evaluate=recorder.on_evaluate)
        run_simulation(
            server_app=make_server_app(strategy, cfg.num_rounds),
            client_app=ClientApp(client_fn=once_failing(cfg, marks, fail_rounds)),
            num_supernodes=cfg.num_clients,
            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
        )
        runs[name] = (fingerprint(strategy.core.hnet), recorder.close())
    (flaky, results), (unbroken, unbroken_results) = runs["flaky"], runs["unbroken"]
    assert flaky == unbroken
    assert [r["round"] for r in results["retried_visits"]] == [2, 3]
    assert all("injected failure" in r["reason"] for r in results["retried_visits"])
    assert results["lost_visits"] == 0 and results["failed_rounds"] == []
    assert results["evaluations"][-1]["test_acc"] == unbroken_results["evaluations"][-1]["test_acc"]
