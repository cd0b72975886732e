import subprocess
import sys
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch

from pFedHN import dataset as dataset_module
from pFedHN.config import ConfigError, data_spec, load_settings
from pFedHN.dataset import (
    DATASETS,
    DataNotFoundError,
    SplitSettings,
    assign_classes,
    cached_partition,
    client_indices,
    dataset_spec,
    ensure_available,
    federated_data,
    load_images,
    load_labels,
    split_by_assignment,
)
from pFedHN.experiment import prepare
from tests.conftest import REPO, TINY_MNIST, TINY_OVERRIDES, compose_config, write_image_folder


@pytest.mark.parametrize("clients,classes,per_client", [(50, 10, 2), (50, 100, 10), (7, 10, 3)])
def test_assignment_gives_distinct_classes_and_paper_proportions(clients, classes, per_client):
    assignment = assign_classes(clients, classes, per_client, np.random.default_rng(0))
    count = per_client * clients // classes + 1
    uses = Counter()
    share = Counter()
    for client in assignment:
        assert len(set(client.classes)) == per_client
        for c, p in zip(client.classes, client.proportions, strict=True):
            uses[c] += 1
            share[c] += p
            # U(0.4, 0.6) draws normalised over `count` draws.
            assert 0.4 / (0.4 + 0.6 * (count - 1)) <= p <= 0.6 / (0.6 + 0.4 * (count - 1))
    assert max(uses.values()) <= count
    assert all(s <= 1.0 + 1e-9 for s in share.values())
    if (per_client * clients) % classes == 0:  # every class used equally often ...
        assert set(uses.values()) == {count - 1}
        assert all(s < 1.0 for s in share.values())  # ... and the +1 leaves some unused


def test_split_takes_int_n_times_p_disjoint_samples_per_class():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, size=5000)
    assignment = assign_classes(20, 10, 2, rng)
    indices = split_by_assignment(labels, assignment, 10, rng.permutation)
    flat = np.concatenate(indices)
    assert len(flat) == len(set(flat.tolist()))  # disjoint
    sizes = np.bincount(labels, minlength=10)
    for client, idx in zip(assignment, indices, strict=True):
        got = Counter(labels[idx].tolist())
        want = {c: int(sizes[c] * p) for c, p in zip(client.classes, client.proportions,
                                                       strict=True)}
        assert dict(got) == want


def test_clients_have_the_same_class_mix_in_train_val_and_test():
    clients = federated_data(DATASETS["mnist"], str(TINY_MNIST), SplitSettings(10, 2, 500, 0))
    assert len(clients) == 10
    for data in clients:
        mixes = []
        for split in ("train", "val", "test"):
            y = getattr(data, f"{split}_y")
            assert len(y) > 0
            counts = torch.bincount(y, minlength=10).double()
            mixes.append(counts / counts.sum())
            assert int((counts > 0).sum()) == 2
        assert torch.equal(mixes[0] > 0, mixes[2] > 0)
        assert torch.allclose(mixes[0], mixes[2], atol=0.1)  # same proportions, up to rounding
        assert data.train_x.dtype == torch.uint8 and data.train_x.shape[1:] == (1, 28, 28)
    total_train = sum(len(c.train_y) for c in clients)
    assert total_train < 2000  # 2500 - 500 val, and the +1 leaves some unused


def test_split_is_seeded():
    federated_data.cache_clear()
    a = federated_data(DATASETS["mnist"], str(TINY_MNIST), SplitSettings(10, 2, 500, 1))
    federated_data.cache_clear()
    b = federated_data(DATASETS["mnist"], str(TINY_MNIST), SplitSettings(10, 2, 500, 1))
    c = federated_data(DATASETS["mnist"], str(TINY_MNIST), SplitSettings(10, 2, 500, 2))
    assert all(torch.equal(x.train_x, y.train_x) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x.train_y, y.train_y) for x, y in zip(a, c, strict=True))


def test_normalisation_matches_totensor_then_normalize():
    data = federated_data(DATASETS["mnist"], str(TINY_MNIST), SplitSettings(10, 2, 500, 0))[0]
    x = data.train_x[:4]
    expected = (x.float() / 255.0 - 0.1307) / 0.3081
    torch.testing.assert_close(data.normalize(x), expected)


