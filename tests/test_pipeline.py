"""The run as a typed pipeline: Results round-trips, stages, sources and data sets added
from a test file reach results.json and the report, measure options travel, and the
package's import graph has no cycle."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from invsim.config import validate
from invsim.results import Results

SRC = Path(__file__).resolve().parents[1] / "src" / "invsim"


def _config(out, **changes):
    raw = {
        "out": str(out), "rng_seed": 0,
        "data": {"dataset": "digits", "size": 28, "natural_n": 60, "pairs": 8},
        "models": [{"name": "a", "spec": "mlp", "train": {"epochs": 1}},
                   {"name": "b", "spec": "lenet", "train": {"epochs": 1}}],
        "inversion": {"iterations": 4, "batch_size": 8},
    }  # fmt: skip
    return validate({**raw, **changes})


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    from invsim.experiment import run_experiment

    out = tmp_path_factory.mktemp("pipeline") / "run"
    return out, run_experiment(_config(out), quiet=True)


def test_results_round_trip_exactly(finished):
    out, results = finished
    assert isinstance(results, Results)
    again = Results.from_json(results.to_json())
    assert again == results
    assert Results.read(out) == results  # what was written is what was returned
    assert again.to_json() == (out / "results.json").read_text()
    # a changed value is seen
    again.matrices["natural"]["linear_cka"].values[0, 1] += 1e-9
    assert again != results
    # results.json's layout: the primary measure's matrices, every measure's, summaries
    d = json.loads((out / "results.json").read_text())
    assert d["matrices"]["natural"] == d["measures"]["linear_cka"]["natural"]
    assert {"summary", "panel", "diagnostics", "models", "statistics", "warnings",
            "provenance"} <= set(d)  # fmt: skip


def test_older_results_files_still_load(finished):
    out, results = finished
    d = json.loads((out / "results.json").read_text())
    d["inversion"] = d.pop("diagnostics")  # an older file's key
    old = Results.from_dict(d)
    assert old.diagnostics == results.diagnostics and old.matrices == results.matrices


def test_toy_stage_source_and_data_set_reach_results_and_report(tmp_path):
    """A stage, a model source (toy:NAME) and a data set, each defined here, found in a
    run's results.json and report with no other change."""
    from invsim.catalog import MODEL_SOURCES, ModelSource, register_model_source
    from invsim.data import TensorImageDataset
    from invsim.data.datasets import DATASETS, DataSource, register_dataset
    from invsim.experiment import STAGES, Stage, add_stage, run_experiment

    def toy_net(name, *, num_classes, in_channels, image_size, width=12):
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size**2, width),
                             nn.ReLU(), nn.Linear(width, num_classes))  # fmt: skip

    def toy_data(spec, *, split, size=None, crop=None):
        g = torch.Generator().manual_seed(0 if split == "train" else 1)
        x = torch.rand(120, 1, 12, 12, generator=g)
        y = (x.mean((1, 2, 3)) > 0.5).long() + 2 * (x[:, 0, :6].mean((1, 2)) > 0.5).long()
        return TensorImageDataset(x, y, id=f"toyset:{split}")

    def toy_stage(run):
        m = run["matrices"]["inverted"]["linear_cka"]  # a stage reads artefacts
        return {"rows": m.rows, "max_offdiag": float(np.max(m.values - np.eye(*m.values.shape)))}

    register_model_source(ModelSource("toy", toy_net, lambda: ["toy:tiny"], "a test's own",
                                      prefix="toy", mean=(0.5,), std=(0.25,)))  # fmt: skip
    register_dataset(DataSource("toyset", toy_data, "a test's own", num_classes=4))
    stage = add_stage(Stage("toy_stage", toy_stage, "a test's own", in_results=True))
    try:
        cfg = _config(
            tmp_path / "run",
            data={"dataset": "toyset", "natural_n": 50, "pairs": 8},
            models=[{"name": "t", "spec": "toy:tiny", "arch_kwargs": {"width": 10},
                     "train": {"epochs": 1}},
                    {"name": "m", "spec": "mlp", "train": {"epochs": 1}}],
        )  # fmt: skip
        results = run_experiment(cfg, quiet=True)
        from invsim.models import load_model

        t = load_model(str(tmp_path / "run" / "models" / "t.safetensors"))  # needs the source
    finally:
        STAGES.remove(stage)
        del MODEL_SOURCES["toy"], DATASETS["toyset"]
    d = json.loads((tmp_path / "run" / "results.json").read_text())
    assert d["toy_stage"]["rows"] == ["t", "m"] == results.extra["toy_stage"]["rows"]
    assert d["models"]["t"]["spec"] == "toy:tiny"
    assert d["provenance"]["config"]["data"]["dataset"] == "toyset"
    html = (tmp_path / "run" / "report.html").read_text()
    assert 'id="stage-toy_stage"' in html and "max_offdiag" in html
    assert "toyset" in html and "toy:tiny" in html
    assert t.invsim_meta["arch"] == "toy:tiny" and t.std.flatten().tolist() == [0.25]


