"""The public API: one import line, lazy, and cheap start-up (no torch until needed)."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)  # fmt: skip


def test_import_invsim_does_not_import_torch_and_names_resolve():
    proc = _python(
        "import invsim, sys\n"
        "assert 'torch' not in sys.modules, 'import invsim imported torch'\n"
        "from invsim import linear_cka\n"
        "assert 'torch' in sys.modules\n"
        "print(round(linear_cka([[0.0], [1.0], [3.0]], [[1.0], [2.0], [4.0]]), 6))\n"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "1.0"


@pytest.mark.parametrize(
    "args", [["--help"], ["invert", "--help"], ["run", "--help"], ["train", "--help"], ["schema"]]
)
def test_cli_help_and_listing_do_not_import_torch(args):
    proc = _python(
        "import sys\n"
        "from invsim.cli import main\n"
        f"sys.argv = ['invsim', *{args!r}]\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "assert 'torch' not in sys.modules, 'the CLI imported torch'\n"
    )
    assert proc.returncode == 0, proc.stderr


def test_readme_api_names_are_exported():
    import invsim

    for name in ("load_model", "load_dataset", "invert_images", "invert_dataset",
                 "InvertedDataset", "natural_similarity", "inverted_similarity",
                 "run_experiment", "InversionConfig"):  # fmt: skip
        assert name in invsim.__all__ and callable(getattr(invsim, name)), name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = invsim.nope
    import pkgutil

    submodules = {m.name for m in pkgutil.iter_modules(invsim.__path__)}
    assert not submodules & set(invsim._LAZY), "a lazy name would be shadowed by a submodule"


def test_catalog_matches_the_zoo_and_torchvision():
    import torchvision

    from invsim.catalog import BUILTIN_ARCHITECTURES, torchvision_classifiers
    from invsim.models.zoo import ARCHITECTURES

    assert sorted(BUILTIN_ARCHITECTURES) == sorted(ARCHITECTURES)
    names = torchvision_classifiers()
    assert "resnet18" in names and "vit_b_16" in names
    assert all(torchvision.models.get_model_builder(n) is not None for n in names)
