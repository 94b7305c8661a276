"""What :func:`invsim.models.load_model` understands, listed without importing torch.

``invsim models`` prints this in a blink: the built-in architectures are named here (a
test checks them against the zoo), torchvision's classifiers are read from its source
files (``@register_model`` functions in ``torchvision/models/*.py``, the same set as
``torchvision.models.list_models(torchvision.models)``, which a test checks), and timm
is only looked up, not imported.

Example:
    >>> from invsim.catalog import list_models
    >>> found = list_models()
    >>> "resnet" in found["builtin"], "tv:resnet18" in found["torchvision"]
    (True, True)
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

__all__ = ["BUILTIN_ARCHITECTURES", "list_models", "timm_available"]

BUILTIN_ARCHITECTURES = ("densenet", "lenet", "mlp", "mobilenet", "resnet", "vgg", "vit")

_REGISTERED = re.compile(r"@register_model\([^)]*\)\s*(?:@[^\n]*\n(?:[^\n]*\n)*?)*?\s*def (\w+)\(")


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def torchvision_classifiers() -> list[str]:
    """Names of torchvision's classification models, from its source (no import)."""
    root = _package_dir("torchvision")
    if root is None:
        return []
    names = set()
    for path in sorted((root / "models").glob("*.py")):
        names.update(_REGISTERED.findall(path.read_text(encoding="utf-8")))
    return sorted(names)


def timm_available() -> bool:
    return importlib.util.find_spec("timm") is not None


def list_models() -> dict[str, list[str]]:
    """``builtin`` names, ``torchvision`` names (``tv:NAME``) and whether timm is there
    (``timm``: ``["timm:NAME"]`` as a pattern when installed, else empty)."""
    return {
        "builtin": list(BUILTIN_ARCHITECTURES),
        "torchvision": ["tv:" + n for n in torchvision_classifiers()],
        "timm": ["timm:NAME"] if timm_available() else [],
    }
