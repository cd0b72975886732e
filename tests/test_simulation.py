"""Real Flower simulations (Ray backend) on the committed tiny MNIST split."""

import json
import subprocess
import sys
from collections import defaultdict

import pytest
from flwr.common import ndarrays_to_parameters
from flwr.simulation import run_simulation

from pFedHN.client import make_client_app
from pFedHN.dataset import DATASETS, federated_data
from pFedHN.experiment import prepare
from pFedHN.server import build_strategy, make_server_app
from pFedHN.settings import Settings, SplitSettings
from pFedHN.strategy import payload_bytes
from tests.conftest import REPO, TINY_MNIST, TINY_OVERRIDES, compose_config
from tests.test_export import exported_test_accuracies, recorded

pytestmark = pytest.mark.simulation


def test_pfedhn_pc_head_after_round_r_is_the_one_trained_in_round_r_minus_1():
    cfg = prepare(compose_config(TINY_OVERRIDES + [
        "num_clients=3", "num_rounds=12", "eval_every=12", "client.inner_steps=5",
        "model.local=True", "model.variant=1", "server.lr=5e-2",
    ]))
    fits = defaultdict(list)  # partition id -> metrics of its fits, in order
    evaluations = []

    def on_fit(server_round, client_metrics, server_metrics):
        for m in client_metrics:
            fits[m["partition-id"]].append(m)

    strategy = build_strategy(cfg, on_fit=on_fit, on_evaluate=lambda r, m, _: evaluations.append(r))
    run_simulation(
        server_app=make_server_app(strategy, cfg.num_rounds),
        client_app=make_client_app(cfg),
        num_supernodes=cfg.num_clients,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    assert sum(len(v) for v in fits.values()) == 12
    assert evaluations == [0, 12]
    revisited = 0
    for history in fits.values():
        for previous, current in zip(history, history[1:], strict=False):
            assert current["head-fingerprint-in"] == previous["head-fingerprint-out"]
            revisited += 1
        for fit in history:
            assert fit["head-fingerprint-in"] != fit["head-fingerprint-out"]  # it trained
    assert revisited >= 6  # 12 rounds over 3 clients: most fits are revisits


def test_main_end_to_end_learns_writes_its_outputs_and_exports_its_models(tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "pFedHN.main", *TINY_OVERRIDES, "num_clients=5",
         "num_rounds=60", "eval_every=20", f"hydra.run.dir={run_dir}"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert [e["round"] for e in results["evaluations"]] == [0, 20, 40, 60]
    first, last = results["evaluations"][0], results["evaluations"][-1]
    assert first["test_acc"] < 0.2  # untrained: about chance (10 classes)
    # Measured here: 0.976 after 60 rounds (5 clients, 2 classes each).
    assert results["final_test_acc"] == last["test_acc"] > 0.9
    best = max(results["evaluations"], key=lambda e: e["val_acc"])
    assert results["test_acc_at_best_val"] == best["test_acc"]
    assert results["best_round"] == best["round"]
    assert results["rounds_completed"] == 60 and results["wall_time_s"] > 0
    assert last["clients_evaluated"] == 5
    assert 0 <= last["test_acc_min"] <= last["test_acc"] <= last["test_acc_max"] <= 1
    # Communication: theta_i out and delta_theta back, same arrays, every round.
    settings = Settings.from_config(compose_config(TINY_OVERRIDES + ["num_clients=5"]))
    strategy = build_strategy(settings)
    theta_bytes = payload_bytes(ndarrays_to_parameters(strategy.core.generate(0)))
    traffic = results["communication"]
    assert traffic["last_training_round_sent_bytes"] == theta_bytes
    assert traffic["training_received_bytes"] == traffic["training_sent_bytes"] == 60 * theta_bytes
    assert traffic["evaluation_sent_bytes"] == 4 * 5 * theta_bytes  # 4 evaluations, 5 clients
    # Server memory: float32 hypernetwork, one SGD momentum buffer per parameter.
    hnet_bytes = 4 * sum(p.numel() for p in strategy.core.hnet.parameters())
    memory = results["server_memory"]
    assert memory["hypernetwork_bytes"] == memory["optimizer_state_bytes"] == hnet_bytes
    assert memory["peak_rss_bytes"] > hnet_bytes
    for name in ("accuracy.png", "config.yaml", "main.log"):
        assert (run_dir / name).stat().st_size > 0
    # The split it trained on, client by client, and a run that trained passes the check.
    clients = federated_data(DATASETS["mnist"], str(TINY_MNIST), SplitSettings(5, 2, 500, 42))
    split = results["split"]
    assert split["partition"] == "classes" and split["seed"] == 42
    for data, summary in zip(clients, split["clients"], strict=True):
        assert summary["classes"] == data.train_y.unique().tolist()
        assert [summary[k] for k in ("train", "val", "test")] == \
            [len(data.train_y), len(data.val_y), len(data.test_y)]
    assert results["training_check"]["status"] == "ok"
    assert results["training_check"]["majority_class_val_acc"] < last["val_acc"]
    assert "split: 5 clients" in (run_dir / "main.log").read_text()
    # Its personalized models, from the command line: each scores on its client's test
    # split exactly what the run recorded at the best-validation round.
    exported = subprocess.run([sys.executable, "-m", "pFedHN.export", str(run_dir)], cwd=REPO,
                              capture_output=True, text=True, timeout=600)
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert f"5 client models of round best ({best['round']})" in exported.stdout
    _, accuracies = exported_test_accuracies(run_dir, settings)
    assert accuracies == recorded(run_dir, best["round"])
