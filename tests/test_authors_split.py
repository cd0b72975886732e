"""client.partition=authors: the authors' pFedHN split, generator for generator.

The reference below is an independent, plain transcription of what the authors'
code does (their trainer seeds torch, numpy and Python's random globally, then
random_split cuts val, numpy assigns classes and proportions, Python's random
shuffles each class of train, val and test in turn). It uses the global
generators, as they do; the package uses private ones in the same states.
"""

import random

import numpy as np
import pytest
import torch

from pFedHN.config import ConfigError, load_settings
from pFedHN.dataset import client_indices
from pFedHN.settings import SplitSettings
from tests.conftest import TINY_OVERRIDES, compose_config

# CIFAR-10 as an image folder lists it (the JPEG copy): class by class.
TRAIN = np.repeat(np.arange(10), 5000)
TEST = np.repeat(np.arange(10), 1000)
VEHICLES = {0, 1, 8, 9}  # airplane, automobile, ship, truck


def reference_split(train_labels, test_labels, num_classes, clients, per_client, val_size,
                    seed):
    np.random.seed(seed)
    random.seed(seed)
    torch.manual_seed(seed)
    n = len(train_labels)
    subsets = torch.utils.data.random_split(range(n), [n - val_size, val_size])
    sets = [(np.array(s.indices), train_labels[s.indices]) for s in subsets]
    sets.append((np.arange(len(test_labels)), test_labels))

    slots = per_client * clients // num_classes + 1
    left = {c: slots for c in range(num_classes)}
    shares = {}
    for c in range(num_classes):
        u = np.random.uniform(0.4, 0.6, size=slots)
        shares[c] = list(u / u.sum())
    plan = []  # per client: [(class, share)]
    for _ in range(clients):
        picked = []
        for _ in range(per_client):
            most = max(left.values())
            c = int(np.random.choice([k for k in range(num_classes) if left[k] == most]))
            left[c] -= 1
            picked.append(c)
        plan.append([(c, shares[c].pop()) for c in picked])

    out = []
    for where, labels in sets:
        size = {c: int((labels == c).sum()) for c in range(num_classes)}
        queue = {}
        for c in range(num_classes):
            members = list(np.nonzero(labels == c)[0])
            random.shuffle(members)
            queue[c] = members
        per_client_sets = []
        for pairs in plan:
            mine = []
            for c, p in pairs:
                k = int(size[c] * p)
                mine += queue[c][:k]
                queue[c] = queue[c][k:]
            per_client_sets.append(sorted(where[mine].tolist()))
        out.append(per_client_sets)
    return dict(zip(("train", "val", "test"), out, strict=True))


def test_authors_split_of_cifar10_matches_their_totals_and_clients():
    ours = client_indices(TRAIN, TEST, 10, SplitSettings(50, 2, 10000, 42, partition="authors"))
    # Measured with the authors' trainer on the JPEG copy (seed 42, 50 clients).
    assert sum(map(len, ours["test"])) == 9025
    assert sum(map(len, ours["val"])) == 9031
    reference = reference_split(TRAIN, TEST, 10, 50, 2, 10000, 42)
    for name in ("train", "val", "test"):
        assert [sorted(i.tolist()) for i in ours[name]] == reference[name], name
    classes = [set(TRAIN[i].tolist()) for i in ours["train"]]
    assert sum(len(c & VEHICLES) == 1 for c in classes) == 24  # theirs; ours (classes): 36
    for name in ("val", "test"):  # a client's val and test follow its training classes
        labels = TRAIN if name == "val" else TEST
        assert [set(labels[i].tolist()) for i in ours[name]] == classes


