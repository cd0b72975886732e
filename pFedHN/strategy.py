"""The pFedHN strategy: the hypernetwork lives here and never leaves the server."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    GetPropertiesIns,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from pFedHN.models import CNNHyper, MHHyper

log = logging.getLogger(__name__)

NO_PARAMETERS = Parameters(tensors=[], tensor_type="numpy.ndarray")


@dataclass(frozen=True)
class Exchange:
    """One Flower exchange of a round: these partitions train, in this phase.

    ``phase``: "personal" (each client its own theta) or "global"
    (MH-pFedHNGD: every client the global model's theta).
    """

    phase: str
    partitions: tuple[int, ...]


class FederationTooSmallError(RuntimeError):
    """Fewer Flower nodes than partitions: the run would wait for ever."""


class RoundsFailingError(RuntimeError):
    """Client visits that brought no update: the clients or their backend are failing.

    ``redo``: whether redoing the rounds from the last checkpoint may heal it (a
    crashed client or worker), or would give the same again (a delta_theta that
    cannot be used, computed afresh from the same weights and seed).
    """

    def __init__(self, message: str, redo: bool = True) -> None:
        super().__init__(message)
        self.redo = redo


@dataclass(frozen=True)
class FailurePolicy:
    """What a round does about client visits that bring no update (``server.*`` keys).

    ``visit_retries``: times a visit that failed (the client raised, timed out or
    was not reached) is sent again, the same weights to the same client, within
    its exchange. A visit still lost then, or one whose delta_theta cannot be used,
    fails the round (``RoundsFailingError``: no record, no checkpoint), unless
    ``accept_lost_visits``: then the round goes on without it, logged and counted,
    and ``max_failed_rounds`` rounds in a row without any update stop the run.
    """

    visit_retries: int = 2
    accept_lost_visits: bool = False
    max_failed_rounds: int | None = 3


def wait_for_nodes(client_manager: ClientManager, needed: int, timeout_s: float) -> None:
    """Return once ``needed`` nodes are connected; raise after ``timeout_s`` seconds.

    Flower's own ``wait_for`` waits a day by default, which is how ``flwr run .``
    on its default two-node federation used to hang on a 10-client config.
    """
    deadline = time.monotonic() + timeout_s
    while (connected := client_manager.num_available()) < needed:
        if time.monotonic() >= deadline:
            raise FederationTooSmallError(
                f"this run needs {needed} Flower nodes, one per partition (num_clients "
                f"+ novel.num_clients), but the federation has {connected} after "
                f"{timeout_s:g} s (server.node_timeout). With `flwr run .` "
                f"give the local simulation {needed} nodes: --federation-config "
                f"\"num-supernodes={needed}\"; in deployment start {needed} SuperNodes, "
                f"or lower num_clients.")
        time.sleep(0.2)


def make_optimizer(
    params: Iterable[torch.nn.Parameter], name: str, lr: float, momentum: float,
    weight_decay: float, fused_adam: bool = False,
) -> torch.optim.Optimizer:
    """The outer optimizer: SGD with momentum (pFedHN) or Adam (MH-pFedHN).

    ``fused_adam``: Adam in torch's fused kernel, one pass over each tensor
    instead of one per operation (MH-pFedHN's server steps a 30M-parameter
    head on every client visit). Its step equals the default kernel's up to a
    float32 rounding (tested). SGD keeps torch's default kernel: its fused one
    fails once a parameter gets its first gradient after others have
    momentum (MH-pFedHN's per-client embeddings), and pFedHN's step is small.
    """
    if name == "adam":
        kernel = {"fused": True} if fused_adam else {}
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, **kernel)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def evaluation_rounds(num_rounds: int, eval_every: int) -> set[int]:
    """Round 0 (untrained), every ``eval_every`` rounds, and the last round."""
    return {0, num_rounds, *range(eval_every, num_rounds + 1, eval_every)}


def pooled_metrics(results: Sequence[dict[str, Scalar]]) -> dict[str, float]:
    """Accuracy and loss pooled over clients (sum correct / sum samples) + spread."""
    out: dict[str, float] = {}
    for split in ("val", "test"):
        n = np.array([r[f"{split}-n"] for r in results], dtype=float)
        correct = np.array([r[f"{split}-correct"] for r in results], dtype=float)
        loss = np.array([r[f"{split}-loss-sum"] for r in results], dtype=float)
        per_client = correct / np.maximum(n, 1)
        out |= {
            f"{split}_acc": correct.sum() / n.sum(),
            f"{split}_loss": loss.sum() / n.sum(),
            f"{split}_acc_min": per_client.min(),
            f"{split}_acc_max": per_client.max(),
            f"{split}_acc_std": per_client.std(),
        }
    return {k: float(v) for k, v in out.items()}


def payload_bytes(parameters: Parameters) -> int:
    """Bytes of the serialised arrays a message carries (Flower's protocol overhead aside)."""
    return sum(len(tensor) for tensor in parameters.tensors)


def _describe(failure: tuple[ClientProxy, FitRes] | BaseException) -> str:
    """One short line: the last line of a client's traceback says what went wrong."""
    if isinstance(failure, BaseException):
        text = f"{type(failure).__name__}: {failure}"
    else:
        text = f"status {failure[1].status.code.name}: {failure[1].status.message}"
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", text).splitlines()]
    return [line for line in lines if line][-1][:300]


def _failure_reasons(
    failures: list[tuple[ClientProxy, FitRes] | BaseException],
) -> Callable[[ClientProxy], str]:
    """Why a client's visit failed: its own status, or the exceptions (they name no client)."""
    own = {f[0].cid: _describe(f) for f in failures if not isinstance(f, BaseException)}
    anonymous = "; ".join(_describe(f) for f in failures if isinstance(f, BaseException))
    return lambda proxy: own.get(proxy.cid, anonymous or "no reply")


def _empty_round_log() -> dict[str, Any]:
    return {"clients": [], "server-time-s": 0.0, "rejected": [], "retried": [],
            "bytes-sent": 0, "bytes-received": 0}


class PFedHNStrategy(Strategy):
    """Each round: theta_i = h(v_i; phi) for a sampled client i, then a VJP step.

    The outer optimizer is built once, so its momentum persists across rounds.
    Flower's node ids are not partition ids; the strategy asks every node for
    its partition id (and parameter count) once, through Flower's
    ``get_properties``. The hypernetwork stays on ``device``; tensors cross to
    the CPU only at Flower's message boundary.

    MH-pFedHN: ``hnet`` is None and ``make_hnet`` builds it from the parameter
    counts the clients report. MH-pFedHNGD (``global_model``): the hypernetwork's
    last client is a virtual one, the global model; each round starts with a
    "global" phase (see ``PFedHNServer``) in which every chosen client trains it.
    """

    def __init__(
        self,
        hnet: CNNHyper | MHHyper | None,
        num_clients: int,
        num_rounds: int,
        eval_every: int = 30,
        clients_per_round: int = 1,
        lr: float = 1e-2,
        momentum: float = 0.9,
        weight_decay: float = 1e-3,
        clip_norm: float = 50.0,
        seed: int = 0,
        device: str | torch.device = "cpu",
        on_fit: Callable[[int, list[dict[str, Scalar]], dict[str, Any]], None] | None = None,
        on_evaluate: Callable[[int, dict[str, float], dict[int, dict]], None] | None = None,
        training_clients: int | None = None,
        optimizer: str = "sgd",
        make_hnet: Callable[[list[int]], MHHyper] | None = None,
        global_model: bool = False,
        sequential: bool = False,
        node_timeout: float = 15.0,
        fused_adam: bool = False,
        failures: FailurePolicy = FailurePolicy(),
    ) -> None:
        super().__init__()
        self.device = torch.device(device)
        self.make_hnet = make_hnet
        self.client_sizes: dict[int, int] = {}  # parameter counts the clients reported
        self.global_id = num_clients if global_model else None  # the virtual client
        self.num_clients = num_clients  # Flower nodes, one per partition
        self.node_timeout = node_timeout  # seconds the first round waits for them
        self.failures = failures  # what a round does about lost visits
        self._failed_in_a_row = 0  # rounds without an update (accept_lost_visits)
        # The partitions sampled for training and evaluated; the rest are novel clients.
        self.clients = list(range(training_clients or num_clients))
        self.clients_per_round = clients_per_round
        self.sequential = sequential  # one outer step per client visit (see begin_round)
        self.eval_rounds = evaluation_rounds(num_rounds, eval_every)
        self.clip_norm = clip_norm
        self.outer = {"name": optimizer, "lr": lr, "momentum": momentum,
                      "weight_decay": weight_decay}
        self.fused_adam = fused_adam  # torch's fused Adam kernel (see make_optimizer)
        self.hnet = self.optimizer = None
        if hnet is not None:
            self._use(hnet)
        self.rng = np.random.default_rng(seed)
        self.on_fit = on_fit
        self.on_evaluate = on_evaluate
        self.node_of: dict[int, ClientProxy] = {}  # partition id -> node
        self.partition_of: dict[str, int] = {}  # node id (cid) -> partition id
        self._nodes_of_run: ClientManager | None = None  # the run node_of belongs to
        self.start_round = 0  # > 0 when resumed: Flower counts rounds from 1 again
        self._server_time = 0.0  # hypernetwork time spent in configure_fit
        self._bytes_sent = 0  # serialised arrays sent to this round's clients
        self.round_clients: list[int] = []  # the partitions sampled for this round
        self.exchange = Exchange("personal", ())  # the Flower exchange under way
        self._round_log: dict[str, Any] = _empty_round_log()  # recorded by end_round
        self._teacher: list[np.ndarray] = []  # MH-pFedHNGD: this round's pre-step global model
        self._evaluation_start = 0.0
        # The last completed round (true count) and the sampler's state then; None once
        # the hypernetwork has moved in the round after it (see state_at_last_round).
        self._last_round: tuple[int, dict] | None = (0, self.rng.bit_generator.state)

    def _use(self, hnet: CNNHyper | MHHyper) -> None:
        """Adopt ``hnet`` and build the outer optimizer over all of it."""
        self.hnet = hnet.to(self.device)
        self.optimizer = make_optimizer(self.hnet.parameters(), **self.outer,
                                        fused_adam=self.fused_adam)

    # --- the algorithm -------------------------------------------------------
    def generate(self, partition_id: int) -> list[np.ndarray]:
        """theta_i as the list of arrays a client loads, in the target's order."""
        with torch.no_grad():
            return [t.cpu().numpy() for t in self.hnet(partition_id).values()]

    def generate_many(self, partition_ids: list[int]) -> list[list[np.ndarray]]:
        """``generate`` for several clients; batched where the hypernetwork can."""
        if not hasattr(self.hnet, "forward_many"):
            return [self.generate(i) for i in partition_ids]
        with torch.no_grad():
            return [[t.cpu().numpy() for t in theta.values()]
                    for theta in self.hnet.forward_many(list(partition_ids))]

    def update(
        self, partition_ids: Sequence[int], delta_thetas: Sequence[list[np.ndarray]]
    ) -> None:
        """Step phi along clip(mean_i (d theta_i / d phi)^T delta_theta_i) with the outer optimizer.

        One vector-Jacobian product over all clients of the round; with the
        authors' one client per round it is exactly their update.
        """
        self._last_round = None  # from here on, the state is no completed round's
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        deltas = [[torch.from_numpy(d).to(self.device) for d in delta_theta]
                  for delta_theta in delta_thetas]
        # Unused parameters (MH-pFedHN: other clients' embeddings and heads) get no
        # gradient, so the optimizer leaves them alone, weight decay included.
        if len(partition_ids) == 1:
            # The hypernetwork's own VJP: MH-pFedHN's writes the head's part out,
            # several times faster than autograd (docs/performance.md).
            grads_of = self.hnet.vjp(partition_ids[0], deltas[0], set(params))
            grads = [grads_of.get(p) for p in params]
        else:
            thetas = [t for i in partition_ids for t in self.hnet(i).values()]
            grads = torch.autograd.grad(thetas, params, allow_unused=True,
                                        grad_outputs=[d for ds in deltas for d in ds])
            if len(partition_ids) > 1:  # the mean (one client: spare a pass over them)
                grads = [None if g is None else g / len(partition_ids) for g in grads]
        for param, grad in zip(params, grads, strict=True):
            # Contiguous: torch's fused CPU Adam (2.14) misreads strided gradients, such
            # as those of MH-pFedHN's batched heads, and they slow every kernel down.
            param.grad = None if grad is None else grad.contiguous()
        torch.nn.utils.clip_grad_norm_(params, self.clip_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def learn_embeddings_only(
        self, partition_ids: Sequence[int], num_rounds: int, lr: float, momentum: float,
        optimizer: str = "sgd", eval_every: int | None = None,
    ) -> None:
        """Novel clients: from now on train only their embeddings, the rest frozen.

        Samples and evaluates only ``partition_ids`` (at round 0 and
        ``num_rounds``, and every ``eval_every`` rounds if given) and steps only
        the embeddings, with SGD (``momentum``) or Adam (the MH-pFedHN
        authors'); other clients' get no gradient and, without weight decay, do
        not move. MH-pFedHN: a novel
        client whose size no training client has (an unseen architecture) also
        trains its head, never trained before; the trunk stays frozen. The global
        model (MH-pFedHNGD) is frozen too: no global phase.
        """
        trainable = list(self.hnet.embeddings.parameters())
        if isinstance(self.hnet, MHHyper):
            seen = {self.hnet.chunks[i] for i in self.clients}
            unseen = {self.hnet.chunks[i] for i in partition_ids} - seen
            trainable += [p for n in sorted(unseen) for p in self.hnet.head(n)]
        self.clients = list(partition_ids)
        self.clients_per_round = min(self.clients_per_round, len(self.clients))
        self.eval_rounds = {0, num_rounds} if eval_every is None \
            else evaluation_rounds(num_rounds, eval_every)
        self.start_round = 0
        self._last_round = (0, self.rng.bit_generator.state)
        self.global_id = None
        self.optimizer = make_optimizer(trainable, optimizer, lr, momentum, weight_decay=0.0,
                                        fused_adam=self.fused_adam)

    def memory_bytes(self) -> dict[str, int]:
        """What the server holds for the algorithm: the hypernetwork and its optimizer state.

        Nothing yet for MH-pFedHN before its clients report their sizes.
        """
        if self.hnet is None:
            return {}

        def nbytes(tensors: Iterable[Any]) -> int:
            return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))

        return {"hypernetwork_bytes": nbytes(self.hnet.parameters()),
                "optimizer_state_bytes": nbytes(t for state in self.optimizer.state.values()
                                                for t in state.values())}

    # --- checkpoints ---------------------------------------------------------
    def model_state(self) -> dict[str, Any]:
        """What generates every client's weights: the hypernetwork (and MH-pFedHN's sizes)."""
        return {"client_sizes": self.client_sizes, "hnet": self.hnet.state_dict()}

    def load_model_state(self, state: dict[str, Any]) -> None:
        """Generate from a saved ``model_state`` (or a whole ``state_dict``)."""
        if self.hnet is None:  # MH-pFedHN: rebuilt from the sizes the clients reported
            self.client_sizes = dict(state["client_sizes"])
            self._use(self.make_hnet([self.client_sizes[i] for i in range(self.num_clients)]))
        self.hnet.load_state_dict(state["hnet"])

    def state_dict(self, server_round: int) -> dict[str, Any]:
        """Everything needed to continue after ``server_round`` (a true round number)."""
        return self.model_state() | {
            "round": server_round,
            "optimizer": self.optimizer.state_dict(),
            "rng": self.rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint: Flower's round r becomes round start_round + r."""
        self.load_model_state(state)
        saved = state["optimizer"]  # its groups name the kernel it ran with: use ours
        kernel = {"fused": self.optimizer.param_groups[0].get("fused"), "foreach": None}
        groups = [group | kernel for group in saved["param_groups"]]
        self.optimizer.load_state_dict(saved | {"param_groups": groups})
        self.rng.bit_generator.state = state["rng"]
        self.start_round = int(state["round"])
        self._last_round = (self.start_round, self.rng.bit_generator.state)

    def state_at_last_round(self) -> tuple[int, dict[str, Any]] | None:
        """The last completed round and ``state_dict`` there, while the state is still that.

        For a process that Flower ends between two steps (``flwr stop``): until the
        round in flight first steps the hypernetwork, only its sampling has moved
        on, and that is put back. None once it has stepped (a sequential round).
        """
        if self._last_round is None or self.hnet is None:
            return None
        server_round, rng = self._last_round
        return server_round, self.state_dict(server_round) | {"rng": rng}

    # --- Flower plumbing (``server_round`` is Flower's count) -----------------
    def _discover_partitions(self, client_manager: ClientManager, server_round: int) -> None:
        """Learn which partition each node holds (once per run; Flower's own protocol)."""
        if client_manager is not self._nodes_of_run:  # a new Flower run: new nodes
            self.node_of, self.partition_of = {}, {}
            self._nodes_of_run = client_manager
        if len(self.node_of) == self.num_clients:
            return
        wait_for_nodes(client_manager, self.num_clients, self.node_timeout)
        unknown = [p for cid, p in client_manager.all().items() if cid not in self.partition_of]
        ins = GetPropertiesIns(config={})
        with ThreadPoolExecutor() as pool:
            answers = list(pool.map(
                lambda proxy: proxy.get_properties(ins, timeout=None, group_id=server_round),
                unknown,
            ))
        sizes = {}
        for proxy, answer in zip(unknown, answers, strict=True):
            partition_id = int(answer.properties["partition-id"])
            if partition_id in self.node_of:
                raise RuntimeError(f"two nodes claim partition {partition_id}")
            self.node_of[partition_id] = proxy
            self.partition_of[proxy.cid] = partition_id
            sizes[partition_id] = int(answer.properties["num-parameters"])
        missing = set(range(self.num_clients)) - set(self.node_of)
        if missing:
            raise RuntimeError(f"no node holds partitions {sorted(missing)}")
        if self.make_hnet is None:
            return
        if self.hnet is None:  # MH-pFedHN: now the sizes to generate are known
            self.client_sizes = sizes
            self._use(self.make_hnet([sizes[i] for i in range(self.num_clients)]))
        changed = {i: (self.client_sizes[i], k) for i, k in sizes.items()
                   if self.client_sizes[i] != k}
        if changed:
            raise RuntimeError("clients report other parameter counts than the hypernetwork "
                               f"generates (partition: (generated, reported)): {changed}")

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        """Nothing global to send: every client gets its own generated weights."""
        return NO_PARAMETERS

    # --- a round: its clients, and the Flower exchanges that train them ------------
    def begin_round(self) -> list[Exchange]:
        """Sample the round's clients; return the round's Flower exchanges, in order.

        1. MH-pFedHNGD only, the global phase: all the round's clients train the
           global model's theta with cross-entropy; one outer step on the
           sample-weighted mean of their deltas. The theta they got is kept as
           the round's teacher (the authors' order: generated before the step).
        2. The personal phase. Averaged (pFedHN): one exchange with all of them,
           then one outer step on their mean VJP. Sequential (the MH-pFedHN
           authors' order): one exchange per client, in the sampled (random)
           order, each followed by an outer step on that client's delta alone,
           so each client's theta comes from the hypernetwork as the client
           before it left it. MH-pFedHNGD's clients distil from the teacher.
        """
        chosen = self.rng.choice(len(self.clients), self.clients_per_round, replace=False)
        self.round_clients = [self.clients[int(i)] for i in chosen]
        self._round_log = _empty_round_log()
        exchanges = [Exchange("global", tuple(self.round_clients))] \
            if self.global_id is not None else []
        personal = [(i,) for i in self.round_clients] if self.sequential \
            else [tuple(self.round_clients)]
        return exchanges + [Exchange("personal", clients) for clients in personal]

    def end_round(self, server_round: int) -> None:
        """Report the round once, all its exchanges together (Flower's count).

        A round that lost visits gets here only if lost visits are accepted
        (``FailurePolicy``, ``aggregate_fit``). Then ``max_failed_rounds`` rounds
        in a row in which no client's result reached the hypernetwork stop the
        run: a dead simulation backend or federation would otherwise race
        through the remaining rounds in seconds.
        """
        round_log, self._round_log = self._round_log, _empty_round_log()
        server_round += self.start_round
        lost = round_log["rejected"]
        clients = round_log.pop("clients")
        self._last_round = (server_round, self.rng.bit_generator.state)
        if self.on_fit is not None:
            self.on_fit(server_round, clients, round_log)
        self._failed_in_a_row = 0 if clients else self._failed_in_a_row + 1
        most = self.failures.max_failed_rounds
        if most is not None and self._failed_in_a_row >= most:
            reason = lost[-1]["reason"] if lost else "no reply"
            raise RoundsFailingError(
                f"rounds {server_round - self._failed_in_a_row + 1}-{server_round}: no "
                f"client's result reached the hypernetwork (the last reason: "
                f"{reason[:300]}). Stopped by server.max_failed_rounds={most} (null: never "
                f"stop). Rounds without an update write no checkpoint: once the clients are "
                f"back, resume=<run dir> goes on from the last one.")

    def visits_to_retry(
        self,
        server_round: int,
        instructions: list[tuple[ClientProxy, FitIns]],
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> list[tuple[ClientProxy, FitIns]]:
        """The exchange's visits that brought no result: logged, counted, to send again.

        The same instructions: the hypernetwork has not moved since, and a client
        seeds its training by round, so a retried visit is the visit it replaces.
        """
        answered = {proxy.cid for proxy, _ in results}
        retry = [(proxy, ins) for proxy, ins in instructions if proxy.cid not in answered]
        reason_of = _failure_reasons(failures)
        for proxy, _ in retry:
            partition_id, reason = self.partition_of[proxy.cid], reason_of(proxy)
            log.warning("round %d: client %d failed (%s); sending its visit again",
                        server_round + self.start_round, partition_id, reason)
            self._round_log["retried"].append({"partition_id": partition_id, "reason": reason})
        return retry

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """Send each client of the exchange (``exchange``) its generated theta_i.

        MH-pFedHNGD: the global phase sends the round's clients the global
        model's theta; the personal phase sends each its own theta followed by
        that same global theta, the teacher (generated before the global phase's
        step, as the authors do).
        """
        self._discover_partitions(client_manager, server_round)
        server_round += self.start_round
        start = time.perf_counter()
        config: dict[str, Scalar] = {"server-round": server_round}
        if self.exchange.phase == "global":
            # As the authors do: the round's teacher is the global model generated
            # once, before this phase steps it.
            self._teacher = self.generate(self.global_id)
            theta_global = ndarrays_to_parameters(self._teacher)
            config["phase"] = "global"
            instructions = [(self.node_of[i], FitIns(theta_global, config))
                            for i in self.exchange.partitions]
        else:
            teacher = [] if self.global_id is None else self._teacher
            config["distill"] = bool(teacher)
            instructions = [
                (self.node_of[i],
                 FitIns(ndarrays_to_parameters(self.generate(i) + teacher), config))
                for i in self.exchange.partitions
            ]
        self._server_time = time.perf_counter() - start
        self._bytes_sent = sum(payload_bytes(ins.parameters) for _, ins in instructions)
        return instructions

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Turn the exchange's delta_theta into one hypernetwork step; log it for the round.

        A client that failed, timed out or sent a delta_theta of the wrong
        shape or with non-finite values is a lost visit: the round fails
        (``RoundsFailingError``) unless lost visits are accepted; then the
        hypernetwork is stepped on the deltas that passed. MH-pFedHNGD's global phase steps the
        virtual client on the sample-weighted mean of the clients' deltas.
        """
        server_round += self.start_round
        start = time.perf_counter()
        in_global_phase = self.exchange.phase == "global"
        accepted: dict[int, tuple[list[np.ndarray], int]] = {}
        rejected: list[dict[str, Any]] = []
        # In the exchange's (sampled) order, not the order replies came in: the
        # step's sums then add up the same way in every run.
        order = {partition_id: k for k, partition_id in enumerate(self.exchange.partitions)}
        results = sorted(results, key=lambda result: order[self.partition_of[result[0].cid]])
        for proxy, res in results:
            partition_id = self.partition_of[proxy.cid]
            delta_theta = parameters_to_ndarrays(res.parameters)
            problem = self.check_delta(
                delta_theta, self.global_id if in_global_phase else partition_id)
            if problem is None:
                accepted[partition_id] = (delta_theta, res.num_examples)
            else:
                rejected.append({"partition_id": partition_id, "reason": problem,
                                 "kind": "rejected"})
        answered = set(accepted) | {r["partition_id"] for r in rejected}
        reason_of = _failure_reasons(failures)
        rejected += [{"partition_id": i, "reason": reason_of(self.node_of[i]), "kind": "failed"}
                     for i in self.exchange.partitions if i not in answered]
        if rejected and not self.failures.accept_lost_visits:
            raise self._lost_visits_error(server_round, rejected)
        for r in rejected:
            log.warning("round %d: client %d left out%s: %s", server_round, r["partition_id"],
                        " of the global phase" if in_global_phase else "", r["reason"])
        if accepted and in_global_phase:
            deltas, examples = zip(*accepted.values(), strict=True)
            weighted = [np.average(tensors, axis=0, weights=examples).astype(np.float32)
                        for tensors in zip(*deltas, strict=True)]
            self.update([self.global_id], [weighted])
        elif accepted:
            self.update(list(accepted), [delta for delta, _ in accepted.values()])
        round_log = self._round_log
        round_log["server-time-s"] += self._server_time + time.perf_counter() - start
        round_log["rejected"] += rejected
        round_log["bytes-sent"] += self._bytes_sent
        round_log["bytes-received"] += sum(payload_bytes(r.parameters) for _, r in results)
        if not in_global_phase:  # the round's record: the personal training of its clients
            round_log["clients"] += [r.metrics for p, r in results
                                     if self.partition_of[p.cid] in accepted]
        return NO_PARAMETERS, {}

    def _lost_visits_error(
        self, server_round: int, lost: list[dict[str, Any]]
    ) -> RoundsFailingError:
        """The round is not kept: raised before it is recorded, so no checkpoint follows it."""
        clients = sorted({r["partition_id"] for r in lost})
        redo = any(r["kind"] == "failed" for r in lost)
        return RoundsFailingError(
            f"round {server_round} lost the visits of clients {clients} ("
            f"{lost[-1]['reason'][:300]})"
            + (f", after server.visit_retries={self.failures.visit_retries} retries" if redo
               else "; the same weights would give that delta_theta again")
            + ". Without them the hypernetwork takes fewer steps than the protocol's, so the "
            "round is not kept (server.accept_lost_visits=true goes on without them).",
            redo=redo)

    def num_parameters(self, partition_id: int) -> int:
        """The size of theta_i: all the server knows of client i's network."""
        return sum(shape.numel() for shape in self.hnet.shapes(partition_id).values())

    def check_delta(self, delta_theta: list[np.ndarray], partition_id: int) -> str | None:
        """Why a client's delta_theta cannot be used, or None when it can."""
        expected = self.hnet.shapes(partition_id)
        shapes = list(expected.values())
        if len(delta_theta) != len(shapes):
            return f"{len(delta_theta)} tensors, expected {len(shapes)}"
        for name, delta, shape in zip(expected, delta_theta, shapes, strict=True):
            if tuple(delta.shape) != tuple(shape):
                return f"{name} has shape {tuple(delta.shape)}, expected {tuple(shape)}"
            if not np.isfinite(delta).all():
                return f"{name} has non-finite values"
        return None

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        """On evaluation rounds, every client evaluates its own generated model."""
        if server_round + self.start_round not in self.eval_rounds:
            return []
        self._discover_partitions(client_manager, server_round)
        self._evaluation_start = time.perf_counter()
        thetas = self.generate_many(self.clients)
        config: dict[str, Scalar] = {"server-round": server_round + self.start_round}
        instructions = [
            (self.node_of[i], EvaluateIns(ndarrays_to_parameters(theta), config))
            for i, theta in zip(self.clients, thetas, strict=True)
        ]
        self._bytes_sent = sum(payload_bytes(ins.parameters) for _, ins in instructions)
        return instructions

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        """Pool accuracy and loss over clients; report the per-client spread."""
        server_round += self.start_round
        for failure in failures:
            log.warning("round %d: a client failed evaluation: %r", server_round, failure)
        if not results:
            return None, {}
        metrics = pooled_metrics([r.metrics for _, r in results])
        metrics["clients_evaluated"] = len(results)
        metrics["evaluation_time_s"] = time.perf_counter() - self._evaluation_start
        metrics["bytes_sent"] = self._bytes_sent  # the clients answer with metrics only
        per_client = {}
        for _, res in results:
            m = res.metrics
            partition_id = int(m["partition-id"])
            per_client[partition_id] = {
                "val_acc": m["val-correct"] / max(m["val-n"], 1),
                "test_acc": m["test-correct"] / max(m["test-n"], 1),
                "test_n": int(m["test-n"]),
                "num_parameters": self.num_parameters(partition_id),
            }
        if self.on_evaluate is not None:
            self.on_evaluate(server_round, metrics, per_client)
        return metrics["val_loss"], metrics

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        """No centralised evaluation: the data lives on the clients."""
        return None
