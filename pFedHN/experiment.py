"""One experiment: its settings prepared, its server side started, trained, the novel phase.

``run`` is what ``python -m pFedHN.main`` does with a composed config (on
Flower's simulation engine); the deployment apps and the benchmarks use its
parts (``prepare``, ``start_experiment``).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Context
from flwr.server import ServerApp, ServerAppComponents
from flwr.simulation import run_simulation
from omegaconf import DictConfig

from pFedHN import checkpoint
from pFedHN.checkpoint import CheckpointError
from pFedHN.client import (
    NOVEL_STATE_DIR,
    STATE_DIR,
    discard_state_after,
    kept_state,
    make_client_app,
)
from pFedHN.config import (
    check_split,
    client_resources,
    describe_split,
    load_settings,
    ray_init_args,
    split_with_labels,
)
from pFedHN.dataset import describe_summary, ensure_available
from pFedHN.device import configure_torch, resolve_device
from pFedHN.files import write_json_atomic
from pFedHN.networks import network_names
from pFedHN.novel import distribution_shift, novel_summary, plot_novel
from pFedHN.polling import flower_polling
from pFedHN.recorder import RunRecorder, summarize
from pFedHN.server import build_strategy, server_components
from pFedHN.settings import Settings
from pFedHN.signals import RunStoppedError, StopRequest, stop_on_signals
from pFedHN.strategy import PFedHNStrategy, RoundsFailingError

log = logging.getLogger(__name__)

NOVEL_PHASE = "the novel clients' "  # how a stop names the novel phase's rounds


def prepare(cfg: DictConfig, check_data: bool = True) -> Settings:
    """The run's settings: validated, paths and defaults fixed, the data checked.

    All before any work. ``check_data=False``: a deployed server, whose machine
    holds no client data.
    """
    def absolute(path: str) -> str:
        return str(Path(path).expanduser().resolve())

    settings = load_settings(cfg, on_disk=check_data)
    resources = client_resources(settings)
    settings = settings.replace(**{
        # Ray workers may run in another directory: give them an absolute root.
        "dataset.root": absolute(settings.dataset.root),
        "resume": absolute(settings.resume) if settings.resume else None,
        # Decided once, here: the server and every client use the same device.
        "device": str(resolve_device(settings.device)),
        "simulation.num_cpus_per_client": resources["num_cpus"],
        "simulation.num_gpus_per_client": resources["num_gpus"],
    })
    if check_data:
        ensure_available(settings.dataset.data, settings.dataset.root, settings.dataset.download)
        check_split(settings)
    return settings


@dataclass
class Experiment:
    """One run's server side: strategy, results and checkpoints, in ``run_dir``.

    ``client_state``: where simulated clients mirror what they keep (``LocalStore``);
    None where the server cannot see it (deployment) or they keep nothing.
    ``stop``: set by a signal (``stop_on_signals``): the run stops at a checkpoint.
    """

    settings: Settings
    run_dir: Path
    strategy: PFedHNStrategy
    recorder: RunRecorder
    client_state: Path | None = None
    stop: StopRequest | None = None
    saved_round: int | None = None  # of the newest checkpoint

    def record_stop(self, resume: str, settled: bool) -> int | None:
        """Flower ends this process mid-run (``flwr stop``, a signal to a deployed ServerApp).

        ``settled``: no round is running any more. Then the last completed round
        is checkpointed where the state is still that round's. The stop is listed
        under ``stops`` in results.json with the ``resume`` command (Flower's log
        upload has ended by then). Returns the round of the newest checkpoint.
        """
        last = self.strategy.state_at_last_round() if settled else None
        fresh = last is not None and last[0] > (self.saved_round or 0)
        saved = last[0] if fresh else self.saved_round
        self.recorder.stops.append({"round": self.recorder.progress.n,
                                    "checkpoint_round": saved, "resume": resume})
        if fresh:
            checkpoint.save(self.run_dir, self.settings, saved, strategy=last[1],
                            recorder=self.recorder.state_dict())
        self.saved_round = saved
        self.recorder.save()
        return saved

    def components(self, on_finish: Callable[[], object] | None = None) -> ServerAppComponents:
        """What the ServerApp runs, on either of Flower's engines."""
        return server_components(self.strategy, self.settings.num_rounds,
                                 self.settings.server.round_timeout, on_finish)

    def finish(self) -> dict:
        """Write the final results; log and return them."""
        self.recorder.server_memory = server_memory(self.strategy)
        results = self.recorder.close()
        log.info("test_acc_at_best_val=%.4f (round %s), final_test_acc=%.4f, "
                 "best_test_acc=%.4f (round %s; the MH-pFedHN authors' measure), "
                 "wall_time_s=%.1f", results["test_acc_at_best_val"], results["best_round"],
                 results["final_test_acc"], results["best_test_acc"],
                 results["best_test_round"], results["wall_time_s"])
        if results["training_check"].get("status") in ("collapsed", "diverged"):
            log.warning("this run did not train: %s", results["training_check"]["message"])
        return results


