"""The README is a front page; scripts/readme_figures.py keeps its numbers true."""

from __future__ import annotations

from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_is_a_front_page():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    for guide in ("models-and-data", "inversion", "similarity", "layers", "scaling-out"):
        assert (
            f"docs/guides/{guide}.md" in text
            and (README.parent / f"docs/guides/{guide}.md").exists()
        )


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
