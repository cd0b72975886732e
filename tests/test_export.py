"""Personalized models out of a run: what is exported scores what the run recorded."""

import json
import shutil

import pytest
import torch
from flwr.app import Context, RecordDict

from pFedHN import checkpoint
from pFedHN.client import STATE_DIR, LocalStore, client_builder, initial_head, kept_state
from pFedHN.config import data_spec
from pFedHN.dataset import federated_data
from pFedHN.experiment import prepare, start_experiment
from pFedHN.export import ExportError, export, load_client_model, main
from pFedHN.personal_model import INDEX, MODELS_DIR
from pFedHN.server import build_strategy
from pFedHN.settings import Settings
from tests.conftest import PC, SMALL, TINY_OVERRIDES, compose_config

SHORT = ["num_clients=4", "num_rounds=8", "eval_every=2", "client.inner_steps=5"]


def exported_test_accuracies(run_dir, settings, models_dir=None):
    """Each exported client model's accuracy on its own test split, computed here."""
    index = json.loads(((models_dir or run_dir / MODELS_DIR) / INDEX).read_text())
    data = federated_data(data_spec(settings), settings.dataset.root, settings.split)
    accuracies = {}
    for client in index["clients"]:
        model = load_client_model(run_dir, int(client), models_dir)
        assert not model.training
        images, labels = data[int(client)].test_x, data[int(client)].test_y
        with torch.inference_mode():
            correct = (model(images.float() / 255).argmax(1) == labels).sum().item()
        accuracies[int(client)] = correct / len(labels)
    return index, accuracies


def recorded(run_dir, server_round):
    """The run's own per-client test accuracies at ``server_round`` (results.json)."""
    results = json.loads((run_dir / "results.json").read_text())
    (evaluation,) = [e for e in results["evaluations"] if e["round"] == server_round]
    return {int(c): m["test_acc"] for c, m in evaluation["per_client"].items()}


@pytest.fixture
def pc(pc_run):
    """The short pFedHN-PC run (conftest), its settings and results; its clients' heads
    live only in their state."""
    results = json.loads((pc_run / "results.json").read_text())
    return pc_run, prepare(compose_config(SMALL + PC)), results


@pytest.mark.simulation
def test_export_pc_models_with_their_heads_score_what_the_run_recorded(pc):
    run_dir, settings, results = pc
    for which, server_round in (("best", results["best_round"]), ("last", 24)):
        export(run_dir, which)
        index, accuracies = exported_test_accuracies(run_dir, settings)
        assert {e["round"] for e in index["clients"].values()} == {server_round}
        assert accuracies == recorded(run_dir, server_round)  # exactly, client by client
        assert all(e["head"] == {"in": 84, "out": 10} for e in index["clients"].values())
    # Weights only: the files are plain state dicts, the head's among them.
    state = torch.load(run_dir / MODELS_DIR / "client_3.pt", weights_only=True)
    assert {"head.fc.weight", "standardize.mean", "network.conv1.weight"} <= set(state)


@pytest.mark.simulation
def test_export_takes_each_pc_head_as_its_client_last_trained_it(pc):
    """Not the head a client starts with: the one in its state at the exported round."""
    run_dir, settings, _ = pc
    export(run_dir, "last")
    for client in range(4):
        head = load_client_model(run_dir, client).head
        kept = kept_state(run_dir / STATE_DIR, client, 24)["head"]
        assert torch.equal(head.fc.weight, kept["fc.weight"])
        untrained = initial_head(84, 10, settings.seed, client)
        assert not torch.equal(head.fc.weight, untrained.fc.weight)


@pytest.mark.simulation
def test_export_command_line_and_its_bad_input(pc, tmp_path, capsys):
    run_dir, _, results = pc
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.yaml").write_text((run_dir / "config.yaml").read_text() + "bogus: 1\n")
    main([str(run_dir), "round=best", "clients=1,3"])
    assert f"2 client models of round best ({results['best_round']})" in capsys.readouterr().out
    index = json.loads((run_dir / MODELS_DIR / INDEX).read_text())
    assert sorted(index["clients"]) == ["1", "3"] and index["variant"] == "pFedHN-PC"
    bad = {
        (str(tmp_path / "nowhere"),): "no such run directory",
        (str(tmp_path),): "not a run directory (no config.yaml)",
        (str(odd),): "not a config of this version of pFedHN (Key 'bogus' is not in struct",
        (str(run_dir), "round=worst"): "round=worst: choose best or last",
        (str(run_dir), "clients=2,9"): "clients=9: this run has clients 0-3",
        (str(run_dir), "clients=seven"): "clients=seven: give all or partition ids",
        (str(run_dir), "epoch=3"): "epoch=3: expected round=best|last",
        (): "usage: python -m pFedHN.export <run dir>",
    }
    for argv, message in bad.items():
        with pytest.raises(SystemExit) as stop:
            main(list(argv))
        assert str(stop.value).startswith("error: ") and message in str(stop.value)


