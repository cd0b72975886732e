"""What a run leaves behind as it goes: results.json and an accuracy plot.

``RunRecorder`` receives the strategy's callbacks during a run; the README's
tables and figures are made afterwards from what it wrote (``pFedHN.results``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import statistics
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
from tqdm import tqdm  # noqa: E402

from pFedHN.files import write_json_atomic  # noqa: E402

log = logging.getLogger(__name__)


def summarize(evaluations: list[dict[str, float]]) -> dict[str, float | int | None]:
    """Model selection as in the paper: test accuracy at the best val accuracy."""
    if not evaluations:
        return {"test_acc_at_best_val": None, "best_round": None, "final_test_acc": None,
                "best_test_acc": None, "best_test_round": None}
    best = max(evaluations, key=lambda e: e["val_acc"])  # first round wins ties
    best_test = max(evaluations, key=lambda e: e["test_acc"])
    return {
        "test_acc_at_best_val": best["test_acc"],
        "best_round": best["round"],
        "final_test_acc": evaluations[-1]["test_acc"],
        # The MH-pFedHN authors' measure: the best test accuracy over all evaluations.
        "best_test_acc": best_test["test_acc"],
        "best_test_round": best_test["round"],
    }


def environment() -> dict[str, Any]:
    """The hardware and versions a run used, for the results table."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cpu_cores": os.cpu_count(), "gpu": None,
            "python": platform.python_version(),
            "torch": version("torch"), "flwr": version("flwr")}


# A run whose pooled val accuracy has never left the split's majority-class level
# (within COLLAPSE_MARGIN) after COLLAPSE_VISITS visits per client has learnt nothing
# beyond each client's label mix (e.g. pFedHN-PC on MNIST at CIFAR's outer lr); one
# whose last two evaluations fell back to that level has collapsed. A single dip, common
# early on CIFAR-10, is not flagged.
COLLAPSE_VISITS = 10
COLLAPSE_MARGIN = 0.02
# Clients of different networks learn late: the paper's five networks stay below the
# majority-class level for their first ~28 visits per client (val 0.30 at round 20
# against 0.60, above it from round 29, seed 42; the authors' code is as slow over
# its first 10 rounds), so a heterogeneous run is judged later.
HETEROGENEOUS_COLLAPSE_VISITS = 40


def training_check(
    evaluations: list[dict[str, float]], majority_val_acc: float | None,
    visits_per_client: float, collapse_visits: float = COLLAPSE_VISITS,
) -> dict[str, Any]:
    """Whether training has diverged or collapsed, judged from the pooled evaluations so far.

    A run is not judged on collapse before ``collapse_visits`` visits per client.
    """
    last = evaluations[-1]
    best = max(e["val_acc"] for e in evaluations)
    check: dict[str, Any] = {"round": last["round"], "val_acc": last["val_acc"],
                             "best_val_acc": best, "majority_class_val_acc": majority_val_acc,
                             "visits_per_client": visits_per_client}
    if not math.isfinite(last["val_loss"]):
        return check | {"status": "diverged", "message": (
            f"round {last['round']}: the val loss is {last['val_loss']}: the "
            "hypernetwork's weights are no longer finite; lower server.lr")}
    if majority_val_acc is None:  # the server cannot see the data (deployment)
        return check | {"status": "not checked"}
    if visits_per_client < collapse_visits:
        return check | {"status": "too early"}
    level = majority_val_acc + COLLAPSE_MARGIN
    where = (f"round {last['round']} (about {visits_per_client:.0f} visits per client): ")
    advice = "check server.lr and client.inner_lr"
    if best < level:
        return check | {"status": "collapsed", "message": (
            f"{where}the best val accuracy so far, {best:.4f}, is no better than predicting "
            f"each client's majority class ({majority_val_acc:.4f}): training has not "
            f"started to learn; {advice}")}
    if len(evaluations) >= 2 and all(e["val_acc"] < level for e in evaluations[-2:]):
        return check | {"status": "collapsed", "message": (
            f"{where}val accuracy fell back to the majority-class level "
            f"({last['val_acc']:.4f} against {majority_val_acc:.4f}) in the last two "
            f"evaluations, after reaching {best:.4f}; {advice}")}
    return check | {"status": "ok"}


def test_acc_by_network(per_client: dict[int, dict],
                        network_names: dict[int, str]) -> dict[str, float]:
    """Test accuracy pooled over the clients of each network size, where sizes differ.

    Networks are told apart by size (``num_parameters``), the only thing the
    server knows of them, and named by ``network_names``.
    """
    correct: dict[int, float] = {}
    samples: dict[int, int] = {}
    for client in per_client.values():
        size = client.get("num_parameters")
        if size is None:
            return {}
        correct[size] = correct.get(size, 0.0) + client["test_acc"] * client["test_n"]
        samples[size] = samples.get(size, 0) + client["test_n"]
    if len(samples) < 2:
        return {}
    return {network_names.get(size, f"{size:,} parameters"):
            correct[size] / max(samples[size], 1) for size in sorted(samples)}


