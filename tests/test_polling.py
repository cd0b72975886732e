"""The shorter polling of Flower's simulation engine (``simulation.poll_interval``).

That whole runs are unchanged by it is checked in tests/test_resume.py (the
uninterrupted run there uses Flower's own polling, the resumed one ours)."""

import importlib
import threading

import flwr
import pytest

from pFedHN.polling import flower_polling

ENGINE = importlib.import_module("flwr.simulation.run_simulation")
VCE_API = importlib.import_module("flwr.server.superlink.fleet.vce.vce_api")


class CountingState:
    def __init__(self):
        self.polls = 0

    def get_message_ins(self, node_id, limit):
        self.polls += 1
        return []


def feed_passes(seconds: float) -> int:
    """How often the engine's feeding loop polls the state in ``seconds``."""
    state, stop = CountingState(), threading.Event()
    threading.Timer(seconds, stop.set).start()
    VCE_API.add_messages_to_queue(state, None, {7: 0}, stop)
    return state.polls


@pytest.mark.skipif(not flwr.__version__.startswith("1.42."), reason="written for flwr 1.42")
def test_both_polls_are_shortened_inside_and_restored_after():
    before = ENGINE.InMemoryGrid, VCE_API.add_messages_to_queue
    assert feed_passes(0.5) <= 6  # Flower's own: every 0.1 s
    with flower_polling(0.01):
        assert ENGINE.InMemoryGrid.keywords == {"pull_interval": 0.01}
        assert ENGINE.InMemoryGrid.func is before[0]
        assert feed_passes(0.5) >= 20
    assert (ENGINE.InMemoryGrid, VCE_API.add_messages_to_queue) == before


def test_none_leaves_flower_as_it_is():
    before = ENGINE.InMemoryGrid, VCE_API.add_messages_to_queue
    with flower_polling(None):
        assert (ENGINE.InMemoryGrid, VCE_API.add_messages_to_queue) == before
