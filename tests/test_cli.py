"""The CLI end to end: `invsim demo --quick`, every output, the report in a real browser."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from invsim.data import load_dataset
from invsim.demo import DEMO_MEASURES
from invsim.models import load_model
from invsim.models.checkpoints import read_checkpoint
from invsim.representation import extract
from invsim.similarity import linear_cka, measure
from invsim.store import InvertedDataset


def invsim(*args: str, check: bool = True, process: bool = False) -> subprocess.CompletedProcess:
    """Run the CLI: in this process through click (as the entry point does, with its exit
    codes and both streams), or with ``process`` as ``python -m invsim``."""
    if process:
        proc = subprocess.run(
            [sys.executable, "-m", "invsim", *args], capture_output=True, text=True, timeout=600
        )
    else:
        from click.testing import CliRunner

        from invsim.cli import main

        result = CliRunner().invoke(main, list(args), catch_exceptions=False)
        proc = subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)
    if check and proc.returncode != 0:
        raise AssertionError(f"invsim {args} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    proc = invsim("demo", "--quick", "--out", str(out), process=True)  # one real process
    return out, proc


def test_demo_quick_exit_code_and_headline(quick_run):
    out, proc = quick_run
    assert proc.returncode == 0
    assert "mean off-diagonal CKA: natural" in proc.stdout
    assert f"report: {out / 'report.html'}" in proc.stdout


def test_every_output_present_and_parseable(quick_run):
    out, _ = quick_run
    results = json.loads((out / "results.json").read_text())
    names = [m["name"] for m in results["provenance"]["config"]["models"]]
    assert len(names) == 4
    for key in ("natural", "inverted"):
        with open(out / f"{key}.csv") as f:
            every = list(csv.DictReader(f))
        assert {r["measure"] for r in every} == set(DEMO_MEASURES)
        rows = [r for r in every if r["measure"] == "linear_cka"]
        assert len(rows) == len(names) ** 2
        assert {r["row"] for r in rows} == set(names)
        m = results["matrices"][key]
        assert m["rows"] == names and m["cols"] == names
        lookup = {(r["row"], r["column"]): float(r["value"]) for r in rows}
        v = np.array(m["values"])
        assert lookup[names[0], names[1]] == pytest.approx(v[0, 1], abs=1e-9)
    for fig in ("heatmaps.png", "robustness.png", "confound-heatmaps.png"):
        assert (out / "figures" / fig).stat().st_size > 1000
    assert len(list((out / "figures").glob("grid-*.png"))) == len(names)
    assert results["provenance"]["deviations_from_paper"]["iterations"] == {
        "used": 100,
        "paper": 2000,
    }
    assert "Differs from the paper's settings: iterations" in (out / "report.html").read_text()


def test_matrix_properties(quick_run):
    out, _ = quick_run
    results = json.loads((out / "results.json").read_text())
    nat = np.array(results["matrices"]["natural"]["values"])
    inv = np.array(results["matrices"]["inverted"]["values"])
    assert nat.shape == inv.shape == (4, 4)
    assert np.allclose(nat, nat.T, atol=1e-12) and np.allclose(np.diag(nat), 1.0)
    assert not np.allclose(inv, inv.T, atol=1e-3)
    assert np.allclose(np.diag(inv), 1.0)
    assert results["summary"]["inverted"]["asymmetry"] > 0


def test_confound_experiment_quick(quick_run):
    out, _ = quick_run
    confound = json.loads((out / "results.json").read_text())["confound"]
    c = confound["headline"]
    assert c["natural_linear_cka_a_b"] >= 0.6
    assert c["inverted_linear_cka_a_b_on_a"] <= 0.2 and c["inverted_linear_cka_a_b_on_b"] <= 0.2
    assert c["inverted_linear_cka_a_a2_on_a"] >= 0.7
    # four numbers per comparison, dCKA beside CKA, and the verdict read from them
    assert {f"{r}_dcka_a_a2{s}" for r, s in (("natural", ""), ("inverted", "_on_a"))} <= set(c)
    assert confound["removes_confound"]["inversion"] is True
    assert confound["removes_confound"]["dcka"] == (
        c["natural_dcka_a_b"] <= 0.3 and c["natural_dcka_a_a2"] - c["natural_dcka_a_b"] >= 0.3
    )


def test_second_run_uses_the_cache(quick_run, monkeypatch):
    import invsim.experiment.matrices as experiment
    import invsim.store.build as store
    from invsim.demo import run_demo

    out, _ = quick_run
    calls = {"invert": 0, "extract": 0}
    real_invert, real_extract = store.invert_images, experiment.extract

    def count(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)

        return wrapped

    monkeypatch.setattr(store, "invert_images", count("invert", real_invert))
    monkeypatch.setattr(experiment, "extract", count("extract", real_extract))
    before = json.loads((out / "results.json").read_text())
    again = run_demo(out, quick=True, quiet=True)
    assert calls == {"invert": 0, "extract": 0}
    assert again["provenance"]["cache"]["computed"] == 0
    assert again["matrices"] == before["matrices"]


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)  # type: ignore[return-value]
    raise AssertionError(
        "no chromium on this machine: `make test` installs Debian's chromium package "
        "(scripts/ensure-chromium.sh); run it or install chromium."
    )


def test_report_renders_in_headless_chromium(quick_run, tmp_path):
    out, _ = quick_run
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000"]  # fmt: skip
    url = (out / "report.html").resolve().as_uri()
    dom = subprocess.run([_chromium(), *flags, "--dump-dom", url], capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    total = re.search(r'data-images-total="(\d+)"', dom.stdout)
    loaded = re.search(r'data-images-loaded="(\d+)"', dom.stdout)
    assert total and loaded, dom.stderr[-2000:]
    assert int(total.group(1)) >= 7
    # the layer-by-layer heatmaps (natural and inverted) and the similarity-by-depth figure
    for section in ("layers-natural", "layers-inverted", "layers-depth"):
        block = re.search(f'id="{section}".*?<img[^>]*alt="([^"]+)"', dom.stdout, re.S)
        assert block and block.group(1) == section, section
    assert loaded.group(1) == total.group(1)
    # the screenshot stays in the test's own directory unless asked for (INVSIM_ARTIFACTS)
    keep = os.environ.get("INVSIM_ARTIFACTS")
    shot = (Path(keep) if keep else tmp_path) / "report.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([_chromium(), *flags, "--window-size=1300,4000", f"--screenshot={shot}", url],
                   capture_output=True, timeout=120)  # fmt: skip
    assert shot.stat().st_size > 10_000


def test_help_is_complete():
    top = invsim("--help").stdout
    for cmd in ("demo", "run", "train", "invert", "similarity", "report", "models"):
        assert cmd in top
        text = invsim(cmd, "--help").stdout
        assert "Usage:" in text
    assert "--device" in invsim("invert", "--help").stdout
    assert "--rng-seed" in invsim("train", "--help").stdout
    assert "--out" in invsim("demo", "--help").stdout


def test_failures_exit_non_zero(tmp_path):
    proc = invsim("run", str(tmp_path / "missing.yaml"), check=False)
    assert proc.returncode == 2 and "no such config file" in proc.stderr
    (tmp_path / "bad.yaml").write_text("out: x\ndata: {dataset: mnist5k}\nmodels: []\nbogus: 1\n")
    proc = invsim("run", str(tmp_path / "bad.yaml"), check=False)
    assert proc.returncode == 2 and "unknown key 'bogus'" in proc.stderr
    proc = invsim("invert", "nonexistent-arch", "--out", str(tmp_path / "o"), check=False)
    assert proc.returncode == 2 and "unknown model spec" in proc.stderr


def test_train_invert_similarity_commands(tmp_path):
    model = tmp_path / "m.safetensors"
    invsim("train", "mlp", "--data", "digits", "--epochs", "1", "--out", str(model))
    assert model.exists()
    base = ["invert", str(model), "--data", "digits", "--pairs", "12", "--iterations", "5",
            "--shard-size", "4", "--out"]  # fmt: skip
    proc = invsim(*base, str(tmp_path / "inv"))
    assert "median loss" in proc.stdout and "90th percentile" in proc.stdout
    assert "did not converge" in proc.stdout  # 5 iterations: the summary warns
    for i in (0, 1, 2):
        invsim(*base, str(tmp_path / "sliced"), "--num-shards", "3", "--shard-index", str(i))
    invsim("invert", "--merge", "--out", str(tmp_path / "sliced"))
    for p in (tmp_path / "inv" / "shards").glob("*.safetensors"):
        assert p.read_bytes() == (tmp_path / "sliced" / "shards" / p.name).read_bytes()
    # the step rule and its settings by name reach the store's record
    invsim(*base, str(tmp_path / "fast"), "--schedule", "converge", "--rule-setting", "memory=4",
           "--rule-setting", "stall=stop", "--snapshot-loss", "0.5")  # fmt: skip
    record = json.loads((tmp_path / "fast" / "dataset.json").read_text())["inversion"]
    assert (record["rule"], record["memory"], record["stall"]) == ("lbfgs", 4, "stop")
    assert record["snapshot_losses"] == [0.5]
    proc = invsim(*base, str(tmp_path / "bad"), "--rule-setting", "memory=4", check=False)
    assert proc.returncode == 2 and "'memory' is a setting of the step rule(s)" in proc.stderr
    # a second, adversarially trained model: the training options reach the checkpoint
    other = tmp_path / "mlp-linf.safetensors"
    invsim("train", "mlp", "--data", "digits", "--epochs", "1", "--eps", "0.3", "--norm",
           "linf", "--steps", "2", "--rng-seed", "3", "--out", str(other))  # fmt: skip
    meta = read_checkpoint(other).meta
    assert meta["eps"] == 0.3 and meta["norm"] == "linf"
    assert read_checkpoint(model).meta["eps"] == 0.0
    inv = f"a={tmp_path / 'inv'}"
    proc = invsim("similarity", "--model", f"a={model}", "--model", f"b={other}", "--data",
                  "digits", "--inverted", inv, "--measure", "linear_cka", "--measure",
                  "procrustes", "--out", str(tmp_path / "s"))  # fmt: skip
    sim = json.loads((tmp_path / "s" / "results.json").read_text())["measures"]
    assert not (tmp_path / "s" / "similarity.json").exists()  # one results file, no second
    # the CLI's numbers are linear CKA computed here from the two models' representations
    images = load_dataset("digits", split="test").images[:1000]
    a, b = load_model(str(model)), load_model(str(other))
    want = linear_cka(extract(a, images), extract(b, images))
    got = sim["linear_cka"]["natural"]["values"]
    assert got[0][1] == pytest.approx(want, abs=1e-9) and 0.05 < want < 0.99
    assert got[1][0] == pytest.approx(want, abs=1e-9) and got[0][0] == pytest.approx(1.0)
    x = InvertedDataset(tmp_path / "inv").images  # row a: a's inverted data
    want = measure("procrustes", extract(a, x), extract(b, x))
    # (the CLI's Procrustes streams from moments: its eigenvalues' square roots agree to 1e-7)
    assert sim["procrustes"]["inverted"]["values"][0][1] == pytest.approx(want, abs=1e-6)
    with open(tmp_path / "s" / "natural.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["measure"] == "linear_cka"]
    cell = next(r["value"] for r in rows if (r["row"], r["column"]) == ("a", "b"))
    assert float(cell) == pytest.approx(got[0][1], rel=1e-9)  # written to 10 digits
    assert "natural (linear_cka):" in proc.stdout and "natural (procrustes):" in proc.stdout
    assert "builtin" in invsim("models").stdout and "tv:NAME" in invsim("models").stdout


def test_unconverged_rows_are_flagged_everywhere(tmp_path):
    from invsim.config import validate
    from invsim.experiment import run_experiment

    cfg = validate({
        "out": str(tmp_path / "run"), "rng_seed": 0,
        "data": {"dataset": "digits", "size": 28, "natural_n": 60, "pairs": 8},
        "models": [{"name": "a", "spec": "mlp", "train": {"epochs": 1}},
                   {"name": "b", "spec": "lenet", "train": {"epochs": 1}}],
        "inversion": {"iterations": 5, "batch_size": 8},
    })  # fmt: skip
    results = run_experiment(cfg, quiet=True)
    for name in ("a", "b"):
        d = results["diagnostics"][name]
        assert d["converged"] is False and d["median_loss"] > 0.1
        assert d["p90_loss"] >= d["median_loss"] and 0 <= d["target_accuracy"] <= 1
    assert {w["model"] for w in results["warnings"] if w["kind"] == "not_converged"} == {"a", "b"}
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000"]  # fmt: skip
    url = (tmp_path / "run" / "report.html").resolve().as_uri()
    dom = subprocess.run([_chromium(), *flags, "--dump-dom", url], capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    marked = re.search(r'data-rows-not-converged="(\d+)"', dom.stdout)
    assert marked and int(marked.group(1)) == 2, dom.stderr[-2000:]
    assert 'id="not-converged"' in dom.stdout
    # results.json holds the diagnostics once; a file from before, under "inversion", still
    # gets its rows flagged when the report is made again
    from invsim.report import write_report

    stored = json.loads((tmp_path / "run" / "results.json").read_text())
    assert "inversion" not in stored and set(stored["diagnostics"]) == {"a", "b"}
    stored["inversion"] = stored.pop("diagnostics")
    (tmp_path / "run" / "results.json").write_text(json.dumps(stored))
    assert 'id="not-converged"' in write_report(tmp_path / "run").read_text()


def _report_cells(text: str) -> dict[tuple[str, str, str], tuple[float, str]]:
    """(regime, row, column) -> (data-value, the text shown) from report.html's tables."""
    out = {}
    for regime, table in re.findall(r'<table class="matrix" data-regime="(\w+)">(.*?)</table>',
                                    text, flags=re.S):  # fmt: skip
        for row, col, value, shown in re.findall(
            r'<td data-row="([^"]+)" data-col="([^"]+)" data-value="([^"]+)">([^<]*)</td>', table
        ):
            out[regime, row, col] = (float(value), shown)
    return out