def server_memory(strategy: PFedHNStrategy) -> dict[str, int]:
    """The hypernetwork and optimizer state, and this process's peak so far."""
    # ru_maxrss is in KiB on Linux: the peak of this process (server and Ray driver).
    return ({} if strategy.core is None else strategy.core.memory_bytes()) | {
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def start_experiment(settings: Settings, run_dir: str | Path, split: dict | None = None,
                     simulated: bool = False, stop: StopRequest | None = None) -> Experiment:
    """Build the server side of a prepared config; with ``settings.resume``, continue that run.

    ``split``: the data split's summary (``describe_split``), where the server can
    see the data; it goes into results.json and arms the collapse check.
    ``simulated``: the clients run on this machine, and their kept state is
    mirrored into the run directory (``client_state_dir``). ``stop``: once set
    (``stop_on_signals``), the round in flight is checkpointed and ``RunStoppedError`` raised.
    """
    run_dir = Path(settings.resume or run_dir)
    resumed = checkpoint.load(run_dir, settings) if settings.resume else None
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(settings.to_yaml())
    title = f"{settings.variant.name} on {settings.dataset.data}, {settings.num_clients} clients"
    recorder = RunRecorder(run_dir, settings.num_rounds, title, split,
                           settings.server.clients_per_round / settings.num_clients,
                           network_names(settings))
    if split is not None:
        log.info("%s", describe_summary(split))
    mirror = client_state_dir(settings, run_dir / STATE_DIR) if simulated else None
    def on_fit(server_round: int, client_metrics: list[dict], server_metrics: dict) -> None:
        recorder.on_fit(server_round, client_metrics, server_metrics)
        stopping = stop is not None and stop.is_set()
        if not client_metrics:  # no update: say so in results.json now, and write
            recorder.save()     # no checkpoint at this round (a resume redoes it)
        elif checkpoint.TRAINING.due(settings, server_round) or stopping:
            # results.json has it as the run goes, refreshed when a checkpoint is written
            recorder.server_memory = server_memory(strategy)
            checkpoint.save(run_dir, settings, server_round,
                            strategy=strategy.state_dict(server_round),
                            recorder=recorder.state_dict())
            experiment.saved_round = server_round
            # A resume, from this checkpoint or the one before it (its fallback), never
            # goes back past the best round of that one.
            before_previous = [e for e in recorder.evaluations
                               if e["round"] < server_round - settings.checkpoint_every]
            checkpoint.prune_best(run_dir, before=summarize(before_previous)["best_round"])
        if stopping:
            raise RunStoppedError(stop.signum, server_round, experiment.saved_round, run_dir)

    def on_evaluate(server_round: int, metrics: dict, per_client: dict) -> None:
        recorder.on_evaluate(server_round, metrics, per_client)
        if summarize(recorder.evaluations)["best_round"] == server_round:
            # A new best-validation round: keep what generates its models (pFedHN.export).
            kept = None if mirror is None else {
                i: kept_state(mirror, i, server_round) for i in range(settings.num_clients)}
            checkpoint.save_best(run_dir, settings, server_round, strategy.core.model_state(),
                                 kept)

    configure_torch(settings.deterministic)  # the server's process; clients do their own
    strategy = build_strategy(settings, on_fit=on_fit, on_evaluate=on_evaluate)
    if resumed is not None:
        strategy.load_state_dict(resumed["strategy"])
        recorder.load_state_dict(resumed["recorder"])
        recorder.stops = earlier_stops(run_dir, resumed["round"]) or recorder.stops
        discard_state_after(run_dir / STATE_DIR, resumed["round"])
        evaluated = [e["round"] for e in recorder.evaluations]
        checkpoint.prune_best(run_dir, after=max(evaluated, default=-1))
        log.info("resuming %s from round %d", run_dir, resumed["round"])
    recorder.server_memory = server_memory(strategy)
    log.info("%s: %d rounds, results in %s", title, settings.num_rounds, run_dir)
    experiment = Experiment(settings, run_dir, strategy, recorder, mirror, stop,
                            resumed["round"] if resumed else None)
    return experiment


def earlier_stops(run_dir: Path, resumed_round: int) -> list[dict]:
    """The stops results.json lists up to the checkpoint resumed from (``record_stop``).

    Written after that checkpoint, so not in its history.
    """
    try:
        stops = json.loads((run_dir / "results.json").read_text()).get("stops", [])
    except (OSError, ValueError):
        return []
    return [s for s in stops if (s.get("checkpoint_round") or 0) <= resumed_round]


def simulate(settings: Settings, server_fn: Callable[[Context], ServerAppComponents],
             state_dir: Path | None = None) -> None:
    """One pass of Flower's simulation engine: a node per partition."""
    logging.getLogger("flwr").setLevel(logging.WARNING)  # no per-round chatter
    with flower_polling(settings.simulation.poll_interval):
        _run_simulation(settings, server_fn, state_dir)


def _run_simulation(settings: Settings, server_fn: Callable[[Context], ServerAppComponents],
                    state_dir: Path | None) -> None:
    run_simulation(
        server_app=ServerApp(server_fn=server_fn),
        client_app=make_client_app(settings, state_dir),
        num_supernodes=settings.partitions,
        backend_config={
            "client_resources": client_resources(settings),
            "init_args": ray_init_args(settings),
        },
    )


def run(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Run the experiment a composed config describes on Flower's simulation engine.

    Returns results.json. With ``resume`` set, continue that run directory
    instead of ``run_dir``. With novel clients, their embedding phase follows
    training (or, with ``novel.from_run``, replaces it).
    """
    settings = prepare(cfg)
    run_dir = Path(settings.resume or run_dir)
    novel_saved = saved_novel_phase(settings, run_dir)  # checked before any work
    with stop_on_signals(StopRequest()) as stop:
        if settings.novel.from_run:
            return run_novel(settings, trained_strategy(settings), run_dir, {}, novel_saved,
                             stop)
        experiment = start_experiment(settings, run_dir, describe_split(settings),
                                      simulated=True, stop=stop)
        experiment = train(settings, experiment)  # after a restart: the one that finished
        results = experiment.finish()
        if settings.novel.num_clients:
            results = run_novel(settings, experiment.strategy, experiment.run_dir, results,
                                novel_saved, stop)
    return results


def train(settings: Settings, experiment: Experiment) -> Experiment:
    """Run training on the simulation engine, restarting it by itself once its clients are lost.

    A lost Ray worker or node fails every later visit; once a round has lost a
    visit for good (``FailurePolicy``), the strategy stops the simulation
    (``RoundsFailingError``). It is then started anew from the last checkpoint,
    up to ``simulation.max_restarts`` times, ``simulation.restart_backoff_s``
    seconds later (doubled for each next restart). A resume is exact, so the run
    ends with an unbroken run's figures. A failure that a redo would repeat (a
    delta_theta that cannot be used) stops the run at once; one after a stop
    signal stops it at its newest checkpoint. Returns the experiment that finished.
    """
    restarts = experiment.recorder.restarts
    while True:
        try:
            simulate(settings, lambda context, this=experiment: this.components(),
                     experiment.client_state)
            return experiment
        except RoundsFailingError as error:
            stop_if_signalled(experiment.stop, error, experiment.recorder.progress.n,
                              experiment.saved_round, experiment.run_dir)
            if not error.redo or len(restarts) >= settings.simulation.max_restarts:
                raise
            wait = settings.simulation.restart_backoff_s * 2 ** len(restarts)
            reached = experiment.recorder.progress.n
            log.warning("%s Restart %d of %d (simulation.max_restarts) in %g s, from the last "
                        "checkpoint", error, len(restarts) + 1,
                        settings.simulation.max_restarts, wait)
            restarts.append({"round": reached, "reason": str(error)[:300]})
            experiment.recorder.progress.close()
            time.sleep(wait)
            shutdown_ray()
            run_dir = experiment.run_dir
            saved = any((run_dir / name).exists() for name in
                        (checkpoint.TRAINING.filename, checkpoint.TRAINING.previous))
            experiment = start_experiment(settings.replace(resume=str(run_dir)) if saved
                                          else settings, run_dir, experiment.recorder.split,
                                          simulated=True, stop=experiment.stop)
            restarts[-1]["resumed_from"] = experiment.strategy.schedule.start_round
            experiment.recorder.restarts = restarts


def stop_if_signalled(stop: StopRequest | None, error: RoundsFailingError, reached: int,
                      saved: int | None, run_dir: Path, phase: str = "") -> None:
    """Clients lost after a stop signal: ``RunStoppedError`` at the newest checkpoint.

    The signal reached Ray's processes too (a scheduler signals every process of
    the job; Ray spares only SIGINT): the round in flight is lost, not the run,
    and a restart would go against the stop. A failure that a redo would repeat
    (``error.redo`` false) is the clients' fault, and stays an error.
    """
    if error.redo and stop is not None and stop.is_set():
        log.warning("the round in flight is lost: the signal ended the clients' Ray processes "
                    "too; signal this process (%d) alone to have it finished", os.getpid())
        raise RunStoppedError(stop.signum, reached, saved, run_dir, phase) from error


def shutdown_ray() -> None:
    """End this process's Ray instance, if any, so that a restart starts a fresh one."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def saved_novel_phase(settings: Settings, run_dir: Path) -> dict | None:
    """With ``resume``: the novel phase's checkpoint in ``run_dir``, if any, checked."""
    if settings.resume and (run_dir / checkpoint.NOVEL.filename).exists():
        return checkpoint.load(run_dir, settings, checkpoint.NOVEL)
    return None


