"""Checkpoints: everything the server needs to continue a run, written atomically."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from pFedHN.files import write_atomic

log = logging.getLogger(__name__)
FILENAME = "checkpoint.pt"
# Every setting defines the experiment a checkpoint belongs to, except these: how long
# and how often (a resume may train longer), where files and data live, the hardware,
# and the novel-client phase that follows training. A resume must agree on the rest.
MAY_CHANGE = (
    "num_rounds", "eval_every", "checkpoint_every", "resume", "device", "deterministic",
    "dataset.root", "dataset.download", "server.round_timeout", "server.node_timeout",
    "server.fused_adam",
    "simulation",
    "novel.rounds", "novel.lr", "novel.optimizer", "novel.eval_every", "novel.dirichlet_alpha",
    "novel.from_run",
)


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or from another experiment."""


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat |= _flatten(value, f"{prefix}{key}.") if isinstance(value, dict) \
            else {f"{prefix}{key}": value}
    return flat


def identity(cfg: DictConfig) -> dict[str, Any]:
    """Every setting of ``cfg`` that defines the experiment, as ``{"a.b": value}``."""
    flat = _flatten(OmegaConf.to_container(cfg, resolve=True))
    return {key: value for key, value in flat.items()
            if not any(key == k or key.startswith(f"{k}.") for k in MAY_CHANGE)}


def save(run_dir: Path, cfg: DictConfig, server_round: int, **states: dict) -> Path:
    """Write ``run_dir/checkpoint.pt`` (atomically)."""
    payload = {"round": server_round, "identity": identity(cfg), **states}
    return write_atomic(Path(run_dir) / FILENAME, lambda tmp: torch.save(payload, tmp))


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
    differing = [f"{k}: checkpoint {saved[k]!r}, config {v!r}"
                 for k, v in ours.items() if k in saved and saved[k] != v]
    if differing:
        raise CheckpointError(
            f"resume={run_dir}: the checkpoint (round {server_round}) is from another "
            "experiment; pass the overrides it was made with. Differences: "
            + "; ".join(differing)
        )
    unrecorded = sorted(ours.keys() - saved.keys())
    if unrecorded:  # made by an older version, which recorded fewer settings
        log.warning("resume=%s: the checkpoint does not record %s; they are taken to be "
                    "as in the config", run_dir, ", ".join(unrecorded))
    if server_round > cfg.num_rounds:
        raise CheckpointError(
            f"resume={run_dir}: the checkpoint is at round {server_round}, "
            f"past num_rounds={cfg.num_rounds}"
        )
    return payload
