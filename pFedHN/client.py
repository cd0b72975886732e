"""The Flower client: trains the generated theta_i and returns delta_theta."""

from __future__ import annotations

import os
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, RecordDict
from flwr.client import NumPyClient
from flwr.clientapp import ClientApp
from omegaconf import DictConfig, OmegaConf
from torch import nn

from pFedHN.config import data_spec, split_kwargs, target_kwargs
from pFedHN.dataset import ClientData, federated_data
from pFedHN.device import configure_torch, resolve_device
from pFedHN.models import LocalLayer, make_target


@dataclass(frozen=True)
class InnerLoop:
    """The client's local optimisation, as in the paper."""

    steps: int = 50
    batch_size: int = 64
    lr: float = 5e-3
    momentum: float = 0.9
    weight_decay: float = 5e-5
    clip_norm: float = 50.0

    @classmethod
    def from_config(cls, cfg: DictConfig) -> InnerLoop:
        """The ``client.*`` settings of a run config."""
        return cls(
            steps=cfg.client.inner_steps, batch_size=cfg.client.batch_size,
            lr=cfg.client.inner_lr, momentum=cfg.client.inner_momentum,
            weight_decay=cfg.client.inner_wd, clip_norm=cfg.client.clip_norm,
        )


def derive_seed(*keys: int) -> int:
    """A seed from non-negative keys, the same in every process.

    (seed, partition, round) seeds a client's inner loop in a round;
    (seed, partition, 0, 1) seeds its pFedHN-PC head.
    """
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


def train_inner_loop(
    model: nn.Module,
    data: ClientData,
    loop: InnerLoop,
    generator: torch.Generator,
    head: LocalLayer | None = None,
    head_optimizer: torch.optim.Optimizer | None = None,
) -> dict[str, float]:
    """Run ``loop.steps`` SGD steps, each on a fresh random batch; return metrics.

    A fresh SGD optimizer each round (the authors'); pFedHN-PC's head keeps its
    own optimizer, whose momentum persists across rounds.
    """
    optimizer = torch.optim.SGD(
        model.parameters(), lr=loop.lr, momentum=loop.momentum,
        weight_decay=loop.weight_decay,
    )
    n, device = len(data.train_y), data.train_y.device
    # Summed on the device: no host sync per step on a GPU.
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    # All of the round's batches drawn up front from a CPU generator: the same
    # samples on every device, and one host-to-device copy instead of one per step
    # (each copy would make the host wait for the GPU).
    batches = torch.stack([
        torch.randperm(n, generator=generator)[: loop.batch_size] for _ in range(loop.steps)
    ]).to(device)
    model.train()
    for idx in batches:
        x, y = data.normalize(data.train_x[idx]), data.train_y[idx]
        logits = model(x) if head is None else head(model(x))
        loss = nn.functional.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        if head_optimizer is not None:
            head_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), loop.clip_norm)
        optimizer.step()
        if head_optimizer is not None:
            head_optimizer.step()
        loss_sum += loss.detach() * len(y)
        correct += (logits.argmax(1) == y).sum()
    seen = loop.steps * min(loop.batch_size, n)
    return {"train_loss": loss_sum.item() / seen, "train_acc": correct.item() / seen}


@torch.inference_mode()
def evaluate_split(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    data: ClientData,
    head: LocalLayer | None = None,
) -> tuple[int, float]:
    """Number correct and summed cross-entropy over a whole split, in one batch."""
    model.eval()
    features = model(data.normalize(images))
    logits = features if head is None else head(features)
    loss_sum = nn.functional.cross_entropy(logits, labels, reduction="sum").item()
    return int((logits.argmax(1) == labels).sum()), loss_sum


def fingerprint(module: nn.Module) -> int:
    """CRC32 of a module's weights: shows in metrics whether state persisted."""
    crc = 0
    for tensor in module.state_dict().values():
        crc = zlib.crc32(tensor.detach().cpu().contiguous().numpy().tobytes(), crc)
    return crc


HEADS_DIR = "client_heads"  # simulation: <run dir>/client_heads/<partition>/<round>.pt


