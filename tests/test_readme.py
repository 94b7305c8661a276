"""The README's Python code blocks run, in order, in one namespace."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 4
    namespace: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md[python block {i}]", "exec"), namespace)
    out = capsys.readouterr().out
    assert "torch.Size([4, 84])" in out and "robustness" in out


def test_readme_shows_the_two_commands():
    text = README.read_text()
    assert "make demo" in text and "make test" in text


def test_readme_figures_says_what_a_resumed_run_costs_from_scratch():
    import importlib.util

    path = README.parent / "scripts" / "readme_figures.py"
    spec = importlib.util.spec_from_file_location("readme_figures", path)
    figures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(figures)
    inv = {"schedule": "converge", "iterations": 4000}
    prov = {"config": {"inversion": inv}, "pairs": 256, "seconds": 30.0}
    fresh = figures._settings_line({"provenance": {**prov, "from_scratch_seconds": 31.0}}, {})
    assert "0.5 minutes on this run's machine," in fresh and "resumed" not in fresh
    resumed = {"provenance": {**prov, "from_scratch_seconds": 900.0}}
    line = figures._settings_line(resumed, {})
    assert "15.0 minutes on this run's machine (this run resumed stored work in 0.5)" in line
    older = figures._settings_line({"provenance": prov}, {})  # results.json before the record
    assert "0.5 minutes on this run's machine," in older