@pytest.mark.parametrize("clients,per_client,seed", [(10, 2, 0), (100, 2, 7), (13, 3, 1)])
def test_authors_split_matches_the_reference_for_other_settings(clients, per_client, seed):
    rng = np.random.default_rng(5)
    train, test = rng.integers(0, 10, 6000), rng.integers(0, 10, 1500)
    ours = client_indices(train, test, 10,
                          SplitSettings(clients, per_client, 1000, seed, partition="authors"))
    reference = reference_split(train, test, 10, clients, per_client, 1000, seed)
    for name in ("train", "val", "test"):
        assert [sorted(i.tolist()) for i in ours[name]] == reference[name], name


def test_authors_split_differs_from_the_packages_own_split():
    theirs = client_indices(TRAIN, TEST, 10, SplitSettings(50, 2, 10000, 42, partition="authors"))
    ours = client_indices(TRAIN, TEST, 10, SplitSettings(50, 2, 10000, 42, partition="classes"))
    assert sum(map(len, ours["val"])) != sum(map(len, theirs["val"]))
    assert [set(TRAIN[i].tolist()) for i in ours["train"]] != \
        [set(TRAIN[i].tolist()) for i in theirs["train"]]


def test_authors_split_leaves_global_generators_alone():
    np.random.seed(3)
    random.seed(3)
    before = np.random.rand(), random.random()
    np.random.seed(3)
    random.seed(3)
    client_indices(TRAIN, TEST, 10, SplitSettings(10, 2, 1000, 42, partition="authors"))
    assert (np.random.rand(), random.random()) == before


def test_authors_split_refuses_mh_protocol():
    cfg = compose_config([*TINY_OVERRIDES, "client.partition=authors",
                          "dataset.local_test_share=0.25"])
    with pytest.raises(ConfigError, match="client.partition"):
        load_settings(cfg)


def reference_mh_split(labels, num_classes, clients, per_client, seed):
    """The MH-pFedHN authors' split of the training set, transcribed with global generators."""
    np.random.seed(seed)
    random.seed(seed)
    torch.manual_seed(seed)
    held = {i: list(np.random.choice(num_classes, size=per_client, replace=False))
            for i in range(clients)}
    weight = {i: {c: np.random.uniform(0.4, 0.6) for c in held[i]} for i in range(clients)}
    total = dict.fromkeys(range(num_classes), 0.0)
    for i in range(clients):
        for c, w in weight[i].items():
            total[c] += w
    size = {c: int((labels == c).sum()) for c in range(num_classes)}
    take = {i: {c: int(w / total[c] * size[c]) for c, w in weight[i].items()}
            for i in range(clients)}
    for c in range(num_classes):
        given = sum(take[i].get(c, 0) for i in range(clients))
        if given not in (0, size[c]):
            first = min(i for i in range(clients) if c in take[i])
            take[first][c] += size[c] - given
    members = {}
    for c in range(num_classes):
        members[c] = [j for j in range(len(labels)) if labels[j] == c]
        random.shuffle(members[c])
    cursor = dict.fromkeys(range(num_classes), 0)
    train, test = [], []
    for i in range(clients):
        mine = []
        for c, k in take[i].items():
            mine += members[c][cursor[c]:cursor[c] + k]
            cursor[c] += k
        n_test = int(len(mine) * 0.25)
        cut = torch.utils.data.random_split(mine, [len(mine) - n_test, n_test])
        train.append(sorted(mine[j] for j in cut[0].indices))
        test.append(sorted(mine[j] for j in cut[1].indices))
    return train, test


@pytest.mark.parametrize("classes,clients,per_client,seed", [
    (10, 50, 2, 42), (10, 7, 3, 0), (20, 30, 4, 5)])
def test_mh_authors_split_matches_the_reference(classes, clients, per_client, seed):
    rng = np.random.default_rng(1)
    train, test = rng.integers(0, classes, 8000), rng.integers(0, classes, 2000)
    ours = client_indices(train, test, classes, SplitSettings(clients, per_client, 1000, seed,
                          partition="mh-authors", local_test_share=0.25))
    reference = reference_mh_split(train, classes, clients, per_client, seed)
    assert [sorted(i.tolist()) for i in ours["train"]] == reference[0]
    assert [sorted(i.tolist()) for i in ours["test"]] == reference[1]


