"""The pFedHN strategy: Flower's side of a round; phi lives in ``core`` on the server.

``PFedHNStrategy.round`` is one round, top to bottom: it samples the clients
and yields the round's Flower exchanges in order (MH-pFedHNGD's global phase,
then the personal phase: all clients at once, or one at a time when
sequential); the server (``pFedHN.server``) runs each with Flower and hands the
replies to ``aggregate_fit``, which steps ``core`` (``pFedHN.core``).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from pFedHN.core import PFedHNCore
from pFedHN.models import CNNHyper, MHHyper
from pFedHN.nodes import FederationTooSmallError, Nodes
from pFedHN.settings import NovelSettings, Settings

__all__ = ["FederationTooSmallError", "PFedHNStrategy", "RoundsFailingError"]

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


def lost_visits_error(server_round: int, lost: list[dict[str, Any]],
                      retries: int) -> RoundsFailingError:
    """The round is not kept: raised before it is recorded, so no checkpoint follows it."""
    clients = sorted({r["partition_id"] for r in lost})
    redo = any(r["kind"] == "failed" for r in lost)
    return RoundsFailingError(
        f"round {server_round} lost the visits of clients {clients} ("
        f"{lost[-1]['reason'][:300]})"
        + (f", after server.visit_retries={retries} retries" if redo
           else "; the same weights would give that delta_theta again")
        + ". Without them the hypernetwork takes fewer steps than the protocol's, so the "
        "round is not kept (server.accept_lost_visits=true goes on without them).",
        redo=redo)


def per_client_accuracy(results: list[tuple[ClientProxy, EvaluateRes]],
                        num_parameters: Callable[[int], int]) -> dict[int, dict[str, Any]]:
    """Each evaluated client's accuracies, test samples and network size, by partition."""
    per_client = {}
    for _, res in results:
        m = res.metrics
        partition_id = int(m["partition-id"])
        per_client[partition_id] = {
            "val_acc": m["val-correct"] / max(m["val-n"], 1),
            "test_acc": m["test-correct"] / max(m["test-n"], 1),
            "test_n": int(m["test-n"]),
            "num_parameters": num_parameters(partition_id),
        }
    return per_client


def _empty_round_log() -> dict[str, Any]:
    return {"clients": [], "server-time-s": 0.0, "rejected": [], "retried": [],
            "bytes-sent": 0, "bytes-received": 0}


