"""The Flower client: trains the generated theta_i and returns delta_theta."""

from __future__ import annotations

import math
import os
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, RecordDict
from flwr.client import NumPyClient
from flwr.clientapp import ClientApp
from torch import nn

from pFedHN.config import data_spec
from pFedHN.dataset import ClientData, cached_partition, federated_data
from pFedHN.device import configure_torch, resolve_device
from pFedHN.files import write_atomic
from pFedHN.models import LocalLayer
from pFedHN.networks import client_network, global_network
from pFedHN.personal_model import personalized_model, write_index, write_model
from pFedHN.settings import Settings
from pFedHN.zoo import Network


@dataclass(frozen=True)
class InnerLoop:
    """The client's local optimisation, as in the paper."""

    steps: int = 50
    batch_size: int = 64
    lr: float = 5e-3
    momentum: float = 0.9
    weight_decay: float = 5e-5
    clip_norm: float | None = 50.0  # None: no clipping (MH-pFedHNGD's global phase)
    epochs: int | None = None  # set: passes over the local data instead of ``steps`` (MH-pFedHN)

    @classmethod
    def from_settings(cls, settings: Settings) -> InnerLoop:
        """The ``client.*`` settings of a run config."""
        return cls(
            steps=settings.client.inner_steps, batch_size=settings.client.batch_size,
            lr=settings.client.inner_lr, momentum=settings.client.inner_momentum,
            weight_decay=settings.client.inner_wd, clip_norm=settings.client.clip_norm,
            epochs=settings.client.epochs,
        )

    def batches(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, list[int]]:
        """A round's sample indices, drawn up front, and the batch sizes to cut them into.

        ``steps`` batches, each a fresh random draw (pFedHN), or ``epochs``
        shuffled passes with a smaller last batch (MH-pFedHN's local loader).
        """
        if self.epochs is None:
            order = [torch.randperm(n, generator=generator)[: self.batch_size]
                     for _ in range(self.steps)]
            return torch.cat(order), [min(self.batch_size, n)] * self.steps
        full, rest = divmod(n, self.batch_size)
        sizes = [self.batch_size] * full + ([rest] if rest else [])
        order = [torch.randperm(n, generator=generator) for _ in range(self.epochs)]
        return torch.cat(order), sizes * self.epochs


