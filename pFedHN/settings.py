"""A run's settings: the Hydra config read once, into typed, read-only fields.

The entry points (``python -m pFedHN.main``, the deployment apps, the
benchmarks) turn the composed config into ``Settings`` with
``config.load_settings``, which also validates it; every other module reads
this object, never the raw config. The keys, their defaults and their meaning
live in ``conf/config.yaml``; the fields below mirror them one to one, and
``Settings.from_config`` refuses a config with a key more or less.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

# model.variant: the algorithm's name, and its preset in conf/algorithm/. The one table.
VARIANTS = {0: ("pFedHN", "pfedhn"), 1: ("pFedHN-PC", "pfedhn_pc"),
            2: ("MH-pFedHN", "mh_pfedhn"), 3: ("MH-pFedHNGD", "mh_pfedhngd")}


class ConfigError(ValueError):
    """A config value that cannot work; the message names key, value and what is allowed."""


@dataclass(frozen=True)
class Variant:
    """Which algorithm a run is, worked out once from ``model.variant``."""

    name: str  # pFedHN, pFedHN-PC, MH-pFedHN or MH-pFedHNGD
    preset: str  # its file in conf/algorithm/
    personal_head: bool  # pFedHN-PC: a private classifier head on each client
    multi_head: bool  # MH-pFedHN(GD): clients of the zoo, one flat theta each
    global_model: bool  # MH-pFedHNGD: the hypernetwork also generates a small global model

    @classmethod
    def of(cls, number: int) -> Variant:
        """``model.variant``: 0 pFedHN, 1 pFedHN-PC, 2 MH-pFedHN, 3 MH-pFedHNGD."""
        name, preset = VARIANTS.get(number, (f"unknown ({number})", ""))
        return cls(name, preset, personal_head=number == 1, multi_head=number in (2, 3),
                   global_model=number == 3)

    @property
    def keeps_client_state(self) -> bool:
        """Clients keep something between rounds: PC heads, MH batch-norm statistics."""
        return self.personal_head or self.multi_head


@dataclass(frozen=True)
class DatasetSettings:
    """``dataset``: which images, where, and how they are cut into train, val and test."""

    data: str
    root: str
    download: bool
    val_size: int
    image_size: int
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    paper_dataset: str | None
    local_test_share: float | None


@dataclass(frozen=True)
class ModelSettings:
    """``model``: the clients' networks and the hypernetwork's shape."""

    target: str
    variant: int
    local: bool
    in_channels: int
    n_kernels: int
    out_dim: int
    n_hidden: int
    hidden_dim: int
    embed_dim: int | None
    architectures: str | tuple[str, ...]
    global_model: str
    chunk_size: int


@dataclass(frozen=True)
class ClientSettings:
    """``client``: how the data is split among clients, and their local training."""

    partition: str
    num_classes_per_node: int
    dirichlet_alpha: float
    min_samples: int
    inner_steps: int
    batch_size: int
    inner_lr: float
    inner_momentum: float
    inner_wd: float
    clip_norm: float
    epochs: int | None
    distill_alpha: float
    distill_temperature: float


@dataclass(frozen=True)
class ServerSettings:
    """``server``: the hypernetwork's outer optimizer and the round's schedule."""

    optimizer: str
    lr: float
    momentum: float
    wd: float
    clip_norm: float
    clients_per_round: int
    sequential: bool
    round_timeout: float | None
    node_timeout: float
    fused_adam: bool
    fused_sgd: bool
    max_failed_rounds: int | None
    visit_retries: int
    accept_lost_visits: bool


@dataclass(frozen=True)
class NovelSettings:
    """``novel``: held-out clients whose embeddings are learned after training."""

    num_clients: int
    rounds: int
    lr: float
    optimizer: str
    eval_every: int | None
    dirichlet_alpha: float | None
    from_run: str | None


@dataclass(frozen=True)
class SimulationSettings:
    """``simulation``: Flower's simulation engine and the resources of each client."""

    mirror_client_state: bool
    num_cpus_per_client: float | None
    num_gpus_per_client: float | None
    num_threads: int | None
    ray_address: str | None
    poll_interval: float | None
    inline_bytes: int | None
    max_restarts: int
    restart_backoff_s: float


