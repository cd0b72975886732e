"""Checkpoints: everything the server needs to continue a run, written atomically."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

FILENAME = "checkpoint.pt"
# The settings a checkpoint's weights and data split depend on: a resumed run
# must agree on all of them. (Rounds, learning rates, eval_every may change.)
IDENTITY_KEYS = (
    "dataset.data", "dataset.val_size", "num_clients", "seed",
    "client.num_classes_per_node", "model.variant", "model.local", "model.in_channels",
    "model.n_kernels", "model.out_dim", "model.n_hidden", "model.hidden_dim",
    "model.embed_dim", "novel.num_clients", "client.partition",
)
# Keys added after checkpoints were first written: their value in those older checkpoints.
ADDED_LATER = {"novel.num_clients": 0, "client.partition": "classes"}


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or from another experiment."""


def identity(cfg: DictConfig) -> dict[str, Any]:
    """The values of IDENTITY_KEYS in ``cfg``."""
    return {key: OmegaConf.select(cfg, key) for key in IDENTITY_KEYS}


def save(run_dir: Path, cfg: DictConfig, server_round: int, **states: dict) -> Path:
    """Write ``run_dir/checkpoint.pt`` via a temporary file and a rename."""
    path = Path(run_dir) / FILENAME
    tmp = path.with_suffix(".pt.tmp")
    torch.save({"round": server_round, "identity": identity(cfg), **states}, tmp)
    os.replace(tmp, path)
    return path


def load(run_dir: Path, cfg: DictConfig) -> dict[str, Any]:
    """Read and check a checkpoint completely before anything uses it."""
    path = Path(run_dir) / FILENAME
    if not path.exists():
        raise CheckpointError(f"resume={run_dir}: no {FILENAME} in that run directory")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
        saved, server_round = payload["identity"], int(payload["round"])
        payload["strategy"], payload["recorder"]  # noqa: B018 - both must be present
    except Exception as error:  # noqa: BLE001 - any unreadable file is refused alike
        raise CheckpointError(f"resume={run_dir}: {path} is corrupt or incomplete ({error})") \
            from None
    ours = identity(cfg)
    saved = ADDED_LATER | saved
    differing = [f"{k}: checkpoint {saved.get(k)!r}, config {ours[k]!r}"
                 for k in IDENTITY_KEYS if saved.get(k) != ours[k]]
    if differing:
        raise CheckpointError(
            f"resume={run_dir}: the checkpoint (round {server_round}) is from another "
            "experiment; pass the overrides it was made with. Differences: "
            + "; ".join(differing)
        )
    if server_round > cfg.num_rounds:
        raise CheckpointError(
            f"resume={run_dir}: the checkpoint is at round {server_round}, "
            f"past num_rounds={cfg.num_rounds}"
        )
    return payload
