"""The Hydra config made into a run's ``Settings``: composed, checked, and what it implies.

``load_settings`` is the one place a config is read; it refuses a value that
cannot give a correct run, naming the key, before any data is read or model
built. The helpers below derive what the settings imply (the dataset's spec,
the target network, each client's architecture, the split, Ray's resources).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from pFedHN.dataset import (
    CIFAR10_VEHICLES,
    DATASETS,
    DatasetSpec,
    dataset_spec,
    load_labels,
    omniglot_listing,
    split_indices,
    split_summary,
)
from pFedHN.device import resolve_device
from pFedHN.models import TARGETS
from pFedHN.networks import client_architectures
from pFedHN.settings import VARIANTS, ConfigError, Settings
from pFedHN.zoo import make_client_model

OPTIMIZERS = ("sgd", "adam")
PARTITIONS = ("classes", "authors", "mh-authors", "mh-dirichlet", "dirichlet")


CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """The config ``python -m pFedHN.main <overrides>`` would run with."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def _fail(key: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{key}={value!r} is not valid: {allowed}")


def _positive(settings: Settings, key: str, kind: type = float) -> None:
    value = settings.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(key, value, f"expected a positive {kind.__name__}")
    if kind is int and not isinstance(value, int):
        _fail(key, value, "expected a positive integer")
    if value <= 0:
        _fail(key, value, f"expected a positive {kind.__name__}")


def load_settings(cfg: DictConfig, on_disk: bool = True) -> Settings:
    """The run's settings from a composed config, checked.

    Raises ConfigError for the first value that cannot give a correct run.
    ``on_disk=False``: a server that holds no data checks what the config alone says.
    """
    settings = Settings.from_config(cfg)
    _validate(settings, on_disk)
    return settings