def client_state_dir(settings: Settings, state_dir: Path) -> Path | None:
    """Where simulated clients mirror what they keep, if they keep anything.

    Simulation only: what clients keep (pFedHN-PC heads, MH-pFedHN batch-norm
    statistics) is mirrored beside the checkpoint (see LocalStore).
    """
    keeps_state = settings.variant.keeps_client_state
    return state_dir if keeps_state and settings.simulation.mirror_client_state else None


def trained_strategy(settings: Settings) -> PFedHNStrategy:
    """The strategy as a finished run (``novel.from_run``) left it."""
    saved = checkpoint.load(Path(settings.novel.from_run), settings)
    if saved["round"] != settings.num_rounds:
        raise CheckpointError(f"novel.from_run={settings.novel.from_run}: its checkpoint is at "
                              f"round {saved['round']}, not at num_rounds={settings.num_rounds}")
    configure_torch(settings.deterministic)
    strategy = build_strategy(settings)
    strategy.load_state_dict(saved["strategy"])
    return strategy


def run_novel(settings: Settings, strategy: PFedHNStrategy, run_dir: Path, results: dict,
              saved: dict | None = None, stop: StopRequest | None = None) -> dict:
    """Learn the novel clients' embeddings, the hypernetwork frozen; report them.

    Adds the figures to ``results``; writes results.json and novel_clients.png
    into ``run_dir``, and the phase's own checkpoint (``checkpoint.NOVEL``).
    ``saved``: such a checkpoint (``saved_novel_phase``), to continue from.
    ``stop``: once set, the phase stops after its round in flight, at a checkpoint.
    """
    novel = settings.novel
    novel_ids = range(settings.num_clients, settings.partitions)
    strategy.learn_embeddings_only(novel_ids, novel, settings.server.momentum)
    run_dir.mkdir(parents=True, exist_ok=True)
    if novel.from_run:
        (run_dir / "config.yaml").write_text(settings.to_yaml())
    state_dir = client_state_dir(settings, run_dir / NOVEL_STATE_DIR)
    evaluations: dict[int, dict] = {}  # per evaluated round, each novel client's metrics
    if saved is not None:
        strategy.load_state_dict(saved["strategy"])
        evaluations = saved["recorder"]["evaluations"]
        if state_dir is not None:
            discard_state_after(state_dir, saved["round"])
        log.info("resuming the novel phase in %s from round %d", run_dir, saved["round"])

    split, labels = split_with_labels(settings)
    train_labels = labels["train"]
    shifts = distribution_shift([train_labels[i] for i in split["train"]], settings.num_clients,
                                int(train_labels.max()) + 1)
    phase = {"rounds": novel.rounds, "lr": novel.lr, "optimizer": novel.optimizer,
             "dirichlet_alpha": novel.dirichlet_alpha, "from_run": novel.from_run}

    def on_evaluate(server_round: int, metrics: dict, per_client: dict) -> None:
        evaluations[server_round] = per_client  # results.json has the phase as it goes
        summary = novel_summary(evaluations, shifts, settings.num_clients, phase)
        write_json_atomic(run_dir / "results.json", results | {"novel_clients": summary})

    checkpointer = NovelCheckpointer(settings, strategy, run_dir, evaluations, stop,
                                     saved["round"] if saved else None)
    strategy.on_fit = checkpointer
    strategy.evaluation.on_evaluate = on_evaluate
    log.info("novel clients %d-%d: %d rounds of embedding training",
             novel_ids[0], novel_ids[-1], novel.rounds)
    try:
        simulate(settings, lambda context: server_components(strategy, novel.rounds), state_dir)
    except RoundsFailingError as error:
        stop_if_signalled(stop, error, checkpointer.reached, checkpointer.saved_round, run_dir,
                          NOVEL_PHASE)
        raise

    summary = novel_summary(evaluations, shifts, settings.num_clients, phase)
    results = results | {"novel_clients": summary}
    write_json_atomic(run_dir / "results.json", results)
    plot_novel(summary, run_dir / "novel_clients.png")
    log.info("novel clients: test_acc %.4f before, %.4f after embedding training "
             "(best %.4f, round %d)", summary["test_acc_before"], summary["test_acc_after"],
             summary["best_test_acc"], summary["best_test_round"])
    return results


