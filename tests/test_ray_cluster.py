"""A Hydra multirun sweep on a Ray cluster that the test starts: a head and one worker node."""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from contextlib import closing
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import REPO, TINY_OVERRIDES

pytestmark = [pytest.mark.simulation, pytest.mark.cluster]

RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def ray_cluster():
    """A head node with no CPUs and a worker node with two: a client can only run on the
    worker. Each ``ray start`` gets its own process group, so that every daemon it
    leaves behind is killed afterwards, whatever the test did."""
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must be short
    address = f"127.0.0.1:{free_port()}"
    common = ["--temp-dir", temp_dir, "--disable-usage-stats",
              "--object-store-memory", str(100 * 2**20)]
    groups = []

    def start(*args: str) -> None:
        proc = subprocess.Popen([RAY, "start", *args, *common], start_new_session=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        groups.append(proc.pid)
        output, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, output

    try:
        start("--head", f"--port={address.split(':')[1]}", "--num-cpus=0",
              "--include-dashboard=false")
        start(f"--address={address}", "--num-cpus=2")
        yield address
    finally:
        for group in groups:
            try:
                os.killpg(group, signal.SIGKILL)
            except ProcessLookupError:
                pass
        subprocess.run(["rm", "-rf", temp_dir], check=False)


def test_a_multirun_sweep_runs_its_clients_on_the_cluster(ray_cluster, tmp_path):
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        [sys.executable, "-m", "pFedHN.main", "-m", "seed=1,2", *TINY_OVERRIDES,
         "num_clients=3", "num_rounds=4", "eval_every=2", "checkpoint_every=2",
         f"simulation.ray_address={ray_cluster}", f"hydra.sweep.dir={sweep}"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    seeds = set()
    for job in ("0", "1"):
        results = json.loads((sweep / job / "results.json").read_text())
        assert [e["round"] for e in results["evaluations"]] == [0, 2, 4]
        assert results["rounds_completed"] == 4
        assert all(e["clients_evaluated"] == 3 for e in results["evaluations"])
        config = OmegaConf.load(sweep / job / "config.yaml")
        assert config.simulation.num_cpus_per_client == 1  # fits the worker node
        seeds.add(config.seed)
    assert seeds == {1, 2}

    # The cluster itself knows both sweep jobs: they ran on it, not on a private Ray.
    probe = subprocess.run(
        [sys.executable, "-c",
         "import ray; from ray._private import state; "
         f"ray.init(address={ray_cluster!r}, logging_level='ERROR'); "
         "print(sum('pFedHN.main' in j.get('Entrypoint', '') for j in state.jobs()))"],
        capture_output=True, text=True, timeout=120,
    )
    assert int(probe.stdout.strip().splitlines()[-1]) >= 1, probe.stderr[-2000:]
