"""Shared fixtures: the committed tiny MNIST split and config composition."""

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pFedHN.config import compose_config, load_settings
from pFedHN.settings import Settings

REPO = Path(__file__).resolve().parents[1]
TINY_MNIST = REPO / "tests" / "fixtures" / "tiny_mnist"

# A small but real pFedHN setting on the committed tiny MNIST split.
TINY_OVERRIDES = [
    "dataset.data=mnist", "model.n_kernels=7", "model.in_channels=1", "model.n_hidden=1",
    f"dataset.root={TINY_MNIST}", "dataset.download=false", "dataset.val_size=500",
    "num_clients=10",
]


def tiny_settings(*overrides: str) -> Settings:
    """The tiny MNIST settings with ``overrides``, checked from the config alone."""
    return load_settings(compose_config(TINY_OVERRIDES + list(overrides)), on_disk=False)


# A short pFedHN-PC run: long enough for checkpoints and evaluations at rounds 8, 16, 24.
SMALL = TINY_OVERRIDES + ["num_clients=4", "num_rounds=24", "eval_every=8",
                          "checkpoint_every=8", "client.inner_steps=10"]
PC = ["model.local=True", "model.variant=1", "server.lr=5e-2"]


def main_command(run_dir, *extra):
    """``python -m pFedHN.main`` of the short pFedHN-PC run, into ``run_dir``."""
    return [sys.executable, "-m", "pFedHN.main", *SMALL, *PC, *extra, f"hydra.run.dir={run_dir}"]


@pytest.fixture(scope="session")
def pc_run(tmp_path_factory):
    """The short pFedHN-PC run, uninterrupted, with Flower's own polling and Ray's own
    object-store threshold (other runs use the package's defaults). Several modules
    read it; none may change its results.json. Run once for all of pytest-xdist's
    workers: the first to need it makes it in their shared temporary folder."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    run_dir = shared / "pc_run"
    with open(shared / "pc_run.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        finished = shared / "pc_run.finished"  # results.json is written as a run goes
        if not finished.exists():
            shutil.rmtree(run_dir, ignore_errors=True)  # a worker's failed attempt
            subprocess.run(main_command(run_dir, "simulation.poll_interval=null",
                                        "simulation.inline_bytes=null"),
                           cwd=REPO, check=True, capture_output=True, timeout=600)
            finished.touch()
    return run_dir


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
