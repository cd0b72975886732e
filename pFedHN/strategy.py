"""The pFedHN strategy: Flower's side of a round; phi lives in ``core`` on the server.

``PFedHNStrategy.round`` is one round, top to bottom: it samples the clients
and yields the round's Flower exchanges in order (MH-pFedHNGD's global phase,
then the personal phase: all clients at once, or one at a time when
sequential); the server (``pFedHN.server``) runs each with Flower and hands the
replies to ``aggregate_fit``, which steps ``core`` (``pFedHN.core``).
"""

from __future__ import annotations

import logging
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
from pFedHN.nodes import FederationTooSmallError, Nodes
from pFedHN.round_log import FailurePolicy, RoundLog, RoundsFailingError, failure_reasons
from pFedHN.schedule import Schedule
from pFedHN.settings import NovelSettings, Settings

__all__ = ["FederationTooSmallError", "PFedHNStrategy", "RoundsFailingError"]

log = logging.getLogger(__name__)

NO_PARAMETERS = Parameters(tensors=[], tensor_type="numpy.ndarray")
# What the run does with a finished round (its round, its updated clients' metrics, the
# rest of its record) and with an evaluation (round, pooled and per-client figures).
OnFit = Callable[[int, list[dict], dict[str, Any]], None]
OnEvaluate = Callable[[int, dict[str, float], dict[int, dict]], None]


@dataclass(frozen=True)
class Exchange:
    """One Flower exchange of a round: these partitions train, in this phase.

    ``phase``: "personal" (each client its own theta) or "global"
    (MH-pFedHNGD: every client the global model's theta).
    """

    phase: str
    partitions: tuple[int, ...]


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


def sort_replies(
    partitions: tuple[int, ...],
    results: list[tuple[ClientProxy, FitRes]],
    failures: list[tuple[ClientProxy, FitRes] | BaseException],
    nodes: Nodes,
    check: Callable[[list[np.ndarray], int], str | None],
) -> tuple[list, dict[int, tuple[list[np.ndarray], int]], list[dict[str, Any]]]:
    """An exchange's replies: sorted, the usable deltas by partition, and the lost visits.

    In the exchange's (sampled) order, not the order replies came in: a step's
    sums then add up the same way in every run. A lost visit: a delta that
    ``check`` refuses ("rejected"), or no reply at all ("failed").
    """
    order = {partition_id: k for k, partition_id in enumerate(partitions)}
    results = sorted(results, key=lambda result: order[nodes.partition_of[result[0].cid]])
    accepted: dict[int, tuple[list[np.ndarray], int]] = {}
    lost: list[dict[str, Any]] = []
    for proxy, res in results:
        partition_id = nodes.partition_of[proxy.cid]
        delta_theta = parameters_to_ndarrays(res.parameters)
        problem = check(delta_theta, partition_id)
        if problem is None:
            accepted[partition_id] = (delta_theta, res.num_examples)
        else:
            lost.append({"partition_id": partition_id, "reason": problem, "kind": "rejected"})
    answered = set(accepted) | {r["partition_id"] for r in lost}
    reason_of = failure_reasons(failures)
    lost += [{"partition_id": i, "reason": reason_of(nodes.node_of[i]), "kind": "failed"}
             for i in partitions if i not in answered]
    return results, accepted, lost


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


class Evaluation:
    """Every client evaluates its own generated model; accuracy and loss are pooled."""

    def __init__(self, on_evaluate: OnEvaluate | None = None) -> None:
        self.on_evaluate = on_evaluate  # called with the pooled and the per-client figures
        self._sent = (0.0, 0)  # when the instructions went out, and their bytes

    def instructions(self, server_round: int, clients: list[int], core: PFedHNCore,
                     nodes: Nodes) -> list[tuple[ClientProxy, EvaluateIns]]:
        """Each client's generated theta, batched where the hypernetwork can."""
        start = time.perf_counter()
        config: dict[str, Scalar] = {"server-round": server_round}
        instructions = [(nodes.node_of[i], EvaluateIns(ndarrays_to_parameters(theta), config))
                        for i, theta in zip(clients, core.generate_many(clients), strict=True)]
        self._sent = (start, sum(payload_bytes(ins.parameters) for _, ins in instructions))
        return instructions

    def pool(self, server_round: int, results: list[tuple[ClientProxy, EvaluateRes]],
             failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
             num_parameters: Callable[[int], int]) -> tuple[float | None, dict[str, Scalar]]:
        """Pooled metrics (sum correct / sum samples) and the per-client spread."""
        for failure in failures:
            log.warning("round %d: a client failed evaluation: %r", server_round, failure)
        if not results:
            return None, {}
        metrics = pooled_metrics([r.metrics for _, r in results]) | {
            "clients_evaluated": len(results),
            "evaluation_time_s": time.perf_counter() - self._sent[0],
            "bytes_sent": self._sent[1]}  # the clients answer with metrics only
        if self.on_evaluate is not None:
            self.on_evaluate(server_round, metrics, per_client_accuracy(results, num_parameters))
        return metrics["val_loss"], metrics


