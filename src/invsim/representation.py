"""Naming a layer and reading a model's representation there.

The *representation* is, by default, the input of the model's final ``nn.Linear``
classifier (found by execution order, not attribute name): post-activation, exactly what
the robustness library's ``with_latent`` returns and what the inversion matches. Any
name from ``named_modules()`` also works; then the representation is that module's
output. Hooks live only inside a context manager that always removes them and restores
each module's train/eval mode, also when the forward raises.
"""

from __future__ import annotations

import contextlib
import difflib
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from invsim._io import progress_bar
from invsim.config import LOGITS, PENULTIMATE

__all__ = [
    "LOGITS",
    "PENULTIMATE",
    "LayerRef",
    "eval_mode",
    "extract",
    "extract_into",
    "capture_layers",
    "select_layers",
    "logits",
    "representation",
    "resolve_layer",
]


class _LayerReachedError(Exception):
    """Raised by a capture hook to end the forward once the layer is reached."""


@dataclass(frozen=True)
class LayerRef:
    """A resolved layer: the module, whether its input or output is read, and the last
    ReLU module call before it (for ``fake_relu``)."""

    name: str
    module: nn.Module
    capture: str  # "input" (penultimate) or "output"
    last_relu: tuple[str, int] | None = None  # (module name, call index within a forward)


_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[Any, LayerRef]] = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def eval_mode(model: nn.Module, *, warn: bool = True, what: str = "this call") -> Iterator[None]:
    """Put ``model`` in eval mode for the block; restore every module's mode afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    if warn and any(t for _, t in modes):
        warnings.warn(
            f"the model was in train mode; invsim puts it in eval mode for {what} (BatchNorm "
            "and Dropout in train mode would corrupt the result) and restores it afterwards.",
            stacklevel=3,
        )
    model.eval()
    try:
        yield
    finally:
        for m, t in modes:
            m.training = t


def logits(output: Any) -> torch.Tensor:
    """The logits of a model's output: a tensor, ``out[0]`` of a tuple, ``out["logits"]``
    of a dict, or ``out.logits`` of an HF-style object."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    if hasattr(output, "logits"):
        return output.logits
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}.")


def _named(model: nn.Module) -> dict[str, nn.Module]:
    return dict(model.named_modules())


def _lookup(model: nn.Module, layer: str) -> str:
    names = _named(model)
    for candidate in (layer, f"model.{layer}"):
        if candidate in names and candidate != "":
            return candidate
    close = difflib.get_close_matches(layer, [n for n in names if n], n=5, cutoff=0.5)
    if not close:
        close = [n for n in names if n and layer in n][:5]
    hint = f" Close matches: {close}." if close else ""
    raise ValueError(
        f"unknown layer {layer!r}: no module of that name in the model.{hint} Use "
        "'penultimate' or a name from model.named_modules()."
    )


BLOCKS = "blocks"


def _backbone(model: nn.Module) -> tuple[nn.Module, str]:
    """The wrapped network and the prefix its module names carry (``model.`` inside
    invsim's InvsimModel wrapper)."""
    inner = getattr(model, "model", None)
    return (inner, "model.") if isinstance(inner, nn.Module) else (model, "")


def _blocks(model: nn.Module) -> list[str]:
    """The outputs of the model's top-level stages: timm's ``feature_info`` where the
    network has it; a Hugging Face model's blocks (its longest ``nn.ModuleList``); else
    each child of the backbone (torchvision, built-in, your own)."""
    net, prefix = _backbone(model)
    info = getattr(net, "feature_info", None)
    modules = [f.get("module") for f in info] if isinstance(info, list) else []
    if modules and all(modules):
        return [prefix + m for m in modules]
    if isinstance(getattr(net, "base_model", None), nn.Module) and hasattr(net, "config"):
        # Hugging Face: the blocks of the longest nn.ModuleList (ViT's layers, ConvNeXt's
        # stages), in module order
        lists = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.ModuleList)]
        if lists:
            name, longest = max(lists, key=lambda nm: len(nm[1]))
            return [f"{prefix}{name}.{i}" for i in range(len(longest))]
    children = [n for n, _ in net.named_children()]
    if len(children) == 1:  # a lone container (nn.Sequential): its children are the stages
        only = children[0]
        return [f"{prefix}{only}.{n}" for n, _ in getattr(net, only).named_children()]
    return [prefix + n for n in children]


