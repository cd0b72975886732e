"""Checkpoints: kill -9 and resume gives the uninterrupted run's results; bad ones refused."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pFedHN import checkpoint
from pFedHN.checkpoint import CheckpointError
from pFedHN.experiment import prepare, start_experiment, train
from pFedHN.server import build_strategy
from pFedHN.settings import Settings
from pFedHN.signals import RunStoppedError, StopRequest
from pFedHN.strategy import RoundsFailingError
from tests.conftest import REPO, SMALL, compose_config, main_command


def figures(run_dir):
    results = json.loads((run_dir / "results.json").read_text())
    keys = ("round", "val_acc", "test_acc", "val_loss", "test_loss", "test_acc_min")
    return ([{k: e[k] for k in keys} for e in results["evaluations"]],
            results["test_acc_at_best_val"], results["best_round"], results["final_test_acc"])


def wait_for_checkpoint(run_dir, at_least):
    """Block until ``run_dir``'s checkpoint is at round ``at_least`` or later."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        path = run_dir / checkpoint.FILENAME
        try:
            if torch.load(path, weights_only=False)["round"] >= at_least:
                return
        except (OSError, RuntimeError, EOFError):  # not there yet, or being replaced
            pass
        time.sleep(0.1)
    pytest.fail(f"no checkpoint at round {at_least}")


