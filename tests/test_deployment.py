"""Flower's deployment engine: a SuperLink and SuperNodes with TLS and SuperNode
authentication on 127.0.0.1, the package's apps run unchanged with ``flwr run``."""

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import pytest
import torch

from pFedHN.config import compose_config
from pFedHN.credentials import make_credentials
from pFedHN.experiment import run
from pFedHN.export import ExportError, export, load_client_model
from tests.conftest import REPO, TINY_MNIST, write_image_folder

# Its tests must not run beside each other: `flwr run .` starts Flower's managed local
# SuperLink on fixed ports. pytest-xdist's `--dist loadfile` keeps a module on one worker.
pytestmark = pytest.mark.deployment

BIN = Path(sys.executable).parent
# Images only the SuperNodes can see: a relative root, found in their working directory.
FOLDER_OVERRIDES = ("dataset.data=folder dataset.root=images dataset.image_size=28 "
                    "model.in_channels=3 model.out_dim=6 model.n_kernels=7 model.n_hidden=1 "
                    "dataset.val_size=60 num_clients=3 num_rounds=2 eval_every=2 "
                    "client.inner_steps=10")
OVERRIDES = (f"dataset.data=mnist model.n_kernels=7 model.in_channels=1 model.n_hidden=1 "
             f"dataset.root={TINY_MNIST} dataset.download=false dataset.val_size=500 "
             "num_clients=3 num_rounds=2 eval_every=2 client.inner_steps=10")


def free_port() -> int:
    with closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Processes:
    """Flower's processes, each in its own process group, all killed at the end."""

    def __init__(self, root: Path) -> None:
        self.root = root
        # The SuperLink and SuperNodes start Flower's other programs from PATH.
        self.env = os.environ | {"FLWR_HOME": str(root / "flwr_home"),
                                 "XDG_CACHE_HOME": str(root / "cache"),
                                 "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.started: list[subprocess.Popen] = []

    def start(self, name: str, *command: str, cwd: Path | None = None) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "w")  # noqa: SIM115 - closed by the OS at exit
        process = subprocess.Popen([str(BIN / command[0]), *command[1:]], env=self.env,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                   cwd=cwd)
        self.started.append(process)
        return process

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text()

    def wait_for(self, name: str, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log(name):
            if time.monotonic() > deadline:
                pytest.fail(f"{name} never logged {text!r}:\n{self.log(name)[-2000:]}")
            time.sleep(0.2)

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "flwr"), *args], env=self.env, cwd=REPO,
                              capture_output=True, text=True, timeout=timeout)

    def kill_all(self) -> None:
        """Kill every process started here and all they started, detached ones too
        (Flower starts its SuperExec in a new session, told its parent's pid, and
        ``flwr run`` its managed local SuperLink, whose log lies under our FLWR_HOME)."""
        doomed = family({p.pid for p in self.started} | mentioning(str(self.root)))
        for pid in doomed:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for process in self.started:
            process.wait()


def mentioning(text: str) -> set[int]:
    """Processes whose command line contains ``text``."""
    found = set()
    for entry in Path("/proc").iterdir():
        try:
            if text.encode() in (entry / "cmdline").read_bytes():
                found.add(int(entry.name))
        except (ValueError, OSError):
            continue
    return found