def _validate(settings: Settings, on_disk: bool) -> None:
    if settings.dataset.data not in DATASETS:
        _fail("dataset.data", settings.dataset.data, f"choose one of {sorted(DATASETS)}")
    spec = data_spec(settings, on_disk)

    if settings.model.variant not in VARIANTS:
        _fail("model.variant", settings.model.variant, ", ".join(
            f"{number} ({name})" for number, (name, _) in VARIANTS.items())
            + "; 1 with model.local=True")
    if bool(settings.model.local) != (settings.model.variant == 1):
        raise ConfigError(
            f"model.local={settings.model.local} disagrees with "
            f"model.variant={settings.model.variant}: pFedHN-PC is "
            "model.variant=1 model.local=True; the others have model.local=False"
        )
    if settings.variant.multi_head:
        _validate_architectures(settings, spec)
    if settings.server.optimizer not in OPTIMIZERS:
        _fail("server.optimizer", settings.server.optimizer, f"choose one of {OPTIMIZERS}")
    if settings.client.epochs is not None:
        _positive(settings, "client.epochs", int)
    if not 0 <= settings.client.distill_alpha <= 1:
        _fail("client.distill_alpha", settings.client.distill_alpha, "a weight in [0, 1]")
    _positive(settings, "client.distill_temperature")
    if settings.model.target not in TARGETS:
        _fail("model.target", settings.model.target, f"choose one of {sorted(TARGETS)}")
    if settings.model.in_channels != spec.in_channels:
        _fail("model.in_channels", settings.model.in_channels,
              f"dataset.data={settings.dataset.data} has {spec.in_channels} channel(s)")
    by_alphabet = spec.split == "alphabets"  # Omniglot: classes per client come from the data
    if settings.model.out_dim != spec.num_classes and not by_alphabet:
        _fail("model.out_dim", settings.model.out_dim,
              f"dataset.data={settings.dataset.data} has {spec.num_classes} classes")
    for key in ("num_rounds", "num_clients", "eval_every", "checkpoint_every", "model.n_kernels",
                "model.hidden_dim", "client.inner_steps", "client.batch_size",
                "client.num_classes_per_node", "server.clients_per_round",
                "dataset.val_size"):
        _positive(settings, key, int)
    if settings.model.n_hidden < 0:
        _fail("model.n_hidden", settings.model.n_hidden, "expected an integer >= 0")
    if settings.model.embed_dim is not None:
        _positive(settings, "model.embed_dim", int)
    for key in ("client.inner_lr", "client.clip_norm", "server.lr", "server.clip_norm"):
        _positive(settings, key)
    for key in ("client.inner_momentum", "client.inner_wd", "server.momentum", "server.wd"):
        if settings.get(key) < 0:
            _fail(key, settings.get(key), "expected a value >= 0")

    if settings.client.num_classes_per_node > spec.num_classes and not by_alphabet:
        _fail("client.num_classes_per_node", settings.client.num_classes_per_node,
              f"dataset.data={settings.dataset.data} has only {spec.num_classes} classes")
    if settings.server.clients_per_round > settings.num_clients:
        _fail("server.clients_per_round", settings.server.clients_per_round,
              f"at most num_clients={settings.num_clients}")
    if settings.eval_every > settings.num_rounds:
        _fail("eval_every", settings.eval_every, f"at most num_rounds={settings.num_rounds}")
    _positive(settings, "novel.rounds", int)
    _positive(settings, "novel.lr")
    if settings.novel.optimizer not in OPTIMIZERS:
        _fail("novel.optimizer", settings.novel.optimizer, f"choose one of {OPTIMIZERS}")
    if settings.novel.eval_every is not None:
        _positive(settings, "novel.eval_every", int)
    novel = settings.novel.num_clients
    if isinstance(novel, bool) or not isinstance(novel, int) or novel < 0:
        _fail("novel.num_clients", novel, "an integer >= 0")
    if settings.novel.dirichlet_alpha is not None:
        _positive(settings, "novel.dirichlet_alpha")
    if by_alphabet and settings.novel.dirichlet_alpha is not None:
        _fail("novel.dirichlet_alpha", settings.novel.dirichlet_alpha,
              f"dataset.data={settings.dataset.data} is split by alphabet; use null")
    if settings.novel.from_run is not None and novel == 0:
        _fail("novel.from_run", settings.novel.from_run, "needs novel.num_clients > 0")
    if settings.server.round_timeout is not None:
        _positive(settings, "server.round_timeout")
    _positive(settings, "server.node_timeout")
    if settings.server.max_failed_rounds is not None:
        _positive(settings, "server.max_failed_rounds", int)
    for name in ("adam", "sgd"):
        fused = getattr(settings.server, f"fused_{name}")
        if not isinstance(fused, bool):
            _fail(f"server.fused_{name}", fused, f"true (torch's fused {name} kernel) or false "
                  "(its default kernel)")
    uses_sgd = "sgd" in (settings.server.optimizer, settings.novel.optimizer)
    if settings.server.fused_sgd and uses_sgd and settings.variant.multi_head:
        _fail("server.fused_sgd", True, "false for MH-pFedHN with SGD: torch's fused SGD fails "
              "once a client's head gets its first gradient after others have momentum")
    retries = settings.server.visit_retries
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        _fail("server.visit_retries", retries, "expected an integer >= 0 (0: no retry)")
    if not isinstance(settings.server.accept_lost_visits, bool):
        _fail("server.accept_lost_visits", settings.server.accept_lost_visits,
              "true (a round goes on without its lost visits) or false (it is redone)")
    if settings.simulation.poll_interval is not None:
        _positive(settings, "simulation.poll_interval")
    if settings.simulation.inline_bytes is not None:
        _positive(settings, "simulation.inline_bytes", int)
    for key, kind in (("simulation.max_restarts", int), ("simulation.restart_backoff_s", float)):
        value = settings.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, kind)) or value < 0:
            _fail(key, value, f"{'an integer' if kind is int else 'a number'} >= 0")
    _validate_partition(settings, by_alphabet)
    _validate_hardware(settings)


def _validate_partition(settings: Settings, by_alphabet: bool) -> None:
    """How samples are divided among clients: classes or Dirichlet, pooled test or not."""
    partition, share = settings.client.partition, settings.dataset.local_test_share
    if partition not in PARTITIONS:
        _fail("client.partition", partition, f"choose one of {PARTITIONS}")
    _positive(settings, "client.dirichlet_alpha")
    min_samples = settings.client.min_samples
    if isinstance(min_samples, bool) or not isinstance(min_samples, int) or min_samples < 0:
        _fail("client.min_samples", min_samples, "an integer >= 0")
    if share is not None and (isinstance(share, bool) or not isinstance(share, (int, float))
                              or not 0 < share < 1):
        _fail("dataset.local_test_share", share, "null (pFedHN's split of the official test "
              "set) or a share in (0, 1), e.g. 0.25")
    if by_alphabet and (partition != "classes" or share is not None):
        _fail("client.partition" if partition != "classes" else "dataset.local_test_share",
              partition if partition != "classes" else share,
              f"dataset.data={settings.dataset.data} is split by alphabet; use the defaults")
    if partition in ("mh-authors", "mh-dirichlet") and share is None:
        _fail("client.partition", partition, "the MH-pFedHN authors' split cuts each client's "
              "data into train and test: set dataset.local_test_share (theirs: 0.25)")
    if partition == "authors" and share is not None:
        _fail("client.partition", partition, "the authors' split is pFedHN's protocol; use "
              "dataset.local_test_share=null, or client.partition=classes with a share")
    if share is not None and settings.novel.dirichlet_alpha is not None:
        _fail("novel.dirichlet_alpha", settings.novel.dirichlet_alpha, "novel clients redrawn from "
              "a Dirichlet mix need pFedHN's split (dataset.local_test_share=null); use null")


