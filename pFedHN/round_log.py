"""A round's record, kept as its exchanges go and reported once; and the policy on lost visits.

A client visit whose update never reaches phi is a step of the protocol that
never happens (``FailurePolicy``): by default the round is not kept.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flwr.common import FitRes
from flwr.server.client_proxy import ClientProxy

log = logging.getLogger(__name__)


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


def _describe(failure: tuple[ClientProxy, FitRes] | BaseException) -> str:
    """One short line: the last line of a client's traceback says what went wrong."""
    if isinstance(failure, BaseException):
        text = f"{type(failure).__name__}: {failure}"
    else:
        text = f"status {failure[1].status.code.name}: {failure[1].status.message}"
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", text).splitlines()]
    return [line for line in lines if line][-1][:300]


def failure_reasons(
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


class RoundLog:
    """What the round's exchanges did: its clients' metrics, server time, bytes, lost visits.

    ``close`` hands the record over once, at the round's end; ``count`` stops the
    run after ``max_failed_rounds`` rounds in a row without an update.
    """

    def __init__(self, failures: FailurePolicy) -> None:
        self.failures = failures
        self.failed_in_a_row = 0  # rounds without an update (accept_lost_visits)
        self.record = self._empty()

    @staticmethod
    def _empty() -> dict[str, Any]:
        return {"clients": [], "server-time-s": 0.0, "rejected": [], "retried": [],
                "bytes-sent": 0, "bytes-received": 0}

    def retry(self, server_round: int, instructions: list[tuple[ClientProxy, Any]],
              results: list[tuple[ClientProxy, FitRes]],
              failures: list[tuple[ClientProxy, FitRes] | BaseException],
              partition_of: dict[str, int]) -> list[tuple[ClientProxy, Any]]:
        """The visits that brought no result: logged, counted, to send again.

        The same instructions: phi has not moved since, and a client seeds its
        training by round, so a retried visit is the visit it replaces.
        """
        answered = {proxy.cid for proxy, _ in results}
        retry = [(proxy, ins) for proxy, ins in instructions if proxy.cid not in answered]
        reason_of = failure_reasons(failures)
        for proxy, _ in retry:
            partition_id, reason = partition_of[proxy.cid], reason_of(proxy)
            log.warning("round %d: client %d failed (%s); sending its visit again",
                        server_round, partition_id, reason)
            self.record["retried"].append({"partition_id": partition_id, "reason": reason})
        return retry

    def lost(self, server_round: int, lost: list[dict[str, Any]], where: str = "") -> None:
        """Visits that brought no usable update: the round fails, unless that is accepted."""
        if lost and not self.failures.accept_lost_visits:
            raise lost_visits_error(server_round, lost, self.failures.visit_retries)
        for r in lost:
            log.warning("round %d: client %d left out%s: %s", server_round, r["partition_id"],
                        where, r["reason"])
        self.record["rejected"] += lost

    def exchange(self, server_s: float, sent: int, received: int,
                 client_metrics: list[dict] | None) -> None:
        """One exchange's cost; ``client_metrics``: the personal phase's updated clients."""
        self.record["server-time-s"] += server_s
        self.record["bytes-sent"] += sent
        self.record["bytes-received"] += received
        self.record["clients"] += client_metrics or []

    def close(self) -> tuple[list[dict], dict[str, Any]]:
        """The round's updated clients' metrics and the rest of its record; start afresh."""
        record, self.record = self.record, self._empty()
        return record.pop("clients"), record

    def count(self, server_round: int, clients: list[dict], record: dict[str, Any]) -> None:
        """After ``max_failed_rounds`` rounds in a row without an update: stop the run.

        A dead simulation backend or federation would otherwise race through the
        remaining rounds in seconds (only with lost visits accepted).
        """
        self.failed_in_a_row = 0 if clients else self.failed_in_a_row + 1
        most = self.failures.max_failed_rounds
        if most is None or self.failed_in_a_row < most:
            return
        lost = record["rejected"]
        raise RoundsFailingError(
            f"rounds {server_round - self.failed_in_a_row + 1}-{server_round}: no "
            f"client's result reached the hypernetwork (the last reason: "
            f"{(lost[-1]['reason'] if lost else 'no reply')[:300]}). Stopped by "
            f"server.max_failed_rounds={most} (null: never stop). Rounds without an "
            f"update write no checkpoint: once the clients are back, resume=<run dir> "
            f"goes on from the last one.")
