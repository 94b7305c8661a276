"""Small file helpers shared by every stage that writes (torch-free).

Examples:
    >>> import tempfile, pathlib
    >>> from invsim._io import atomic_write
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "x.json"
    >>> atomic_write(p, b"{}") and None
    >>> p.read_bytes()
    b'{}'
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["atomic_write", "json_bytes", "progress_bar"]


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` atomically: a temporary file in the same directory,
    flushed and fsynced, then renamed over ``path``. A reader never sees half a file."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def json_bytes(obj: Any) -> bytes:
    """Canonical JSON (sorted keys, indented, trailing newline) as bytes."""
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def progress_bar(total: int | None, desc: str, progress: bool | None, *, unit: str = "img"):
    """A tqdm bar; ``progress=None`` shows it only when stderr is a terminal."""
    import sys

    from tqdm.auto import tqdm

    disable = (not sys.stderr.isatty()) if progress is None else not progress
    return tqdm(total=total, desc=desc, unit=unit, disable=disable, leave=False)
