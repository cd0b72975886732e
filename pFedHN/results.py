"""What a run leaves behind: results.json and an accuracy plot, written as it goes."""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
from tqdm import tqdm  # noqa: E402


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write then rename, so a reader never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)


def summarize(evaluations: list[dict[str, float]]) -> dict[str, float | int | None]:
    """Model selection as in the paper: test accuracy at the best val accuracy."""
    if not evaluations:
        return {"test_acc_at_best_val": None, "best_round": None, "final_test_acc": None}
    best = max(evaluations, key=lambda e: e["val_acc"])  # first round wins ties
    return {
        "test_acc_at_best_val": best["test_acc"],
        "best_round": best["round"],
        "final_test_acc": evaluations[-1]["test_acc"],
    }


class RunRecorder:
    """Receives the strategy's callbacks; keeps results.json and the plot current."""

    def __init__(self, run_dir: str | Path, num_rounds: int, title: str) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.title = title
        self.evaluations: list[dict[str, float]] = []
        self.round_times: list[dict[str, float]] = []
        self.failed_rounds: list[int] = []
        self.start = time.perf_counter()
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
        if not client_metrics:
            self.failed_rounds.append(server_round)
        self.progress.update(1)

    def on_evaluate(self, server_round: int, metrics: dict[str, float]) -> None:
        """An evaluation of every client finished: record, save, plot."""
        record = {"round": server_round, **metrics,
                  "wall_time_s": time.perf_counter() - self.start}
        self.evaluations.append(record)
        self.progress.set_postfix(val_acc=f"{metrics['val_acc']:.4f}",
                                  test_acc=f"{metrics['test_acc']:.4f}")
        self.save()
        self.plot()
        # Evaluation time is not a training round's time.
        self._last_round_end = time.perf_counter()

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
            "wall_time_s": time.perf_counter() - self.start,
            "rounds_completed": self.progress.n,
            "failed_rounds": self.failed_rounds,
            "timing": self.timing(),
            "evaluations": self.evaluations,
        })

    def plot(self) -> None:
        """Accuracy against round, val and test."""
        fig, ax = plt.subplots(figsize=(6, 4))
        rounds = [e["round"] for e in self.evaluations]
        for split in ("val", "test"):
            ax.plot(rounds, [100 * e[f"{split}_acc"] for e in self.evaluations],
                    label=f"{split} (pooled over clients)")
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