@pytest.mark.simulation
def test_export_of_a_run_without_best_state_offers_round_last(pc, tmp_path):
    run_dir, settings, _ = pc
    older = tmp_path / "older"
    shutil.copytree(run_dir, older, ignore=shutil.ignore_patterns(checkpoint.BEST_DIR))
    # Nor did its config know the keys added since: they take their defaults.
    config = (older / "config.yaml").read_text()
    (older / "config.yaml").write_text(config.replace("  max_restarts: 3\n", ""))
    assert "max_restarts" not in (older / "config.yaml").read_text()
    with pytest.raises(ExportError, match="older version.*round=last"):
        export(older, "best")
    export(older, "last")
    _, accuracies = exported_test_accuracies(older, settings)
    assert accuracies == recorded(older, 24)


@pytest.mark.simulation
def test_export_loader_refuses_a_tampered_index_or_file(pc, tmp_path):
    run_dir, _, _ = pc
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    export(copy, "last", clients=[0, 1])
    index_path = copy / MODELS_DIR / INDEX
    index = json.loads(index_path.read_text())
    # Another network than the weights were made for.
    index["clients"]["0"]["network"]["kwargs"]["n_kernels"] = 16
    # A file that is not the one exported.
    weights = torch.load(copy / MODELS_DIR / "client_1.pt", weights_only=True)
    weights["head.fc.bias"] += 1
    torch.save(weights, copy / MODELS_DIR / "client_1.pt")
    index_path.write_text(json.dumps(index))
    with pytest.raises(ExportError, match="does not load as the network"):
        load_client_model(copy, 0)
    with pytest.raises(ExportError, match="not the file index.json names"):
        load_client_model(copy, 1)
    with pytest.raises(ExportError, match="no model of client 2; exported: 0, 1"):
        load_client_model(copy, 2)
    with pytest.raises(ExportError, match="no index.json"):
        load_client_model(tmp_path, 0)


def test_export_keeps_the_best_rounds_state_and_prunes_what_no_resume_needs(tmp_path):
    """The state of a round is saved when it becomes the best, and dropped once superseded
    by a checkpoint; a resume forgets best rounds it will evaluate again."""
    settings = Settings.from_config(compose_config(TINY_OVERRIDES + SHORT +
                                                   ["checkpoint_every=2"]))
    experiment = start_experiment(settings, tmp_path)
    strategy = experiment.strategy

    def evaluate(server_round, val_acc):
        metrics = {k: 0.5 for k in ("test_acc", "val_loss", "test_acc_min", "test_acc_max")}
        strategy.evaluation.on_evaluate(server_round, metrics | {"val_acc": val_acc}, {})

    def hnet_at(server_round):
        return checkpoint.load_best(tmp_path, settings, server_round)["model"]["hnet"]

    evaluate(0, 0.1)
    for parameter in strategy.core.hnet.parameters():
        parameter.data += 1.0  # training moved the hypernetwork
    evaluate(2, 0.3)
    snapshot = {k: v.clone() for k, v in strategy.core.hnet.state_dict().items()}
    for parameter in strategy.core.hnet.parameters():
        parameter.data += 1.0
    evaluate(4, 0.3)  # a tie: the first round stays the best
    evaluate(6, 0.2)
    assert checkpoint.best_rounds(tmp_path) == [0, 2]
    assert all(torch.equal(hnet_at(2)[k], v) for k, v in snapshot.items())
    assert not torch.equal(hnet_at(0)["embeddings.weight"], snapshot["embeddings.weight"])
    # Round 8's checkpoint: the one before it (its fallback, round 6) has seen rounds 0-4,
    # whose best is 2: round 0 is gone for good.
    strategy.on_fit(8, [{"partition-id": 0}], {})
    assert checkpoint.best_rounds(tmp_path) == [2]
    evaluate(8, 0.9)
    assert checkpoint.best_rounds(tmp_path) == [2, 8]
    # Resumed from round 8's checkpoint, which has seen rounds 0-6 only.
    resumed = start_experiment(settings.replace(resume=str(tmp_path)), tmp_path)
    assert checkpoint.best_rounds(tmp_path) == [2]
    assert resumed.recorder.evaluations[-1]["round"] == 6


def test_export_by_a_supernode_of_its_own_pc_model_after_the_last_round(tmp_path):
    """Deployment: the server never sees the head; the client writes its whole model."""
    settings = prepare(compose_config(TINY_OVERRIDES + SHORT + PC))
    strategy = build_strategy(settings)
    folder = tmp_path / "node1_models"
    context = Context(run_id=1, node_id=1, state=RecordDict(), run_config={},
                      node_config={"partition-id": 1, "model-dir": str(folder)})
    client = client_builder(settings)(context)
    theta = strategy.core.generate(1)
    client.fit(theta, {"server-round": 7})  # trains the head, kept in Context.state
    client.evaluate(theta, {"server-round": 7})
    assert not folder.exists()  # not the last round yet
    _, _, metrics = client_builder(settings)(context).evaluate(theta, {"server-round": 8})
    model = load_client_model(None, 1, folder)
    data = federated_data(data_spec(settings), settings.dataset.root, settings.split)[1]
    with torch.inference_mode():
        correct = (model(data.test_x.float() / 255).argmax(1) == data.test_y).sum().item()
    assert correct == metrics["test-correct"]
    entry = json.loads((folder / INDEX).read_text())["clients"]["1"]
    assert entry["round"] == 8 and entry["test_acc"] == correct / len(data.test_y)
    trained_head = LocalStore(context.state).load("head")
    assert torch.equal(model.head.fc.weight, trained_head["fc.weight"])
