"""Distributed equals single-process: CKA all-reduce and sharded inversion (gloo, 2 procs)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from invsim import StreamingPanel, linear_cka
from invsim.store import invert_dataset

HELPERS = Path(__file__).parent / "helpers"
sys.path.insert(0, str(HELPERS))
import dist_worker  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HELPERS)}


def _run_group(task: str, out: Path, world: int = 2) -> None:
    rdv = out.parent / f"rdv-{task}"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(HELPERS / "dist_worker.py"),
                task,
                str(r),
                str(world),
                str(rdv),
                str(out),
            ],
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for r in range(world)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]


def test_distributed_cka_equals_single_process(tmp_path):
    _run_group("cka", tmp_path)
    x, y = dist_worker.data()
    want_mat = StreamingPanel(["x", "y", "z"])
    want_mat.update({"x": x, "y": y, "z": torch.tanh(x[:, :3] - 50)})
    want = want_mat.compute(["debiased_cka"])["debiased_cka"].values
    for rank in (0, 1):
        got = json.loads((tmp_path / f"cka-{rank}.json").read_text())
        assert got["biased"] == pytest.approx(linear_cka(x, y), abs=1e-10)
        assert got["debiased"] == pytest.approx(linear_cka(x, y, debiased=True), abs=1e-10)
        assert torch.allclose(torch.tensor(got["matrix"], dtype=torch.float64),
                              torch.from_numpy(want), atol=1e-10)  # fmt: skip
        # every other accumulator, synced by the same call, equals one process
        want_others = dist_worker.others(0, 1)
        assert got["others"]["minibatch"] == pytest.approx(want_others["minibatch"], abs=1e-12)
        for key in ("moments", "tiles"):
            assert np.allclose(got["others"][key], want_others[key], atol=1e-10, rtol=0), key
        assert got["others"]["tiles"][0][1] == pytest.approx(
            linear_cka(x, y, debiased=True), abs=1e-10
        )
        # every streaming measure, from the all-reduced moments, equals one process
        single = want_mat.compute(list(got["measures"]))
        for name, values in got["measures"].items():
            values = torch.tensor(values, dtype=torch.float64)
            assert torch.allclose(values, torch.from_numpy(single[name].values), atol=1e-8), name


@pytest.mark.parametrize("task", ["invert", "invert-converge"])
def test_distributed_inversion_is_an_exact_partition(tmp_path, task, store_files):
    dist_out = tmp_path / "dist" / "inv"
    dist_out.parent.mkdir()
    _run_group(task, dist_out)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    kw = {"iterations": 6} if task == "invert" else dist_worker.CONVERGE
    try:
        single = tmp_path / "single"
        invert_dataset(dist_worker.model(), dist_worker.small_set(), 10, single, shard_size=3,
                       batch_size=3, progress=False, **kw)  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    # byte-identical shards, records and manifest
    assert store_files(dist_out) == store_files(single)
    manifest = json.loads((dist_out / "manifest.json").read_text())
    assert [r["shard"] for r in manifest["shards"]] == [0, 1, 2, 3]
    assert sum(r["n"] for r in manifest["shards"]) == 10
    for rank in (0, 1):
        assert json.loads((tmp_path / "dist" / f"rank-{rank}.json").read_text()) == {"n": 10}


def test_torchrun_cli_matches_single_process(tmp_path, store_files):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    model_path = tmp_path / "m.safetensors"
    env = {**ENV}
    subprocess.run([sys.executable, "-m", "invsim", "train", "mlp", "--data", "digits",
                    "--epochs", "1", "--out", str(model_path)], env=env, check=True,
                   capture_output=True)  # fmt: skip
    args = ["invert", str(model_path), "--data", "digits", "--pairs", "10", "--iterations",
            "5", "--shard-size", "3"]  # fmt: skip
    subprocess.run([sys.executable, "-m", "invsim", *args, "--out", str(tmp_path / "one")],
                   env=env, check=True, capture_output=True)  # fmt: skip
    proc = subprocess.run(
        [torchrun, "--standalone", "--nproc-per-node=2", "-m", "invsim", *args, "--out",
         str(tmp_path / "two")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert store_files(tmp_path / "two") == store_files(tmp_path / "one")


def test_torchrun_experiment_matches_single_process(tmp_path):
    import numpy as np
    import yaml

    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    cfg = {
        "data": {"dataset": "digits", "size": 28, "natural_n": 90, "pairs": 21},
        "models": [{"name": "a", "spec": "mlp", "train": {"epochs": 1}},
                   {"name": "b", "spec": "mlp", "train": {"epochs": 1, "rng_seed": 3}}],
        "inversion": {"iterations": 8, "batch_size": 7, "shard_size": 6},
    }  # fmt: skip
    results = {}
    for label, launcher in (("one", [sys.executable, "-m", "invsim"]),
                            ("two", [torchrun, "--standalone", "--nproc-per-node=2", "-m",
                                     "invsim"])):  # fmt: skip
        path = tmp_path / f"{label}.yaml"
        path.write_text(yaml.safe_dump({**cfg, "out": str(tmp_path / label)}))
        proc = subprocess.run([*launcher, "run", str(path), "--quiet"], env=ENV,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[label] = json.loads((tmp_path / label / "results.json").read_text())
    for key in ("natural", "inverted"):
        # the values and, for the same seed, the intervals and permutation nulls (21
        # inverted pairs: above MIN_INTERVAL_N, so every cell has its interval)
        for stat in ("values", "ci_low", "ci_high", "ci_centre", "null_mean", "p_value"):
            a = np.array(results["one"]["matrices"][key][stat], dtype=float)
            b = np.array(results["two"]["matrices"][key][stat], dtype=float)
            assert np.isfinite(a).all() and np.allclose(a, b, atol=1e-6), (key, stat, a, b)
    for p in (tmp_path / "one" / "inverted").rglob("*.safetensors"):
        assert p.read_bytes() == (tmp_path / "two" / p.relative_to(tmp_path / "one")).read_bytes()


def test_torchrun_layer_similarity_matches_single_process(tmp_path):
    # two saved random LeNets; blocks of 16 examples, so the 60 images take four passes,
    # which the two processes split between them (and the first batch fixes the shift)
    from invsim.models import load_model, save_model

    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    specs = []
    for i in (0, 1):
        torch.manual_seed(i)
        save_model(
            load_model("lenet", in_channels=1, image_size=28), tmp_path / f"m{i}.safetensors"
        )
        specs += ["--model", f"m{i}={tmp_path / f'm{i}.safetensors'}"]
    args = ["layer-similarity", *specs, "--data", "digits", "--size", "28", "--natural-n", "60",
            "--measure", "linear_cka", "--measure", "debiased_cka", "--batch-size", "8",
            "--block", "16"]  # fmt: skip
    one = subprocess.run([sys.executable, "-m", "invsim", *args, "--out", str(tmp_path / "one")],
                         env=ENV, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([torchrun, "--standalone", "--nproc-per-node=2", "-m", "invsim", *args,
                          "--out", str(tmp_path / "two")], env=ENV, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    a = json.loads((tmp_path / "one" / "results.json").read_text())["layers"]["natural"]
    b = json.loads((tmp_path / "two" / "results.json").read_text())["layers"]["natural"]
    same = ("block", "passes", "forwarded")
    assert a["schedule"]["passes"] == 4 and all(a["schedule"][k] == b["schedule"][k] for k in same)
    for measure in ("linear_cka", "debiased_cka"):
        x, y = np.array(a["values"][measure], float), np.array(b["values"][measure], float)
        assert np.isfinite(x).all() and np.abs(x - y).max() < 1e-10, measure
