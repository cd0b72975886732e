"""A client's personalized model as files: a plain state dict and an index that describes it.

``index.json`` names, per client, the network (family, name, arguments: see
``zoo.Network``), pFedHN-PC's head, the round, the client's accuracies there
and the file's SHA-256; with the input normalisation shared by all. Written by
``pFedHN.export`` (a run directory) and by a SuperNode at the end of a
deployed run (its node config's ``model-dir``); read by ``load_client_model``.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pFedHN.files import write_atomic, write_json_atomic
from pFedHN.models import LocalLayer
from pFedHN.zoo import Network

MODELS_DIR = "models"
INDEX = "index.json"
INPUT = "images scaled to [0, 1], N x C x H x W (torchvision's ToTensor)"


class ExportError(ValueError):
    """A run, round or client that cannot be exported, or an export that does not load."""


class Standardize(nn.Module):
    """The clients' input normalisation, ``(x - mean) / std``, on images in [0, 1]."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(-1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise a batch as the client did before training on it."""
        return (x - self.mean) / self.std


def personalized_model(network: nn.Module, mean: Sequence[float], std: Sequence[float],
                       head: nn.Module | None = None) -> nn.Sequential:
    """A client's whole model: normalisation, its network, and pFedHN-PC's private head."""
    parts = OrderedDict(standardize=Standardize(mean, std), network=network)
    if head is not None:
        parts["head"] = head
    return nn.Sequential(parts)


def write_model(folder: Path, filename: str, model: nn.Sequential,
                network: Network) -> dict[str, Any]:
    """Save ``model``'s state dict as ``folder/filename``; return its index entry."""
    state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    path = write_atomic(folder / filename, lambda tmp: torch.save(state, tmp))
    head = getattr(model, "head", None)
    return {"file": filename, "sha256": _sha256(path),
            "network": {"family": network.family, "name": network.name,
                        "kwargs": dict(network.kwargs)},
            "head": None if head is None else {"in": head.fc.in_features,
                                               "out": head.fc.out_features}}


def write_index(folder: Path, variant: str, round_: str | int, mean: Sequence[float],
                std: Sequence[float], clients: dict[str, dict],
                global_model: dict | None = None) -> Path:
    """Write ``folder/index.json`` for the models written there."""
    index = {"variant": variant, "round": round_,
             "normalization": {"mean": list(mean), "std": list(std)}, "input": INPUT,
             "clients": clients}
    if global_model is not None:
        index["global_model"] = global_model
    return write_json_atomic(folder / INDEX, index)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_client_model(run_dir: str | Path | None, client: int | str = 0,
                      models_dir: str | Path | None = None) -> nn.Module:
    """Client ``client``'s exported model (or ``"global"``: MH-pFedHNGD's), in eval mode.

    Reads ``<run_dir>/models`` (or ``models_dir``); runs no code from the
    files. Refuses a file that is not the one the index names, or weights that
    do not fit the network the index describes.
    """
    folder = Path(models_dir) if models_dir else Path(run_dir) / MODELS_DIR
    if not (folder / INDEX).is_file():
        raise ExportError(f"{folder}: no {INDEX}; run python -m pFedHN.export {run_dir} first")
    index = json.loads((folder / INDEX).read_text())
    entry = index.get("global_model") if client == "global" else \
        index.get("clients", {}).get(str(client))
    if entry is None:
        raise ExportError(f"{folder}: no model of client {client}; exported: "
                          f"{', '.join(index.get('clients', {})) or 'none'}")
    path = folder / entry["file"]
    if not path.is_file() or _sha256(path) != entry["sha256"]:
        raise ExportError(f"{path}: not the file {INDEX} names (missing or changed)")
    try:
        head = entry.get("head")
        model = personalized_model(
            Network(**entry["network"]).build(), index["normalization"]["mean"],
            index["normalization"]["std"], head and LocalLayer(head["in"], head["out"]))
        model.load_state_dict(torch.load(path, weights_only=True))
    except (ValueError, RuntimeError, TypeError, KeyError) as error:
        raise ExportError(f"{path}: does not load as the network {INDEX} describes "
                          f"({str(error).splitlines()[0]})") from None
    return model.eval()
