"""Every python block of README.md and docs/ runs: the blocks of one page in order, in one
namespace, in a scratch directory. A block whose first line is ``# needs: ...`` (a GPU,
the user's own files) is shown but not run."""

from __future__ import annotations

import os
import re
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md"] + sorted(
    p for p in (ROOT / "docs").rglob("*.md") if "generated" not in p.parts
)
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def blocks(page: Path) -> list[str]:
    return [b for b in BLOCK.findall(page.read_text()) if not b.startswith("# needs:")]


@pytest.mark.parametrize("page", [p for p in PAGES if blocks(p)], ids=lambda p: p.name)
def test_python_blocks_of_a_page_run_in_order(page, tmp_path, capsys):
    from invsim.catalog import MODEL_SOURCES
    from invsim.data.datasets import DATASETS
    from invsim.experiment import STAGES
    from invsim.inversion import RULES
    from invsim.inversion.settings import STEP_SETTINGS
    from invsim.similarity import MEASURES

    registries = [MEASURES, MODEL_SOURCES, DATASETS, RULES, STEP_SETTINGS]
    saved = [dict(r) for r in registries], list(STAGES)
    # the page runs as a module of its own, as a user's script does (pydantic resolves a
    # settings class's annotations in its module)
    module = types.ModuleType(f"docs_{page.stem}")
    sys.modules[module.__name__] = module
    namespace: dict = module.__dict__
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        for i, block in enumerate(blocks(page)):
            exec(compile(block, f"{page.relative_to(ROOT)}[python block {i}]", "exec"), namespace)
    finally:  # a page's own measures, sources and stages do not outlive it
        os.chdir(cwd)
        for registry, before in zip(registries, saved[0], strict=True):
            registry.clear()
            registry.update(before)
        STAGES[:] = saved[1]
        del sys.modules[module.__name__]
    assert capsys.readouterr().out.strip(), "a page's code shows its user something"


def test_the_collector_finds_the_pages_code():
    found = {p.name: len(blocks(p)) for p in PAGES}
    assert found["README.md"] >= 1 and found["getting-started.md"] >= 2
    assert sum(found.values()) >= 8