@dataclass(frozen=True)
class Distillation:
    """MH-pFedHNGD's personalised loss: alpha T^2 KL(global || student) + (1 - alpha) CE.

    Both softened by the temperature T (Hinton et al.'s knowledge distillation;
    torch's ``kl_div`` takes the student's log-probabilities and the teacher's).
    """

    alpha: float = 0.2
    temperature: float = 15.0

    def loss(
        self, logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """The loss of one batch."""
        t = self.temperature
        kl = nn.functional.kl_div(
            nn.functional.log_softmax(logits / t, dim=1),
            nn.functional.log_softmax(teacher_logits / t, dim=1),
            reduction="batchmean", log_target=True,
        )
        return self.alpha * t * t * kl + (1 - self.alpha) * nn.functional.cross_entropy(
            logits, labels)


def derive_seed(*keys: int) -> int:
    """A seed from non-negative keys, the same in every process.

    (seed, partition, round) seeds a client's inner loop in a round,
    (seed, partition, round, 2) its MH-pFedHNGD global phase, and
    (seed, partition, 0, 1) its pFedHN-PC head.
    """
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


def initial_head(feature_dim: int, out_dim: int, seed: int, partition_id: int) -> LocalLayer:
    """pFedHN-PC: a client's private head before its first fit, seeded by its partition."""
    with torch.random.fork_rng():
        torch.manual_seed(derive_seed(seed, partition_id, 0, 1))
        return LocalLayer(feature_dim, out_dim)


def train_inner_loop(
    model: nn.Module,
    data: ClientData,
    loop: InnerLoop,
    generator: torch.Generator,
    head: LocalLayer | None = None,
    head_optimizer: torch.optim.Optimizer | None = None,
    teacher: nn.Module | None = None,
    distillation: Distillation | None = None,
) -> dict[str, float]:
    """Run the round's SGD steps (``InnerLoop.batches``); return metrics.

    The metrics: training loss and accuracy, the number of steps, how many of
    them the gradient-norm clip shortened and the largest gradient norm seen.

    A fresh SGD optimizer each round (the authors'); pFedHN-PC's head keeps its
    own optimizer, whose momentum persists across rounds. With a ``teacher``
    (MH-pFedHNGD's global model) the loss is ``distillation.loss``.
    """
    optimizer = torch.optim.SGD(
        model.parameters(), lr=loop.lr, momentum=loop.momentum,
        weight_decay=loop.weight_decay,
    )
    device = data.train_y.device
    # Summed on the device: no host sync per step on a GPU.
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    largest_norm = torch.zeros((), device=device)  # of the steps' gradients, before clipping
    clipped = torch.zeros((), dtype=torch.long, device=device)  # steps the clip shortened
    clip_norm = math.inf if loop.clip_norm is None else loop.clip_norm
    # All of the round's batches drawn up front from a CPU generator: the same
    # samples on every device, and one host-to-device copy instead of one per step
    # (each copy would make the host wait for the GPU).
    order, sizes = loop.batches(len(data.train_y), generator)
    model.train()
    if teacher is not None:
        teacher.eval()
    for idx in order.to(device).split(sizes):
        x, y = data.normalize(data.train_x[idx]), data.train_y[idx]
        logits = model(x) if head is None else head(model(x))
        if teacher is None:
            loss = nn.functional.cross_entropy(logits, y)
        else:
            with torch.no_grad():
                teacher_logits = teacher(x)
            loss = distillation.loss(logits, teacher_logits, y)
        optimizer.zero_grad(set_to_none=True)
        if head_optimizer is not None:
            head_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = nn.utils.clip_grad_norm_(model.parameters(), clip_norm)  # inf: only measures
        largest_norm = torch.maximum(largest_norm, norm)
        clipped += norm > clip_norm
        optimizer.step()
        if head_optimizer is not None:
            head_optimizer.step()
        loss_sum += loss.detach() * len(y)
        correct += (logits.argmax(1) == y).sum()
    seen = len(order)
    return {"train_loss": loss_sum.item() / seen, "train_acc": correct.item() / seen,
            "steps": len(sizes), "clipped-steps": clipped.item(),
            "largest-grad-norm": largest_norm.item()}


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


STATE_DIR = "client_state"  # simulation: <run dir>/client_state/<partition>/<round>.pt
NOVEL_STATE_DIR = "novel_client_state"  # the same for the novel phase, whose rounds restart
# A SuperNode's decoded partition (see client_builder's data_cache).
DATA_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pfedhn"


class LocalStore:
    """What a client keeps to itself between rounds, as named state dicts.

    pFedHN-PC: its head ("head") and the head's momentum ("head_momentum");
    MH-pFedHN: batch norm's running statistics ("buffers", "global_buffers").
    Always in Flower's ``Context.state``, which persists on the node across rounds
    (a client object is built anew every round, so an attribute would not). In
    simulation it is also mirrored to ``mirror_dir/<round>.pt`` so that a resumed
    simulation, whose new processes start with an empty ``Context.state``, picks
    up each part as it was at the checkpoint. On real devices there is no mirror.
    """

    def __init__(
        self, state: RecordDict, mirror_dir: Path | None = None, checkpoint_every: int = 1
    ) -> None:
        self.state = state
        self.mirror_dir = mirror_dir
        self.checkpoint_every = checkpoint_every

    def load(self, part: str) -> dict[str, torch.Tensor] | None:
        """The state dict saved as ``part``, or None before it was first saved."""
        fresh = not any(isinstance(v, ArrayRecord) for v in self.state.values())
        saved = sorted(self.mirror_dir.glob("*.pt")) if fresh and self.mirror_dir else []
        if saved:  # a resumed simulation: its new process starts with an empty state
            for name, tensors in torch.load(saved[-1], weights_only=True).items():
                self.state[name] = ArrayRecord(torch_state_dict=tensors)
        record = self.state.get(part)
        return record.to_torch_state_dict() if isinstance(record, ArrayRecord) else None

    def save(self, parts: dict[str, dict[str, torch.Tensor]], server_round: int) -> None:
        """Keep ``parts``; in simulation also all parts on disk, pruned to what a resume needs."""
        for name, tensors in parts.items():
            self.state[name] = ArrayRecord(torch_state_dict=tensors)
        if self.mirror_dir is None:
            return
        self.mirror_dir.mkdir(parents=True, exist_ok=True)
        path = self.mirror_dir / f"{server_round:08d}.pt"
        everything = {name: record.to_torch_state_dict() for name, record in self.state.items()
                      if isinstance(record, ArrayRecord)}
        write_atomic(path, lambda tmp: torch.save(everything, tmp))
        # The server checkpointed last at or before this round's start, and keeps the
        # checkpoint before that to fall back on; a resume from either needs the newest
        # state up to its round, and anything newer.
        every = self.checkpoint_every
        previous_checkpoint = ((server_round - 1) // every - 1) * every
        older = [p for p in sorted(self.mirror_dir.glob("*.pt"))
                 if int(p.stem) <= previous_checkpoint]
        for stale in older[:-1]:
            stale.unlink()


def kept_state(mirror_root: Path, partition_id: int,
               server_round: int) -> dict[str, dict[str, torch.Tensor]] | None:
    """What a simulated client kept after its last fit up to ``server_round``, from its mirror.

    None before its first fit (or for a client that keeps nothing).
    """
    saved = [path for path in sorted((mirror_root / str(partition_id)).glob("*.pt"))
             if int(path.stem) <= server_round]
    return torch.load(saved[-1], weights_only=True) if saved else None


def discard_state_after(mirror_root: Path, server_round: int) -> None:
    """Before a resume: forget client state saved after the checkpoint's round."""
    for path in mirror_root.glob("*/*.pt"):
        if int(path.stem) > server_round:
            path.unlink()


@dataclass(frozen=True)
class OwnModel:
    """Deployment: where a SuperNode writes its model after the run's last round.

    The server never sees a pFedHN-PC head or batch-norm statistics, so the
    client writes its whole model itself (``personal_model``'s format), with
    the ``network`` it trains.
    """

    folder: Path
    network: Network
    variant: str
    final_round: int


def named_theta(model: nn.Module, arrays: list[torch.Tensor],
                flat: bool = False) -> OrderedDict[str, torch.Tensor]:
    """Generated weights by ``model``'s parameter names, in the order they arrive.

    ``flat``: MH-pFedHN's one vector, which only the client's architecture cuts
    into its tensors.
    """
    shapes = OrderedDict((name, p.shape) for name, p in model.named_parameters())
    if flat:
        (vector,) = arrays
        arrays = [piece.view(shape) for piece, shape in
                  zip(vector.split([s.numel() for s in shapes.values()]), shapes.values(),
                      strict=True)]
    return OrderedDict(zip(shapes, arrays, strict=True))


def buffers_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """Batch norm's running statistics: the state that is not generated."""
    return {name: tensor.detach().cpu() for name, tensor in model.named_buffers()}


@dataclass(frozen=True)
class Training:
    """How a client trains: its inner loop, the run's seed and classes, MH-pFedHN's ways.

    ``flat``: MH-pFedHN, theta is one flat vector the client cuts into its
    parameters. ``distillation``: MH-pFedHNGD's personal-phase loss.
    """

    loop: InnerLoop
    seed: int
    out_dim: int
    flat: bool = False
    distillation: Distillation = Distillation()

    @classmethod
    def from_settings(cls, settings: Settings) -> Training:
        """The run's training recipe, the same on every client."""
        return cls(InnerLoop.from_settings(settings), settings.seed, settings.model.out_dim,
                   settings.variant.multi_head,
                   Distillation(settings.client.distill_alpha, settings.client.distill_temperature))


class PFedHNClient(NumPyClient):
    """Loads the theta_i the server generated, trains it, returns delta_theta.

    The variants differ in what arrives and what stays:
    - pFedHN: one array per parameter of ``model``.
    - pFedHN-PC (``model.local``): the same, and a private head in ``store``.
    - MH-pFedHN (``flat=True``): theta_i as one flat vector, which only this
      client knows how to cut into its parameters; it tells the server its
      parameter count, never its architecture. Batch-norm statistics stay in ``store``.
    - MH-pFedHNGD (``global_model``): also trains the small global model in a
      "global" phase, and distils it into its own model in the personal phase.
    """

    def __init__(
        self,
        partition_id: int,
        data: ClientData,
        model: nn.Module,
        training: Training,
        store: LocalStore | None = None,
        device: str | torch.device = "cpu",
        global_model: nn.Module | None = None,
        own_model: OwnModel | None = None,
    ) -> None:
        self.partition_id = partition_id
        self.own_model = own_model
        self.device = torch.device(device)
        self.data = data.to(self.device)
        self.model = model.to(self.device)
        self.loop, self.seed, self.out_dim = training.loop, training.seed, training.out_dim
        self.local = getattr(model, "local", False)
        self.flat = training.flat
        self.global_model = None if global_model is None else global_model.to(self.device)
        self.distillation = training.distillation
        models = [self.model] + ([self.global_model] if self.global_model else [])
        if store is None and (self.local or any(buffers_of(m) for m in models)):
            raise ValueError("this client keeps state between rounds: give it a LocalStore")
        self.store = store

    def get_properties(self, config: dict) -> dict[str, int]:
        """Tell the server which partition this node holds and how many weights it needs."""
        return {"partition-id": self.partition_id,
                "num-parameters": sum(p.numel() for p in self.model.parameters())}

    def _load_theta(
        self, model: nn.Module, parameters: list[np.ndarray], buffers: str
    ) -> OrderedDict[str, torch.Tensor]:
        """Put theta into ``model`` (and its saved ``buffers``); return theta by name."""
        theta = named_theta(model, [torch.from_numpy(a).to(self.device) for a in parameters],
                            self.flat)
        saved = self.store.load(buffers) if self.store is not None else None
        # Every parameter is in theta; only buffers may be missing, before the
        # first fit, and then keep their initial values.
        model.load_state_dict(theta | (saved or {}), strict=False)
        return theta

    def _delta(self, model: nn.Module, theta: OrderedDict[str, torch.Tensor]) -> list[np.ndarray]:
        """delta_theta = theta - trained, in the layout theta arrived in."""
        deltas = [theta[name] - param.detach() for name, param in model.named_parameters()]
        if self.flat:
            deltas = [torch.cat([d.flatten() for d in deltas])]
        return [d.cpu().contiguous().numpy() for d in deltas]

    def _head(self) -> tuple[LocalLayer, torch.optim.SGD]:
        """The private head and its optimizer, as this client last left them."""
        head = initial_head(self.model.feature_dim, self.out_dim, self.seed,
                            self.partition_id).to(self.device)
        optimizer = torch.optim.SGD(
            head.parameters(), lr=self.loop.lr, momentum=self.loop.momentum,
            weight_decay=self.loop.weight_decay,
        )
        saved = self.store.load("head")
        if saved is not None:
            head.load_state_dict(saved)
            momentum = self.store.load("head_momentum") or {}
            for name, param in head.named_parameters():
                if name in momentum:
                    optimizer.state[param]["momentum_buffer"] = momentum[name].to(self.device)
        return head, optimizer

    def _head_state(
        self, head: LocalLayer, optimizer: torch.optim.SGD
    ) -> dict[str, dict[str, torch.Tensor]]:
        momentum = {
            name: optimizer.state[param]["momentum_buffer"].cpu()
            for name, param in head.named_parameters()
            if optimizer.state[param].get("momentum_buffer") is not None
        }
        weights = {name: tensor.cpu() for name, tensor in head.state_dict().items()}
        return {"head": weights, "head_momentum": momentum}

    def fit(
        self, parameters: list[np.ndarray], config: dict
    ) -> tuple[list[np.ndarray], int, dict]:
        """Train theta_i locally and return delta_theta = theta_i - theta_tilde_i.

        MH-pFedHNGD: in the "global" phase theta is the global model's; in the
        personal phase the global model's theta follows the client's, as teacher.
        """
        start = time.perf_counter()
        server_round = int(config["server-round"])
        in_global_phase = config.get("phase") == "global"
        model, buffers = (self.global_model, "global_buffers") if in_global_phase \
            else (self.model, "buffers")
        teacher = None
        if config.get("distill"):
            parameters, teacher_theta = parameters[:1], parameters[1:]
            self._load_theta(self.global_model, teacher_theta, "global_buffers")
            teacher = self.global_model
        theta = self._load_theta(model, parameters, buffers)
        keys = (self.seed, self.partition_id, server_round) + ((2,) if in_global_phase else ())
        generator = torch.Generator().manual_seed(derive_seed(*keys))
        metrics: dict = {"partition-id": self.partition_id}
        head = optimizer = None
        if self.local:
            head, optimizer = self._head()
            metrics["head-fingerprint-in"] = fingerprint(head)
        # The authors train the global model without clipping its gradients.
        loop = replace(self.loop, clip_norm=None) if in_global_phase else self.loop
        metrics |= train_inner_loop(model, self.data, loop, generator, head, optimizer,
                                    teacher, self.distillation)
        kept = {buffers: statistics} if (statistics := buffers_of(model)) else {}
        if self.local:
            kept |= self._head_state(head, optimizer)
            metrics["head-fingerprint-out"] = fingerprint(head)
        if kept:
            self.store.save(kept, server_round)
        metrics["client-time-s"] = time.perf_counter() - start
        return self._delta(model, theta), len(self.data.train_y), metrics

    def evaluate(
        self, parameters: list[np.ndarray], config: dict
    ) -> tuple[float, int, dict]:
        """Evaluate the generated model on this client's val and test sets.

        With ``own_model``, after the run's last round also write the model to its folder.
        """
        self._load_theta(self.model, parameters, "buffers")
        head = self._head()[0] if self.local else None
        metrics: dict = {"partition-id": self.partition_id}
        for split in ("val", "test"):
            images, labels = getattr(self.data, f"{split}_x"), getattr(self.data, f"{split}_y")
            correct, loss_sum = evaluate_split(self.model, images, labels, self.data, head)
            metrics |= {f"{split}-correct": correct, f"{split}-loss-sum": loss_sum,
                        f"{split}-n": len(labels)}
        server_round = config.get("server-round")
        if self.own_model is not None and server_round == self.own_model.final_round:
            self._write_own_model(head, metrics, int(server_round))
        return metrics["val-loss-sum"] / max(metrics["val-n"], 1), metrics["val-n"], metrics

    def _write_own_model(self, head: LocalLayer | None, metrics: dict, server_round: int) -> None:
        own = self.own_model
        mean, std = self.data.mean.flatten().tolist(), self.data.std.flatten().tolist()
        model = personalized_model(self.model, mean, std, head)
        own.folder.mkdir(parents=True, exist_ok=True)
        entry = write_model(own.folder, f"client_{self.partition_id}.pt", model, own.network)
        entry |= {"partition_id": self.partition_id, "phase": "training", "round": server_round,
                  **{f"{split}_acc": metrics[f"{split}-correct"] / max(metrics[f"{split}-n"], 1)
                     for split in ("val", "test")}}
        write_index(own.folder, own.variant, server_round, mean, std,
                    {str(self.partition_id): entry})


def make_client_app(settings: Settings, state_mirror_dir: Path | None = None) -> ClientApp:
    """A ClientApp whose clients read their partition from the node config.

    ``state_mirror_dir``: simulation only, see ``LocalStore``.
    """
    build_client = client_builder(settings, state_mirror_dir)
    return ClientApp(client_fn=lambda context: build_client(context).to_client())


def client_builder(
    settings: Settings, state_mirror_dir: Path | None = None, data_cache: bool = False
) -> Callable[[Context], PFedHNClient]:
    """The function that builds a node's client from its Context, every round.

    Only the (small) settings travel in the closure: each worker process loads
    and splits the data once and keeps it (``federated_data`` is cached).
    ``data_cache``: a SuperNode, whose every message is a new process, reads its
    partition from a file on its disk after the first message (``cached_partition``
    in the node config's ``data-cache-dir``, default ``~/.cache/pfedhn``).
    MH-pFedHN: a node's architecture is ``model.architectures``' entry for its
    partition, or its node config's ``architecture`` on a real device.
    """
    training = Training.from_settings(settings)
    threads = settings.simulation.num_threads or settings.simulation.num_cpus_per_client
    deterministic = settings.deterministic
    # Once here, not per round: for an image folder it reads the class folders.
    spec = data_spec(settings)
    variant = settings.variant

    def build_client(context: Context) -> PFedHNClient:
        configure_torch(deterministic, threads)
        device = resolve_device(settings.device)  # in the process that trains
        partition_id = int(context.node_config["partition-id"])
        if data_cache:
            cache_dir = context.node_config.get("data-cache-dir") or DATA_CACHE_DIR
            data = cached_partition(str(cache_dir), spec, settings.dataset.root, partition_id,
                                    settings.split).to(device)
        else:
            data = federated_data(spec, settings.dataset.root, settings.split,
                                  device=str(device))[partition_id]
        store = LocalStore(
            context.state,
            state_mirror_dir / str(partition_id) if state_mirror_dir else None,
            settings.checkpoint_every,
        )
        architecture = context.node_config.get("architecture")  # a SuperNode's own
        network = client_network(settings, partition_id, architecture and str(architecture))
        model_dir = context.node_config.get("model-dir")  # a SuperNode's, for its model
        own_model = model_dir and OwnModel(Path(str(model_dir)).expanduser(), network,
                                           variant.name, settings.num_rounds)
        return PFedHNClient(
            partition_id, data, network.build(), training, store, device,
            global_model=global_network(settings).build() if variant.global_model else None,
            own_model=own_model or None,
        )

    return build_client