class HeadStore:
    """Where a pFedHN-PC client keeps its private head and momentum between rounds.

    Always in Flower's ``Context.state``, which persists on the node across rounds
    (a client object is built anew every round, so an attribute would not). In
    simulation it is also mirrored to ``mirror_dir/<round>.pt`` so that a resumed
    simulation, whose new processes start with an empty ``Context.state``, picks
    up each head as it was at the checkpoint. On real devices there is no mirror.
    """

    def __init__(
        self, state: RecordDict, mirror_dir: Path | None = None, checkpoint_every: int = 1
    ) -> None:
        self.state = state
        self.mirror_dir = mirror_dir
        self.checkpoint_every = checkpoint_every

    def load(self) -> tuple[dict, dict] | None:
        """(head state dict, momentum buffers by name), or None before the first fit."""
        if "head" in self.state:
            return (self.state["head"].to_torch_state_dict(),
                    self.state["head_momentum"].to_torch_state_dict())
        saved = sorted(self.mirror_dir.glob("*.pt")) if self.mirror_dir else []
        if saved:
            payload = torch.load(saved[-1], weights_only=True)
            return payload["head"], payload["momentum"]
        return None

    def save(self, head: dict, momentum: dict, server_round: int) -> None:
        """Keep the head; in simulation also on disk, pruned to what a resume can need."""
        self.state["head"] = ArrayRecord(torch_state_dict=head)
        self.state["head_momentum"] = ArrayRecord(torch_state_dict=momentum)
        if self.mirror_dir is None:
            return
        self.mirror_dir.mkdir(parents=True, exist_ok=True)
        path = self.mirror_dir / f"{server_round:08d}.pt"
        torch.save({"head": head, "momentum": momentum}, path.with_suffix(".tmp"))
        os.replace(path.with_suffix(".tmp"), path)
        # The server checkpointed last at or before this round's start; a resume
        # needs the newest head up to that round, and anything newer.
        last_checkpoint = (server_round - 1) // self.checkpoint_every * self.checkpoint_every
        older = [p for p in sorted(self.mirror_dir.glob("*.pt")) if int(p.stem) <= last_checkpoint]
        for stale in older[:-1]:
            stale.unlink()


def discard_heads_after(mirror_root: Path, server_round: int) -> None:
    """Before a resume: forget heads trained after the checkpoint's round."""
    for path in mirror_root.glob("*/*.pt"):
        if int(path.stem) > server_round:
            path.unlink()


