"""The split summary (what each client holds) and the check that a run trained."""

import math

import numpy as np
import pytest

from pFedHN.dataset import CIFAR10_VEHICLES, split_summary
from pFedHN.results import COLLAPSE_VISITS, training_check


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
