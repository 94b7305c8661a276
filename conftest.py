"""Guards for the whole suite, doctests included: no test leaks.

- Each test (and doctest) must leave the environment variables and the working directory
  as it found them; a leak fails that test, names what changed, and is undone so that it
  cannot spread to later tests (or the CLI subprocesses they start).
- No test writes outside its temporary directories: the user's own invsim cache and this
  checkout (build and tool caches aside) are compared before and after the session, and
  any file created, changed or removed there fails the run with its path.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parent
# what running Python and the tools may write in the checkout
SKIP = {".git", ".venv", "__pycache__", ".ruff_cache", ".pytest_cache", "build", "dist"}
# set by pytest itself, by the OpenMP runtime the first time torch loads it, and by
# torch's compiler the first time it is imported
OWN_ENV = {
    "PYTEST_CURRENT_TEST",
    "KMP_DUPLICATE_LIB_OK",
    "KMP_INIT_AT_FORK",
    "TORCHINDUCTOR_CACHE_DIR",
}


def _user_caches() -> list[Path]:
    """Where invsim caches data when $INVSIM_CACHE is not set (see invsim.data.cache)."""
    home = Path.home()
    xdg = os.environ.get("XDG_CACHE_HOME")
    bases = [home / ".cache", home / "Library" / "Caches"] + ([Path(xdg)] if xdg else [])
    return [b / "invsim" for b in bases]


def _snapshot(roots: list[Path]) -> dict[str, tuple[int, int]]:
    out = {}
    for root in roots:
        if not root.exists():
            continue
        for dirpath, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if d not in SKIP and not d.endswith(".egg-info")]
            for f in files:
                p = Path(dirpath) / f
                try:
                    st = p.stat()
                except FileNotFoundError:
                    continue
                out[str(p)] = (st.st_size, st.st_mtime_ns)
    return out


def pytest_configure(config: pytest.Config) -> None:
    # hypothesis keeps no example database, nor its other files, in the checkout
    try:
        from hypothesis import settings
        from hypothesis.configuration import set_hypothesis_home_dir

        set_hypothesis_home_dir(tempfile.mkdtemp(prefix="invsim-hypothesis-"))
        settings.register_profile("invsim", database=None)
        settings.load_profile("invsim")
    except ImportError:
        pass
    config._invsim_before = _snapshot([ROOT, *_user_caches()])


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    before = getattr(session.config, "_invsim_before", None)
    if before is None:
        return
    after = _snapshot([ROOT, *_user_caches()])
    changed = sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))
    if changed:
        listing = "\n  ".join(changed[:20])
        print(f"\nFAILED: tests wrote outside their temporary directories:\n  {listing}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(autouse=True)
def _no_leaks(request: pytest.FixtureRequest):
    env, cwd = dict(os.environ), os.getcwd()
    yield
    now = dict(os.environ)
    changed = sorted(k for k in (set(env) | set(now)) - OWN_ENV if env.get(k) != now.get(k))
    moved = os.getcwd() != cwd
    for k in changed:  # undone, so that one leak cannot spread
        if k in env:
            os.environ[k] = env[k]
        else:
            del os.environ[k]
    os.chdir(cwd)
    assert not changed, (
        f"{request.node.nodeid} changed the environment variables {changed} and did not "
        "restore them; use monkeypatch.setenv / mock.patch.dict."
    )
    assert not moved, f"{request.node.nodeid} changed the working directory; use monkeypatch.chdir."