SECTIONS = {"dataset": DatasetSettings, "model": ModelSettings, "client": ClientSettings,
            "server": ServerSettings, "novel": NovelSettings,
            "simulation": SimulationSettings}


@dataclass(frozen=True)
class SplitSettings:
    """How the samples are dealt out to the clients (see ``client_indices``)."""

    partitions: int  # every partition: the training clients, then the novel ones
    classes_per_client: int
    val_size: int
    seed: int
    novel: int = 0
    novel_alpha: float | None = None
    partition: str = "classes"
    dirichlet_alpha: float = 0.5
    min_samples: int = 0
    local_test_share: float | None = None


@dataclass(frozen=True)
class Settings:
    """Everything a run is configured with; ``variant`` is derived once from the model's."""

    num_rounds: int
    num_clients: int
    seed: int
    eval_every: int
    checkpoint_every: int
    resume: str | None
    device: str
    deterministic: bool
    dataset: DatasetSettings
    model: ModelSettings
    client: ClientSettings
    server: ServerSettings
    novel: NovelSettings
    simulation: SimulationSettings
    variant: Variant = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "variant", Variant.of(self.model.variant))

    @classmethod
    def from_config(cls, cfg: DictConfig) -> Settings:
        """The config's values, resolved, as fields; a key more or less is a ConfigError.

        Values are not checked here (``config.load_settings`` does that, naming the key).
        """
        return _build(cls, OmegaConf.to_container(cfg, resolve=True), "")

    @property
    def partitions(self) -> int:
        """Flower nodes and data partitions: the training clients, then the novel ones."""
        return self.num_clients + self.novel.num_clients

    @property
    def split(self) -> SplitSettings:
        """How the data is dealt out to the partitions."""
        return SplitSettings(
            partitions=self.partitions,
            classes_per_client=self.client.num_classes_per_node,
            val_size=self.dataset.val_size,
            seed=self.seed,
            novel=self.novel.num_clients,
            novel_alpha=self.novel.dirichlet_alpha,
            partition=self.client.partition,
            dirichlet_alpha=self.client.dirichlet_alpha,
            min_samples=self.client.min_samples,
            local_test_share=self.dataset.local_test_share,
        )

    def replace(self, **changes: Any) -> Settings:
        """A copy with ``{"a.b": value}`` changes, e.g. ``{"dataset.root": "/data"}``."""
        tree = self.as_dict()
        for key, value in changes.items():
            *path, last = key.split(".")
            node = tree
            for part in path:
                node = node[part]
            if last not in node:
                raise KeyError(key)
            node[last] = value
        return _build(Settings, tree, "")

    def as_dict(self) -> dict[str, Any]:
        """The settings as the config's nested dict (lists for tuples), without ``variant``."""
        tree = dataclasses.asdict(self)
        tree.pop("variant")
        return OmegaConf.to_container(OmegaConf.create(tree))

    def to_yaml(self) -> str:
        """What a run directory's ``config.yaml`` holds."""
        return OmegaConf.to_yaml(OmegaConf.create(self.as_dict()))

    def get(self, key: str) -> Any:
        """The value at ``"a.b"``, as the config names it."""
        value: Any = self
        for part in key.split("."):
            value = getattr(value, part)
        return value


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict as ``{"a.b": value}``."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat |= flatten(value, f"{prefix}{key}.") if isinstance(value, dict) \
            else {f"{prefix}{key}": value}
    return flat


def _build(cls: type, tree: dict[str, Any], prefix: str) -> Any:
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown, missing = set(tree) - fields, fields - set(tree)
    if unknown or missing:
        raise ConfigError(
            f"the config does not match the settings: unknown keys "
            f"{sorted(prefix + k for k in unknown)}, missing keys "
            f"{sorted(prefix + k for k in missing)} (see conf/config.yaml)")
    values = {}
    for name, value in tree.items():
        if name in SECTIONS and cls is Settings:
            if not isinstance(value, dict):
                raise ConfigError(f"{name}={value!r} is not valid: expected a section")
            value = _build(SECTIONS[name], value, f"{name}.")
        elif isinstance(value, list):  # read-only: tuples
            value = tuple(value)
        values[name] = value
    return cls(**values)
