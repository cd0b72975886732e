"""Files that are never seen half-written, and generated parts of hand-written pages."""

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


def around_markers(page: Path, start: str, end: str) -> tuple[str, str]:
    """``page``'s text before ``start`` and after ``end``; ValueError naming what is missing."""
    text = page.read_text() if page.exists() else ""
    if start not in text or end not in text:
        raise ValueError(f"{page} has no {start} ... {end} markers")
    head, rest = text.split(start, 1)
    return head, rest.split(end, 1)[1]


def replace_between(page: Path, start: str, end: str, lines: list[str]) -> None:
    """Rewrite what lies between ``page``'s markers ``start`` and ``end``."""
    head, tail = around_markers(page, start, end)
    page.write_text(f"{head}{start}\n" + "\n".join(lines) + f"\n{end}{tail}")