def test_report_numbers_equal_results_and_csvs(quick_run, tmp_path):
    out, _ = quick_run
    results = json.loads((out / "results.json").read_text())
    # `invsim report DIR` rebuilds the report from results.json and the stores alone
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "report.html").unlink()
    proc = invsim("report", str(copy))
    assert (copy / "report.html").exists(), proc.stdout
    text = (copy / "report.html").read_text()
    cells = _report_cells(text)
    for regime in ("natural", "inverted"):
        m = results["matrices"][regime]
        for i, r in enumerate(m["rows"]):
            for j, c in enumerate(m["cols"]):
                value, shown = cells[regime, r, c]
                assert value == m["values"][i][j]
                assert shown.startswith(f"{m['values'][i][j]:.3f}")
                if m["ci_low"][i][j] is not None:
                    assert f"[{m['ci_low'][i][j]:.3f}, {m['ci_high'][i][j]:.3f}]" in shown
    # the headline numbers: the summary table's off-diagonal means
    for regime, s in results["summary"].items():
        assert re.search(rf"<td>{regime}</td><td>{s['offdiag_mean']:.3f}</td>", text), regime
    # the intervals' method and target are in the caption
    assert results["matrices"]["inverted"]["ci_method"] in text
    assert "centred on debiased_cka" in text
    # the CSVs equal the JSON, every measure, cell and statistic
    for regime in ("natural", "inverted"):
        with open(out / f"{regime}.csv") as f:
            for row in csv.DictReader(f):
                m = results["measures"][row["measure"]][regime]
                i, j = m["rows"].index(row["row"]), m["cols"].index(row["column"])
                assert float(row["value"]) == pytest.approx(m["values"][i][j], rel=1e-9, abs=1e-12)
                for stat in ("ci_low", "ci_high", "ci_centre", "null_mean", "p_value"):
                    want = m.get(stat, [[None] * len(m["cols"])] * len(m["rows"]))[i][j]
                    if want is None:
                        assert row[stat] == "", (regime, row, stat)
                    else:
                        assert float(row[stat]) == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_schema_is_the_config_json_schema():
    schema = json.loads(invsim("schema").stdout)
    props = schema["properties"]
    assert {"models", "data", "inversion", "calibration", "measures", "regimes"} <= set(props)
    assert "out" in schema["required"] and "models" in schema["required"]
    from invsim.config import ExperimentConfig

    assert schema == json.loads(json.dumps(ExperimentConfig.model_json_schema()))


def test_invert_at_an_intermediate_layer_then_every_layer_of_it(tmp_path):
    model = tmp_path / "m.safetensors"
    invsim("train", "mlp", "--data", "digits", "--epochs", "1", "--out", str(model))
    invsim("invert", str(model), "--data", "digits", "--pairs", "8", "--iterations", "5",
           "--layer", "model.2", "--out", str(tmp_path / "inv"))  # fmt: skip
    record = json.loads((tmp_path / "inv" / "dataset.json").read_text())
    assert record["inversion"]["layer"] == "model.2"
    invsim("layer-similarity", "--model", f"a={model}", "--data", "digits", "--natural-n", "30",
           "--select", "model.*", "--inverted", f"a={tmp_path / 'inv'}", "--out",
           str(tmp_path / "ls"))  # fmt: skip
    found = json.loads((tmp_path / "ls" / "results.json").read_text())["layers"]
    inv = found["inverted"]["a"]
    assert inv["n"] == 8 and inv["row"] == "a" and inv["layers"]["a"][2] == "model.2"
    assert found["natural"]["n"] == 30
    assert (tmp_path / "ls" / "layers-inverted-a.csv").exists()