class PFedHNStrategy(Strategy):
    """Each round: theta_i = h(v_i; phi) to each sampled client, then a step on their deltas.

    ``core``: phi and its optimizer (MH-pFedHN: built by ``make_core`` once the
    clients report their sizes). MH-pFedHNGD: ``global_id`` is the global model.
    """

    def __init__(self, settings: Settings, core: PFedHNCore | None = None,
                 make_core: Callable[[list[int]], PFedHNCore] | None = None,
                 on_fit: OnFit | None = None, on_evaluate: OnEvaluate | None = None) -> None:
        super().__init__()
        server = settings.server
        self.core, self.make_core = core, make_core
        self.nodes = Nodes(settings.partitions, server.node_timeout)
        self.global_id = settings.partitions if settings.variant.global_model else None
        self.schedule = Schedule(settings)  # who is visited when
        self.failures = FailurePolicy(server.visit_retries, server.accept_lost_visits,
                                      server.max_failed_rounds)
        self.log = RoundLog(self.failures)  # the round's record, reported once
        self.on_fit = on_fit
        self.evaluation = Evaluation(on_evaluate)
        self.exchange = Exchange("personal", ())  # the one under way (see ``round``)
        self._teacher: list[np.ndarray] = []  # MH-pFedHNGD: this round's pre-step global model
        self._sent = (0.0, 0)  # server seconds and bytes of the last configure_* call

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
        sampled = self.schedule.sample()
        self.log.close()  # a fresh record (a failed round may have left one)
        if self.global_id is not None:
            self.exchange = Exchange("global", sampled)
            yield self.exchange
        for group in self.schedule.visits(sampled):
            self.exchange = Exchange("personal", group)
            yield self.exchange
        self.end_round(server_round)

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """Send each client of the exchange under way its generated theta_i.

        MH-pFedHNGD: the global phase sends the global model's theta; the personal
        phase appends that same theta, the teacher, to each client's own.
        """
        self._discover_partitions(client_manager, server_round)
        start = time.perf_counter()
        config: dict[str, Scalar] = {"server-round": server_round + self.schedule.start_round}
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

        A lost visit (no reply, or a delta of the wrong shape or non-finite) fails
        the round (``RoundLog.lost``), unless accepted: then the rest step phi.
        """
        server_round += self.schedule.start_round
        start = time.perf_counter()
        in_global_phase = self.exchange.phase == "global"
        results, accepted, rejected = sort_replies(
            self.exchange.partitions, results, failures, self.nodes,
            lambda delta_theta, i: self.core.check_delta(
                delta_theta, self.global_id if in_global_phase else i))
        self.log.lost(server_round, rejected, " of the global phase" if in_global_phase else "")
        if accepted:
            self.schedule.last_round = None  # from here on, phi is no completed round's
            deltas, examples = zip(*accepted.values(), strict=True)
            if in_global_phase:
                self.core.update_global(self.global_id, deltas, examples)
            else:
                self.core.update(list(accepted), deltas)
        self.log.exchange(self._sent[0] + time.perf_counter() - start, self._sent[1],
                          sum(payload_bytes(r.parameters) for _, r in results),
                          None if in_global_phase else
                          [r.metrics for p, r in results
                           if self.nodes.partition_of[p.cid] in accepted])
        return NO_PARAMETERS, {}

    def end_round(self, server_round: int) -> None:
        """Report the round once, all its exchanges together (Flower's count)."""
        clients, record = self.log.close()
        server_round += self.schedule.start_round
        self.schedule.completed(server_round)
        if self.on_fit is not None:
            self.on_fit(server_round, clients, record)
        self.log.count(server_round, clients, record)

    def visits_to_retry(self, server_round: int, instructions: list[tuple[ClientProxy, FitIns]],
                        results: list[tuple[ClientProxy, FitRes]],
                        failures: list[tuple[ClientProxy, FitRes] | BaseException],
                        ) -> list[tuple[ClientProxy, FitIns]]:
        """The exchange's visits that brought no result, to send again (``RoundLog.retry``)."""
        return self.log.retry(server_round + self.schedule.start_round, instructions, results,
                              failures, self.nodes.partition_of)

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        """On evaluation rounds, every client evaluates its own generated model."""
        if not self.schedule.evaluates(server_round):
            return []
        self._discover_partitions(client_manager, server_round)
        return self.evaluation.instructions(server_round + self.schedule.start_round,
                                            self.schedule.clients, self.core, self.nodes)

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        """Pool accuracy and loss over clients; report the per-client spread."""
        return self.evaluation.pool(server_round + self.schedule.start_round, results,
                                    failures, self.core.num_parameters)

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
            self.core = self.make_core([sizes[i] for i in range(self.nodes.partitions)])
        self.core.check_sizes(sizes)

    def learn_embeddings_only(self, partition_ids: Sequence[int], novel: NovelSettings,
                              momentum: float) -> None:
        """Novel clients: from now on only they are sampled, evaluated and trained (embeddings)."""
        self.core.learn_embeddings_only(self.schedule.clients, partition_ids, novel, momentum)
        self.schedule.novel_phase(partition_ids, novel)
        self.global_id = None

    def load_model_state(self, state: dict[str, Any]) -> None:
        """Generate from a saved ``PFedHNCore.model_state`` (or a whole ``state_dict``)."""
        if self.core is None:  # MH-pFedHN: rebuilt from the sizes the clients reported
            sizes = state["client_sizes"]
            self.core = self.make_core([sizes[i] for i in range(self.nodes.partitions)])
        self.core.load_model_state(state)

    def state_dict(self, server_round: int) -> dict[str, Any]:
        """Everything needed to continue after ``server_round`` (a true round number)."""
        return self.core.state() | {"round": server_round,
                                    "rng": self.schedule.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint: Flower's round r becomes round start_round + r."""
        self.load_model_state(state)
        self.core.load_optimizer_state(state["optimizer"])
        self.schedule.resume(int(state["round"]), state["rng"])

    def state_at_last_round(self) -> tuple[int, dict[str, Any]] | None:
        """The last completed round and ``state_dict`` there, while phi is still that.

        For ``flwr stop``: the sampler of the round in flight is put back; None
        once that round has stepped phi (a sequential round).
        """
        if self.schedule.last_round is None or self.core is None:
            return None
        server_round, rng = self.schedule.last_round
        return server_round, self.state_dict(server_round) | {"rng": rng}