@dataclass
class NovelCheckpointer:
    """The novel phase's ``on_fit``: its checkpoint when due, as training's.

    No checkpoint at a round without an update: a resume redoes that round.
    Once ``stop`` is set: a checkpoint at this round, then ``RunStoppedError``.
    """

    settings: Settings
    strategy: PFedHNStrategy
    run_dir: Path
    evaluations: dict[int, dict]
    stop: StopRequest | None = None
    saved_round: int | None = None  # of the newest novel-phase checkpoint

    def __post_init__(self) -> None:
        self.reached = self.saved_round or 0  # the last round fitted

    def __call__(self, server_round: int, client_metrics: list[dict], *_: object) -> None:
        """A novel round's updates are in (``PFedHNStrategy.on_fit``)."""
        self.reached = server_round
        stopping = self.stop is not None and self.stop.is_set()
        if client_metrics and (checkpoint.NOVEL.due(self.settings, server_round) or stopping):
            checkpoint.save(self.run_dir, self.settings, server_round, checkpoint.NOVEL,
                            strategy=self.strategy.state_dict(server_round),
                            recorder={"evaluations": self.evaluations})
            self.saved_round = server_round
        if stopping:
            raise RunStoppedError(self.stop.signum, server_round, self.saved_round, self.run_dir,
                                  NOVEL_PHASE)
