"""The one place that decides each client's network, from the settings alone.

pFedHN: the target network (``models.TARGETS``); MH-pFedHN: a zoo model per
partition (``model.architectures``), and MH-pFedHNGD's global model. No data
code: a server that holds no data builds what it generates for from here.
"""

from __future__ import annotations

from typing import Any

from pFedHN.catalog import DATASETS
from pFedHN.settings import Settings
from pFedHN.zoo import Network, assign_architectures


def image_size(settings: Settings) -> int:
    """The side of the images the networks take (an image folder's: ``dataset.image_size``)."""
    data = settings.dataset.data
    return settings.dataset.image_size if data == "folder" else DATASETS[data].image_size


def client_architectures(settings: Settings) -> list[str]:
    """Each partition's zoo model name (``model.architectures``)."""
    choice = settings.model.architectures
    if not isinstance(choice, str):
        choice = [str(name) for name in choice]
    return assign_architectures(choice, settings.partitions)


def network_names(settings: Settings) -> dict[int, str]:
    """MH-pFedHN: the configured networks' names by parameter count.

    A size is all the server knows of a client's network; results group clients by it.
    """
    if not settings.variant.multi_head:
        return {}
    names: dict[int, list[str]] = {}
    for name in dict.fromkeys(client_architectures(settings)):
        model = zoo_network(settings, name).build()
        names.setdefault(sum(p.numel() for p in model.parameters()), []).append(name)
    return {size: "/".join(same) for size, same in names.items()}


def target_kwargs(settings: Settings) -> dict[str, Any]:
    """Arguments of ``make_target`` for these settings."""
    return {
        "name": settings.model.target,
        "in_channels": settings.model.in_channels,
        "n_kernels": settings.model.n_kernels,
        "out_dim": settings.model.out_dim,
        "input_size": image_size(settings),
        "local": settings.variant.personal_head,
    }


def zoo_network(settings: Settings, name: str) -> Network:
    """The zoo's network ``name`` for this dataset's inputs and classes."""
    return Network("zoo", name, {"in_channels": settings.model.in_channels,
                                 "num_classes": settings.model.out_dim,
                                 "input_size": image_size(settings)})


def client_network(settings: Settings, partition_id: int,
                   architecture: str | None = None) -> Network:
    """The network partition ``partition_id`` trains: the one place that decides it.

    pFedHN: the target network; MH-pFedHN: the zoo model that
    ``model.architectures`` gives the partition, or ``architecture`` (a
    SuperNode's node config names its own).
    """
    if not settings.variant.multi_head:
        kwargs = target_kwargs(settings)
        return Network("target", kwargs.pop("name"), kwargs)
    return zoo_network(settings, architecture or client_architectures(settings)[partition_id])


def global_network(settings: Settings) -> Network:
    """MH-pFedHNGD's global model, whose architecture every party knows."""
    return zoo_network(settings, settings.model.global_model)