class RunRecorder:
    """Receives the strategy's callbacks; keeps results.json and the plot current.

    ``split``: the data split's summary (``describe_split``), None where the
    server cannot see the data; its majority-class level drives ``training_check``
    (``visits_per_round``: client visits per round over clients).
    ``network_names``: where clients' networks differ in size, a name for each
    size; each evaluation then also pools test accuracy per network, and the
    collapse check waits longer (``HETEROGENEOUS_COLLAPSE_VISITS``).
    """

    def __init__(self, run_dir: str | Path, num_rounds: int, title: str,
                 split: dict[str, Any] | None = None, visits_per_round: float = 1.0,
                 network_names: dict[int, str] | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.network_names = network_names or {}
        self.collapse_visits = (HETEROGENEOUS_COLLAPSE_VISITS if len(self.network_names) > 1
                                else COLLAPSE_VISITS)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.title = title
        self.split = split
        self.visits_per_round = visits_per_round
        self.check: dict[str, Any] = {}
        self.evaluations: list[dict[str, float]] = []
        self.round_times: list[dict[str, float]] = []
        self.failed_rounds: list[int] = []  # rounds without a hypernetwork update
        self.client_failures: list[dict[str, Any]] = []  # round, partition_id, reason, kind
        # Visits sent again after a failure (server.visit_retries): round, partition_id, reason.
        self.retried_visits: list[dict[str, Any]] = []
        # Flower ended the run mid-way (flwr stop): round, checkpoint_round, resume command.
        self.stops: list[dict[str, Any]] = []
        # The simulation restarted from a checkpoint: round reached, resumed from, why.
        self.restarts: list[dict[str, Any]] = []
        self.bytes = {"training_sent": 0, "training_received": 0, "evaluation_sent": 0}
        # The clients' local SGD steps (personal training) from round ``from_round`` on:
        # how many the clip shortened.
        self.local_steps = {"steps": 0, "clipped": 0, "largest_grad_norm": 0.0, "from_round": 0}
        self.last_round_bytes = {"sent": 0, "received": 0}
        self.start = time.perf_counter()
        self.earlier_wall_time_s = 0.0  # of the sessions before a resume
        self.environment = environment()
        self.server_memory: dict[str, int] = {}  # filled in by the experiment each round
        self._last_round_end = None
        self.progress = tqdm(total=num_rounds, desc="rounds", unit="round", dynamic_ncols=True)

    def on_fit(self, server_round: int, client_metrics: list[dict], server_metrics: dict) -> None:
        """One training round finished."""
        now = time.perf_counter()
        if self._last_round_end is not None and server_round > 1:
            self.round_times.append({
                "round_s": now - self._last_round_end,
                "client_s": sum(m.get("client-time-s", 0.0) for m in client_metrics),
                "server_s": server_metrics.get("server-time-s", 0.0),
            })
        self._last_round_end = now
        self.last_round_bytes = {"sent": server_metrics.get("bytes-sent", 0),
                                 "received": server_metrics.get("bytes-received", 0)}
        self.bytes["training_sent"] += self.last_round_bytes["sent"]
        self.bytes["training_received"] += self.last_round_bytes["received"]
        for m in client_metrics:
            self.local_steps["steps"] += m.get("steps", 0)
            self.local_steps["clipped"] += m.get("clipped-steps", 0)
            self.local_steps["largest_grad_norm"] = max(self.local_steps["largest_grad_norm"],
                                                        m.get("largest-grad-norm", 0.0))
        for rejected in server_metrics.get("rejected", []):
            self.client_failures.append({"round": server_round, **rejected})
        for retried in server_metrics.get("retried", []):
            self.retried_visits.append({"round": server_round, **retried})
        if not client_metrics:
            self.failed_rounds.append(server_round)
        self.progress.update(1)

    def on_evaluate(
        self, server_round: int, metrics: dict[str, float], per_client: dict | None = None
    ) -> None:
        """An evaluation of every client finished: record, save, plot (pooled figures).

        ``per_client``: each partition's accuracies, kept in the record as ``per_client``.
        """
        record = {"round": server_round, **metrics, "wall_time_s": self.wall_time_s()}
        by_network = test_acc_by_network(per_client or {}, self.network_names)
        if by_network:
            record["test_acc_by_network"] = by_network
        if per_client:  # what an exported model of this round scores (pFedHN.export)
            record["per_client"] = {str(i): {k: c[k] for k in ("val_acc", "test_acc") if k in c}
                                    for i, c in sorted(per_client.items())}
        self.bytes["evaluation_sent"] += metrics.get("bytes_sent", 0)
        self.evaluations.append(record)
        log.info("round %d: val_acc=%.4f test_acc=%.4f (clients %.4f-%.4f) val_loss=%.4f%s",
                 server_round, metrics["val_acc"], metrics["test_acc"],
                 metrics["test_acc_min"], metrics["test_acc_max"], metrics["val_loss"],
                 "".join(f"; {name} {acc:.4f}" for name, acc in by_network.items()))
        self.progress.set_postfix(val_acc=f"{metrics['val_acc']:.4f}",
                                  test_acc=f"{metrics['test_acc']:.4f}")
        majority = self.split["majority_class_acc"]["val"] if self.split else None
        check = training_check(self.evaluations, majority, server_round * self.visits_per_round,
                               self.collapse_visits)
        if "message" in check and check["status"] != self.check.get("status"):
            log.warning("%s", check["message"])
        self.check = check
        self.save()
        self.plot()
        # Evaluation time is not a training round's time.
        self._last_round_end = time.perf_counter()

    def state_dict(self) -> dict[str, Any]:
        """The history a resumed run continues from."""
        return {"evaluations": self.evaluations, "failed_rounds": self.failed_rounds,
                "client_failures": self.client_failures, "restarts": self.restarts,
                "retried_visits": self.retried_visits, "stops": self.stops,
                "rounds_completed": self.progress.n,
                "wall_time_s": self.wall_time_s(), "bytes": self.bytes,
                "local_steps": self.local_steps, "round_times": self.round_times}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the history of an interrupted run."""
        self.evaluations = list(state["evaluations"])
        self.failed_rounds = list(state["failed_rounds"])
        self.client_failures = list(state["client_failures"])
        self.restarts = list(state.get("restarts", []))  # older checkpoints: none recorded
        self.retried_visits = list(state.get("retried_visits", []))  # older: none recorded
        self.stops = list(state.get("stops", []))
        self.earlier_wall_time_s = state["wall_time_s"]
        self.bytes = dict(state.get("bytes", self.bytes))  # older checkpoints: from zero
        self.round_times = list(state.get("round_times", []))  # older: from the resume on
        # Checkpoints older than the tally: it counts from the resumed round.
        self.local_steps = dict(state.get("local_steps", self.local_steps
                                          | {"from_round": state["rounds_completed"]}))
        self.progress.update(state["rounds_completed"])

    def wall_time_s(self) -> float:
        """Seconds spent on this run, all sessions together."""
        return self.earlier_wall_time_s + time.perf_counter() - self.start

    def timing(self) -> dict[str, float | None]:
        """Median seconds of a training round and of its client and server parts."""
        if not self.round_times:
            return {}
        return {f"median_{k}": statistics.median(t[k] for t in self.round_times)
                for k in ("round_s", "client_s", "server_s")}

    def save(self) -> None:
        """Write results.json with everything so far."""
        write_json_atomic(self.run_dir / "results.json", {
            "title": self.title,
            **summarize(self.evaluations),
            "wall_time_s": self.wall_time_s(),
            "rounds_completed": self.progress.n,
            "failed_rounds": self.failed_rounds,
            "client_failures": self.client_failures,
            # Visits whose update never reached the hypernetwork (server.accept_lost_visits).
            "lost_visits": len(self.client_failures),
            "retried_visits": self.retried_visits,
            "restarts": self.restarts,
            "stops": self.stops,
            "training_check": self.check,
            "timing": self.timing(),
            "local_steps": self.local_steps,
            "communication": {f"{k}_bytes": v for k, v in self.bytes.items()}
            | {f"last_training_round_{k}_bytes": v for k, v in self.last_round_bytes.items()},
            "environment": self.environment,
            "server_memory": self.server_memory,
            "split": self.split,
            "evaluations": self.evaluations,
        })

    def plot(self) -> None:
        """Accuracy against round, val and test; test per network where they differ."""
        fig, ax = plt.subplots(figsize=(6, 4))
        rounds = [e["round"] for e in self.evaluations]
        for split in ("val", "test"):
            ax.plot(rounds, [100 * e[f"{split}_acc"] for e in self.evaluations],
                    label=f"{split} (pooled over clients)")
        plot_networks(ax, self.evaluations, "test, ", linewidth=0.8, linestyle="--")
        ax.set_xlabel("round")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(self.title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(self.run_dir / "accuracy.png", dpi=100)
        plt.close(fig)

    def close(self) -> dict[str, Any]:
        """Final write; return the summary."""
        self.progress.close()
        self.save()
        return json.loads((self.run_dir / "results.json").read_text())


def plot_networks(ax: plt.Axes, evaluations: list[dict[str, Any]], prefix: str,
                  **style: Any) -> None:
    """A line per network of the evaluations' ``test_acc_by_network``, in percent."""
    networks = dict.fromkeys(n for e in evaluations for n in e.get("test_acc_by_network", {}))
    for name in networks:
        points = [(e["round"], 100 * e["test_acc_by_network"][name])
                  for e in evaluations if name in e.get("test_acc_by_network", {})]
        ax.plot(*zip(*points, strict=True), label=f"{prefix}{name}", **style)
