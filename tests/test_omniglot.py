"""Omniglot: torchvision's on-disk layout, the split by alphabet, the 4-convolution network."""

import numpy as np
import pytest
import torch
from flwr.app import RecordDict
from PIL import Image

from pFedHN.client import InnerLoop, LocalStore, PFedHNClient, Training
from pFedHN.config import ConfigError
from pFedHN.dataset import (
    DATASETS,
    DataNotFoundError,
    SplitSettings,
    ensure_available,
    federated_data,
)
from pFedHN.experiment import prepare
from pFedHN.models import CNNHyper, ConvNet4, make_target, parameter_shapes
from tests.conftest import compose_config

# (half, alphabet, characters): two background alphabets and one evaluation alphabet
ALPHABETS = [("background", "Alpha", 3), ("background", "Beta", 2), ("evaluation", "Gamma", 4)]


def write_omniglot(root, drawings=20):
    """Extracted Omniglot as torchvision lays it out; a drawing's grey level encodes its
    character (numbered over both halves, background first)."""
    character = 0
    for half, alphabet, count in ALPHABETS:
        for c in range(1, count + 1):
            folder = root / "omniglot-py" / f"images_{half}" / alphabet / f"character{c:02d}"
            folder.mkdir(parents=True)
            for k in range(1, drawings + 1):
                pixels = np.full((105, 105), 20 + 10 * character, dtype=np.uint8)
                Image.fromarray(pixels, mode="L").save(folder / f"{c:02d}{k:02d}_{k:02d}.png")
            character += 1


@pytest.fixture(scope="module")
def omniglot_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("omniglot")
    write_omniglot(root)
    return root


def test_clients_hold_whole_alphabets_with_local_labels(omniglot_root):
    ensure_available("omniglot", omniglot_root, download=False)
    clients = federated_data(DATASETS["omniglot"], str(omniglot_root), SplitSettings(3, 0, 0, 0))
    sizes = []
    for data in clients:
        assert data.train_x.shape[1:] == (1, 28, 28) and data.train_x.dtype == torch.uint8
        characters = len(data.train_y.unique())
        sizes.append(characters)
        assert data.train_y.unique().tolist() == list(range(characters))  # 0..C-1
        for split, per_character in (("train", 14), ("val", 2), ("test", 4)):
            labels = getattr(data, f"{split}_y")
            assert np.bincount(labels.numpy()).tolist() == [per_character] * characters
            # a drawing's grey level names its global character: one per local label
            grey = getattr(data, f"{split}_x")[:, 0, 14, 14]
            for label in range(characters):
                assert len(grey[labels == label].unique()) == 1
        assert set(data.test_x[:, 0, 14, 14].tolist()) == set(data.train_x[:, 0, 14, 14].tolist())
    assert sorted(sizes) == [2, 3, 4]  # one alphabet each


def test_omniglot_settings_are_checked_against_the_data(omniglot_root):
    base = ["data=omniglot", f"dataset.root={omniglot_root}", "dataset.download=false"]
    cfg = prepare(compose_config(base + ["num_clients=3", "model.out_dim=4"]))
    assert cfg.model.target == "conv4"
    with pytest.raises(ConfigError, match="num_clients"):
        prepare(compose_config(base + ["num_clients=4"]))  # only three alphabets
    with pytest.raises(ConfigError, match=r"model\.out_dim"):
        prepare(compose_config(base + ["num_clients=1", "model.out_dim=5"]))  # 9 characters


def test_missing_omniglot_offline_is_named(tmp_path):
    with pytest.raises(DataNotFoundError, match="omniglot-py"):
        ensure_available("omniglot", tmp_path, download=False)


def test_conv4_network_and_its_generated_weights():
    model = ConvNet4(1, 16, 55, 28)
    widths = [m.out_channels for m in model.convs]
    assert widths == [16, 32, 64, 128] and model.feature_dim == 128
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 55)
    body = make_target("conv4", in_channels=1, n_kernels=16, out_dim=55, input_size=28,
                       local=True)
    assert body(torch.zeros(2, 1, 28, 28)).shape == (2, 128) and body.fc is None
    hnet = CNNHyper(3, parameter_shapes(model), n_hidden=1)
    model.load_state_dict(hnet(1), strict=True)  # names and shapes line up


def test_a_pc_client_trains_on_omniglot(omniglot_root):
    data = federated_data(DATASETS["omniglot"], str(omniglot_root), SplitSettings(3, 0, 0, 0))[0]
    model = ConvNet4(1, 8, 4, 28, local=True)
    arrays = [p.detach().numpy().copy() for p in model.parameters()]
    client = PFedHNClient(0, data, ConvNet4(1, 8, 4, 28, local=True),
                          Training(InnerLoop(steps=5, batch_size=8), seed=0, out_dim=4),
                          store=LocalStore(RecordDict()))
    delta, n, metrics = client.fit(arrays, {"server-round": 1})
    assert [d.shape for d in delta] == [a.shape for a in arrays] and n == len(data.train_y)
    assert metrics["head-fingerprint-in"] != metrics["head-fingerprint-out"]  # a 128-d head
