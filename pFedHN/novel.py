"""Generalization to novel clients (paper, section 5.3): what is measured and shown.

Novel clients never take part in training. Afterwards the hypernetwork is frozen
and only their embeddings are learned, through the same Flower rounds
(``PFedHNStrategy.learn_embeddings_only``); each is evaluated before and after.
Their distance from the training distribution is the total variation distance
between their class mix and the training clients' pooled class mix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def distribution_shift(
    train_labels_per_client: list[np.ndarray], num_training: int, num_classes: int
) -> list[float]:
    """TV distance of each novel client's class mix from the training clients' mix."""
    def mix(labels: np.ndarray) -> np.ndarray:
        counts = np.bincount(labels, minlength=num_classes).astype(float)
        return counts / max(counts.sum(), 1.0)

    training = mix(np.concatenate(train_labels_per_client[:num_training]))
    return [float(0.5 * np.abs(mix(labels) - training).sum())
            for labels in train_labels_per_client[num_training:]]


def novel_summary(
    evaluations: dict[int, dict[int, dict]], shifts: list[float], first_novel: int,
    settings: dict[str, Any],
) -> dict[str, Any]:
    """Per novel client: shift and test accuracy before/after; pooled accuracies.

    "after" is the last evaluated round (``rounds_completed``): the phase's end
    once it has finished.

    ``evaluations``: per evaluated round, each novel client's metrics. Besides
    the first and last, the pooled test accuracy of every evaluated round and
    its best (the MH-pFedHN authors evaluate every round of this phase).
    """
    before, after = evaluations[min(evaluations)], evaluations[max(evaluations)]
    clients = [
        {"partition_id": pid, "shift_tv": shifts[pid - first_novel],
         "test_acc_before": before[pid]["test_acc"], "test_acc_after": after[pid]["test_acc"],
         "test_n": after[pid]["test_n"]}
        for pid in sorted(after)
    ]
    n = np.array([c["test_n"] for c in clients], dtype=float)

    def pooled(key: str) -> float:
        return float(np.dot([c[key] for c in clients], n) / n.sum())

    by_round = [{"round": r, "test_acc": sum(m["test_acc"] * m["test_n"] for m in per.values())
                 / sum(m["test_n"] for m in per.values())}
                for r, per in sorted(evaluations.items())]
    best = max(by_round, key=lambda e: e["test_acc"])  # the first round wins ties
    return {**settings, "rounds_completed": max(evaluations),
            "test_acc_before": pooled("test_acc_before"),
            "test_acc_after": pooled("test_acc_after"), "best_test_acc": best["test_acc"],
            "best_test_round": best["round"], "test_acc_by_round": by_round,
            "clients": clients}


def plot_novel(summary: dict[str, Any], path: Path) -> None:
    """Test accuracy against distribution shift, before and after embedding training."""
    clients = summary["clients"]
    shift = [c["shift_tv"] for c in clients]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.scatter(shift, [100 * c["test_acc_before"] for c in clients], facecolors="none",
               edgecolors="tab:gray", label="before (untrained embedding)")
    ax.scatter(shift, [100 * c["test_acc_after"] for c in clients], color="tab:blue",
               label=f"after {summary['rounds']} rounds of embedding training")
    alpha = summary.get("dirichlet_alpha")
    ax.set_title("Novel clients: frozen hypernetwork, learned embedding"
                 + (f"\nnovel class mix ~ Dirichlet({alpha})" if alpha is not None else ""))
    ax.set_xlabel("distribution shift: TV distance to the training clients' class mix")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