def family(roots: set[int]) -> set[int]:
    """``roots`` and their descendants, including those given ``--parent-pid <root>``."""
    parent, command = {}, {}
    for entry in Path("/proc").iterdir():
        try:
            parent[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            command[int(entry.name)] = (entry / "cmdline").read_bytes().split(b"\0")
        except (ValueError, OSError):
            continue
    found, grew = set(roots), True
    while grew:
        more = {pid for pid, ppid in parent.items() if ppid in found}
        more |= {pid for pid, argv in command.items()
                 if any(argv[i] == b"--parent-pid" and argv[i + 1].decode() in map(str, found)
                        for i in range(len(argv) - 1))}
        grew = not more <= found
        found |= more
    return found


@pytest.fixture
def processes(tmp_path):
    procs = Processes(tmp_path)
    try:
        yield procs
    finally:
        procs.kill_all()


def test_deploy_folder_data_on_a_secure_federation_the_server_without_images_and_unlisted_nodes_refused(  # noqa: E501
    processes, tmp_path
):
    """pFedHN on image folders that only the SuperNodes hold: the SuperLink (and
    its ServerApp) runs in a directory without them, and still builds the run."""
    started = time.monotonic()
    link_dir, node_dir = tmp_path / "superlink_machine", tmp_path / "supernode_machine"
    link_dir.mkdir()
    write_image_folder(node_dir / "images", classes=tuple("abcdef"), per_class=(70, 20), step=30,
                       size=28)
    credentials = tmp_path / "credentials"
    make_credentials(credentials, supernodes=4, hosts=["127.0.0.1", "localhost"])
    ca = str(credentials / "ca.crt")
    superlink = f"127.0.0.1:{free_port()}"

    processes.start("superlink", "flower-superlink", "--ssl-ca-certfile", ca,
                    "--ssl-certfile", str(credentials / "superlink.pem"),
                    "--ssl-keyfile", str(credentials / "superlink.key"),
                    "--enable-supernode-auth", "--disable-runtime-dependency-installation",
                    "--port", superlink.split(":")[1], cwd=link_dir)
    processes.wait_for("superlink", "Uvicorn running on https://")
    home = tmp_path / "flwr_home"
    home.mkdir(exist_ok=True)
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "secure"\n\n[superlink.secure]\n'
        f'address = "{superlink}"\nroot-certificates = "{ca}"\n'
    )
    for i in range(3):  # the fourth key stays unlisted
        registered = processes.cli("supernode", "register", str(credentials / f"supernode_{i}.pub"),
                                   "secure")
        assert registered.returncode == 0, registered.stdout + registered.stderr

    def supernode(i: int) -> subprocess.Popen:
        return processes.start(
            f"supernode{i}", "flower-supernode", "--root-certificates", ca,
            "--superlink", superlink, "--port", str(free_port()),
            "--auth-supernode-private-key", str(credentials / f"supernode_{i}"),
            "--node-config", f"partition-id={i} model-dir='models_{i}'", cwd=node_dir,
        )

    for i in range(3):
        supernode(i)
    intruder = supernode(3)
    assert intruder.wait(timeout=120) != 0
    assert "Failed to activate SuperNode" in processes.log("supernode3")

    run_dir = tmp_path / "run"
    run = processes.cli("run", ".", "secure", "--stream", "--run-config",
                        f"overrides='{FOLDER_OVERRIDES}' run-dir='{run_dir}'", timeout=600)
    # flwr run exits 0 even when the ServerApp failed: its log says why.
    assert run.returncode == 0 and (run_dir / "results.json").exists(), \
        (run.stdout + run.stderr)[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["rounds_completed"] == 2 and results["failed_rounds"] == []
    assert [e["round"] for e in results["evaluations"]] == [0, 2]
    assert all(e["clients_evaluated"] == 3 for e in results["evaluations"])
    assert (run_dir / "checkpoint.pt").exists()
    assert results["evaluations"][-1]["test_acc"] > 1 / 6  # the classes are learnable
    assert not (link_dir / "images").exists()
    # Each SuperNode wrote its own model of the last round, as the run evaluated it; the
    # server, without the images its clients measured their normalisation on, cannot.
    for i in range(3):
        index = json.loads((node_dir / f"models_{i}" / "index.json").read_text())
        recorded = results["evaluations"][-1]["per_client"][str(i)]
        assert index["clients"][str(i)]["test_acc"] == recorded["test_acc"]
        assert index["round"] == 2
        load_client_model(None, i, node_dir / f"models_{i}")
    with pytest.raises(ExportError, match="measured on their images"):
        export(run_dir, "last")
    # Each SuperNode decoded its partition once; later messages read it from disk.
    cached = sorted(p.name.split("-")[0] for p in (tmp_path / "cache" / "pfedhn").iterdir())
    assert cached == ["partition0", "partition1", "partition2"]
    print(f"deployment test took {time.monotonic() - started:.0f} s")


def test_flwr_run_local_simulation_with_enough_nodes_trains_and_too_few_nodes_stop_it(
    processes, tmp_path
):
    """The README's ``flwr run .`` recipe: Flower's managed local SuperLink, the
    federation sized with --federation-config, no second torch installed; and a
    federation smaller than num_clients stops the run instead of waiting for ever."""
    processes.env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    run_dir = tmp_path / "run"
    run = processes.cli("run", ".", "--stream", "--federation-config", "num-supernodes=3",
                        "--run-config", f"overrides='{OVERRIDES}' run-dir='{run_dir}'",
                        timeout=300)
    assert (run_dir / "results.json").exists(), (run.stdout + run.stderr)[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["rounds_completed"] == 2
    assert all(e["clients_evaluated"] == 3 for e in results["evaluations"])
    # The managed SuperLink's SuperExec would be told to install the app's
    # dependencies (a second torch) with this flag.
    local_flower = [Path(f"/proc/{pid}/cmdline").read_bytes()
                    for pid in family(mentioning(str(tmp_path)))]
    assert any(b"flower-superexec" in argv for argv in local_flower)
    assert not any(b"--allow-runtime-dependency-installation" in argv for argv in local_flower)

    small_dir = tmp_path / "too_small"
    started = time.monotonic()
    run = processes.cli("run", ".", "--stream", "--federation-config", "num-supernodes=2",
                        "--run-config", f"overrides='{OVERRIDES} server.node_timeout=2' "
                        f"run-dir='{small_dir}'", timeout=120)
    assert "needs 3 Flower nodes" in run.stdout + run.stderr, (run.stdout + run.stderr)[-3000:]
    assert "has 2" in run.stdout + run.stderr
    assert not (small_dir / "results.json").exists()
    assert time.monotonic() - started < 100


def test_flwr_stop_leaves_a_checkpoint_at_the_last_round_and_a_resume_that_ends_like_an_unbroken_run(  # noqa: E501
    processes, tmp_path
):
    """``flwr stop`` mid-run: the round in flight ends at a checkpoint, results.json
    lists the stop with the exact ``flwr run`` that resumes it, and that run ends
    with the figures of an unbroken ``python -m pFedHN.main`` run."""
    processes.env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    overrides = OVERRIDES.replace("num_rounds=2 eval_every=2", "eval_every=10 checkpoint_every=4")
    run_dir = tmp_path / "run"
    started = processes.cli("run", ".", "--federation-config", "num-supernodes=3",
                            "--run-config", f"overrides='{overrides} num_rounds=300' "
                            f"run-dir='{run_dir}'", timeout=120)
    run_id = started.stdout.split("Successfully started run")[-1].split()[0]
    deadline = time.monotonic() + 240
    while not (run_dir / "checkpoint.previous.pt").exists():  # two checkpoints: round 8
        assert time.monotonic() < deadline, started.stdout + started.stderr
        time.sleep(0.2)
    stopped = processes.cli("stop", run_id)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    while not json.loads((run_dir / "results.json").read_text()).get("stops"):
        assert time.monotonic() < deadline, "the stop was never recorded"
        time.sleep(0.5)
    [stop] = json.loads((run_dir / "results.json").read_text())["stops"]
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=False)["round"]
    assert 8 <= saved == stop["checkpoint_round"] == stop["round"] < 300
    assert f"resume={run_dir}'" in stop["resume"] and "num_rounds=300" in stop["resume"]

    # The line as a user runs it, on this federation, for 20 rounds instead of 300.
    command = stop["resume"].replace("<your federation>", "--stream --federation-config "
                                     "num-supernodes=3").replace("num_rounds=300", "num_rounds=20")
    subprocess.run(["bash", "-c", command.replace("flwr ", f"{BIN / 'flwr'} ", 1)],
                   env=processes.env, cwd=REPO, capture_output=True, timeout=300)
    resumed = json.loads((run_dir / "results.json").read_text())
    unbroken = run(compose_config(shlex.split(overrides) + ["num_rounds=20"]),
                   tmp_path / "unbroken")
    assert resumed["rounds_completed"] == 20 and resumed["stops"] == [stop]
    figures = [[(e["round"], e["test_acc"], e["val_loss"]) for e in r["evaluations"]]
               for r in (resumed, unbroken)]
    assert figures[0] == figures[1]
