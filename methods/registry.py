"""The one registry of distillers: names are unique, lookups of unknown names list the known ones."""
from __future__ import annotations

import ast
import dataclasses
import hashlib
import inspect
from typing import Any, Dict, Mapping, Tuple

from hkdbench.benchmark.core.errors import HkdbenchError


_REGISTRY: Dict[str, type] = {}
_PLUGIN_CODE: Dict[str, str] = {}  # a plugin's code, fingerprinted when it registers (the source that was run)


class UnknownMethodError(HkdbenchError, KeyError):
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
    from .base import TEACHER_READS

    if getattr(cls, "teacher_reads", None) not in TEACHER_READS:
        raise TypeError(f"{cls.__qualname__}.teacher_reads must be one of {', '.join(TEACHER_READS)}, got "
                        f"{getattr(cls, 'teacher_reads', None)!r}")
    if _is_builtin(cls) and not isinstance(cls.__dict__.get("version"), int):
        raise TypeError(f"built-in method {cls.__qualname__} must declare its computation's 'version' (an int)")
    if not _is_builtin(cls):
        _PLUGIN_CODE[name] = _plugin_code(cls)
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
    from hkdbench.benchmark.core.config import build_dataclass

    return build_dataclass(get_method(name).Config, dict(overrides or {}), where=f"method.{name}")


def method_settings(name: str, cfg) -> Tuple[str, ...]:
    """The hyperparameters of ``cfg`` (the method's config) that differ from the method's defaults, canonical
    ``key=value`` (sorted): what a run stands for of them, and its label (``kd[temperature=4]``)."""
    from hkdbench.benchmark.core.config import flatten, to_dict

    defaults = to_dict(get_method(name).Config())
    mine = to_dict(cfg)
    return tuple(flatten({k: _plain_number(v) for k, v in mine.items() if v != defaults[k]}))


def _plain_number(value: Any) -> Any:
    """4.0 as 4 (one spelling of a value in a label: ``kd[temperature=4]``)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, (list, tuple)):
        return [_plain_number(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------------------------
# The method's computation, part of a run's identity
# --------------------------------------------------------------------------------------------------------------

_PACKAGE = __name__.rsplit(".", 1)[0]  # hkdbench.methods


def _is_builtin(cls: type) -> bool:
    return cls.__module__.startswith(_PACKAGE + ".")


def method_code(name: str) -> str:
    """What a run of method ``name`` computes, as its identity records it. A built-in method: ``v<version>``, its
    declared version (held honest by its golden run). A plugin: ``src-<hash>`` of the source of every plugin class
    it is built from (its class and its plugin ancestors, through :func:`source_fingerprint`, so formatting, comments
    and docstrings do not count), the versions of the built-in methods it inherits from, and its own ``version``
    if it declares one."""
    cls = get_method(name)
    return f"v{cls.version}" if _is_builtin(cls) else _PLUGIN_CODE[name]


def _plugin_code(cls: type) -> str:
    parts = []
    for klass in _distiller_classes(cls):
        if _is_builtin(klass):
            parts.append(f"{klass.__module__}.{klass.__qualname__}@v{klass.__dict__.get('version', 0)}")
        else:
            parts.append(source_fingerprint(_source_of(klass)))
    if "version" in cls.__dict__:
        parts.append(f"version={cls.__dict__['version']}")
    return "src-" + hashlib.sha256("|".join(parts).encode()).hexdigest()[:12]


def _source_of(klass: type) -> str:
    """The source of the module that defines a plugin class (its helpers included), or of the class alone where the
    module has no file (a notebook cell)."""
    for target in (inspect.getmodule(klass), klass):
        try:
            return inspect.getsource(target)
        except (OSError, TypeError):
            continue
    raise TypeError(f"method {klass.__qualname__} has no source to fingerprint (its code is part of every run's "
                    "identity); define it in a .py file")


def method_source(name: str) -> Dict[str, Any]:
    """Where method ``name`` was loaded from (env.json): its module and file, and its computation's code."""
    cls = get_method(name)
    return {"module": cls.__module__, "file": inspect.getsourcefile(cls), "code": method_code(name)}


def _distiller_classes(cls: type) -> list:
    """``cls`` and its ancestors up to (not including) the Distiller base, most derived first."""
    from .base import Distiller

    return [k for k in cls.__mro__ if isinstance(k, type) and issubclass(k, Distiller) and k is not Distiller]


def source_fingerprint(source: str) -> str:
    """A hash of Python source that formatting, comments and docstrings do not change: the source parsed, its
    docstrings dropped, and written back by ``ast.unparse`` (one canonical spelling of the same code)."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return hashlib.sha256(ast.unparse(tree).encode()).hexdigest()[:16]


class MethodCodeChangedError(HkdbenchError, RuntimeError):
    pass


def check_method_code(name: str, recorded: str) -> None:
    """Fails when the loaded code of method ``name`` is not the computation a run's config recorded: the run was
    planned with other code (an edited plugin, another version of hkdbench), so training it now would store numbers
    under a name that stands for something else."""
    live = method_code(name)
    if recorded != live:
        raise MethodCodeChangedError(
            f"method {name!r}: the run was configured for its code {recorded or '(none recorded)'}, but the code "
            f"loaded now is {live}; its computation has changed since, so this is another run: configure it again "
            "(re-run the train command, or re-submit the sweep, which plans the changed method as new runs)")


def unregister_method(name: str) -> None:
    """Removes a method (for tests that register temporary methods)."""
    _REGISTRY.pop(name, None)
    _PLUGIN_CODE.pop(name, None)
