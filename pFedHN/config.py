"""Checks on the Hydra config, run before any data is read or model built."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from pFedHN.dataset import (
    CIFAR10_VEHICLES,
    DATASETS,
    DatasetSpec,
    SplitSettings,
    dataset_spec,
    load_labels,
    omniglot_listing,
    split_indices,
    split_summary,
)
from pFedHN.device import resolve_device
from pFedHN.models import TARGETS
from pFedHN.zoo import assign_architectures, make_client_model

VARIANTS = {0: "pFedHN", 1: "pFedHN-PC", 2: "MH-pFedHN", 3: "MH-pFedHNGD"}
OPTIMIZERS = ("sgd", "adam")
PARTITIONS = ("classes", "authors", "mh-authors", "mh-dirichlet", "dirichlet")


CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """The config ``python -m pFedHN.main <overrides>`` would run with."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


class ConfigError(ValueError):
    """A config value that cannot work; the message names key, value and what is allowed."""


def _fail(key: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{key}={value!r} is not valid: {allowed}")


def _positive(cfg: DictConfig, key: str, kind: type = float) -> None:
    value = OmegaConf.select(cfg, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(key, value, f"expected a positive {kind.__name__}")
    if kind is int and not isinstance(value, int):
        _fail(key, value, "expected a positive integer")
    if value <= 0:
        _fail(key, value, f"expected a positive {kind.__name__}")


def validate(cfg: DictConfig, on_disk: bool = True) -> None:
    """Raise ConfigError for the first value that cannot give a correct run.

    ``on_disk=False``: a server that holds no data checks what the config alone says.
    """
    if cfg.dataset.data not in DATASETS:
        _fail("dataset.data", cfg.dataset.data, f"choose one of {sorted(DATASETS)}")
    spec = data_spec(cfg, on_disk)

    if cfg.model.variant not in VARIANTS:
        _fail("model.variant", cfg.model.variant, "0 (pFedHN), 1 (pFedHN-PC, with "
              "model.local=True), 2 (MH-pFedHN) or 3 (MH-pFedHNGD)")
    if bool(cfg.model.local) != (cfg.model.variant == 1):
        raise ConfigError(
            f"model.local={cfg.model.local} disagrees with "
            f"model.variant={cfg.model.variant}: pFedHN-PC is "
            "model.variant=1 model.local=True; the others have model.local=False"
        )
    if variant_of(cfg).multi_head:
        _validate_architectures(cfg, spec)
    if cfg.server.optimizer not in OPTIMIZERS:
        _fail("server.optimizer", cfg.server.optimizer, f"choose one of {OPTIMIZERS}")
    if cfg.client.epochs is not None:
        _positive(cfg, "client.epochs", int)
    if not 0 <= cfg.client.distill_alpha <= 1:
        _fail("client.distill_alpha", cfg.client.distill_alpha, "a weight in [0, 1]")
    _positive(cfg, "client.distill_temperature")
    if cfg.model.target not in TARGETS:
        _fail("model.target", cfg.model.target, f"choose one of {sorted(TARGETS)}")
    if cfg.model.in_channels != spec.in_channels:
        _fail("model.in_channels", cfg.model.in_channels,
              f"dataset.data={cfg.dataset.data} has {spec.in_channels} channel(s)")
    by_alphabet = spec.split == "alphabets"  # Omniglot: classes per client come from the data
    if cfg.model.out_dim != spec.num_classes and not by_alphabet:
        _fail("model.out_dim", cfg.model.out_dim,
              f"dataset.data={cfg.dataset.data} has {spec.num_classes} classes")
    for key in ("num_rounds", "num_clients", "eval_every", "checkpoint_every", "model.n_kernels",
                "model.hidden_dim", "client.inner_steps", "client.batch_size",
                "client.num_classes_per_node", "server.clients_per_round",
                "dataset.val_size"):
        _positive(cfg, key, int)
    if cfg.model.n_hidden < 0:
        _fail("model.n_hidden", cfg.model.n_hidden, "expected an integer >= 0")
    if cfg.model.embed_dim is not None:
        _positive(cfg, "model.embed_dim", int)
    for key in ("client.inner_lr", "client.clip_norm", "server.lr", "server.clip_norm"):
        _positive(cfg, key)
    for key in ("client.inner_momentum", "client.inner_wd", "server.momentum", "server.wd"):
        if OmegaConf.select(cfg, key) < 0:
            _fail(key, OmegaConf.select(cfg, key), "expected a value >= 0")

    if cfg.client.num_classes_per_node > spec.num_classes and not by_alphabet:
        _fail("client.num_classes_per_node", cfg.client.num_classes_per_node,
              f"dataset.data={cfg.dataset.data} has only {spec.num_classes} classes")
    if cfg.server.clients_per_round > cfg.num_clients:
        _fail("server.clients_per_round", cfg.server.clients_per_round,
              f"at most num_clients={cfg.num_clients}")
    if cfg.eval_every > cfg.num_rounds:
        _fail("eval_every", cfg.eval_every, f"at most num_rounds={cfg.num_rounds}")
    _positive(cfg, "novel.rounds", int)
    _positive(cfg, "novel.lr")
    if cfg.novel.optimizer not in OPTIMIZERS:
        _fail("novel.optimizer", cfg.novel.optimizer, f"choose one of {OPTIMIZERS}")
    if cfg.novel.eval_every is not None:
        _positive(cfg, "novel.eval_every", int)
    novel = cfg.novel.num_clients
    if isinstance(novel, bool) or not isinstance(novel, int) or novel < 0:
        _fail("novel.num_clients", novel, "an integer >= 0")
    if cfg.novel.dirichlet_alpha is not None:
        _positive(cfg, "novel.dirichlet_alpha")
    if by_alphabet and cfg.novel.dirichlet_alpha is not None:
        _fail("novel.dirichlet_alpha", cfg.novel.dirichlet_alpha,
              f"dataset.data={cfg.dataset.data} is split by alphabet; use null")
    if cfg.novel.from_run is not None and novel == 0:
        _fail("novel.from_run", cfg.novel.from_run, "needs novel.num_clients > 0")
    if cfg.server.round_timeout is not None:
        _positive(cfg, "server.round_timeout")
    _positive(cfg, "server.node_timeout")
    if not isinstance(cfg.server.fused_adam, bool):
        _fail("server.fused_adam", cfg.server.fused_adam, "true (torch's fused Adam kernel) "
              "or false (its default kernel)")
    if cfg.simulation.poll_interval is not None:
        _positive(cfg, "simulation.poll_interval")
    _validate_partition(cfg, by_alphabet)
    _validate_hardware(cfg)


def _validate_partition(cfg: DictConfig, by_alphabet: bool) -> None:
    """How samples are divided among clients: classes or Dirichlet, pooled test or not."""
    partition, share = cfg.client.partition, cfg.dataset.local_test_share
    if partition not in PARTITIONS:
        _fail("client.partition", partition, f"choose one of {PARTITIONS}")
    _positive(cfg, "client.dirichlet_alpha")
    min_samples = cfg.client.min_samples
    if isinstance(min_samples, bool) or not isinstance(min_samples, int) or min_samples < 0:
        _fail("client.min_samples", min_samples, "an integer >= 0")
    if share is not None and (isinstance(share, bool) or not isinstance(share, (int, float))
                              or not 0 < share < 1):
        _fail("dataset.local_test_share", share, "null (pFedHN's split of the official test "
              "set) or a share in (0, 1), e.g. 0.25")
    if by_alphabet and (partition != "classes" or share is not None):
        _fail("client.partition" if partition != "classes" else "dataset.local_test_share",
              partition if partition != "classes" else share,
              f"dataset.data={cfg.dataset.data} is split by alphabet; use the defaults")
    if partition in ("mh-authors", "mh-dirichlet") and share is None:
        _fail("client.partition", partition, "the MH-pFedHN authors' split cuts each client's "
              "data into train and test: set dataset.local_test_share (theirs: 0.25)")
    if partition == "authors" and share is not None:
        _fail("client.partition", partition, "the authors' split is pFedHN's protocol; use "
              "dataset.local_test_share=null, or client.partition=classes with a share")
    if share is not None and cfg.novel.dirichlet_alpha is not None:
        _fail("novel.dirichlet_alpha", cfg.novel.dirichlet_alpha, "novel clients redrawn from "
              "a Dirichlet mix need pFedHN's split (dataset.local_test_share=null); use null")


def _validate_architectures(cfg: DictConfig, spec: DatasetSpec) -> None:
    """MH-pFedHN: every client's network and the global one exist for this data."""
    _positive(cfg, "model.chunk_size", int)
    try:
        names = client_architectures(cfg)
    except ValueError as error:
        _fail("model.architectures", OmegaConf.select(cfg, "model.architectures"), str(error))
    keys = {name: "model.architectures" for name in names}
    if variant_of(cfg).global_model:
        keys[cfg.model.global_model] = "model.global_model"
    for name, key in keys.items():
        try:
            make_client_model(name, cfg.model.in_channels, cfg.model.out_dim, spec.image_size)
        except ValueError as error:
            _fail(key, name, f"{error} (dataset.data={cfg.dataset.data}, "
                  f"dataset.image_size={spec.image_size})")


def _validate_hardware(cfg: DictConfig) -> None:
    """The device, determinism and the Ray resources each client asks for."""
    try:
        device = resolve_device(str(cfg.device))
    except ValueError as error:
        _fail("device", cfg.device, str(error))
    if not isinstance(cfg.deterministic, bool):
        _fail("deterministic", cfg.deterministic, "true or false")
    address = cfg.simulation.ray_address
    if address is not None and (not isinstance(address, str) or not address.strip()):
        _fail("simulation.ray_address", address, "null, auto, or <host>:<port> of a Ray head")
    cpus = cfg.simulation.num_cpus_per_client
    if cpus is not None:
        _positive(cfg, "simulation.num_cpus_per_client")
        if address is None and cpus > (os.cpu_count() or 1):
            _fail("simulation.num_cpus_per_client", cpus,
                  f"null or at most the {os.cpu_count()} cores of this machine")
    key, gpus = "simulation.num_gpus_per_client", cfg.simulation.num_gpus_per_client
    if gpus is None:
        return
    if isinstance(gpus, bool) or not isinstance(gpus, (int, float)) or gpus < 0 \
            or (gpus > 1 and gpus % 1):
        _fail(key, gpus, "null, 0, a fraction of one GPU in (0, 1], or a whole number of GPUs")
    if gpus > 0 and device.type != "cuda":
        _fail(key, gpus, f"device={cfg.device} runs on the CPU here "
              "(torch sees no CUDA device); use 0 or null")
    if gpus == 0 and device.type == "cuda":
        _fail(key, gpus, "on CUDA every client needs a share of a GPU (Ray hides the GPUs "
              "from clients that ask for none); use null, a fraction such as 0.25, "
              "or device=cpu")
    if address is None and gpus > torch.cuda.device_count():
        _fail(key, gpus, f"this machine has {torch.cuda.device_count()} GPU(s)")


def client_resources(cfg: DictConfig) -> dict[str, float]:
    """Ray resources of one ClientApp: the config's, else the defaults for the device."""
    on_gpu = resolve_device(str(cfg.device)).type == "cuda"
    cpus = cfg.simulation.num_cpus_per_client
    if cpus is None:  # CPU: one client at a time on every core; GPU: the GPU does the work
        cpus = 1 if on_gpu or cfg.simulation.ray_address else os.cpu_count() or 1
    gpus = cfg.simulation.num_gpus_per_client
    if gpus is None:  # a quarter: four clients share a GPU in evaluation rounds
        gpus = 0.25 if on_gpu else 0.0
    return {"num_cpus": cpus, "num_gpus": float(gpus)}


def check_split(cfg: DictConfig) -> None:
    """Every client must get samples in train, val and test (reads labels only)."""
    spec = data_spec(cfg)
    train = load_labels(spec, cfg.dataset.root, train=True)
    if spec.split != "alphabets" and cfg.dataset.val_size >= len(train):
        _fail("dataset.val_size", cfg.dataset.val_size,
              f"must be less than the {len(train)} training samples of {cfg.dataset.root}")
    try:
        split, _ = split_with_labels(cfg, train)
    except ValueError as error:  # a Dirichlet split that cannot serve min_samples
        _fail("client.min_samples", cfg.client.min_samples, str(error))
    if spec.split == "alphabets":
        _check_alphabet_split(cfg, train, split)
    for name, per_client in split.items():
        empty = [i for i, idx in enumerate(per_client) if len(idx) == 0]
        if empty:
            raise ConfigError(
                f"num_clients={cfg.num_clients} with client.num_classes_per_node="
                f"{cfg.client.num_classes_per_node}: {len(empty)} client(s) (e.g. {empty[0]}) "
                f"would get no {name} samples from this data; use fewer clients"
                + (" or a larger dataset.val_size" if name == "val" else "")
            )


def split_with_labels(
    cfg: DictConfig, train_labels: np.ndarray | None = None
) -> tuple[dict[str, list[np.ndarray]], dict[str, np.ndarray]]:
    """Each client's indices per split, and the labels each split's indices point into."""
    spec = data_spec(cfg)
    if train_labels is None:
        train_labels = load_labels(spec, cfg.dataset.root, train=True)
    test_labels = load_labels(spec, cfg.dataset.root, train=False)
    split = split_indices(spec, cfg.dataset.root, train_labels, test_labels,
                          split_settings(cfg))
    if spec.split == "alphabets":  # one pool of drawings
        return split, dict.fromkeys(split, train_labels)
    if cfg.dataset.local_test_share is not None:  # indices run over train, then test
        return split, dict.fromkeys(split, np.concatenate([train_labels, test_labels]))
    return split, {"train": train_labels, "val": train_labels, "test": test_labels}


def describe_split(cfg: DictConfig) -> dict[str, Any]:
    """``split_summary`` of this config's split: classes and sample counts per client."""
    split, labels = split_with_labels(cfg)
    num_classes = int(max(int(y.max()) for y in labels.values())) + 1
    like_cifar10 = cfg.dataset.data in ("cifar10", "cinic10") or (
        cfg.dataset.data == "folder" and cfg.dataset.paper_dataset == "cifar10")
    groups = (CIFAR10_VEHICLES, frozenset(range(10)) - CIFAR10_VEHICLES) \
        if like_cifar10 and num_classes == 10 else None
    return {"partition": cfg.client.partition, "seed": cfg.seed,
            **split_summary(split, labels, num_classes, groups)}


def _check_alphabet_split(cfg: DictConfig, labels, split: dict) -> None:
    """Omniglot: at least one alphabet per client; out_dim covers every client's characters."""
    alphabets = len(set(omniglot_listing(cfg.dataset.root)[2]))
    if num_partitions(cfg) > alphabets:
        _fail("num_clients", cfg.num_clients, f"dataset.data={cfg.dataset.data} has "
              f"{alphabets} alphabets: at most one client per alphabet (novel ones included)")
    most = max(len(set(labels[idx])) for idx in split["train"])
    if cfg.model.out_dim < most:
        _fail("model.out_dim", cfg.model.out_dim,
              f"a client holds {most} characters with num_clients={cfg.num_clients}; "
              f"use at least {most}")


@dataclass(frozen=True)
class Variant:
    """Which algorithm a config runs, worked out in one place (``variant_of``)."""

    name: str  # pFedHN, pFedHN-PC, MH-pFedHN or MH-pFedHNGD
    personal_head: bool  # pFedHN-PC: a private classifier head on each client
    multi_head: bool  # MH-pFedHN(GD): clients of the zoo, one flat theta each
    global_model: bool  # MH-pFedHNGD: the hypernetwork also generates a small global model

    @property
    def keeps_client_state(self) -> bool:
        """Clients keep something between rounds: PC heads, MH batch-norm statistics."""
        return self.personal_head or self.multi_head


def variant_of(cfg: DictConfig) -> Variant:
    """The algorithm ``model.variant`` names (validated: ``model.local`` agrees)."""
    v = cfg.model.variant
    return Variant(VARIANTS[v], personal_head=v == 1, multi_head=v in (2, 3),
                   global_model=v == 3)


def client_architectures(cfg: DictConfig) -> list[str]:
    """Each partition's zoo model name (``model.architectures``)."""
    choice = cfg.model.architectures
    if not isinstance(choice, str):
        choice = [str(name) for name in choice]
    return assign_architectures(choice, num_partitions(cfg))


def num_partitions(cfg: DictConfig) -> int:
    """Flower nodes and data partitions: the training clients, then the novel ones."""
    return cfg.num_clients + cfg.novel.num_clients


def split_settings(cfg: DictConfig) -> SplitSettings:
    """How this config deals the data out to its partitions."""
    return SplitSettings(
        num_clients=num_partitions(cfg),
        classes_per_client=cfg.client.num_classes_per_node,
        val_size=cfg.dataset.val_size,
        seed=cfg.seed,
        novel=cfg.novel.num_clients,
        novel_alpha=cfg.novel.dirichlet_alpha,
        partition=cfg.client.partition,
        dirichlet_alpha=cfg.client.dirichlet_alpha,
        min_samples=cfg.client.min_samples,
        local_test_share=cfg.dataset.local_test_share,
    )


def data_spec(cfg: DictConfig, on_disk: bool = True) -> DatasetSpec:
    """The dataset's spec; an image folder's classes are read off disk.

    ``on_disk=False``: from the config alone, for a server that holds no data
    (``folder`` then has ``model.out_dim`` classes, which the clients check
    against their folders).
    """
    def channels(key: str) -> tuple[float, ...] | None:
        value = OmegaConf.select(cfg, key)
        return None if value is None else tuple(float(v) for v in value)

    name = cfg.dataset.data
    if not on_disk:
        spec = DATASETS[name]
        if name != "folder":
            return spec
        return replace(spec, num_classes=cfg.model.out_dim, image_size=cfg.dataset.image_size,
                       mean=channels("dataset.mean"), std=channels("dataset.std"))
    return dataset_spec(name, cfg.dataset.root, cfg.dataset.image_size,
                        channels("dataset.mean"), channels("dataset.std"))


def target_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """Arguments of ``make_target`` for this config."""
    return {
        "name": cfg.model.target,
        "in_channels": cfg.model.in_channels,
        "n_kernels": cfg.model.n_kernels,
        "out_dim": cfg.model.out_dim,
        "input_size": data_spec(cfg, on_disk=False).image_size,
        "local": variant_of(cfg).personal_head,
    }
