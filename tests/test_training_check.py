"""The split summary (what each client holds) and the check that a run trained."""

import math

import numpy as np
import pytest

from pFedHN.dataset import CIFAR10_VEHICLES, split_summary
from pFedHN.recorder import (
    COLLAPSE_VISITS,
    HETEROGENEOUS_COLLAPSE_VISITS,
    RunRecorder,
    training_check,
)


def test_split_summary_counts_each_clients_classes_and_majority_level():
    train = np.array([0, 0, 0, 1, 2, 2, 3, 3, 3, 3])
    test = np.array([0, 1, 1, 2, 3, 3])
    split = {"train": [np.array([0, 1, 2, 3]), np.array([4, 5, 6, 7, 8])],
             "val": [np.array([9]), np.array([6])],
             "test": [np.array([0, 1, 2]), np.array([3, 4, 5])]}
    summary = split_summary(split, {"train": train, "val": train, "test": test}, 4)
    assert summary["clients"] == [
        {"classes": [0, 1], "train": 4, "val": 1, "test": 3},
        {"classes": [2, 3], "train": 5, "val": 1, "test": 3},
    ]
    assert summary["totals"] == {"train": 9, "val": 2, "test": 6}
    # Client 0's majority class is 0, client 1's is 3 (3 of 5 samples).
    assert summary["majority_class_acc"]["train"] == pytest.approx((3 + 3) / 9)
    assert summary["majority_class_acc"]["val"] == pytest.approx((0 + 1) / 2)
    assert summary["majority_class_acc"]["test"] == pytest.approx((1 + 2) / 6)
    assert "mixed_group_clients" not in summary


def test_split_summary_counts_clients_mixing_vehicles_and_animals():
    labels = np.array([0, 3, 1, 8, 2, 5])  # (plane, cat), (car, ship), (bird, dog)
    split = {name: [np.array([0, 1]), np.array([2, 3]), np.array([4, 5])]
             for name in ("train", "val", "test")}
    groups = (CIFAR10_VEHICLES, frozenset(range(10)) - CIFAR10_VEHICLES)
    summary = split_summary(split, dict.fromkeys(split, labels), 10, groups)
    assert summary["mixed_group_clients"] == 1


def history(*val_accs, last_loss=0.5):
    rounds = range(30, 30 * (len(val_accs) + 1), 30)
    out = [{"round": r, "val_acc": v, "val_loss": 0.5}
           for r, v in zip(rounds, val_accs, strict=True)]
    out[-1]["val_loss"] = last_loss
    return out


MNIST_PC_LR_5E2 = (0.53, 0.5375, 0.536, 0.5339)  # pFedHN-PC on MNIST at CIFAR's lr
CIFAR10_PFEDHN = (0.41, 0.4994, 0.6133, 0.5413)  # learning, with one dip (10 clients)


def test_check_flags_a_run_that_never_left_the_majority_level_after_enough_visits():
    assert training_check(history(*MNIST_PC_LR_5E2[:3]), 0.5375, 9.0)["status"] == "too early"
    stuck = training_check(history(*MNIST_PC_LR_5E2), 0.5375, 12.0)
    assert stuck["status"] == "collapsed" and "server.lr" in stuck["message"]
    assert "0.5375" in stuck["message"] and "not started to learn" in stuck["message"]
    assert training_check(history(0.5375 + 0.019), 0.5375, COLLAPSE_VISITS)["status"] \
        == "collapsed"
    assert training_check(history(0.5375 + 0.021), 0.5375, COLLAPSE_VISITS)["status"] == "ok"


def test_check_forgives_one_dip_but_not_a_fall_back_to_the_majority_level():
    assert training_check(history(*CIFAR10_PFEDHN), 0.5288, 12.0)["status"] == "ok"
    fell = training_check(history(*CIFAR10_PFEDHN, 0.53), 0.5288, 15.0)
    assert fell["status"] == "collapsed" and "fell back" in fell["message"]
    assert "0.6133" in fell["message"]  # what it had reached


def test_check_flags_non_finite_weights_at_once_and_without_a_split():
    for loss in (math.nan, math.inf):
        check = training_check(history(0.1, last_loss=loss), None, 0.1)
        assert check["status"] == "diverged" and "server.lr" in check["message"]
    assert training_check(history(0.1), None, 50.0)["status"] == "not checked"


# The paper's five networks, seed 42: val accuracy at rounds 10, 20, 29 (one visit
# per client a round) against a majority-class level of 0.5973.
FIVE_NETWORKS = ((10, 0.2169), (20, 0.2988), (29, 0.6406))


def test_a_heterogeneous_run_is_judged_later_and_still_judged(tmp_path):
    evaluations = [{"round": r, "val_acc": v, "val_loss": 1.0} for r, v in FIVE_NETWORKS]
    split = {"majority_class_acc": {"val": 0.5973}}
    metrics = {"test_acc": 0.5, "test_acc_min": 0.0, "test_acc_max": 1.0, "val_loss": 1.0}

    def status(network_names, rounds):
        recorder = RunRecorder(tmp_path / str(len(network_names)) / str(len(rounds)),
                               50, "check", split, network_names=network_names)
        for r, v in rounds:
            recorder.on_evaluate(r, metrics | {"val_acc": v})
        recorder.close()
        return recorder.check["status"]

    one, five = {100: "cnn"}, {100 * i: f"net{i}" for i in range(1, 6)}
    assert status(one, FIVE_NETWORKS[:2]) == "collapsed"  # one network: judged at 10
    assert status(five, FIVE_NETWORKS[:2]) == "too early"
    # Once judged, the run that took off passes and one still at round 20's level does not.
    judged = training_check(evaluations, 0.5973, HETEROGENEOUS_COLLAPSE_VISITS,
                            HETEROGENEOUS_COLLAPSE_VISITS)
    assert judged["status"] == "ok"
    stuck = evaluations[:2] + [{"round": 40, "val_acc": 0.3, "val_loss": 1.0}]
    assert training_check(stuck, 0.5973, 40.0, HETEROGENEOUS_COLLAPSE_VISITS)["status"] \
        == "collapsed"