def test_missing_data_offline_names_root_and_layout(tmp_path):
    with pytest.raises(DataNotFoundError) as err:
        ensure_available("cifar10", tmp_path / "nowhere", download=False)
    message = str(err.value)
    assert str(tmp_path / "nowhere") in message
    assert "cifar-10-batches-py" in message and "dataset.root" in message


def test_present_data_passes_the_check():
    ensure_available("mnist", TINY_MNIST, download=False)


def test_image_folder_is_read_split_and_resized(tmp_path):
    write_image_folder(tmp_path)
    spec = dataset_spec("folder", tmp_path, image_size=32)
    assert (spec.num_classes, spec.in_channels, spec.image_size) == (3, 3, 32)
    clients = federated_data(spec, str(tmp_path), SplitSettings(3, 1, 6, 0))
    for data in clients:
        assert data.train_x.shape[1:] == (3, 32, 32) and data.train_x.dtype == torch.uint8
        label = int(data.test_y[0])
        assert set(data.train_y.tolist()) == set(data.test_y.tolist()) == {label}
        assert int(data.test_x[0, 0, 0, 0]) // 40 == label  # images stay with their labels
    # mean measured on all 36 training images: (40 * mean label + mean k) / 255
    expected = torch.full((3, 1, 1), (40 * 1 + 5.5) / 255)
    torch.testing.assert_close(clients[0].mean, expected)


def test_image_folder_problems_are_named(tmp_path):
    with pytest.raises(DataNotFoundError, match="train"):
        dataset_spec("folder", tmp_path)
    write_image_folder(tmp_path)
    (tmp_path / "test" / "emu").rename(tmp_path / "test" / "owl")
    with pytest.raises(DataNotFoundError, match="must be the same"):
        dataset_spec("folder", tmp_path)


CINIC_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                 "ship", "truck")