def _validate_architectures(settings: Settings, spec: DatasetSpec) -> None:
    """MH-pFedHN: every client's network and the global one exist for this data."""
    _positive(settings, "model.chunk_size", int)
    try:
        names = client_architectures(settings)
    except ValueError as error:
        _fail("model.architectures", settings.model.architectures, str(error))
    keys = {name: "model.architectures" for name in names}
    if settings.variant.global_model:
        keys[settings.model.global_model] = "model.global_model"
    for name, key in keys.items():
        try:
            make_client_model(name, settings.model.in_channels, settings.model.out_dim,
                              spec.image_size)
        except ValueError as error:
            _fail(key, name, f"{error} (dataset.data={settings.dataset.data}, "
                  f"dataset.image_size={spec.image_size})")


def _validate_hardware(settings: Settings) -> None:
    """The device, determinism and the Ray resources each client asks for."""
    try:
        device = resolve_device(str(settings.device))
    except ValueError as error:
        _fail("device", settings.device, str(error))
    if not isinstance(settings.deterministic, bool):
        _fail("deterministic", settings.deterministic, "true or false")
    address = settings.simulation.ray_address
    if address is not None and (not isinstance(address, str) or not address.strip()):
        _fail("simulation.ray_address", address, "null, auto, or <host>:<port> of a Ray head")
    cpus = settings.simulation.num_cpus_per_client
    if cpus is not None:
        _positive(settings, "simulation.num_cpus_per_client")
        if address is None and cpus > (os.cpu_count() or 1):
            _fail("simulation.num_cpus_per_client", cpus,
                  f"null or at most the {os.cpu_count()} cores of this machine")
    key, gpus = "simulation.num_gpus_per_client", settings.simulation.num_gpus_per_client
    if gpus is None:
        return
    if isinstance(gpus, bool) or not isinstance(gpus, (int, float)) or gpus < 0 \
            or (gpus > 1 and gpus % 1):
        _fail(key, gpus, "null, 0, a fraction of one GPU in (0, 1], or a whole number of GPUs")
    if gpus > 0 and device.type != "cuda":
        _fail(key, gpus, f"device={settings.device} runs on the CPU here "
              "(torch sees no CUDA device); use 0 or null")
    if gpus == 0 and device.type == "cuda":
        _fail(key, gpus, "on CUDA every client needs a share of a GPU (Ray hides the GPUs "
              "from clients that ask for none); use null, a fraction such as 0.25, "
              "or device=cpu")
    if address is None and gpus > torch.cuda.device_count():
        _fail(key, gpus, f"this machine has {torch.cuda.device_count()} GPU(s)")


def client_resources(settings: Settings) -> dict[str, float]:
    """Ray resources of one ClientApp: the settings', else the defaults for the device."""
    on_gpu = resolve_device(str(settings.device)).type == "cuda"
    cpus = settings.simulation.num_cpus_per_client
    if cpus is None:  # CPU: one client at a time on every core; GPU: the GPU does the work
        cpus = 1 if on_gpu or settings.simulation.ray_address else os.cpu_count() or 1
    gpus = settings.simulation.num_gpus_per_client
    if gpus is None:  # a quarter: four clients share a GPU in evaluation rounds
        gpus = 0.25 if on_gpu else 0.0
    return {"num_cpus": cpus, "num_gpus": float(gpus)}


def ray_init_args(settings: Settings) -> dict[str, object]:
    """Arguments of ``ray.init`` for Flower's simulation engine.

    A private Ray instance passes messages up to ``simulation.inline_bytes``
    inside its task calls: a theta or delta_theta (0.4-2.3 MB here) otherwise
    goes through Ray's object store, a few milliseconds more per message. An
    existing Ray cluster keeps its own settings.
    """
    if address := settings.simulation.ray_address:
        return {"include_dashboard": False, "address": address}
    inline = settings.simulation.inline_bytes
    return {"include_dashboard": False} | (
        {"_system_config": {"max_direct_call_object_size": inline}} if inline else {})


