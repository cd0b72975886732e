"""Shared fixtures: the committed tiny MNIST split and config composition."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pFedHN.config import compose_config  # noqa: F401 (the tests take it from here)

REPO = Path(__file__).resolve().parents[1]
TINY_MNIST = REPO / "tests" / "fixtures" / "tiny_mnist"

# A small but real pFedHN setting on the committed tiny MNIST split.
TINY_OVERRIDES = [
    "dataset.data=mnist", "model.n_kernels=7", "model.in_channels=1", "model.n_hidden=1",
    f"dataset.root={TINY_MNIST}", "dataset.download=false", "dataset.val_size=500",
    "num_clients=10",
]


@pytest.fixture
def tiny_cfg():
    return compose_config(TINY_OVERRIDES)


# Tests taking ``device`` run on the CPU and, where torch sees one, on CUDA too.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))]


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def write_image_folder(root, classes=("cat", "dog", "emu"), per_class=(12, 4), size=20,
                       splits=("train", "test"), step=40):
    """A small ImageFolder tree of PNGs; pixel values encode the class."""
    for split, count in zip(splits, per_class, strict=True):
        for label, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for k in range(count):
                pixels = np.full((size, size, 3), step * label + k, dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{k}.png")
