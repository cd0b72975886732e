"""Who is visited when: each round's clients, the evaluation rounds, where the run stands.

No Flower here: the strategy asks the schedule, and Flower carries out the answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pFedHN.settings import NovelSettings, Settings


def evaluation_rounds(num_rounds: int, eval_every: int) -> set[int]:
    """Round 0 (untrained), every ``eval_every`` rounds, and the last round."""
    return {0, num_rounds, *range(eval_every, num_rounds + 1, eval_every)}


class Schedule:
    """The sampled clients of each round, in a seeded random order, and when to evaluate.

    ``start_round``: > 0 when resumed (Flower counts rounds from 1 again).
    ``last_round``: the last completed round (a true count) with the sampler's
    state then; None once phi has moved in the round after it.
    """

    def __init__(self, settings: Settings) -> None:
        # The partitions sampled for training and evaluated; the rest are novel clients.
        self.clients = list(range(settings.num_clients))
        self.per_round = settings.server.clients_per_round
        self.sequential = settings.server.sequential  # one outer step per client visit
        self.eval_rounds = evaluation_rounds(settings.num_rounds, settings.eval_every)
        self.rng = np.random.default_rng(settings.seed)
        self.start_round = 0
        self.last_round: tuple[int, dict] | None = (0, self.rng.bit_generator.state)

    def sample(self) -> tuple[int, ...]:
        """The round's clients, in the order they are visited."""
        chosen = self.rng.choice(len(self.clients), self.per_round, replace=False)
        return tuple(self.clients[int(i)] for i in chosen)

    def visits(self, sampled: tuple[int, ...]) -> list[tuple[int, ...]]:
        """The personal phase's exchanges: one per client (sequential), or one for all."""
        return [(i,) for i in sampled] if self.sequential else [sampled]

    def evaluates(self, server_round: int) -> bool:
        """Whether Flower's round ``server_round`` is an evaluation round."""
        return server_round + self.start_round in self.eval_rounds

    def completed(self, server_round: int) -> None:
        """Round ``server_round`` (a true count) has ended; phi is as it left it."""
        self.last_round = (server_round, self.rng.bit_generator.state)

    def novel_phase(self, partition_ids: Sequence[int], novel: NovelSettings) -> None:
        """From now on only ``partition_ids``; rounds count from 0 again.

        Evaluated at round 0, every ``novel.eval_every`` (if set) and ``novel.rounds``.
        """
        self.clients = list(partition_ids)
        self.per_round = min(self.per_round, len(self.clients))
        self.eval_rounds = {0, novel.rounds} if novel.eval_every is None \
            else evaluation_rounds(novel.rounds, novel.eval_every)
        self.start_round = 0
        self.completed(0)

    def resume(self, server_round: int, rng_state: dict[str, Any]) -> None:
        """Continue after round ``server_round`` with the sampler as it was then."""
        self.rng.bit_generator.state = rng_state
        self.start_round = server_round
        self.completed(server_round)
