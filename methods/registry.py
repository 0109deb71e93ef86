"""The one registry of distillers: names are unique, lookups of unknown names list the known ones."""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping

_REGISTRY: Dict[str, type] = {}


class UnknownMethodError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0])


def register_method(cls: type) -> type:
    """Class decorator: registers a Distiller subclass under its ``name`` attribute."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__qualname__} must set a non-empty class attribute 'name' to be registered")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        other = _REGISTRY[name]
        raise ValueError(
            f"method name {name!r} is already registered by {other.__module__}.{other.__qualname__}; "
            "pick another name")
    config_cls = getattr(cls, "Config", None)
    if config_cls is None or not dataclasses.is_dataclass(config_cls):
        raise TypeError(f"{cls.__qualname__} must define a dataclass 'Config' of its hyperparameters")
    if not config_cls.__dataclass_params__.frozen:
        raise TypeError(f"{cls.__qualname__}.Config must be a frozen dataclass")
    _REGISTRY[name] = cls
    return cls


def get_method(name: str) -> type:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownMethodError(
            f"unknown method {name!r}; known methods: {', '.join(sorted(_REGISTRY))}") from None


def list_methods() -> Dict[str, type]:
    return dict(sorted(_REGISTRY.items()))


def method_config(name: str, overrides: Mapping[str, Any] | None = None):
    """Builds the method's frozen config from its paper defaults plus ``overrides``, validating every key."""
    from hkdbench.benchmark.config import build_dataclass

    return build_dataclass(get_method(name).Config, dict(overrides or {}), where=f"method.{name}")


def unregister_method(name: str) -> None:
    """Removes a method (for tests that register temporary methods)."""
    _REGISTRY.pop(name, None)