@pytest.mark.simulation
def test_killed_then_resumed_run_ends_like_an_uninterrupted_one(pc_run, tmp_path):
    """Also: Flower's own polling and Ray's own object-store threshold (the
    uninterrupted run) and the package's shorter polls and inline messages (the
    broken run, the defaults) give the same run."""
    broken = tmp_path / "broken"
    process = subprocess.Popen(main_command(broken), cwd=REPO, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_checkpoint(broken, 8)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the driver, Ray and its workers
        process.wait()
    killed_at = torch.load(broken / checkpoint.FILENAME, weights_only=False)["round"]
    assert 8 <= killed_at < 24
    # What the killed run wrote as it went includes the server's memory.
    memory = json.loads((broken / "results.json").read_text())["server_memory"]
    assert memory["peak_rss_bytes"] > memory["hypernetwork_bytes"] > 0

    resumed = subprocess.run(main_command(broken, f"resume={broken}"), cwd=REPO,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    print(f"killed at round {killed_at}; resumed vs uninterrupted: {figures(broken)[1:]} vs "
          f"{figures(pc_run)[1:]} (test_acc_at_best_val, best_round, final_test_acc)")
    assert figures(broken) == figures(pc_run)
    assert [e["round"] for e in figures(broken)[0]] == [0, 8, 16, 24]


@pytest.mark.simulation
@pytest.mark.parametrize("signum, to_group", [(signal.SIGTERM, False), (signal.SIGINT, True),
                                              (signal.SIGTERM, True)],
                         ids=["kill", "ctrl-c", "scheduler"])
def test_a_signal_stops_the_run_at_a_checkpoint_with_the_resume_line(pc_run, tmp_path, signum,
                                                                     to_group):
    """``kill PID`` and a terminal's Ctrl-C (SIGINT to the process group; Ray's processes
    block it): the round in flight finishes and is checkpointed; status 128 + the signal.
    A scheduler's SIGTERM to every process of the job also ends Ray's: the run stops at
    its newest checkpoint instead of restarting."""
    stopped = tmp_path / "stopped"
    process = subprocess.Popen(main_command(stopped), cwd=REPO, start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_checkpoint(stopped, 8)
        os.killpg(process.pid, signum) if to_group else process.send_signal(signum)
        output, _ = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 128 + signum, output[-3000:]
    line = [ln for ln in output.splitlines() if "resume with:" in ln][-1]
    saved = torch.load(stopped / checkpoint.FILENAME, weights_only=False)["round"]
    reached = re.search(r"stopped after round (\d+), with a checkpoint at round (\d+) in "
                        + re.escape(f"{stopped}; resume with: python -m pFedHN.main "), line)
    assert reached and int(reached[2]) == saved and line.endswith(f"resume={stopped}")
    if signum == signal.SIGTERM and to_group:
        assert "Restart" not in output
        if "the round in flight is lost" in output:  # it died with Ray's workers
            assert saved in (8, 16) and int(reached[1]) >= saved
        else:  # rarely: its visits were all back before the signal
            assert int(reached[1]) == saved
    else:
        assert int(reached[1]) == saved and 8 <= saved < 24
    assert f"{signal.Signals(signum).name}: stopped after round" in line
    if not to_group:  # the line's command ends the run as an unbroken one
        command = line.split("resume with: ")[1].split()
        resumed = subprocess.run([sys.executable, *command[1:]], cwd=REPO,
                                 capture_output=True, text=True, timeout=600)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert figures(stopped) == figures(pc_run)


def test_a_second_signal_ends_the_run_at_once(tmp_path):
    code = ("import os, signal, time\n"
            "from pFedHN.signals import StopRequest, stop_on_signals\n"
            "with stop_on_signals(StopRequest()) as stop:\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    time.sleep(0.5)\n"
            "    assert stop.signum == signal.SIGTERM\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    time.sleep(5)\n"
            "print('not stopped')\n")
    ended = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                           text=True, timeout=60)
    assert ended.returncode == 143 and "not stopped" not in ended.stdout
    assert "SIGTERM again: ending at once" in ended.stderr


def test_clients_lost_after_a_stop_signal_stop_the_run_at_its_checkpoint_not_restart_it(
        tmp_path, monkeypatch):
    """A scheduler signals every process of the job: Ray's die with the round in flight.
    The run then ends as stopped, at its newest checkpoint, instead of restarting."""
    settings = prepare(compose_config(SMALL + ["simulation.restart_backoff_s=0"]))
    stop = StopRequest()
    experiment = start_experiment(settings, tmp_path, stop=stop)
    experiment.saved_round = 8
    experiment.recorder.progress.update(11)
    simulations = []

    def simulate(*args, **kwargs):
        simulations.append(args)
        stop.signum = signal.SIGTERM  # arrives while the round is in flight
        raise RoundsFailingError("round 12 lost the visits of clients [2]: actor died")

    monkeypatch.setattr("pFedHN.experiment.simulate", simulate)
    with pytest.raises(RunStoppedError, match="SIGTERM: stopped after round 11, with a "
                                              "checkpoint at round 8") as stopped:
        train(settings, experiment)
    assert len(simulations) == 1 and stopped.value.exit_code == 143
    assert stopped.value.saved == 8 and stopped.value.run_dir == tmp_path
    assert experiment.recorder.restarts == []

    def send_unusable_updates(*args):  # a failure of the clients' own, signal or not
        raise RoundsFailingError("round 12: client 2's delta_theta has 3 tensors", redo=False)

    monkeypatch.setattr("pFedHN.experiment.simulate", send_unusable_updates)
    with pytest.raises(RoundsFailingError, match="delta_theta has 3 tensors"):
        train(settings, experiment)


def client_workers(session):
    """The Ray workers running ClientApps in process group ``session``."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and os.getpgid(int(entry.name)) == session and \
                    (entry / "cmdline").read_bytes().startswith(b"ray::ClientAppActor"):
                found.append(int(entry.name))
        except (OSError, ProcessLookupError):
            continue
    return found


@pytest.mark.simulation
def test_a_run_whose_workers_are_killed_restarts_itself_and_ends_like_an_unbroken_one(
        pc_run, tmp_path):
    """kill -9 of the clients' Ray workers (as the OOM killer does), twice in one run:
    the run restarts its simulation from its checkpoint by itself, each time."""
    healed = tmp_path / "healed"
    process = subprocess.Popen(
        main_command(healed, "simulation.restart_backoff_s=0"),
        cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True)
    try:
        for at_round in (8, 16):
            wait_for_checkpoint(healed, at_round)
            workers = client_workers(process.pid)
            assert workers, "no ClientAppActor process found"
            for pid in workers:
                os.kill(pid, signal.SIGKILL)
        _, stderr = process.communicate(timeout=600)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 0, stderr[-3000:]
    assert figures(healed) == figures(pc_run)
    restarts = json.loads((healed / "results.json").read_text())["restarts"]
    assert [r["resumed_from"] for r in restarts] == [8, 16]
    # The round in flight lost its visits, retries included, and was not kept.
    assert all("lost the visits of clients" in r["reason"] for r in restarts)


def small_settings(*overrides: str) -> Settings:
    return Settings.from_config(compose_config(SMALL + list(overrides)))


@pytest.fixture
def saved_run(tmp_path):
    cfg = small_settings()
    strategy = build_strategy(cfg)
    checkpoint.save(tmp_path, cfg, 10, strategy=strategy.state_dict(10),
                    recorder={"evaluations": [], "failed_rounds": [], "client_failures": [],
                              "rounds_completed": 10,
                              "wall_time_s": 1.0})
    return tmp_path, cfg


@pytest.mark.parametrize("override", [
    "num_clients=5", "model.n_kernels=8", "dataset.data=cifar10", "seed=3",
    "client.partition=authors", "client.partition=dirichlet", "client.dirichlet_alpha=0.1",
    "dataset.local_test_share=0.25", "dataset.val_size=400", "model.target=conv4",
    "model.architectures=vgg8-16", "server.lr=0.005", "server.optimizer=adam",
    "client.inner_steps=7", "client.epochs=1", "novel.num_clients=2",
])
def test_checkpoint_of_another_experiment_is_refused_naming_the_setting(saved_run, override):
    run_dir, _ = saved_run
    key, value = override.split("=")
    with pytest.raises(CheckpointError, match=rf"{key}: checkpoint .*, config .*{value}"):
        checkpoint.load(run_dir, small_settings(override))


@pytest.mark.parametrize("override", [
    "num_rounds=48", "eval_every=4", "checkpoint_every=4", "dataset.root=/elsewhere",
    "dataset.download=true", "device=cpu", "simulation.num_cpus_per_client=1",
    "server.round_timeout=60", "novel.rounds=7", "novel.lr=0.5",
    # the novel phase's settings: one trained run serves every novel setting
    "novel.optimizer=adam", "novel.eval_every=5", "novel.dirichlet_alpha=0.1",
    "server.node_timeout=30", "simulation.poll_interval=null", "server.max_failed_rounds=9",
    "server.visit_retries=0", "server.accept_lost_visits=true",
])
def test_checkpoint_identity_leaves_out_run_length_places_and_hardware(saved_run, override):
    run_dir, _ = saved_run
    assert checkpoint.load(run_dir, small_settings(override))["round"] == 10


def test_checkpoint_identity_of_an_older_version_checks_what_it_recorded(saved_run, caplog):
    run_dir, cfg = saved_run
    payload = torch.load(run_dir / checkpoint.FILENAME, weights_only=False)
    payload["identity"] = {k: payload["identity"][k] for k in ("num_clients", "seed")}
    torch.save(payload, run_dir / checkpoint.FILENAME)
    with pytest.raises(CheckpointError, match="seed"):
        checkpoint.load(run_dir, small_settings("seed=5"))
    assert checkpoint.load(run_dir, small_settings("server.lr=5e-3"))["round"] == 10
    assert "does not record" in caplog.text and "server.lr" in caplog.text


def test_corrupt_or_missing_checkpoint_is_refused(saved_run, tmp_path):
    run_dir, cfg = saved_run
    payload = checkpoint.load(run_dir, cfg)  # the good one loads
    assert payload["round"] == 10 and "hnet" in payload["strategy"]
    (run_dir / checkpoint.FILENAME).write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt"):
        checkpoint.load(run_dir, cfg)
    with pytest.raises(CheckpointError, match="no checkpoint.pt"):
        checkpoint.load(tmp_path / "elsewhere", cfg)


def test_a_damaged_checkpoint_falls_back_on_the_one_before_it(saved_run, caplog):
    run_dir, cfg = saved_run
    strategy = build_strategy(cfg)
    recorder = {"evaluations": [], "failed_rounds": [], "client_failures": [],
                "rounds_completed": 20, "wall_time_s": 2.0}
    checkpoint.save(run_dir, cfg, 20, strategy=strategy.state_dict(20), recorder=recorder)
    latest, previous = run_dir / checkpoint.FILENAME, run_dir / checkpoint.TRAINING.previous
    assert checkpoint.load(run_dir, cfg)["round"] == 20
    assert torch.load(previous, weights_only=False)["round"] == 10  # the last two are kept
    for damage in (lambda: latest.write_bytes(latest.read_bytes()[:1000]),  # truncated
                   latest.unlink):  # killed between the two renames of a save
        damage()
        assert checkpoint.load(run_dir, cfg)["round"] == 10
        assert f"falling back on {previous.name} (round 10)" in caplog.text
        caplog.clear()
    previous.write_bytes(b"not a checkpoint either")
    with pytest.raises(CheckpointError, match="previous.pt is corrupt"):
        checkpoint.load(run_dir, cfg)
    # Another experiment's checkpoint is refused, not passed over for an older one.
    checkpoint.save(run_dir, cfg, 30, strategy=strategy.state_dict(30), recorder=recorder)
    checkpoint.save(run_dir, small_settings("seed=3"), 40,
                    strategy=strategy.state_dict(40), recorder=recorder)
    with pytest.raises(CheckpointError, match="another experiment"):
        checkpoint.load(run_dir, cfg)


def test_strategy_state_round_trips(saved_run):
    run_dir, cfg = saved_run
    fresh = build_strategy(small_settings("seed=3"))  # other initial weights
    fresh.load_state_dict(checkpoint.load(run_dir, cfg)["strategy"])
    assert fresh.schedule.start_round == 10
    reference = build_strategy(cfg)
    for a, b in zip(fresh.core.hnet.parameters(), reference.core.hnet.parameters(), strict=True):
        assert torch.equal(a, b)
    assert fresh.schedule.rng.integers(1000) == reference.schedule.rng.integers(1000)


def test_a_round_without_updates_writes_no_checkpoint_and_enough_in_a_row_stop_the_run(
        tmp_path):
    settings = small_settings("checkpoint_every=1", "server.max_failed_rounds=2",
                              "server.accept_lost_visits=true")
    strategy = start_experiment(settings, tmp_path).strategy

    def play(server_round, updated):
        # what aggregate_fit leaves for end_round: the metrics of the clients that updated
        strategy.log.exchange(0.0, 0, 0, [{"train_loss": 1.0, "steps": 3}] if updated else [])
        strategy.end_round(server_round)
        return checkpoint.load(tmp_path, settings)["round"]

    assert play(1, True) == 1
    assert play(2, False) == 1  # no update, no checkpoint
    assert play(3, True) == 3  # an update ends the streak
    assert play(4, False) == 3
    with pytest.raises(RoundsFailingError, match=r"rounds 4-5: .*server\.max_failed_rounds=2"):
        play(5, False)
    assert checkpoint.load(tmp_path, settings)["round"] == 3
    assert json.loads((tmp_path / "results.json").read_text())["failed_rounds"] == [2, 4, 5]
