"""What a run leaves behind: results.json and an accuracy plot, written as it goes."""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
from tqdm import tqdm  # noqa: E402

from pFedHN.files import write_json_atomic  # noqa: E402
from pFedHN.settings import Variant  # noqa: E402

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
        by_network = self.test_acc_by_network(per_client or {})
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

    def test_acc_by_network(self, per_client: dict[int, dict]) -> dict[str, float]:
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
        return {self.network_names.get(size, f"{size:,} parameters"):
                correct[size] / max(samples[size], 1) for size in sorted(samples)}

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


# --- The README's results table, regenerated from committed run summaries ----------

# The paper's test accuracy (%), by (dataset, variant, clients); REFERENCE section 3.
PAPER = {
    ("mnist", 0, 50): "99.28 ± 0.11",
    ("cifar10", 0, 50): "88.38 ± 0.29",
    ("cifar10", 1, 10): "92.47",
    ("cifar10", 1, 50): "90.08 ± 0.63",
    ("cifar10", 1, 100): "88.09",
    ("cifar100", 0, 50): "59.48 ± 0.67",
    ("cifar100", 1, 10): "68.15",
    ("cifar100", 1, 50): "60.17",
    ("cifar100", 1, 100): "53.24",
    ("omniglot", 1, 50): "81.89",
}
DATASET_NAMES = {"mnist": "MNIST", "cifar10": "CIFAR-10", "cifar100": "CIFAR-100",
                 "cinic10": "CINIC-10", "omniglot": "Omniglot"}
NO_DATA_HERE = {"cifar100", "omniglot"}  # the machines this table is made on hold no copy of these


def preset_command(key: tuple[str, int, int]) -> str:
    """The command that runs one of the paper's settings, from the config presets."""
    dataset, variant, clients = key
    return (f"python -m pFedHN.main data={dataset} algorithm={Variant.of(variant).preset} "
            f"num_clients={clients}")


START, END = "<!-- results:start -->", "<!-- results:end -->"


def load_summaries(runs_dir: Path) -> list[dict[str, Any]]:
    """Each run summary folder (config.yaml + results.json), sorted by name."""
    from omegaconf import OmegaConf  # only the table needs it

    summaries = []
    for folder in sorted(p for p in runs_dir.iterdir() if (p / "results.json").exists()):
        cfg = OmegaConf.load(folder / "config.yaml")
        results = json.loads((folder / "results.json").read_text())
        paper_dataset = cfg.dataset.get("paper_dataset") or cfg.dataset.data
        summaries.append({"name": folder.name, "cfg": cfg, "results": results,
                          "key": (paper_dataset, int(cfg.model.variant), int(cfg.num_clients))})
    return summaries


def _dataset_label(cfg) -> str:
    if cfg.dataset.data == "folder":
        like = DATASET_NAMES.get(cfg.dataset.get("paper_dataset"), "images")
        return f"{like} ({Path(cfg.dataset.root).name}, folder)"
    return DATASET_NAMES[cfg.dataset.data]


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


SPLIT_NAMES = {"classes": "ours", "authors": "authors'", "dirichlet": "Dirichlet",
               "mh-authors": "MH authors'", "mh-dirichlet": "MH authors' Dirichlet"}


def _mean_std(values: list[float]) -> str:
    """Percent, mean ± sample standard deviation (the paper's spread over seeds)."""
    if len(values) == 1:
        return _pct(values[0])
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


def setting_of(summary: dict[str, Any]) -> tuple:
    """What a row of the table holds fixed: everything but the seed."""
    cfg, res = summary["cfg"], summary["results"]
    done = res.get("rounds_completed", cfg.num_rounds)
    return (*summary["key"], _dataset_label(cfg), cfg.client.get("partition", "classes"),
            int(cfg.num_rounds), done == cfg.num_rounds) + \
        ((_networks(cfg),) if _multi_head(summary) else ())


def _networks(cfg) -> str:
    """MH-pFedHN: the clients' networks (``model.architectures``), in a few words."""
    choice = cfg.model.architectures
    if isinstance(choice, str):
        return {"blocks": "the authors' five, in blocks"}.get(choice, f"all {choice}")
    return f"{len(set(choice))} kinds, listed per client"


