"""Atomic file writes: the one place that writes a temporary file and renames it.

Every small file d2r writes (checkpoints, ``job.json``, ``run.json``, reports,
figures) goes through :func:`atomic_write`, so a crash never leaves one half written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` on a temporary name beside ``path``, then rename it to ``path``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json(path: str | os.PathLike, data: Mapping[str, Any], *, indent: int = 2) -> Path:
    """Write JSON atomically (run records, job state, benchmark results)."""
    return write_text(path, json.dumps(data, indent=indent, default=str))