def check_split(settings: Settings) -> None:
    """Every client must get samples in train, val and test (reads labels only)."""
    spec = data_spec(settings)
    train = load_labels(spec, settings.dataset.root, train=True)
    if spec.split != "alphabets" and settings.dataset.val_size >= len(train):
        _fail("dataset.val_size", settings.dataset.val_size,
              f"must be less than the {len(train)} training samples of {settings.dataset.root}")
    try:
        split, _ = split_with_labels(settings, train)
    except ValueError as error:  # a Dirichlet split that cannot serve min_samples
        _fail("client.min_samples", settings.client.min_samples, str(error))
    if spec.split == "alphabets":
        _check_alphabet_split(settings, train, split)
    for name, per_client in split.items():
        empty = [i for i, idx in enumerate(per_client) if len(idx) == 0]
        if empty:
            raise ConfigError(
                f"num_clients={settings.num_clients} with client.num_classes_per_node="
                f"{settings.client.num_classes_per_node}: {len(empty)} client(s) (e.g. {empty[0]}) "
                f"would get no {name} samples from this data; use fewer clients"
                + (" or a larger dataset.val_size" if name == "val" else "")
            )


def split_with_labels(
    settings: Settings, train_labels: np.ndarray | None = None
) -> tuple[dict[str, list[np.ndarray]], dict[str, np.ndarray]]:
    """Each client's indices per split, and the labels each split's indices point into."""
    spec = data_spec(settings)
    if train_labels is None:
        train_labels = load_labels(spec, settings.dataset.root, train=True)
    test_labels = load_labels(spec, settings.dataset.root, train=False)
    split = split_indices(spec, settings.dataset.root, train_labels, test_labels,
                          settings.split)
    if spec.split == "alphabets":  # one pool of drawings
        return split, dict.fromkeys(split, train_labels)
    if settings.dataset.local_test_share is not None:  # indices run over train, then test
        return split, dict.fromkeys(split, np.concatenate([train_labels, test_labels]))
    return split, {"train": train_labels, "val": train_labels, "test": test_labels}


def describe_split(settings: Settings) -> dict[str, Any]:
    """``split_summary`` of the run's split: classes and sample counts per client."""
    split, labels = split_with_labels(settings)
    num_classes = int(max(int(y.max()) for y in labels.values())) + 1
    like_cifar10 = settings.dataset.data in ("cifar10", "cinic10") or (
        settings.dataset.data == "folder" and settings.dataset.paper_dataset == "cifar10")
    groups = (CIFAR10_VEHICLES, frozenset(range(10)) - CIFAR10_VEHICLES) \
        if like_cifar10 and num_classes == 10 else None
    return {"partition": settings.client.partition, "seed": settings.seed,
            **split_summary(split, labels, num_classes, groups)}


def _check_alphabet_split(settings: Settings, labels, split: dict) -> None:
    """Omniglot: at least one alphabet per client; out_dim covers every client's characters."""
    alphabets = len(set(omniglot_listing(settings.dataset.root)[2]))
    if settings.partitions > alphabets:
        _fail("num_clients", settings.num_clients, f"dataset.data={settings.dataset.data} has "
              f"{alphabets} alphabets: at most one client per alphabet (novel ones included)")
    most = max(len(set(labels[idx])) for idx in split["train"])
    if settings.model.out_dim < most:
        _fail("model.out_dim", settings.model.out_dim,
              f"a client holds {most} characters with num_clients={settings.num_clients}; "
              f"use at least {most}")


def data_spec(settings: Settings, on_disk: bool = True) -> DatasetSpec:
    """The dataset's spec; an image folder's classes are read off disk.

    ``on_disk=False``: from the config alone, for a server that holds no data
    (``folder`` then has ``model.out_dim`` classes, which the clients check
    against their folders).
    """
    def channels(key: str) -> tuple[float, ...] | None:
        value = settings.get(key)
        return None if value is None else tuple(float(v) for v in value)

    name = settings.dataset.data
    if not on_disk:
        spec = DATASETS[name]
        if name != "folder":
            return spec
        return replace(spec, num_classes=settings.model.out_dim,
                       image_size=settings.dataset.image_size,
                       mean=channels("dataset.mean"), std=channels("dataset.std"))
    return dataset_spec(name, settings.dataset.root, settings.dataset.image_size,
                        channels("dataset.mean"), channels("dataset.std"))