class PFedHNStrategy(Strategy):
    """Each round: theta_i = h(v_i; phi) to each sampled client, then a step on their deltas.

    ``core``: phi and its optimizer. MH-pFedHN: None until the clients have
    reported their parameter counts; ``make_core`` then builds it from them.
    MH-pFedHNGD: the hypernetwork's last client is a virtual one, the global
    model (``global_id``), which every sampled client trains first each round.
    """

    def __init__(self, settings: Settings, core: PFedHNCore | None = None,
                 make_core: Callable[[list[int]], PFedHNCore] | None = None,
                 on_fit: Callable[[int, list[dict], dict[str, Any]], None] | None = None,
                 on_evaluate: Callable[[int, dict[str, float], dict[int, dict]], None]
                 | None = None) -> None:
        super().__init__()
        server = settings.server
        self.core, self.make_core = core, make_core
        self.client_sizes: dict[int, int] = {}  # parameter counts the clients reported
        self.nodes = Nodes(settings.partitions, server.node_timeout)
        self.global_id = settings.partitions if settings.variant.global_model else None
        # The partitions sampled for training and evaluated; the rest are novel clients.
        self.clients = list(range(settings.num_clients))
        self.clients_per_round = server.clients_per_round
        self.sequential = server.sequential  # one outer step per client visit
        self.eval_rounds = evaluation_rounds(settings.num_rounds, settings.eval_every)
        self.failures = FailurePolicy(server.visit_retries, server.accept_lost_visits,
                                      server.max_failed_rounds)
        self._failed_in_a_row = 0  # rounds without an update (accept_lost_visits)
        self.rng = np.random.default_rng(settings.seed)
        self.on_fit, self.on_evaluate = on_fit, on_evaluate
        self.start_round = 0  # > 0 when resumed: Flower counts rounds from 1 again
        self.exchange = Exchange("personal", ())  # the one under way (see ``round``)
        self._round_log: dict[str, Any] = _empty_round_log()  # recorded by end_round
        self._teacher: list[np.ndarray] = []  # MH-pFedHNGD: this round's pre-step global model
        self._sent = (0.0, 0)  # server seconds and bytes of the last configure_* call
        # The last completed round (true count) and the sampler's state then; None once
        # phi has moved in the round after it (see state_at_last_round).
        self._last_round: tuple[int, dict] | None = (0, self.rng.bit_generator.state)

    @property
    def hnet(self) -> CNNHyper | MHHyper | None:
        """The hypernetwork, where ``core`` is built."""
        return None if self.core is None else self.core.hnet

    # --- one round, top to bottom ---------------------------------------------------
    def round(self, server_round: int) -> Iterator[Exchange]:
        """Sample the round's clients; yield its Flower exchanges in order; record it.

        1. MH-pFedHNGD only, the global phase: all the round's clients train the
           global model's theta with cross-entropy; one outer step on the
           sample-weighted mean of their deltas. The theta they got is kept as
           the round's teacher (the authors' order: generated before the step).
        2. The personal phase. Averaged (pFedHN): one exchange with all of them,
           then one outer step on their mean VJP. Sequential (the MH-pFedHN
           authors' order): one exchange per client, in the sampled (random)
           order, each followed by an outer step on that client's delta alone.
           MH-pFedHNGD's clients distil from the teacher.
        """
        chosen = self.rng.choice(len(self.clients), self.clients_per_round, replace=False)
        sampled = tuple(self.clients[int(i)] for i in chosen)
        self._round_log = _empty_round_log()
        if self.global_id is not None:
            self.exchange = Exchange("global", sampled)
            yield self.exchange
        for group in ([(i,) for i in sampled] if self.sequential else [sampled]):
            self.exchange = Exchange("personal", group)
            yield self.exchange
        self.end_round(server_round)

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """Send each client of the exchange under way its generated theta_i.

        MH-pFedHNGD: the global phase sends the global model's theta; the
        personal phase sends each client its own theta followed by that same
        global theta, the teacher (generated before the global step, as the
        authors do).
        """
        self._discover_partitions(client_manager, server_round)
        start = time.perf_counter()
        config: dict[str, Scalar] = {"server-round": server_round + self.start_round}
        if self.exchange.phase == "global":
            self._teacher = self.core.generate(self.global_id)
            thetas = {i: self._teacher for i in self.exchange.partitions}
            config["phase"] = "global"
        else:
            teacher = [] if self.global_id is None else self._teacher
            config["distill"] = bool(teacher)
            thetas = {i: self.core.generate(i) + teacher for i in self.exchange.partitions}
        instructions = [(self.nodes.node_of[i], FitIns(ndarrays_to_parameters(theta), config))
                        for i, theta in thetas.items()]
        self._sent = (time.perf_counter() - start,
                      sum(payload_bytes(ins.parameters) for _, ins in instructions))
        return instructions

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Turn the exchange's delta_theta into one step of phi; log it for the round.

        A client that failed, timed out or sent a delta_theta of the wrong shape
        or with non-finite values is a lost visit: the round fails
        (``RoundsFailingError``) unless lost visits are accepted; then phi is
        stepped on the deltas that passed.
        """
        server_round += self.start_round
        start = time.perf_counter()
        in_global_phase = self.exchange.phase == "global"
        # In the exchange's (sampled) order, not the order replies came in: the
        # step's sums then add up the same way in every run.
        order = {partition_id: k for k, partition_id in enumerate(self.exchange.partitions)}
        partition_of = self.nodes.partition_of
        results = sorted(results, key=lambda result: order[partition_of[result[0].cid]])
        accepted: dict[int, tuple[list[np.ndarray], int]] = {}
        rejected: list[dict[str, Any]] = []
        for proxy, res in results:
            partition_id = partition_of[proxy.cid]
            delta_theta = parameters_to_ndarrays(res.parameters)
            problem = self.core.check_delta(
                delta_theta, self.global_id if in_global_phase else partition_id)
            if problem is None:
                accepted[partition_id] = (delta_theta, res.num_examples)
            else:
                rejected.append({"partition_id": partition_id, "reason": problem,
                                 "kind": "rejected"})
        answered = set(accepted) | {r["partition_id"] for r in rejected}
        reason_of = _failure_reasons(failures)
        rejected += [{"partition_id": i, "reason": reason_of(self.nodes.node_of[i]),
                      "kind": "failed"} for i in self.exchange.partitions if i not in answered]
        if rejected and not self.failures.accept_lost_visits:
            raise lost_visits_error(server_round, rejected, self.failures.visit_retries)
        for r in rejected:
            log.warning("round %d: client %d left out%s: %s", server_round, r["partition_id"],
                        " of the global phase" if in_global_phase else "", r["reason"])
        if accepted:
            self._last_round = None  # from here on, the state is no completed round's
            deltas, examples = zip(*accepted.values(), strict=True)
            if in_global_phase:
                self.core.update_global(self.global_id, deltas, examples)
            else:
                self.core.update(list(accepted), deltas)
        self._log_exchange(results, rejected, accepted, time.perf_counter() - start)
        return NO_PARAMETERS, {}

    def end_round(self, server_round: int) -> None:
        """Report the round once, all its exchanges together (Flower's count).

        A round that lost visits gets here only if lost visits are accepted.
        Then ``max_failed_rounds`` rounds in a row in which no client's result
        reached phi stop the run: a dead simulation backend or federation would
        otherwise race through the remaining rounds in seconds.
        """
        round_log, self._round_log = self._round_log, _empty_round_log()
        server_round += self.start_round
        clients = round_log.pop("clients")
        self._last_round = (server_round, self.rng.bit_generator.state)
        if self.on_fit is not None:
            self.on_fit(server_round, clients, round_log)
        self._failed_in_a_row = 0 if clients else self._failed_in_a_row + 1
        most = self.failures.max_failed_rounds
        if most is not None and self._failed_in_a_row >= most:
            lost = round_log["rejected"]
            raise RoundsFailingError(
                f"rounds {server_round - self._failed_in_a_row + 1}-{server_round}: no "
                f"client's result reached the hypernetwork (the last reason: "
                f"{(lost[-1]['reason'] if lost else 'no reply')[:300]}). Stopped by "
                f"server.max_failed_rounds={most} (null: never stop). Rounds without an "
                f"update write no checkpoint: once the clients are back, resume=<run dir> "
                f"goes on from the last one.")

    def visits_to_retry(
        self,
        server_round: int,
        instructions: list[tuple[ClientProxy, FitIns]],
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> list[tuple[ClientProxy, FitIns]]:
        """The exchange's visits that brought no result: logged, counted, to send again.

        The same instructions: phi has not moved since, and a client seeds its
        training by round, so a retried visit is the visit it replaces.
        """
        answered = {proxy.cid for proxy, _ in results}
        retry = [(proxy, ins) for proxy, ins in instructions if proxy.cid not in answered]
        reason_of = _failure_reasons(failures)
        for proxy, _ in retry:
            partition_id, reason = self.nodes.partition_of[proxy.cid], reason_of(proxy)
            log.warning("round %d: client %d failed (%s); sending its visit again",
                        server_round + self.start_round, partition_id, reason)
            self._round_log["retried"].append({"partition_id": partition_id, "reason": reason})
        return retry

    def _log_exchange(self, results: list[tuple[ClientProxy, FitRes]],
                      rejected: list[dict[str, Any]], accepted: dict[int, Any],
                      step_s: float) -> None:
        round_log = self._round_log
        round_log["server-time-s"] += self._sent[0] + step_s
        round_log["rejected"] += rejected
        round_log["bytes-sent"] += self._sent[1]
        round_log["bytes-received"] += sum(payload_bytes(r.parameters) for _, r in results)
        if self.exchange.phase == "personal":  # the round's record: its personal training
            round_log["clients"] += [r.metrics for p, r in results
                                     if self.nodes.partition_of[p.cid] in accepted]

    # --- evaluation ----------------------------------------------------------------
    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        """On evaluation rounds, every client evaluates its own generated model."""
        if server_round + self.start_round not in self.eval_rounds:
            return []
        self._discover_partitions(client_manager, server_round)
        start = time.perf_counter()
        config: dict[str, Scalar] = {"server-round": server_round + self.start_round}
        instructions = [
            (self.nodes.node_of[i], EvaluateIns(ndarrays_to_parameters(theta), config))
            for i, theta in zip(self.clients, self.core.generate_many(self.clients), strict=True)
        ]
        self._sent = (start, sum(payload_bytes(ins.parameters) for _, ins in instructions))
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
        metrics = pooled_metrics([r.metrics for _, r in results]) | {
            "clients_evaluated": len(results),
            "evaluation_time_s": time.perf_counter() - self._sent[0],
            "bytes_sent": self._sent[1]}  # the clients answer with metrics only
        if self.on_evaluate is not None:
            self.on_evaluate(server_round, metrics,
                             per_client_accuracy(results, self.core.num_parameters))
        return metrics["val_loss"], metrics

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        """No centralised evaluation: the data lives on the clients."""
        return None

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        """Nothing global to send: every client gets its own generated weights."""
        return NO_PARAMETERS

    def _discover_partitions(self, client_manager: ClientManager, server_round: int) -> None:
        """Learn the nodes' partitions; MH-pFedHN: build phi for the sizes they report."""
        sizes = self.nodes.discover(client_manager, server_round)
        if not sizes or self.make_core is None:
            return
        if self.core is None:  # MH-pFedHN: now the sizes to generate are known
            self.client_sizes = sizes
            self.core = self.make_core([sizes[i] for i in range(self.nodes.partitions)])
        changed = {i: (self.client_sizes[i], k) for i, k in sizes.items()
                   if self.client_sizes[i] != k}
        if changed:
            raise RuntimeError("clients report other parameter counts than the hypernetwork "
                               f"generates (partition: (generated, reported)): {changed}")

    # --- novel clients, and state --------------------------------------------------
    def learn_embeddings_only(self, partition_ids: Sequence[int], novel: NovelSettings,
                              momentum: float) -> None:
        """Novel clients: from now on sample, evaluate and train only them.

        Only their embeddings learn (``PFedHNCore.learn_embeddings_only``); no
        global phase. Evaluated at round 0 and ``novel.rounds`` (and every ``novel.eval_every``).
        """
        self.core.learn_embeddings_only(self.clients, partition_ids, novel, momentum)
        self.clients = list(partition_ids)
        self.clients_per_round = min(self.clients_per_round, len(self.clients))
        self.eval_rounds = {0, novel.rounds} if novel.eval_every is None \
            else evaluation_rounds(novel.rounds, novel.eval_every)
        self.start_round = 0
        self._last_round = (0, self.rng.bit_generator.state)
        self.global_id = None

    def memory_bytes(self) -> dict[str, int]:
        """Phi's and its optimizer's bytes; none before MH-pFedHN's clients report sizes."""
        return {} if self.core is None else self.core.memory_bytes()

    def model_state(self) -> dict[str, Any]:
        """What generates every client's weights: phi (and MH-pFedHN's sizes)."""
        return {"client_sizes": self.client_sizes, "hnet": self.core.hnet.state_dict()}

    def load_model_state(self, state: dict[str, Any]) -> None:
        """Generate from a saved ``model_state`` (or a whole ``state_dict``)."""
        if self.core is None:  # MH-pFedHN: rebuilt from the sizes the clients reported
            self.client_sizes = dict(state["client_sizes"])
            self.core = self.make_core([self.client_sizes[i]
                                        for i in range(self.nodes.partitions)])
        self.core.hnet.load_state_dict(state["hnet"])

    def state_dict(self, server_round: int) -> dict[str, Any]:
        """Everything needed to continue after ``server_round`` (a true round number)."""
        return self.model_state() | {"round": server_round,
                                     "optimizer": self.core.optimizer_state(),
                                     "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint: Flower's round r becomes round start_round + r."""
        self.load_model_state(state)
        self.core.load_optimizer_state(state["optimizer"])
        self.rng.bit_generator.state = state["rng"]
        self.start_round = int(state["round"])
        self._last_round = (self.start_round, self.rng.bit_generator.state)

    def state_at_last_round(self) -> tuple[int, dict[str, Any]] | None:
        """The last completed round and ``state_dict`` there, while the state is still that.

        For a process that Flower ends between two steps (``flwr stop``): until the
        round in flight first steps phi, only its sampling has moved on, and that
        is put back. None once it has stepped (a sequential round).
        """
        if self._last_round is None or self.core is None:
            return None
        server_round, rng = self._last_round
        return server_round, self.state_dict(server_round) | {"rng": rng}