def _glob(pattern: str, name: str) -> bool:
    """Shell-style match of a dotted module name; ``*`` and ``?`` never cross a dot."""
    import re

    rx = "".join("[^.]*" if c == "*" else "[^.]" if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(rx, name) is not None


def select_layers(model: nn.Module, layers: str | Sequence[str]) -> list[str]:
    """The layer names that ``layers`` selects, in the model's module order: each item is
    ``"penultimate"``, ``"logits"``, ``"blocks"`` (the top-level stages, see
    :func:`_blocks`), a module name, or a pattern (``"layer*"``, ``"blocks.*"``) matched
    against the module names with or without the wrapper's ``model.`` prefix (``*`` and
    ``?`` stay within one dotted part: ``layer*`` is layer1..layer4, not their blocks). An item
    that selects nothing is an error naming close matches. Nothing runs.

    Examples:
        >>> from invsim.models import load_model
        >>> from invsim.representation import select_layers
        >>> select_layers(load_model("tv:resnet18"), ["layer*", "penultimate"])
        ['model.layer1', 'model.layer2', 'model.layer3', 'model.layer4', 'penultimate']
    """
    items = [layers] if isinstance(layers, str) else list(layers)
    names = [n for n in _named(model) if n]
    out: list[str] = []
    for item in items:
        if item in (PENULTIMATE, LOGITS):
            found = [item]
        elif item == BLOCKS:
            found = _blocks(model)
        elif any(c in item for c in "*?["):
            found = [n for n in names if _glob(item, n) or _glob(item, n.removeprefix("model."))]
            if not found:
                stem = item.split("*")[0].split("?")[0].split("[")[0].rstrip(".")
                close = difflib.get_close_matches(stem, names, n=5, cutoff=0.4)
                raise ValueError(
                    f"layer pattern {item!r} matches no module of the model."
                    + (f" Close names: {close}." if close else "")
                    + " `invsim layers MODEL --select '*'` lists the top-level ones."
                )
        else:
            found = [_lookup(model, item)]
        out += [n for n in found if n not in out]
    return out


def _calls(model: nn.Module, x: torch.Tensor) -> list[tuple[str, nn.Module]]:
    """Every module call of one forward on ``x[:1]``, in execution order."""
    names = {id(m): n for n, m in _named(model).items()}
    calls: list[tuple[str, nn.Module]] = []
    hooks = [
        m.register_forward_pre_hook(lambda mod, args: calls.append((names[id(mod)], mod)))
        for m in model.modules()
    ]
    try:
        with eval_mode(model, warn=False), torch.no_grad():
            model(x[:1])
    finally:
        for h in hooks:
            h.remove()
    return calls


def _target(
    model: nn.Module, calls: list[tuple[str, nn.Module]], layer: str
) -> tuple[str, nn.Module, str]:
    """(module name, module, "input" or "output") that ``layer`` reads: the input of the
    last-run nn.Linear for "penultimate", else the named module's output. A module that
    runs other than once per forward is refused (its value would be ambiguous)."""
    if layer == PENULTIMATE:
        linears = [(n, m) for n, m in calls if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError(
                "'penultimate' is the input of the final nn.Linear classifier, but this model "
                "runs no nn.Linear module; name a layer explicitly."
            )
        (name, module), how = linears[-1], "input"
    else:
        name = _lookup(model, layer)
        module, how = _named(model)[name], "output"
    count = sum(1 for n, _ in calls if n == name)
    if count != 1:
        raise ValueError(
            f"module {name!r} runs {count} times in one forward (a reused module), so its "
            f"{how} is ambiguous and would be recorded {count} times; name a module that "
            "runs once (e.g. the block that contains it)."
        )
    return name, module, how


def _probe(model: nn.Module, x: torch.Tensor, layer: str) -> LayerRef:
    """Run one forward on ``x[:1]`` and record module calls in execution order."""
    calls = _calls(model, x)
    name, module, capture = _target(model, calls, layer)
    stop = next(i for i, (n, _) in enumerate(calls) if n == name)
    relus = [n for n, m in calls[:stop] if isinstance(m, nn.ReLU)]
    last_relu = None
    if relus:
        rname = relus[-1]
        last_relu = (rname, sum(1 for n in relus if n == rname) - 1)
    return LayerRef(name, module, capture, last_relu)


def resolve_layer(
    model: nn.Module, layer: str = PENULTIMATE, *, example_input: torch.Tensor | None = None
) -> LayerRef:
    """Resolve ``layer`` ("penultimate" or a module name) to a :class:`LayerRef`.

    The first call runs one probe forward on ``example_input[:1]`` (or on a zero image
    built from ``model.invsim_meta``) and caches the answer per model, layer and input
    shape. A module that runs more than once per forward is reported.

    Examples:
        >>> from invsim.models import load_model
        >>> from invsim.representation import resolve_layer
        >>> ref = resolve_layer(load_model("resnet"))
        >>> ref.name, ref.capture
        ('model.fc', 'input')
    """
    if example_input is None:
        meta = getattr(model, "invsim_meta", {}) or {}
        c, s = meta.get("in_channels"), meta.get("image_size")
        if not (c and s):
            if layer != PENULTIMATE:
                _lookup(model, layer)  # report unknown names before asking for an input
            raise ValueError("pass example_input= so the layer can be located by a probe forward.")
        example_input = torch.zeros(1, c, s, s)
    device = next((p.device for p in model.parameters()), example_input.device)
    key = (layer, tuple(example_input.shape[1:]))
    cache = _CACHE.setdefault(model, {})
    if key not in cache:
        cache[key] = _probe(model, example_input.to(device), layer)
    return cache[key]


@contextlib.contextmanager
def reader(
    model: nn.Module, ref: LayerRef, *, fake_relu: bool = False
) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
    """Hooks installed once for a block of forwards; yields ``read(x) -> (n, d)``.

    Each ``read`` runs the model until the layer and stops there. The hooks are removed
    when the block ends, also on an exception. Loops (the inversion) use this so that
    no hook is registered and removed per iteration.
    """
    box: dict[str, Any] = {}
    handles = []
    state = {"calls": 0, "input": None}

    def grab(value: torch.Tensor) -> None:
        box["value"] = value
        state["calls"] = 0
        raise _LayerReachedError

    if ref.capture == "input":
        handles.append(ref.module.register_forward_pre_hook(lambda m, args: grab(args[0])))
    else:
        handles.append(ref.module.register_forward_hook(lambda m, args, out: grab(out)))
    if fake_relu:
        if ref.last_relu is None:
            for h in handles:
                h.remove()
            raise ValueError(f"fake_relu: no nn.ReLU module runs before {ref.name!r}.")
        handles += _fake_relu_hooks(model, ref.last_relu, state)

    def read(x: torch.Tensor) -> torch.Tensor:
        box.clear()
        state["calls"] = 0
        with contextlib.suppress(_LayerReachedError):
            model(x)
        if "value" not in box:
            raise RuntimeError(f"the forward finished without reaching layer {ref.name!r}.")
        value = box.pop("value")
        if not isinstance(value, torch.Tensor):
            value = logits(value)
        return value.flatten(1)

    try:
        yield read
    finally:
        for h in handles:
            h.remove()


def _capture_targets(
    model: nn.Module, names: Sequence[str], calls: list[tuple[str, nn.Module]]
) -> dict[str, tuple[str, nn.Module]]:
    """layer -> ("input" or "output", module) for every layer but logits; a module that
    runs more than once per forward is refused."""
    targets: dict[str, tuple[str, nn.Module]] = {}
    for layer in names:
        if layer != LOGITS:
            _, module, how = _target(model, calls, layer)
            targets[layer] = (how, module)
    return targets


@contextlib.contextmanager
def capture_layers(
    model: nn.Module,
    layers: Sequence[str],
    *,
    example_input: torch.Tensor,
    dtype: torch.dtype | None = None,
) -> Iterator[Callable[[torch.Tensor], dict[str, torch.Tensor]]]:
    """Hook every layer of ``layers`` at once; yields ``read(x) -> {layer: (n, d)}``.

    One forward per batch gives every layer's representation. Each output is copied the
    moment its module returns it, so a later in-place operation (torchvision's ``bn1``
    followed by ``ReLU(inplace=True)``) cannot overwrite it: ``bn1`` keeps its negative
    values. The forward stops after the deepest layer unless ``"logits"`` is asked for.
    A module that runs more than once per forward is refused (its output would be
    ambiguous), as in :func:`resolve_layer`. The hooks are removed when the block ends,
    also on an exception; the caller sets eval mode and grad mode. ``dtype`` makes the
    copy in that dtype (float64 for exact sums: one copy, not two).

    Examples:
        >>> import torch
        >>> from invsim.models import load_model
        >>> from invsim.representation import capture_layers
        >>> m = load_model("lenet").eval()
        >>> x = torch.rand(4, 1, 28, 28)
        >>> with capture_layers(m, ["model.0", "penultimate"], example_input=x) as read:
        ...     {k: tuple(v.shape) for k, v in read(x).items()}
        {'model.0': (4, 4704), 'penultimate': (4, 84)}
    """
    names = list(dict.fromkeys(layers))
    targets = _capture_targets(model, names, _calls(model, example_input))
    box: dict[str, torch.Tensor] = {}

    def keep(layer: str, value: Any) -> None:
        if not isinstance(value, torch.Tensor):
            value = logits(value)
        flat = value.flatten(1)  # a copy, below: later in-place ops cannot touch it
        box[layer] = flat.clone() if dtype is None else flat.to(dtype, copy=True)
        if LOGITS not in names and len(box) == len(targets):  # the deepest one: stop here
            raise _LayerReachedError

    handles = []
    for layer, (how, module) in targets.items():
        if how == "input":
            handles.append(
                module.register_forward_pre_hook(lambda m, args, k=layer: keep(k, args[0]))
            )
        else:
            handles.append(module.register_forward_hook(lambda m, args, out, k=layer: keep(k, out)))

    def read(x: torch.Tensor) -> dict[str, torch.Tensor]:
        box.clear()
        out = None
        with contextlib.suppress(_LayerReachedError):
            out = model(x)
        if LOGITS in names:
            box[LOGITS] = logits(out).flatten(1)
        missing = [k for k in names if k not in box]
        if missing:
            raise RuntimeError(f"the forward finished without reaching layers {missing}.")
        return {k: box[k] for k in names}

    try:
        yield read
    finally:
        for h in handles:
            h.remove()


def _fake_relu_hooks(model: nn.Module, last_relu: tuple[str, int], state: dict) -> list:
    """Hooks that make the ``index``-th call of the ReLU module ``name`` a ReLU forward
    and an identity backward (the robustness library's fake ReLU)."""
    rname, index = last_relu
    relu = _named(model)[rname]

    def pre(m: nn.Module, args: tuple) -> tuple | None:
        if state["calls"] == index:
            state["input"] = args[0]
            return (args[0].clone(),)  # an in-place ReLU must not overwrite the original
        return None

    def post(m: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
        state["calls"] += 1
        if state["calls"] - 1 == index:
            x = state["input"]
            return x + (out - x).detach()  # ReLU forward, identity backward
        return None

    return [relu.register_forward_pre_hook(pre), relu.register_forward_hook(post)]


def _forward_to(model: nn.Module, x: torch.Tensor, ref: LayerRef, fake_relu: bool) -> torch.Tensor:
    with reader(model, ref, fake_relu=fake_relu) as read:
        return read(x)


def _read(model: nn.Module, x: torch.Tensor, layer: str) -> torch.Tensor:
    """The representation at ``layer``, or with ``layer="logits"`` the model's logits."""
    if layer != LOGITS:
        return _forward_to(model, x, resolve_layer(model, layer, example_input=x), False)
    out = model(x)
    try:
        return logits(out).flatten(1)
    except TypeError as e:
        raise ValueError(
            f"a functional measure needs the model's logits, but {type(model).__name__} "
            f"returns {type(out).__name__} ({e}); drop the functional measures (agreement, "
            "cohens_kappa, js_divergence) or wrap the model to return logits."
        ) from e


def representation(
    model: nn.Module, x: torch.Tensor, layer: str = PENULTIMATE, *, fake_relu: bool = False
) -> torch.Tensor:
    """The (n, d) representation of images ``x`` at ``layer``; differentiable.

    The forward stops at the layer (the rest of the network does not run). A model in
    train mode is put in eval mode for the call, with a warning. ``fake_relu`` passes
    gradients through the last ReLU before the layer unchanged (robustness library).

    Examples:
        >>> import torch
        >>> from invsim.models import load_model
        >>> from invsim.representation import representation
        >>> m = load_model("mlp")
        >>> representation(m, torch.rand(3, 1, 28, 28)).shape
        torch.Size([3, 128])
    """
    ref = resolve_layer(model, layer, example_input=x)
    with eval_mode(model, what="representation()"):
        return _forward_to(model, x, ref, fake_relu)


def _batches(data: Any, batch_size: int) -> tuple[Iterator[torch.Tensor], int | None]:
    if isinstance(data, torch.Tensor):
        return iter(data.split(batch_size)), len(data)
    if isinstance(data, Dataset) and not isinstance(data, DataLoader):
        data = DataLoader(data, batch_size=batch_size, shuffle=False)
    if isinstance(data, DataLoader):

        def images() -> Iterator[torch.Tensor]:
            for batch in data:
                yield batch[0] if isinstance(batch, (tuple, list)) else batch

        n = len(data.dataset) if hasattr(data.dataset, "__len__") else None  # type: ignore[arg-type]
        return images(), n
    raise TypeError(
        f"data must be a tensor of images, a Dataset or a DataLoader; got {type(data).__name__}."
    )


def extract_into(
    models: Mapping[str, nn.Module],
    data: Any,
    accumulator: Any,
    *,
    layer: str | Mapping[str, str] = PENULTIMATE,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    progress: bool | None = None,
) -> Any:
    """Stream every model's representation of ``data`` into ``accumulator``, batch by batch.

    ``accumulator`` is a :class:`~invsim.StreamingPanel` (updated with a name ->
    representation mapping), or, for exactly two models, a :class:`~invsim.LinearCKA` or
    :class:`~invsim.MinibatchCKA` (updated with the two in order). n may exceed memory.
    Returns the accumulator.
    """
    names = list(models)
    layers = {k: (layer[k] if isinstance(layer, Mapping) else layer) for k in names}
    batches, n = _batches(data, batch_size)
    with contextlib.ExitStack() as stack:
        for k in names:
            stack.enter_context(eval_mode(models[k], what="extraction"))
            if device is not None:
                models[k].to(device)
        stack.enter_context(torch.inference_mode())
        bar = stack.enter_context(progress_bar(n, "representations", progress))
        for xb in batches:
            dev = device or next((p.device for p in models[names[0]].parameters()), "cpu")
            xb = xb.to(dev)
            reps = {}
            for k in names:
                ref = resolve_layer(models[k], layers[k], example_input=xb)
                reps[k] = _forward_to(models[k], xb, ref, False)
            if hasattr(accumulator, "names"):
                accumulator.update(reps)
            else:
                if len(reps) != 2:
                    raise ValueError(f"{type(accumulator).__name__} compares exactly two models.")
                accumulator.update(*reps.values())
            bar.update(len(xb))
    return accumulator


def extract(
    model: nn.Module,
    data: Any,
    *,
    layer: str = PENULTIMATE,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    progress: bool | None = None,
) -> torch.Tensor:
    """The (n, d) float32 representation of all of ``data`` (a tensor of images, a
    Dataset of (image, label) or a DataLoader), computed in batches under
    ``torch.inference_mode``. The progress bar is off when stderr is not a terminal.

    Examples:
        >>> import torch
        >>> from invsim.models import load_model
        >>> from invsim.representation import extract
        >>> extract(load_model("lenet"), torch.rand(10, 1, 28, 28), batch_size=4).shape
        torch.Size([10, 84])
    """
    out: list[torch.Tensor] = []
    batches, n = _batches(data, batch_size)
    if device is not None:
        model.to(device)
    with (
        eval_mode(model, what="extract()"),
        torch.inference_mode(),
        progress_bar(n, "representations", progress) as bar,
    ):
        for xb in batches:
            xb = xb.to(device or next((p.device for p in model.parameters()), "cpu"))
            out.append(_read(model, xb, layer).float().cpu())
            bar.update(len(xb))
    if not out:
        raise ValueError("data is empty: no images to extract representations from.")
    return torch.cat(out)
