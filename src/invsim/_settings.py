"""The base of every settings group: strict, closed, frozen pydantic models, and the
error that names the key. Torch-free, and below both :mod:`invsim.config` and the
inversion's step rules (whose settings are :class:`RuleSettings`)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

__all__ = ["ConfigError", "RuleSettings"]


class ConfigError(ValueError):
    """A setting is invalid: the message names the key, the value and what is allowed."""


class _Settings(BaseModel):
    """Strict (no silent coercion: 1 is not a bool, "3" is not an int), closed (unknown
    keys are errors) and immutable."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    def replace(self, **changes: Any):
        """A validated copy with ``changes`` applied (unknown names are an error)."""
        return type(self).checked({**self.model_dump(), **changes}, where=type(self).__name__)

    @classmethod
    def checked(cls, raw: Any, *, where: str = ""):
        """``cls(**raw)``, with a :class:`ConfigError` naming the key on failure."""
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            raise ConfigError(_message(e, where, cls)) from None


class RuleSettings(_Settings):
    """A step rule's own settings (:mod:`invsim.inversion.rules`); ``rule`` names the rule."""

    rule: str

    def record(self) -> dict[str, Any]:
        """The settings as the store's record and config hash see them."""
        return self.model_dump()


_TYPES = {
    "int_type": "int",
    "bool_type": "bool",
    "float_type": "float or int",
    "string_type": "str",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "list_type": "a list",
}


def _fields_at(model: type[BaseModel], loc: list[Any]) -> list[str]:
    """The keys allowed at ``loc`` (a key path below ``model``), for error messages."""
    import typing

    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            break
        inner = [a for a in typing.get_args(field.annotation) or [field.annotation]]
        inner += [b for a in inner for b in typing.get_args(a)]
        models = [a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)]
        if not models:
            break
        model = models[0]
    return sorted(model.model_fields)


def _message(e: ValidationError, where: str, model: type[BaseModel]) -> str:
    # an unknown key first (usually a typo that explains the rest), then a missing one
    order = {"extra_forbidden": 0, "missing": 1}
    err = min(e.errors(), key=lambda x: order.get(x["type"], 2))
    loc = [p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p == "none"))]
    path = where
    for p in loc:
        path += f"[{p}]" if isinstance(p, int) else (f".{p}" if path else str(p))
    kind, value = err["type"], err.get("input")
    if kind == "extra_forbidden":
        import difflib

        allowed = _fields_at(model, loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown key {path!r}{hint}; allowed here: {', '.join(allowed)}."
    if kind == "missing":
        return f"missing required key {path!r}."
    if kind in _TYPES:
        return f"{path!r} must be {_TYPES[kind]}; got {value!r} ({type(value).__name__})."
    msg = err["msg"].removeprefix("Value error, ")
    if kind == "value_error":  # a ConfigError from a nested group's own check: where it was
        nested = isinstance((err.get("ctx") or {}).get("error"), ConfigError)
        return f"{path}: {msg}" if nested and path else msg
    return f"{path!r}: {msg}; got {value!r}." if path else msg
