"""Personalized models out of a run: every client's own network, ready to use.

``python -m pFedHN.export <run dir> [round=best|last] [clients=all|0,7]`` writes
``<run dir>/models/``: ``client_<partition>.pt`` per client (a plain state dict,
read with ``torch.load(path, weights_only=True)``) and ``index.json``, which says
what each file holds: the network's family, name and arguments, pFedHN-PC's
head, the input normalisation, the round, the client's accuracies there and the
file's SHA-256. ``load_client_model(run_dir, client)`` rebuilds a client's model
from them, in eval mode; it takes images scaled to [0, 1] (what torchvision's
``ToTensor`` gives) and returns logits.

``round=best`` is the round of best pooled validation accuracy, the one whose
test accuracy ``results.json`` headlines (kept by the run in ``best/``);
``round=last`` is the run's checkpoint. Novel clients come from the novel
phase's checkpoint. What clients keep to themselves (pFedHN-PC heads, batch-norm
statistics) comes from the simulation's mirror of it; in deployment it never
reaches the server, and each SuperNode writes its own model (``model-dir`` in
its node config; docs/deployment.md).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError
from torch import nn

from pFedHN import checkpoint
from pFedHN.checkpoint import CheckpointError
from pFedHN.client import NOVEL_STATE_DIR, STATE_DIR, initial_head, kept_state, named_theta
from pFedHN.config import compose_config, data_spec
from pFedHN.dataset import DataNotFoundError, federated_data
from pFedHN.networks import client_network, global_network
from pFedHN.personal_model import (
    MODELS_DIR,
    ExportError,
    load_client_model,
    personalized_model,
    write_index,
    write_model,
)
from pFedHN.server import build_strategy
from pFedHN.settings import ConfigError, Settings
from pFedHN.zoo import Network

__all__ = ["ExportError", "export", "load_client_model", "main"]

ROUNDS = ("best", "last")


def run_settings(run_dir: Path) -> Settings:
    """The settings a run directory was made with (its ``config.yaml``)."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ExportError(f"{run_dir}: not a run directory (no config.yaml); give the "
                          "directory a run wrote its results.json into")
    try:
        # Keys added since the run was made take their defaults (none defines an experiment).
        settings = Settings.from_config(OmegaConf.merge(compose_config(), OmegaConf.load(path)))
    except (ConfigError, ConfigKeyError) as error:
        raise ExportError(f"{path}: not a config of this version of pFedHN "
                          f"({str(error).splitlines()[0]})") from None
    return settings.replace(device="cpu")  # generated on the CPU, wherever the run trained


def _accuracies(evaluation: dict[str, Any] | None, partition_id: int) -> dict[str, float | None]:
    client = ((evaluation or {}).get("per_client") or {}).get(str(partition_id), {})
    return {"val_acc": client.get("val_acc"), "test_acc": client.get("test_acc")}


def _normalization(settings: Settings) -> tuple[list[float], list[float]]:
    """The mean and std every client normalised with (measured on the data if not set)."""
    spec = data_spec(settings, on_disk=False)
    if spec.mean is not None and spec.std is not None:
        return list(spec.mean), list(spec.std)
    try:
        data = federated_data(data_spec(settings), settings.dataset.root, settings.split)[0]
    except (DataNotFoundError, OSError) as error:
        raise ExportError(
            f"the clients normalised with a mean and std measured on their images "
            f"(dataset.mean/std were null), which this machine lacks ({error}); export where "
            "the data is, or read each SuperNode's own model (node config model-dir)") from None
    return data.mean.flatten().tolist(), data.std.flatten().tolist()


