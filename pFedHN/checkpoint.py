"""Checkpoints: everything the server needs to continue a run, written atomically."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path
from typing import Any

import torch

from pFedHN.files import write_atomic
from pFedHN.settings import Settings, flatten

log = logging.getLogger(__name__)
# Every setting defines the experiment a checkpoint belongs to, except these: how long
# and how often (a resume may train longer), where files and data live, the hardware,
# and the novel-client phase that follows training. A resume must agree on the rest.
MAY_CHANGE = (
    "num_rounds", "eval_every", "checkpoint_every", "resume", "device", "deterministic",
    "dataset.root", "dataset.download", "server.round_timeout", "server.node_timeout",
    "server.fused_adam", "server.fused_sgd", "server.max_failed_rounds", "server.visit_retries",
    "server.accept_lost_visits",
    "simulation",
    "novel.rounds", "novel.lr", "novel.optimizer", "novel.eval_every", "novel.dirichlet_alpha",
    "novel.from_run",
)


@dataclass(frozen=True)
class Phase:
    """A resumable part of a run: training, then the novel clients' embedding phase."""

    filename: str
    may_change: tuple[str, ...]  # settings a resume may change (see MAY_CHANGE)
    rounds_key: str  # the setting that says how many rounds the phase has

    @property
    def previous(self) -> str:
        """The checkpoint before the latest, kept to fall back on if the latest is damaged."""
        stem, _, suffix = self.filename.rpartition(".")
        return f"{stem}.previous.{suffix}"

    def num_rounds(self, settings: Settings) -> int:
        """How many rounds the phase has in ``settings``."""
        return attrgetter(self.rounds_key)(settings)

    def due(self, settings: Settings, server_round: int) -> bool:
        """A checkpoint is written every ``checkpoint_every`` rounds and after the last."""
        return server_round % settings.checkpoint_every == 0 \
            or server_round == self.num_rounds(settings)


TRAINING = Phase("checkpoint.pt", MAY_CHANGE, "num_rounds")
# The novel phase continues a trained hypernetwork: its training length and the
# novel phase's own optimizer and split define it too; only its length may change.
NOVEL = Phase("novel_checkpoint.pt",
              tuple(k for k in MAY_CHANGE if k not in (
                  "num_rounds", "novel.lr", "novel.optimizer", "novel.dirichlet_alpha")),
              "novel.rounds")
FILENAME = TRAINING.filename


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or from another experiment."""


class DamagedCheckpointError(CheckpointError):
    """A checkpoint file that is missing, truncated or corrupt."""


def identity(settings: Settings, phase: Phase = TRAINING) -> dict[str, Any]:
    """Every setting that defines the experiment (up to ``phase``), as ``{"a.b": value}``."""
    flat = flatten(settings.as_dict())
    return {key: value for key, value in flat.items()
            if not any(key == k or key.startswith(f"{k}.") for k in phase.may_change)}


def save(run_dir: Path, settings: Settings, server_round: int, phase: Phase = TRAINING,
         **states: dict) -> Path:
    """Write ``run_dir/<phase's file>`` (atomically); the one it replaces becomes ``previous``."""
    payload = {"round": server_round, "identity": identity(settings, phase), **states}
    path, previous = Path(run_dir) / phase.filename, Path(run_dir) / phase.previous

    def write(tmp: Path) -> None:
        torch.save(payload, tmp)
        if path.exists():  # killed between the two renames: load falls back on previous
            os.replace(path, previous)

    return write_atomic(path, write)