def test_mh_authors_split_deals_every_training_sample_and_cuts_each_client_75_25():
    split = client_indices(TRAIN, TEST, 10, SplitSettings(50, 2, 10000, 42, partition="mh-authors",
                           local_test_share=0.25))
    used = np.concatenate(split["train"] + split["test"])
    assert sorted(used.tolist()) == list(range(len(TRAIN)))  # each exactly once
    for train, test, val in zip(split["train"], split["test"], split["val"], strict=True):
        n = len(train) + len(test)
        assert len(test) == int(0.25 * n)
        held = set(TRAIN[np.concatenate([train, test])].tolist())
        assert len(held) == 2
        # Validation: the official test set (indices after the training set), same classes.
        assert val.min() >= len(TRAIN)
        assert set(TEST[val - len(TRAIN)].tolist()) == held
    assert sum(map(len, split["val"])) == len(TEST)


@pytest.mark.parametrize("partition", ["mh-authors", "mh-dirichlet"])
def test_mh_authors_split_needs_a_test_share(partition):
    cfg = compose_config([*TINY_OVERRIDES, f"client.partition={partition}"])
    with pytest.raises(ConfigError, match="local_test_share"):
        load_settings(cfg)


def reference_mh_dirichlet_split(labels, num_classes, clients, alpha, least, seed):
    """The MH-pFedHN authors' Dirichlet split, transcribed with global generators."""
    np.random.seed(seed)
    random.seed(seed)
    torch.manual_seed(seed)
    smallest = 0.0
    while least >= smallest:
        label_distribution = np.random.dirichlet([alpha] * clients, num_classes)
        class_members = [np.argwhere(labels == y).flatten() for y in range(num_classes)]
        per_client = [[] for _ in range(clients)]
        for members, fractions in zip(class_members, label_distribution, strict=True):
            cuts = (np.cumsum(fractions)[:-1] * len(members)).astype(int)
            for i, part in enumerate(np.split(members, cuts)):
                per_client[i] += [part]
        per_client = [np.concatenate(parts) for parts in per_client]
        smallest = min(len(p) for p in per_client)
    train, test = [], []
    for mine in per_client:
        n_test = int(len(mine) * 0.25)
        cut = torch.utils.data.random_split(mine, [len(mine) - n_test, n_test])
        train.append(sorted(int(mine[j]) for j in cut[0].indices))
        test.append(sorted(int(mine[j]) for j in cut[1].indices))
    return train, test


@pytest.mark.parametrize("classes,clients,alpha,least,seed", [
    (10, 50, 0.1, 30, 42), (10, 20, 0.5, 100, 3), (20, 30, 0.3, 40, 7)])
def test_mh_dirichlet_split_matches_the_reference(classes, clients, alpha, least, seed):
    rng = np.random.default_rng(1)
    train, test = rng.integers(0, classes, 8000), rng.integers(0, classes, 2000)
    ours = client_indices(train, test, classes, SplitSettings(
        clients, 2, 1000, seed, partition="mh-dirichlet", dirichlet_alpha=alpha,
        min_samples=least, local_test_share=0.25))
    reference = reference_mh_dirichlet_split(train, classes, clients, alpha, least, seed)
    assert [sorted(i.tolist()) for i in ours["train"]] == reference[0]
    assert [sorted(i.tolist()) for i in ours["test"]] == reference[1]
    sizes = [len(a) + len(b) for a, b in zip(ours["train"], ours["test"], strict=True)]
    assert min(sizes) > least
    used = np.concatenate(ours["train"] + ours["test"])
    assert sorted(used.tolist()) == list(range(len(train)))  # every sample, once
    assert all(len(b) == int(0.25 * n) for b, n in zip(ours["test"], sizes, strict=True))
    val = np.concatenate(ours["val"])
    assert sorted(val.tolist()) == list(range(len(train), len(train) + len(test)))
