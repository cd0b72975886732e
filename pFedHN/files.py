"""Files that are never seen half-written."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_atomic(path: str | Path, write: Callable[[Path], object]) -> Path:
    """``write(tmp)`` into a file beside ``path``, then rename it to ``path``.

    A reader (a resume, a plot, another process) sees the old file or the new
    one, never half of one, even if this process is killed mid-write.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)
    return path


def write_json_atomic(path: str | Path, payload: Any) -> Path:
    """``payload`` as indented JSON, written atomically."""
    return write_atomic(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=2)))
