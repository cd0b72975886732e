"""Flower's simulation engine, polling for messages sooner than every 0.1 s.

A patch of flwr 1.42's internals, kept apart: ``flower_polling`` leaves any
other Flower version as it is.
"""

from __future__ import annotations

import functools
import importlib
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import flwr

log = logging.getLogger(__name__)


class _ShortWaits:
    """A stop event whose waits last at most ``interval`` seconds."""

    def __init__(self, event: threading.Event, interval: float) -> None:
        self.event, self.interval = event, interval

    def is_set(self) -> bool:
        return self.event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self.event.wait(self.interval if timeout is None else min(timeout, self.interval))


@contextmanager
def flower_polling(interval: float | None) -> Iterator[None]:
    """Let Flower's simulation engine find messages every ``interval`` s, not every 0.1 s.

    In flwr 1.42 the engine's loop that hands messages to clients, and the
    in-memory grid that collects their replies, each poll every 0.1 s: a round of
    one client waits about 0.1 s for nothing (see docs/performance.md). Here the
    grid gets its documented ``pull_interval`` and the loop a stop event with
    shorter waits; messages, their order and the results are the same (a test
    compares whole runs). ``None``, or another flwr version: Flower as it is.
    """
    if interval is None:
        yield
        return
    try:
        engine = importlib.import_module("flwr.simulation.run_simulation")
        vce_api = importlib.import_module("flwr.server.superlink.fleet.vce.vce_api")
        grid_class, feed = engine.InMemoryGrid, vce_api.add_messages_to_queue
    except (ImportError, AttributeError):
        grid_class = feed = None
    if not flwr.__version__.startswith("1.42.") or feed is None:
        log.warning("simulation.poll_interval=%s: written for flwr 1.42, this is %s; "
                    "Flower's own 0.1 s polling is kept", interval, flwr.__version__)
        yield
        return

    def feed_sooner(state, queue, nodes_mapping, f_stop) -> None:  # noqa: ANN001 (Flower's)
        feed(state, queue, nodes_mapping, _ShortWaits(f_stop, interval))

    engine.InMemoryGrid = functools.partial(grid_class, pull_interval=interval)
    vce_api.add_messages_to_queue = feed_sooner
    try:
        yield
    finally:
        engine.InMemoryGrid, vce_api.add_messages_to_queue = grid_class, feed