def _mib(n: float | None) -> str:
    return "–" if n is None else f"{n / 2**20:,.0f} MiB"


def mh_table(summaries: list[dict[str, Any]]) -> str:
    """Markdown table of MH-pFedHN(GD) runs: both accuracy figures, cost and memory.

    The MH-pFedHN authors report the best test accuracy over rounds (evaluated
    every round); this package's headline, test at the best-validation round,
    stands beside it.
    """
    lines = [
        "| dataset | clients | algorithm | networks | split | rounds | seeds "
        "| best test over rounds (the authors' measure) | test at best val | final test "
        "| round (median) | hypernetwork + Adam state | server peak memory | runs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for setting, runs in _by_setting(s for s in summaries if _multi_head(s)):
        label, partition, num_rounds, finished, networks = setting[3:]
        group = _Group.of(runs, num_rounds, finished)
        round_s = statistics.median(r["timing"]["median_round_s"] for r in group.results)
        memory = group.results[0].get("server_memory", {})
        state = memory.get("hypernetwork_bytes")
        state_text = "–" if state is None else \
            f"{_mib(state)} + {_mib(memory.get('optimizer_state_bytes'))}"
        peak = memory.get("peak_rss_bytes")
        lines.append(
            f"| {label} | {group.cfg.num_clients} | {Variant.of(group.cfg.model.variant).name} "
            f"| {networks} | {SPLIT_NAMES.get(partition, partition)} | {group.rounds} "
            f"| {group.seeds} | {group.figure('best_test_acc', 'best_test_round')} "
            f"| {group.figure('test_acc_at_best_val', 'best_round')} "
            f"| {group.figure('final_test_acc')} | {round_s:.1f} s "
            f"| {state_text} | {'–' if peak is None else f'{peak / 2**30:.1f} GiB'} "
            f"| {group.names} |"
        )
    return "\n".join(lines)


def novel_table(summaries: list[dict[str, Any]]) -> str:
    """Markdown table of the runs with novel clients: one row per run.

    After training, the hypernetwork is frozen and only the novel clients'
    embeddings learn; their pooled test accuracy before that phase, at its last
    evaluated round and at its best round (the MH-pFedHN authors' measure).
    """
    lines = [
        "| dataset | algorithm | networks | clients: trained + novel | training rounds "
        "| novel rounds | seed | novel: best test over rounds (the authors' measure) "
        "| novel: before | novel: after | runs |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        cfg, novel = s["cfg"], s["results"].get("novel_clients")
        if not novel:
            continue
        done = novel.get("rounds_completed", novel["rounds"])
        novel_rounds = f"{done}" if done == novel["rounds"] else f"{done} of {novel['rounds']}"
        networks = _networks(cfg) if _multi_head(s) else cfg.model.get("target", "cnn")
        lines.append(
            f"| {_dataset_label(cfg)} | {Variant.of(cfg.model.variant).name} | {networks} "
            f"| {cfg.num_clients} + {cfg.novel.num_clients} "
            f"| {s['results'].get('rounds_completed', cfg.num_rounds)} | {novel_rounds} "
            f"| {cfg.seed} | {_pct(novel['best_test_acc'])} (round {novel['best_test_round']}) "
            f"| {_pct(novel['test_acc_before'])} | {_pct(novel['test_acc_after'])} "
            f"| `{s['name']}` |")
    return "\n".join(lines)


def _multi_head(summary: dict[str, Any]) -> bool:
    return int(summary["cfg"].model.variant) in (2, 3)


def _by_setting(summaries) -> list[tuple[tuple, list[dict[str, Any]]]]:
    """The summaries grouped by ``setting_of`` (first seen first), each group by seed."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for s in summaries:
        groups.setdefault(setting_of(s), []).append(s)
    return [(setting, sorted(runs, key=lambda r: r["cfg"].seed))
            for setting, runs in groups.items()]


@dataclass(frozen=True)
class _Group:
    """One table row's runs (a setting's seeds) and what every table shows of them."""

    cfg: Any
    results: list[dict[str, Any]]
    rounds: str  # "500", or "130 of 500" while the run is unfinished, with any failures
    seeds: str
    names: str

    @classmethod
    def of(cls, runs: list[dict[str, Any]], num_rounds: int, finished: bool) -> _Group:
        results = [r["results"] for r in runs]
        done = results[0].get("rounds_completed", num_rounds)
        rounds = f"{done}" if finished else f"{done} of {num_rounds}"
        # Never silent: rounds whose updates were lost change what "500 rounds" means.
        failed = sum(len(r.get("failed_rounds", [])) for r in results)
        lost = sum(len(r.get("client_failures", [])) for r in results)
        if failed or lost:
            rounds += f" ({failed} failed, {lost} client results lost)"
        return cls(runs[0]["cfg"], results, rounds,
                   ", ".join(str(r["cfg"].seed) for r in runs),
                   ", ".join(f"`{r['name']}`" for r in runs))

    def figure(self, key: str, round_key: str | None = None) -> str:
        """Mean ± std of ``key`` over the seeds; one seed's value with its round."""
        text = _mean_std([r[key] for r in self.results])
        if round_key and len(self.results) == 1:
            text += f" (round {self.results[0][round_key]})"
        return text


def results_table(summaries: list[dict[str, Any]]) -> str:
    """Markdown table: one row per setting (its seeds pooled), then the paper's rows not run.

    A setting's figures are the mean ± standard deviation over its seeds; an
    unfinished run gets a row of its own. A row with no run shows the command
    that makes it.
    """
    lines = [
        "| dataset | clients | algorithm | split | rounds | seeds | paper "
        "| ours: test at best val | ours: final test | hardware | wall time per run | runs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for setting, runs in _by_setting(s for s in summaries if not _multi_head(s)):
        key, label, partition, num_rounds, finished = setting[:3], *setting[3:]
        group = _Group.of(runs, num_rounds, finished)
        env = group.results[0].get("environment", {})
        minutes = statistics.median(r["wall_time_s"] for r in group.results) / 60
        lines.append(
            f"| {label} | {group.cfg.num_clients} | {Variant.of(group.cfg.model.variant).name} "
            f"| {SPLIT_NAMES.get(partition, partition)} | {group.rounds} | {group.seeds} "
            f"| {PAPER.get(key, '–')} | {group.figure('test_acc_at_best_val', 'best_round')} "
            f"| {group.figure('final_test_acc')} "
            f"| {env.get('cpu_cores', '?')} CPU cores ({env.get('cpu', '?')}) "
            f"| {minutes:.0f} min | {group.names} |"
        )
    done_keys = {s["key"] for s in summaries if not _multi_head(s)}
    for key in sorted(PAPER.keys() - done_keys):
        dataset, variant, clients = key
        why = "not run here (no copy of the data)" if dataset in NO_DATA_HERE else "not run yet"
        lines.append(
            f"| {DATASET_NAMES[dataset]} | {clients} | {Variant.of(variant).name} | | 5000 | "
            f"| {PAPER[key]} | {why} | | | | `{preset_command(key)}` |"
        )
    return "\n".join(lines)


def runs_table(summaries: list[dict[str, Any]]) -> str:
    """Markdown table: every run summary on its own line (each seed's figures)."""
    lines = ["| run | seed | split: mixed vehicle/animal clients, majority-class test acc. "
             "| test at best val (round) | final test |",
             "|---|---|---|---|---|"]
    for s in summaries:
        res, split = s["results"], s["results"].get("split")
        split_text = "–" if not split else (
            f"{split.get('mixed_group_clients', '–')}, "
            f"{_pct(split['majority_class_acc']['test'])}")
        lines.append(f"| `{s['name']}` | {s['cfg'].seed} | {split_text} "
                     f"| {_pct(res['test_acc_at_best_val'])} ({res['best_round']}) "
                     f"| {_pct(res['final_test_acc'])} |")
    return "\n".join(lines)


def plot_runs(summaries: list[dict[str, Any]], static_dir: Path) -> list[Path]:
    """One accuracy-vs-round plot per dataset: a line per run, the paper as reference."""
    by_dataset: dict[str, list[dict[str, Any]]] = {}
    for s in summaries:  # MH-pFedHN's 500 rounds apart from pFedHN's 5000 steps
        by_dataset.setdefault(s["key"][0] + ("_mh" if _multi_head(s) else ""), []).append(s)
    written = []
    for dataset, runs in sorted(by_dataset.items()):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        drawn: set[tuple] = set()  # the paper's line once per setting
        for s in runs:
            evaluations = s["results"]["evaluations"]
            label = (f"{Variant.of(s['cfg'].model.variant).name}, {s['cfg'].num_clients} clients, "
                     f"seed {s['cfg'].seed}")
            if _multi_head(s):
                label += f", {_networks(s['cfg'])}"
            line, = ax.plot([e["round"] for e in evaluations],
                            [100 * e["test_acc"] for e in evaluations], label=label)
            paper = PAPER.get(s["key"])
            if paper is not None and s["key"] not in drawn:
                drawn.add(s["key"])
                ax.axhline(float(paper.split()[0]), color=line.get_color(), linestyle="--",
                           linewidth=1, label=f"paper: {label} ({paper})")
        name = DATASET_NAMES.get(dataset.removesuffix("_mh"), dataset)
        ax.set_title(f"Test accuracy during training: {name}"
                     + (", MH-pFedHN" if dataset.endswith("_mh") else ""))
        ax.set_xlabel("round (a pass over the clients)" if dataset.endswith("_mh")
                      else "round (hypernetwork step)")
        ax.set_ylabel("test accuracy, pooled over clients (%)")
        written.append(_save_figure(fig, ax, static_dir / f"accuracy_{dataset}.png"))
    return written + [plot_by_network(s, static_dir) for s in summaries
                      if any("test_acc_by_network" in e for e in s["results"]["evaluations"])]


def plot_by_network(summary: dict[str, Any], static_dir: Path) -> Path:
    """A heterogeneous run's test accuracy per network, beside the pooled figure."""
    evaluations = summary["results"]["evaluations"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([e["round"] for e in evaluations], [100 * e["test_acc"] for e in evaluations],
            color="black", label="pooled over all clients")
    plot_networks(ax, evaluations, "", linewidth=1)
    cfg = summary["cfg"]
    ax.set_title(f"Test accuracy per network: {Variant.of(cfg.model.variant).name}, "
                 f"{cfg.num_clients} clients, seed {cfg.seed}")
    ax.set_xlabel("round (a pass over the clients)")
    ax.set_ylabel("test accuracy, pooled over the network's clients (%)")
    return _save_figure(fig, ax, static_dir / f"accuracy_{summary['name']}_by_network.png")


def plot_networks(ax: plt.Axes, evaluations: list[dict[str, Any]], prefix: str,
                  **style: Any) -> None:
    """A line per network of the evaluations' ``test_acc_by_network``, in percent."""
    networks = dict.fromkeys(n for e in evaluations for n in e.get("test_acc_by_network", {}))
    for name in networks:
        points = [(e["round"], 100 * e["test_acc_by_network"][name])
                  for e in evaluations if name in e.get("test_acc_by_network", {})]
        ax.plot(*zip(*points, strict=True), label=f"{prefix}{name}", **style)


def _save_figure(fig: plt.Figure, ax: plt.Axes, path: Path) -> Path:
    """Grid, legend, and a PNG without the version stamp (regenerating changes nothing)."""
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)
    return path


def regenerate(runs_dir: Path, readme: Path, static_dir: Path) -> None:
    """Rewrite the README's table between its markers and the plots in _static/."""
    summaries = load_summaries(runs_dir)
    text = readme.read_text()
    if START not in text or END not in text:
        raise ValueError(f"{readme} has no {START} ... {END} markers")
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    plots = plot_runs(summaries, static_dir)
    body = "\n".join([
        "Regenerated by `python -m pFedHN.results` from the run summaries in "
        "`_static/runs/` (each: `config.yaml` and `results.json`). Headline: test "
        "accuracy at the round of best pooled validation accuracy; mean ± standard "
        "deviation over the seeds listed. Split: `ours` is this package's seeded split, "
        "`authors'` the authors' code's split for the same seed (`client.partition=authors`). "
        "Rounds: a bracket counts the rounds in which no client's update reached the "
        "hypernetwork and the client results lost (crashed or rejected clients, each "
        "listed in the run's `results.json`).",
        "",
        results_table(summaries),
        *(["", "MH-pFedHN and MH-pFedHNGD, on the MH-pFedHN authors' protocol (every client "
            "every round, one at a time; each client's data cut 75/25 into its own train "
            "and test):", "", mh_table(summaries)]
          if any(_multi_head(s) for s in summaries) else []),
        *(["", "Novel clients: after training, the hypernetwork frozen, only the novel "
            "clients' embeddings learn (evaluated every round where the run says so):", "",
            novel_table(summaries)]
          if any(s["results"].get("novel_clients") for s in summaries) else []),
        "",
        "Each run:",
        "",
        runs_table(summaries),
        "",
        *[f"![{p.stem}]({p.relative_to(readme.parent).as_posix()})" for p in plots],
    ])
    readme.write_text(f"{head}{START}\n{body}\n{END}{tail}")


def collect(run_dir: Path, runs_dir: Path, name: str) -> Path:
    """Copy a run's summary (config without machine paths, results.json) for committing."""
    from omegaconf import OmegaConf

    target = runs_dir / name
    target.mkdir(parents=True, exist_ok=True)
    cfg = OmegaConf.load(run_dir / "config.yaml")
    results = json.loads((run_dir / "results.json").read_text())
    # No paths of this machine: only the last part of each.
    for key in ("dataset.root", "resume", "novel.from_run"):
        if OmegaConf.select(cfg, key) is not None:
            OmegaConf.update(cfg, key, Path(OmegaConf.select(cfg, key)).name)
    if results.get("novel_clients", {}).get("from_run"):
        results["novel_clients"]["from_run"] = Path(results["novel_clients"]["from_run"]).name
    (target / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    write_json_atomic(target / "results.json", results)
    return target


def add_split(summary_dir: Path, data_root: Path) -> None:
    """Add ``split`` to a run summary whose results.json predates it.

    The split is a function of the config and the data's labels, so it is
    recomputed from the summary's config with its data at ``data_root``.
    """
    from omegaconf import OmegaConf

    from pFedHN.config import compose_config, describe_split, load_settings  # the data
    from pFedHN.settings import flatten

    cfg = compose_config()
    saved = flatten(OmegaConf.to_container(OmegaConf.load(summary_dir / "config.yaml")))
    absent = object()
    for key, value in saved.items():  # older summaries may hold since-renamed keys
        if OmegaConf.select(cfg, key, default=absent) is not absent:
            OmegaConf.update(cfg, key, value)
    cfg.dataset.root = str(data_root)
    results = json.loads((summary_dir / "results.json").read_text())
    split = describe_split(load_settings(cfg))
    write_json_atomic(summary_dir / "results.json", results | {"split": split})


def main(argv: list[str] | None = None) -> None:
    """``python -m pFedHN.results [--collect RUN_DIR NAME] [--add-split NAME DATA_ROOT]``."""
    import argparse

    repo = Path(__file__).resolve().parents[1]
    parser = argparse.ArgumentParser(description="Regenerate the README's results table.")
    parser.add_argument("--collect", nargs=2, metavar=("RUN_DIR", "NAME"), action="append",
                        default=[], help="first copy a run's summary into _static/runs/NAME")
    parser.add_argument("--add-split", nargs=2, metavar=("NAME", "DATA_ROOT"), action="append",
                        default=[], help="add the split summary to _static/runs/NAME, from "
                        "its data at DATA_ROOT (summaries made before results.json had one)")
    parser.add_argument("--readme", type=Path, default=repo / "README.md")
    parser.add_argument("--static", type=Path, default=repo / "_static")
    args = parser.parse_args(argv)
    runs_dir = args.static / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    for run_dir, name in args.collect:
        collect(Path(run_dir), runs_dir, name)
    for name, data_root in args.add_split:
        add_split(runs_dir / name, Path(data_root).expanduser().resolve())
    regenerate(runs_dir, args.readme, args.static)


if __name__ == "__main__":
    main()
