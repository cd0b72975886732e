"""The benchmark scripts run end to end and write what the README's tables are made of."""

import json
import subprocess
import sys

import pytest
import yaml

from pFedHN import checkpoint
from pFedHN.config import compose_config, data_spec
from pFedHN.dataset import federated_data
from pFedHN.experiment import prepare
from pFedHN.networks import client_architectures
from pFedHN.server import build_strategy
from pFedHN.zoo import make_client_model
from tests.conftest import REPO, TINY_OVERRIDES

FIGURES = ("plain_round_s", "flower_round_s", "evaluation_round_s", "full_protocol_estimate_s")


@pytest.mark.simulation
def test_round_cost_writes_its_figures_without_machine_paths_and_renders_a_row(tmp_path):
    figures_file, page = tmp_path / "cost.json", tmp_path / "page.md"
    script = [sys.executable, str(REPO / "benchmarks" / "round_cost.py")]
    subprocess.run([*script, "--rounds", "6", "--json", str(figures_file), *TINY_OVERRIDES,
                    "device=cpu"], cwd=tmp_path, check=True, capture_output=True, timeout=600)

    figures = json.loads(figures_file.read_text())
    assert all(figures[key] > 0 for key in FIGURES)
    evaluations = len(range(0, 5000, 30)) + 1  # the protocol: every 30 rounds and the last
    assert figures["full_protocol_estimate_s"] == pytest.approx(
        5000 * figures["flower_round_s"] + evaluations * figures["evaluation_round_s"])
    assert figures["flower_over_plain"] == pytest.approx(
        figures["flower_round_s"] / figures["plain_round_s"])
    assert figures["plain_repeats_bit_for_bit"] is True
    assert figures["settings"]["inline_bytes"] == 4 * 2**20
    assert "dataset.root=<tiny_mnist>" in figures["settings"]["overrides"]
    assert str(REPO) not in figures_file.read_text()

    page.write_text("before\n<!-- round_cost:start -->\nold row\n<!-- round_cost:end -->\nafter\n")
    subprocess.run([*script, "--render", str(figures_file), "--into", str(page)], cwd=tmp_path,
                   check=True, capture_output=True, timeout=120)
    text = page.read_text()
    assert text.startswith("before\n") and text.endswith("after\n") and "old row" not in text
    assert ("`cost.json` (10 clients, 6 rounds, poll_interval 0.01, inline_bytes 4194304)"
            in text)
    assert f"| {figures['flower_over_plain']:.2f} |" in text


def mh_run_dir(run_dir, overrides):
    """A run directory as an MH-pFedHNGD run leaves it, its checkpoint written directly."""
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    settings = prepare(compose_config(overrides))
    strategy = build_strategy(settings)
    if settings.variant.multi_head:  # the sizes its clients would report
        sizes = [sum(p.numel() for p in make_client_model(name, 1, 10, 28).parameters())
                 for name in client_architectures(settings)]
        strategy.core = strategy.make_core(sizes)
    checkpoint.save(run_dir, settings, 1, strategy=strategy.state_dict(1), recorder={})
    return settings


def test_clip_check_counts_every_step_and_visit_and_what_the_clip_would_shorten(tmp_path):
    tight = ["client.clip_norm=1e-4", "server.clip_norm=1e-6"]  # every step, every visit
    settings = mh_run_dir(tmp_path / "run", TINY_OVERRIDES + [
        "algorithm=mh_pfedhngd", "num_clients=3",
        "model.architectures=[mh-cnn,mh-vgg8,mh-resnet10]", *tight])
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "clip_check.py"),
                    str(tmp_path / "run"), "--json", str(tmp_path / "clip.json")],
                   cwd=tmp_path, check=True, capture_output=True, timeout=600)
    figures = json.loads((tmp_path / "clip.json").read_text())
    data = federated_data(data_spec(settings), settings.dataset.root, settings.split)
    batches = sum(-(-len(data[i].train_y) // settings.client.batch_size) for i in range(3))
    initial, saved = figures["global_phase"]["round 0"], figures["global_phase"]["round 1"]
    assert initial == saved  # the saved hypernetwork is the run's initial one, rebuilt alike
    assert saved["steps"] == saved["clipped"] == batches and saved["largest_grad_norm"] > 1e-4
    for start in ("trained embedding", "fresh embedding"):
        found = figures["novel_phase"][start]
        assert found["visits"] == found["above_clip"] == 3
        assert 1e-6 < found["median_norm"] <= found["largest_norm"]


def test_clip_check_refuses_a_run_without_several_architectures(tmp_path):
    mh_run_dir(tmp_path / "run", TINY_OVERRIDES)  # pFedHN
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "clip_check.py"),
                           str(tmp_path / "run")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode != 0 and "algorithm=mh_pfedhn" in done.stderr


def test_server_visit_times_both_gradients_and_finds_them_equal(tmp_path):
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "server_visit.py"), "--visits",
                    "2", "--json", str(tmp_path / "visit.json")],
                   cwd=tmp_path, check=True, capture_output=True, timeout=600)
    figures = json.loads((tmp_path / "visit.json").read_text())
    assert figures["clients"] == 50 and figures["hypernetwork_parameters"] == 30_801_920
    assert figures["largest_gradient_difference"] < 1e-6
    assert figures["autograd_over_written_out"] == pytest.approx(
        figures["autograd_gradient_s"] / figures["written_out_gradient_s"])
    assert figures["visit_s"] > figures["written_out_gradient_s"] > 0


def test_client_threads_times_each_network_at_each_thread_count(tmp_path):
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "client_threads.py"),
                    "--networks", "mh-cnn", "mh-vgg8", "--threads", "1", "2",
                    "--blocks", "2", "--steps", "1", "--json", str(tmp_path / "threads.json")],
                   cwd=tmp_path, check=True, capture_output=True, timeout=600)
    figures = json.loads((tmp_path / "threads.json").read_text())
    assert sorted(figures["networks"]) == ["mh-cnn", "mh-vgg8"]
    for network in figures["networks"].values():
        one, two = network["median_step_s"]["1"], network["median_step_s"]["2"]
        assert one > 0 and two > 0
        assert network["ratio_to_first"]["2"] == pytest.approx(two / one)
        assert network["ratio_to_first"]["1"] == 1.0
