"""Generate the docs pages that have one source elsewhere, into docs/generated/:

- ``cli.md``: every ``invsim`` command's help, from the click commands themselves;
- ``config.md``: every YAML section and field (type, default, description), from the
  pydantic config models in ``invsim.config``;
- ``benchmarks.md``: every benchmark's measured numbers, from ``benchmarks/results/*.json``.

``make docs`` runs this before ``mkdocs build``; the pages include these files.
"""

from __future__ import annotations

import json
import typing
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "generated"

# what each benchmark measures and the command that writes its file
BENCHMARKS = {
    "cka": (
        "bench_cka.py",
        "Exact streaming linear CKA at n=50,000, d=2,048 against the "
        "compute bound, and the peers' minibatch estimators.",
    ),
    "inversion": (
        "bench_inversion.py",
        "invert_images against a bare forward+backward loop; early stopping.",
    ),
    "training": (
        "bench_training.py",
        "Training the built-in architectures, clean and adversarial.",
    ),
    "startup": (
        "bench_startup.py",
        "CLI start-up and data loading against references measured in the same run.",
    ),
    "measures": (
        "bench_measures.py",
        "Every streaming measure from one pass; blockwise neighbour and RBF measures' memory.",
    ),
    "calibration": (
        "bench_calibration.py",
        "Per-cell intervals and exact nulls against the plain matrix.",
    ),
    "coverage": (
        "bench_coverage.py",
        "Interval coverage by simulation in the regime invsim runs in (n at or below the width).",
    ),
    "layer-coverage": ("bench_layer_coverage.py", "Coverage of the layer-by-layer intervals."),
    "passes": ("bench_passes.py", "Image passes per second of the inversion on CPU."),
    "folding": ("bench_folding.py", "Batch-norm folding and channels-last for the inversion."),
    "layers": ("bench_layers.py", "The layer-by-layer view: passes, memory and time."),
    "convergence": (
        "bench_convergence.py --demo-dir runs/demo",
        "The converging schedule against the paper's on the demo zoo.",
    ),
    "convergence-methods": (
        "bench_convergence.py --methods",
        "L-BFGS and momentum steps against the paper's on the demo zoo.",
    ),
    "hard": ("bench_hard.py", "Every schedule on standard, strongly robust and kinked models."),
    "hard-second-order": (
        "bench_hard.py at commit bad3460",
        "Gauss-Newton, hybrid, L-BFGS and momentum steps on the earlier hard models: the "
        "measurement that retired the second-order steps.",
    ),
}
MAX_ROWS = 40


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) or str(annotation)
    return text.replace("typing.", "").replace("NoneType", "None")


def _default(field: Any) -> str:
    if field.is_required():
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default
    if hasattr(value, "model_dump"):
        return "see its section"
    return f"`{json.dumps(value, default=str)}`"


def config_page() -> str:
    """One table per config section, from the pydantic models (the one source)."""
    from pydantic import BaseModel

    from invsim.config import ExperimentConfig, RuleSettings
    from invsim.inversion import RULES

    lines = [
        "Every key of an experiment's YAML file, from the config models themselves "
        "(`invsim schema` prints the JSON schema). A typo is an error that names the key.",
        "",
    ]
    seen: set[type] = set()
    todo: list[tuple[str, type]] = [("(top level)", ExperimentConfig)]
    while todo:
        where, model = todo.pop(0)
        if model in seen:
            continue
        seen.add(model)
        lines += [f"### `{where}`: {model.__name__}", "", (model.__doc__ or "").strip(), ""]
        lines += ["| key | type | default | description |", "|---|---|---|---|"]
        for name, field in model.model_fields.items():
            desc = (field.description or "").replace("|", "\\|").replace("\n", " ")
            kind = _type_name(field.annotation).replace("|", "or")
            lines.append(f"| `{name}` | {kind} | {_default(field)} | {desc} |")
            for arg in (field.annotation, *typing.get_args(field.annotation)):
                for inner in (arg, *typing.get_args(arg)):
                    if isinstance(inner, type) and issubclass(inner, RuleSettings):
                        todo += [(f"{name}, rule {r!r}", c.Settings) for r, c in RULES.items()]
                    elif isinstance(inner, type) and issubclass(inner, BaseModel):
                        todo.append((f"{name}", inner))
        lines.append("")
    return "\n".join(lines)


def cli_page() -> str:
    """Every command's help text, from the click commands."""
    import click

    from invsim.cli import main

    lines = ["Generated from the commands' own help (`invsim COMMAND --help`).", ""]
    ctx = click.Context(main, info_name="invsim")
    lines += ["### `invsim`", "", "```text", main.get_help(ctx), "```", ""]
    for name in sorted(main.commands):
        cmd = main.commands[name]
        sub = click.Context(cmd, info_name=name, parent=ctx)
        lines += [f"### `invsim {name}`", "", "```text", cmd.get_help(sub), "```", ""]
    return "\n".join(lines)


def _flat(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(path, leaf) pairs of a JSON value; lists of records are kept whole."""
    if isinstance(value, dict):
        out = []
        for k, v in value.items():
            out += _flat(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return [(prefix, value)]
    return [(prefix, value)]


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, dict)):
        text = json.dumps(v, default=str)
        return f"`{text[:120]}{'...' if len(text) > 120 else ''}`"
    return str(v).replace("|", "\\|")


def _records(rows: list[dict]) -> list[str]:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows[:MAX_ROWS]:
        lines.append("| " + " | ".join(_cell(r.get(k, "")) for k in keys) + " |")
    return lines


def benchmarks_page() -> str:
    """Each benchmark's command, machine and every number in its results file."""
    lines = []
    for path in sorted((ROOT / "benchmarks" / "results").glob("*.json")):
        data = json.loads(path.read_text())
        script, what = BENCHMARKS.get(path.stem, (None, ""))
        command = data.get("command") if isinstance(data, dict) else None
        command = command or (f"python benchmarks/{script}" if script else "see benchmarks/")
        machine = data.get("machine") if isinstance(data, dict) else None
        lines += [f"## {path.stem}", "", what, "", f"- command: `{command}`"]
        lines += [f"- machine: {_cell(machine) if machine else 'the 2-core CPU machine'}"]
        lines += [f"- results: `benchmarks/results/{path.name}`", ""]
        scalars = []
        for key, value in _flat(data):
            if key in ("machine", "command"):
                continue
            if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
                lines += [f"**{key}**", "", *_records(value), ""]
            else:
                scalars.append((key, value))
        if scalars:
            lines += ["| measured | value |", "|---|---|"]
            lines += [f"| {k} | {_cell(v)} |" for k, v in scalars[:MAX_ROWS]]
            lines.append("")
    return "\n".join(lines)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, make in (("cli", cli_page), ("config", config_page), ("benchmarks", benchmarks_page)):
        (OUT / f"{name}.md").write_text(make() + "\n")
    print(f"wrote {OUT}/cli.md, config.md, benchmarks.md")


if __name__ == "__main__":
    main()