class PFedHNClient(NumPyClient):
    """Loads the theta_i the server generated, trains it, returns delta_theta."""

    def __init__(
        self,
        partition_id: int,
        data: ClientData,
        model: nn.Module,
        loop: InnerLoop,
        seed: int,
        out_dim: int,
        heads: HeadStore | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        self.partition_id = partition_id
        self.device = torch.device(device)
        self.data = data.to(self.device)
        self.model = model.to(self.device)
        self.loop = loop
        self.seed = seed
        self.out_dim = out_dim
        self.local = model.local
        if self.local and heads is None:
            raise ValueError("a pFedHN-PC client needs a HeadStore for its private head")
        self.heads = heads

    def get_properties(self, config: dict) -> dict[str, int]:
        """Tell the server which partition this node holds."""
        return {"partition-id": self.partition_id}

    def _load_theta(self, parameters: list[np.ndarray]) -> OrderedDict[str, torch.Tensor]:
        names = [name for name, _ in self.model.named_parameters()]
        theta = OrderedDict(
            (name, torch.from_numpy(array).to(self.device))
            for name, array in zip(names, parameters, strict=True)
        )
        self.model.load_state_dict(theta)
        return theta

    def _head(self) -> tuple[LocalLayer, torch.optim.SGD]:
        """The private head and its optimizer, as this client last left them."""
        with torch.random.fork_rng():
            torch.manual_seed(derive_seed(self.seed, self.partition_id, 0, 1))
            head = LocalLayer(self.model.feature_dim, self.out_dim).to(self.device)
        optimizer = torch.optim.SGD(
            head.parameters(), lr=self.loop.lr, momentum=self.loop.momentum,
            weight_decay=self.loop.weight_decay,
        )
        saved = self.heads.load()
        if saved is not None:
            head.load_state_dict(saved[0])
            for name, param in head.named_parameters():
                if name in saved[1]:
                    optimizer.state[param]["momentum_buffer"] = saved[1][name].to(self.device)
        return head, optimizer

    def _store_head(
        self, head: LocalLayer, optimizer: torch.optim.SGD, server_round: int
    ) -> None:
        momentum = {
            name: optimizer.state[param]["momentum_buffer"].cpu()
            for name, param in head.named_parameters()
            if optimizer.state[param].get("momentum_buffer") is not None
        }
        weights = {name: tensor.cpu() for name, tensor in head.state_dict().items()}
        self.heads.save(weights, momentum, server_round)

    def fit(
        self, parameters: list[np.ndarray], config: dict
    ) -> tuple[list[np.ndarray], int, dict]:
        """Train theta_i locally and return delta_theta = theta_i - theta_tilde_i."""
        start = time.perf_counter()
        theta = self._load_theta(parameters)
        server_round = int(config["server-round"])
        generator = torch.Generator().manual_seed(
            derive_seed(self.seed, self.partition_id, server_round)
        )
        metrics: dict = {"partition-id": self.partition_id}
        head = optimizer = None
        if self.local:
            head, optimizer = self._head()
            metrics["head-fingerprint-in"] = fingerprint(head)
        metrics |= train_inner_loop(self.model, self.data, self.loop, generator, head, optimizer)
        if self.local:
            self._store_head(head, optimizer, server_round)
            metrics["head-fingerprint-out"] = fingerprint(head)
        delta_theta = [
            (theta[name] - param.detach()).cpu().contiguous().numpy()
            for name, param in self.model.named_parameters()
        ]
        metrics["client-time-s"] = time.perf_counter() - start
        return delta_theta, len(self.data.train_y), metrics

    def evaluate(
        self, parameters: list[np.ndarray], config: dict
    ) -> tuple[float, int, dict]:
        """Evaluate the generated model on this client's val and test sets."""
        self._load_theta(parameters)
        head = self._head()[0] if self.local else None
        metrics: dict = {"partition-id": self.partition_id}
        for split in ("val", "test"):
            images, labels = getattr(self.data, f"{split}_x"), getattr(self.data, f"{split}_y")
            correct, loss_sum = evaluate_split(self.model, images, labels, self.data, head)
            metrics |= {f"{split}-correct": correct, f"{split}-loss-sum": loss_sum,
                        f"{split}-n": len(labels)}
        return metrics["val-loss-sum"] / max(metrics["val-n"], 1), metrics["val-n"], metrics


def make_client_app(cfg: DictConfig, head_mirror_dir: Path | None = None) -> ClientApp:
    """A ClientApp whose clients read their partition from the node config.

    ``head_mirror_dir``: simulation only, see ``HeadStore``.
    """
    build_client = client_builder(cfg, head_mirror_dir)
    return ClientApp(client_fn=lambda context: build_client(context).to_client())


def client_builder(
    cfg: DictConfig, head_mirror_dir: Path | None = None
) -> Callable[[Context], PFedHNClient]:
    """The function that builds a node's client from its Context, every round.

    Only the (small) config travels in the closure: each worker process loads
    and splits the data once and keeps it (``federated_data`` is cached).
    """
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    loop = InnerLoop.from_config(cfg)
    threads = cfg.simulation.num_threads or cfg.simulation.num_cpus_per_client
    deterministic = bool(cfg.get("deterministic", False))
    # Once here, not per round: for an image folder both read the class folders.
    spec, model_kwargs = data_spec(cfg), target_kwargs(cfg)

    def build_client(context: Context) -> PFedHNClient:
        configure_torch(deterministic, threads)
        device = resolve_device(cfg.get("device", "auto"))  # in the process that trains
        partition_id = int(context.node_config["partition-id"])
        clients = federated_data(spec, cfg.dataset.root, **split_kwargs(cfg), device=str(device))
        heads = HeadStore(
            context.state,
            head_mirror_dir / str(partition_id) if head_mirror_dir else None,
            cfg.checkpoint_every,
        )
        return PFedHNClient(
            partition_id, clients[partition_id], make_target(**model_kwargs),
            loop, cfg.seed, cfg.model.out_dim, heads, device,
        )

    return build_client