class _Source:
    """One saved state: the hypernetwork of a round and what the clients kept then."""

    def __init__(self, settings: Settings, round_: int, model: dict,
                 client_state: dict[int, dict] | None, phase: str) -> None:
        self.settings, self.round, self.phase = settings, round_, phase
        self.client_state = client_state
        self.strategy = build_strategy(settings)
        self.strategy.load_model_state(model)

    def generated(self, partition_id: int) -> list[torch.Tensor]:
        """Theta of ``partition_id`` (or of MH-pFedHNGD's virtual global client)."""
        return [torch.from_numpy(a) for a in self.strategy.core.generate(partition_id)]

    def kept(self, partition_id: int, network: nn.Module) -> dict | None:
        """What the client kept at this round; refused where it kept something the server lacks."""
        variant = self.settings.variant
        needs = variant.personal_head or any(True for _ in network.buffers())
        if self.client_state is None:
            if needs:
                raise ExportError(
                    f"client {partition_id}: its own part (the pFedHN-PC head or batch-norm "
                    "statistics) never reached this server (a deployment, or "
                    "simulation.mirror_client_state=false); each SuperNode writes its own "
                    "model instead (node config model-dir)")
            return None
        return self.client_state.get(partition_id)

    def model(self, partition_id: int, network: Network, normalization) -> nn.Sequential:
        """Client ``partition_id``'s model as it was evaluated at this round."""
        body = network.build()
        theta = named_theta(body, self.generated(partition_id), self.settings.variant.multi_head)
        kept = self.kept(partition_id, body) or {}
        body.load_state_dict(theta | kept.get("buffers", {}), strict=False)
        head = None
        if self.settings.variant.personal_head:
            head = initial_head(body.feature_dim, self.settings.model.out_dim,
                                self.settings.seed, partition_id)
            if "head" in kept:
                head.load_state_dict(kept["head"])
        return personalized_model(body, *normalization, head)


def _training_source(run_dir: Path, settings: Settings, which: str,
                     results: dict) -> _Source:
    if which == "best":
        best = results.get("best_round")
        if best is None:
            raise ExportError(f"{run_dir}: results.json has no evaluation yet")
        if best not in checkpoint.best_rounds(run_dir):
            raise ExportError(
                f"{run_dir}: the run keeps no state of its best-validation round ({best}); "
                "it was made by an older version of pFedHN. Export its checkpoint instead: "
                "round=last")
        saved = checkpoint.load_best(run_dir, settings, best)
        return _Source(settings, best, saved["model"], saved["client_state"], "training")
    saved = checkpoint.load(run_dir, settings)
    return _Source(settings, saved["round"], saved["strategy"],
                   _mirrored(run_dir / STATE_DIR, settings, saved["round"]), "training")


def _mirrored(mirror: Path, settings: Settings, round_: int) -> dict[int, dict] | None:
    if not mirror.is_dir():
        return None
    return {i: kept_state(mirror, i, round_) for i in range(settings.partitions)}


def export(run_dir: str | Path, round: str = "best",  # noqa: A002 - the CLI's key
           clients: Sequence[int] | None = None) -> Path:
    """Write the clients' models of ``round`` ("best" or "last") to ``<run_dir>/models``.

    ``clients``: partition ids (default: all, novel clients included once their
    phase has a checkpoint). Returns the index's path.
    """
    run_dir = Path(run_dir).expanduser().resolve()
    if not run_dir.is_dir():
        raise ExportError(f"{run_dir}: no such run directory")
    if round not in ROUNDS:
        raise ExportError(f"round={round}: choose best or last")
    settings = run_settings(run_dir)
    results_path = run_dir / "results.json"
    if not results_path.is_file():
        raise ExportError(f"{run_dir}: no results.json; the run has not evaluated yet")
    results = json.loads(results_path.read_text())
    every = range(settings.partitions)
    if clients is None:  # novel clients once their phase has a checkpoint
        novel_ready = (run_dir / checkpoint.NOVEL.filename).exists()
        clients = every if novel_ready else range(settings.num_clients)
    chosen = list(clients)
    unknown = [c for c in chosen if c not in every]
    if unknown:
        raise ExportError(f"clients={','.join(map(str, unknown))}: this run has clients "
                          f"0-{settings.partitions - 1}")
    try:
        training = _training_source(run_dir, settings, round, results)
        novel = _novel_source(run_dir, settings) \
            if any(c >= settings.num_clients for c in chosen) else None
    except CheckpointError as error:
        raise ExportError(str(error)) from None
    evaluations = {e["round"]: e for e in results.get("evaluations", [])}
    novel_summary = results.get("novel_clients") or {}
    novel_after = {c["partition_id"]: c for c in novel_summary.get("clients", [])}
    normalization = _normalization(settings)
    out = run_dir / MODELS_DIR
    out.mkdir(exist_ok=True)
    entries = {}
    for partition_id in chosen:
        is_novel = partition_id >= settings.num_clients
        source = novel if is_novel else training
        network = client_network(settings, partition_id)
        model = source.model(partition_id, network, normalization)
        if is_novel:  # the novel phase's figures are of its last evaluated round
            evaluated = novel_summary.get("rounds_completed") == source.round
            after = novel_after.get(partition_id, {}) if evaluated else {}
            accuracies = {"val_acc": None, "test_acc": after.get("test_acc_after")}
        else:
            accuracies = _accuracies(evaluations.get(source.round), partition_id)
        entries[str(partition_id)] = write_model(
            out, f"client_{partition_id}.pt", model, network) | {
            "partition_id": partition_id, "phase": source.phase, "round": source.round,
            **accuracies}
    global_model = _export_global(out, settings, training, normalization) \
        if settings.variant.global_model else None
    return write_index(out, settings.variant.name, round, *normalization, entries, global_model)


