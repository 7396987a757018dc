"""Small file helpers shared by the package: one atomic JSON writer and its reader.

Workdirs are read and written only through these (and Orbax), so that every result file is either
the old one or the new one, never half written.
"""
from __future__ import annotations

import json
import os
from typing import Any


def write_json(path: str, obj: Any, *, indent: int | None = 2) -> str:
    """Writes `obj` as JSON to `path` atomically (a temporary file, then a rename); returns path.
    Values JSON cannot hold (numpy scalars, tuples of them, paths) are written as str."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=indent, default=_plain)
    os.replace(tmp, path)
    return path


def read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def _plain(x):
    if hasattr(x, "item"):  # numpy / jax scalars
        return x.item()
    if hasattr(x, "tolist"):
        return x.tolist()
    return str(x)
