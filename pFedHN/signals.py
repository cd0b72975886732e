"""SIGINT and SIGTERM stop a run cleanly: after the round in flight, at a checkpoint.

What a scheduler, a script or ``kill`` sends. The first signal asks the run to
stop once the round in flight has finished; the experiment then writes a
checkpoint at that round and raises ``RunStoppedError``, which the entry point turns
into one line naming the round and the ``resume=`` command, and exit status
128 + the signal's number (130, 143). A second signal ends the process at once.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """Whether, and by which signal, the run was asked to stop."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def is_set(self) -> bool:
        """A signal arrived: stop after the round in flight."""
        return self.signum is not None


class RunStoppedError(RuntimeError):
    """The run stopped on a signal, after ``reached`` rounds, with a checkpoint at ``saved``."""

    def __init__(self, signum: int, reached: int, saved: int | None, run_dir: Path,
                 phase: str = "") -> None:
        self.exit_code = 128 + signum
        self.saved, self.run_dir = saved, run_dir
        at = f"a checkpoint at round {saved}" if saved else "no checkpoint yet"
        super().__init__(f"{signal.Signals(signum).name}: stopped after {phase}round {reached}, "
                         f"with {at} in {run_dir}")


@contextmanager
def stop_on_signals(request: StopRequest) -> Iterator[StopRequest]:
    """While inside, SIGINT and SIGTERM set ``request``; a second one exits at once.

    Ray's driver replaces SIGTERM's handler with an immediate exit when it
    starts (inside Flower's simulation engine); that is held off here, so the
    round in flight finishes and is checkpointed. (Its C++ core would abort the
    process on a signal that reaches another thread: ``pFedHN/__init__.py``
    turns that off before Ray is imported.)
    """
    def handle(signum: int, frame: object) -> None:
        if request.is_set():
            log.warning("%s again: ending at once", signal.Signals(signum).name)
            os._exit(128 + signum)
        request.signum = signum
        log.warning("%s: stopping after the round in flight, at a checkpoint (send it again "
                    "to end at once)", signal.Signals(signum).name)

    if threading.current_thread() is not threading.main_thread():
        yield request  # Python lets only the main thread handle signals
        return
    previous = {signum: signal.signal(signum, handle) for signum in SIGNALS}
    try:
        ray_utils = importlib.import_module("ray._private.utils")
        ray_sets_sigterm = ray_utils.set_sigterm_handler
    except (ImportError, AttributeError):  # another Ray: its handler may win
        ray_utils = ray_sets_sigterm = None
    if ray_utils is not None:
        ray_utils.set_sigterm_handler = lambda handler: None
    try:
        yield request
    finally:
        if ray_utils is not None:
            ray_utils.set_sigterm_handler = ray_sets_sigterm
        for signum, handler in previous.items():
            signal.signal(signum, handler)