def _novel_source(run_dir: Path, settings: Settings) -> _Source:
    phase = checkpoint.NOVEL
    if not (run_dir / phase.filename).exists():
        raise ExportError(f"{run_dir}: no {phase.filename}; its novel clients have no "
                          f"embedding yet (clients 0-{settings.num_clients - 1} do)")
    saved = checkpoint.load(run_dir, settings, phase)
    return _Source(settings, saved["round"], saved["strategy"],
                   _mirrored(run_dir / NOVEL_STATE_DIR, settings, saved["round"]), "novel")


def _export_global(out: Path, settings: Settings, source: _Source,
                   normalization) -> dict[str, Any] | None:
    """MH-pFedHNGD's global model, where it has no per-client batch-norm statistics."""
    network = global_network(settings)
    body = network.build()
    if any(True for _ in body.buffers()):
        return None  # each client holds its own statistics of it: no one global model
    # The hypernetwork's virtual last client, after the partitions.
    body.load_state_dict(named_theta(body, source.generated(settings.partitions), flat=True))
    model = personalized_model(body, *normalization)
    return write_model(out, "global.pt", model, network) | {"round": source.round}


def _parse(argv: Sequence[str]) -> tuple[str, str, list[int] | None]:
    if not argv or "=" in argv[0]:
        raise ExportError("usage: python -m pFedHN.export <run dir> [round=best|last] "
                          "[clients=all|0,7]")
    options = {"round": "best", "clients": "all"}
    for arg in argv[1:]:
        key, sep, value = arg.partition("=")
        if not sep or key not in options:
            raise ExportError(f"{arg}: expected round=best|last or clients=all|<ids, "
                              "comma-separated>")
        options[key] = value
    clients = None
    if options["clients"] != "all":
        try:
            clients = [int(c) for c in options["clients"].strip("[]").split(",")]
        except ValueError:
            raise ExportError(f"clients={options['clients']}: give all or partition ids, "
                              "e.g. clients=0,7") from None
    return argv[0], options["round"], clients


def main(argv: Sequence[str] | None = None) -> None:
    """The command line: export, then one line saying where the models are."""
    try:
        run_dir, which, clients = _parse(sys.argv[1:] if argv is None else argv)
        index_path = export(run_dir, which, clients)
    except ExportError as error:
        raise SystemExit(f"error: {error}") from None
    index = json.loads(index_path.read_text())
    rounds = sorted({e["round"] for e in index["clients"].values()})
    print(f"{len(index['clients'])} client models of round {which} "
          f"({', '.join(map(str, rounds))}) in {index_path.parent}")


if __name__ == "__main__":
    main()