def test_a_stage_reads_only_earlier_artefacts(tmp_path):
    from invsim.experiment import STAGES, Run, Stage, run_experiment

    early = Stage("too_early", lambda run: run["matrices"])
    stages = [STAGES[0], early] + STAGES[1:]
    with pytest.raises(KeyError, match="stage 'matrices' has not run yet"):
        run_experiment(_config(tmp_path / "run"), quiet=True, stages=stages)
    assert Run(_config(tmp_path / "x")).out == tmp_path / "x"


def test_measure_options_from_yaml_and_cli_reach_the_values(tmp_path, finished):
    from invsim.experiment import run_experiment
    from invsim.models import load_model
    from invsim.representation import extract
    from invsim.similarity import get_measure, measure

    out, _ = finished
    cfg = _config(out, measures=["linear_cka", {"name": "mutual_knn", "k": 3},
                                 "knn_jaccard:k=4"])  # fmt: skip
    r = run_experiment(cfg, quiet=True, report=False)
    d = json.loads((out / "results.json").read_text())
    assert d["measures"]["mutual_knn"]["natural"]["options"] == {"k": 3}
    assert d["measures"]["knn_jaccard"]["inverted"]["options"] == {"k": 4}
    assert d["provenance"]["config"]["measures"][1] == {"name": "mutual_knn", "k": 3}
    a, b = (load_model(str(out / "models" / f"{n}.safetensors")) for n in ("a", "b"))
    from invsim.store import InvertedDataset

    x = InvertedDataset(out / "inverted" / "a").images
    ra, rb = extract(a, x), extract(b, x)
    got = r.matrix("inverted", "mutual_knn")["a", "b"]
    assert got == pytest.approx(measure("mutual_knn", ra, rb, k=3), abs=1e-12)
    assert got != pytest.approx(measure("mutual_knn", ra, rb, k=6), abs=1e-6)  # k matters
    with pytest.raises(ValueError, match=r"has no option \['kk'\]; its options: \['k', 'metric'\]"):
        get_measure("mutual_knn:kk=3")
    with pytest.raises(Exception, match="no option"):
        validate({**_config(out).model_dump(mode="json"), "measures": ["rbf_cka:sigma=2"]})


def _imports(path: Path) -> set[str]:
    """The invsim modules a source file imports (at any depth in the file)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("invsim"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("invsim"))
    return found


def _module_graph() -> dict[str, set[str]]:
    mods = {}
    for p in SRC.rglob("*.py"):
        rel = p.relative_to(SRC.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        mods[name] = p
    return {m: {i for i in _imports(p) if i in mods and i != m} for m, p in mods.items()}


def test_no_import_cycles_and_layers_point_down():
    graph = _module_graph()
    # the experiment is the top: nothing below it, and not the report, imports it
    for m, deps in graph.items():
        if not m.startswith(("invsim.experiment", "invsim.cli", "invsim.demo")) and m != "invsim":
            assert not {d for d in deps if d.startswith("invsim.experiment")}, m
    assert not any(d.startswith("invsim.experiment") for d in graph["invsim.report"])
    # similarity is maths: it imports only itself and the results' data types
    outside = {d for d in graph["invsim.similarity"] if not d.startswith("invsim.similarity")}
    assert outside <= {"invsim.results"}, outside
    # no cycle among modules, package __init__ re-exports set aside
    edges = {m: {d for d in deps if not _is_package_of(d, m)} for m, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in edges.get(m, ()):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path, m, d]))
            if d not in state:
                visit(d, [*path, m])
        state[m] = 2

    for m in edges:
        if m not in state:
            visit(m, [])


def _is_package_of(dep: str, module: str) -> bool:
    """``dep`` is a package whose __init__ only re-exports: ``invsim``, or one that
    ``module`` lives in."""
    return dep == "invsim" or module.startswith(dep + ".")


def test_no_function_over_eighty_lines():
    long = []
    for p in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1  # the signature counts, the docstring not
                if ast.get_docstring(node):
                    doc = node.body[0]
                    n -= doc.end_lineno - doc.lineno + 1
                if n > 80:
                    long.append(f"{p.relative_to(SRC)}:{node.name} ({n} lines)")
    assert not long, long


def test_a_first_release_has_no_deprecated_names(tmp_path):
    import invsim
    from invsim import cka_matrix
    from invsim.config import CalibrationConfig, ConfigError
    from invsim.data import TensorImageDataset
    from invsim.models import load_model
    from invsim.store import invert_dataset

    assert "LinearCKAMatrix" not in invsim.__all__ and not hasattr(invsim, "LinearCKAMatrix")
    x = torch.randn(40, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with pytest.raises(TypeError, match="measure"):
        cka_matrix({"a": x, "b": x**2}, measure="rbf")
    with pytest.raises(Exception, match="n_boot"):
        CalibrationConfig(n_boot=100)
    ds = TensorImageDataset(torch.rand(20, 1, 28, 28), torch.arange(20) % 2)
    with pytest.raises(ConfigError, match="seed"):  # a seed is an image: rng_seed draws
        invert_dataset(load_model("mlp"), ds, 6, tmp_path / "a", seed=3, iterations=3)