def test_cinic10_is_read_from_its_own_layout(tmp_path):
    """CINIC-10's train/valid/test folders of 32x32 PNGs: train and valid pool into the
    training set (val is cut from it), test stays the test set."""
    write_image_folder(tmp_path, CINIC_CLASSES, per_class=(4, 3, 2), size=32,
                       splits=("train", "valid", "test"), step=20)
    spec = dataset_spec("cinic10", tmp_path)
    assert (spec.num_classes, spec.in_channels, spec.image_size) == (10, 3, 32)
    assert spec.mean == DATASETS["cinic10"].mean  # CINIC-10's own normalisation
    train_x, train_y = load_images(spec, tmp_path, train=True)
    test_x, test_y = load_images(spec, tmp_path, train=False)
    assert train_x.shape == (70, 3, 32, 32) and test_x.shape == (20, 3, 32, 32)
    assert np.array_equal(load_labels(spec, tmp_path, train=True), train_y.numpy())
    assert np.bincount(train_y.numpy()).tolist() == [7] * 10
    assert all(int(x[0, 0, 0]) // 20 == int(y) for x, y in zip(train_x, train_y, strict=True))
    clients = federated_data(spec, str(tmp_path), SplitSettings(5, 2, 10, 0))
    for data in clients:
        assert len(set(data.train_y.tolist())) <= 2
        assert set(data.test_y.tolist()) <= set(data.train_y.tolist())


def test_cinic10_without_its_valid_folder_says_where_to_get_it(tmp_path):
    write_image_folder(tmp_path, CINIC_CLASSES, per_class=(2, 2), size=32, step=20)
    with pytest.raises(DataNotFoundError, match=r"valid is not a directory.*CINIC-10\.tar\.gz"):
        dataset_spec("cinic10", tmp_path)


def _labels(n, classes=10, seed=0):
    return np.random.default_rng(seed).integers(0, classes, n)


@pytest.mark.parametrize("alpha,skewed", [(0.05, True), (100.0, False)])
def test_dirichlet_split_is_disjoint_skewed_by_alpha_and_keeps_min_samples(alpha, skewed):
    train, test = _labels(6000), _labels(1000, seed=1)
    split = client_indices(train, test, 10, SplitSettings(20, 2, 1000, seed=3,
                                                          partition="dirichlet",
                                                          dirichlet_alpha=alpha, min_samples=40))
    for name, pool_size in (("train", 5000), ("val", 1000), ("test", 1000)):
        everything = np.concatenate(split[name])
        assert len(everything) == len(set(everything.tolist())) == pool_size  # disjoint, all
    assert min(len(idx) for idx in split["train"]) >= 40
    val = set(np.concatenate(split["val"]).tolist())
    assert not val & set(np.concatenate(split["train"]).tolist())
    top_share = [np.bincount(train[idx], minlength=10).max() / len(idx) for idx in split["train"]]
    assert (np.mean(top_share) > 0.7) if skewed else (np.mean(top_share) < 0.3)
    if skewed:  # a client's test set follows its own class proportions
        same = [np.bincount(train[a], minlength=10).argmax()
                == np.bincount(test[b], minlength=10).argmax()
                for a, b in zip(split["train"], split["test"], strict=True) if len(b)]
        assert np.mean(same) > 0.8


def test_dirichlet_split_that_cannot_serve_min_samples_names_the_key():
    cfg = compose_config(TINY_OVERRIDES + ["client.partition=dirichlet",
                                           "client.min_samples=1000"])
    with pytest.raises(ConfigError, match=r"client\.min_samples=1000 .*Dirichlet"):
        prepare(cfg)


def test_local_test_share_splits_each_clients_pooled_data():
    train, test = _labels(5000), _labels(1000, seed=1)
    split = client_indices(train, test, 10,
                           SplitSettings(10, 2, 600, seed=0, local_test_share=0.25))
    pooled = np.concatenate([train, test])
    used = np.concatenate([np.concatenate(split[n]) for n in ("train", "val", "test")])
    assert len(used) == len(set(used.tolist())) and used.max() >= 5000  # test images reused
    for own_train, own_test in zip(split["train"], split["test"], strict=True):
        total = len(own_train) + len(own_test)
        assert abs(len(own_test) - 0.25 * total) <= 0.5
        assert set(pooled[own_test]) <= set(pooled[own_train])  # the client's own classes
    data = federated_data(DATASETS["mnist"], str(TINY_MNIST), SplitSettings(5, 2, 500, 0,
                          local_test_share=0.25))
    for client in data:
        assert len(client.test_y) == round(0.25 * (len(client.train_y) + len(client.test_y)))
        assert set(client.test_y.tolist()) <= set(client.train_y.tolist())


def test_cached_partition_is_decoded_once_then_read_from_disk(tmp_path, monkeypatch):
    cfg = load_settings(compose_config(TINY_OVERRIDES))
    spec, split = data_spec(cfg), cfg.split
    fresh = federated_data(spec, cfg.dataset.root, split)[3]
    first = cached_partition(tmp_path, spec, cfg.dataset.root, 3, split)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].name.startswith("partition3-")

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded the dataset again")

    monkeypatch.setattr(dataset_module, "federated_data", no_decoding)
    again = cached_partition(tmp_path, spec, cfg.dataset.root, 3, split)
    for name in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y", "mean", "std"):
        assert torch.equal(getattr(again, name), getattr(fresh, name))
        assert torch.equal(getattr(first, name), getattr(fresh, name))
    with pytest.raises(AssertionError, match="decoded"):  # another split: another file
        cached_partition(tmp_path, spec, cfg.dataset.root, 3, replace(split, seed=7))
    with pytest.raises(AssertionError, match="decoded"):  # another partition
        cached_partition(tmp_path, spec, cfg.dataset.root, 4, split)


def test_a_supernode_message_with_a_cached_partition_imports_no_torchvision_nor_simulation(
    tmp_path,
):
    """flwr 1.42 starts a process per message: it should import only what it uses."""
    cfg = load_settings(compose_config(TINY_OVERRIDES))
    cached_partition(tmp_path, data_spec(cfg), cfg.dataset.root, 2, cfg.split)
    script = f"""
import sys
from flwr.app import Context, RecordDict
import pFedHN.deployment
from pFedHN.client import client_builder
from pFedHN.config import compose_config, load_settings
cfg = load_settings(compose_config({TINY_OVERRIDES!r}))
context = Context(run_id=1, node_id=1, state=RecordDict(), run_config={{}},
                  node_config={{"partition-id": 2, "data-cache-dir": {str(tmp_path)!r}}})
client = client_builder(cfg, data_cache=True)(context)
assert len(client.data.train_y) > 0
print(sorted(m for m in ("torchvision", "flwr.simulation", "matplotlib", "ray")
             if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