def load(run_dir: Path, settings: Settings, phase: Phase = TRAINING) -> dict[str, Any]:
    """Read and check a checkpoint completely before anything uses it.

    A missing, truncated or corrupt latest checkpoint falls back on the one
    before it (``Phase.previous``), saying so; a checkpoint of another
    experiment is refused whichever it is.
    """
    path, previous = Path(run_dir) / phase.filename, Path(run_dir) / phase.previous
    if not path.exists() and not previous.exists():
        raise CheckpointError(f"resume={run_dir}: no {phase.filename} in that run directory")
    parts = ("strategy", "recorder")
    try:
        payload = _read(path, f"resume={run_dir}", settings, phase, parts)
    except DamagedCheckpointError as damage:
        if not previous.exists():
            raise
        payload = _read(previous, f"resume={run_dir}", settings, phase, parts)
        log.warning("%s; falling back on %s (round %d)", damage, previous.name, payload["round"])
    server_round = payload["round"]
    num_rounds = phase.num_rounds(settings)
    if server_round > num_rounds:
        raise CheckpointError(
            f"resume={run_dir}: {phase.filename} is at round {server_round}, "
            f"past {phase.rounds_key}={num_rounds}"
        )
    return payload


def _read(path: Path, context: str, settings: Settings, phase: Phase,
          parts: tuple[str, ...]) -> dict[str, Any]:
    """A saved payload with ``parts``, of the experiment ``settings`` describe (else refused)."""
    if not path.exists():
        raise DamagedCheckpointError(f"{context}: {path} is missing")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
        saved, server_round = payload["identity"], int(payload["round"])
        for part in parts:
            payload[part]  # noqa: B018 - each must be present
    except Exception as error:  # noqa: BLE001 - any unreadable file is refused alike
        raise DamagedCheckpointError(
            f"{context}: {path} is corrupt or incomplete ({error})") from None
    ours = identity(settings, phase)
    differing = [f"{k}: checkpoint {saved[k]!r}, config {v!r}"
                 for k, v in ours.items() if k in saved and saved[k] != v]
    if differing:
        raise CheckpointError(
            f"{context}: the checkpoint (round {server_round}) is from another "
            "experiment; pass the overrides it was made with. Differences: "
            + "; ".join(differing)
        )
    unrecorded = sorted(ours.keys() - saved.keys())
    if unrecorded:  # made by an older version, which recorded fewer settings
        log.warning("%s: the checkpoint does not record %s; they are taken to be "
                    "as in the config", context, ", ".join(unrecorded))
    payload["round"] = server_round
    return payload


# The best-validation round's models: the hypernetwork then and the clients' own
# parts, written when a round becomes the best, so the models of results.json's
# headline round can be exported (pFedHN.export). One file per such round.
BEST_DIR = "best"


def _best_path(run_dir: Path, server_round: int) -> Path:
    return Path(run_dir) / BEST_DIR / f"{server_round:08d}.pt"


def best_rounds(run_dir: Path) -> list[int]:
    """The rounds whose best-round state ``run_dir`` holds, in order."""
    return sorted(int(p.stem) for p in (Path(run_dir) / BEST_DIR).glob("*.pt"))


def save_best(run_dir: Path, settings: Settings, server_round: int, model: dict,
              client_state: dict[int, dict] | None) -> Path:
    """Write the state of a new best round (``client_state``: None where the server has none)."""
    payload = {"round": server_round, "identity": identity(settings), "model": model,
               "client_state": client_state}
    path = _best_path(run_dir, server_round)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, lambda tmp: torch.save(payload, tmp))


def prune_best(run_dir: Path, before: int | None = None, after: int | None = None) -> None:
    """Forget best-round state older than ``before`` (superseded for good) or newer than ``after``.

    At a checkpoint, ``before`` is the best round so far: a resume from it can
    never go back to an older one. On resume, ``after`` is the last evaluated
    round the checkpoint records: later ones belong to the lost stretch.
    """
    for server_round in best_rounds(run_dir):
        if (before is not None and server_round < before) or \
                (after is not None and server_round > after):
            _best_path(run_dir, server_round).unlink()


def load_best(run_dir: Path, settings: Settings, server_round: int) -> dict[str, Any]:
    """The state ``save_best`` wrote for ``server_round``, checked like a checkpoint."""
    path = _best_path(run_dir, server_round)
    if not path.exists():
        raise CheckpointError(f"{run_dir}: no state of round {server_round} in {BEST_DIR}/")
    return _read(path, str(run_dir), settings, TRAINING, ("model", "client_state"))
