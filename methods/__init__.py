"""The distillers. Importing this package registers every method module in this folder: a new built-in
method is one new file here."""
import functools
import importlib
import importlib.util
import pkgutil

from .base import (LOGITS, OWN_PASS, PRE_LOGITS, STAGES, TASK_LOSS, TEACHER_READS, Distiller, RankExchange, Targets,
                   TrainingSet, check_numbers, kd_kl)
from .registry import (MethodCodeChangedError, check_method_code, get_method, list_methods, method_code,
                       method_config, method_settings, method_source, register_method, unregister_method)

_INFRASTRUCTURE = {"base", "registry"}
for _module in pkgutil.iter_modules(__path__):
    if _module.name not in _INFRASTRUCTURE and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")



def load_plugins(spec: str | None = None) -> list:
    """Imports user methods named in ``spec`` or $HKDBENCH_METHODS: a comma-separated list of module names
    (importable) or paths to .py files. Their ``@register_method`` classes then work everywhere, the CLI
    included. Returns the imported modules."""
    import os
    import sys
    from pathlib import Path

    spec = spec if spec is not None else os.environ.get("HKDBENCH_METHODS", "")
    modules = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        if item.endswith(".py"):
            path = Path(item).resolve()
            if not path.is_file():
                from hkdbench.benchmark.core.config import ConfigError

                raise ConfigError(f"method plugin {item!r} (from HKDBENCH_METHODS) does not exist")
            name = f"hkdbench_plugin_{path.stem}"
            module_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            try:
                _import_plugin(item, functools.partial(module_spec.loader.exec_module, module))
            except BaseException:
                del sys.modules[name]  # a plugin that failed is tried again next time, not taken as loaded
                raise
        else:
            module = _import_plugin(item, functools.partial(importlib.import_module, item))
        modules.append(module)
    return modules


def _import_plugin(item: str, do_import):
    """Runs one plugin import; a plugin that cannot be imported fails with its name and the reason, not a
    traceback from inside the import machinery."""
    from hkdbench.benchmark.core.config import ConfigError

    try:
        return do_import()
    except ModuleNotFoundError as err:
        if not item.endswith(".py") and (err.name is None or item.startswith(err.name)):  # the plugin itself
            raise ConfigError(f"method plugin {item!r} (from HKDBENCH_METHODS) cannot be imported: {err}; give an "
                              "importable module name or a path to a .py file") from None
        raise ConfigError(f"method plugin {item!r} (from HKDBENCH_METHODS) needs a module that is not "
                          f"installed: {err}") from None
    except SyntaxError as err:
        raise ConfigError(f"method plugin {item!r} (from HKDBENCH_METHODS) has a syntax error: {err.filename}, "
                          f"line {err.lineno}: {err.msg}; fix it or remove it from HKDBENCH_METHODS") from None
    except ImportError as err:
        raise ConfigError(f"method plugin {item!r} (from HKDBENCH_METHODS) cannot be imported: {err}") from None


__all__ = ["load_plugins", "LOGITS", "PRE_LOGITS", "STAGES", "OWN_PASS", "TEACHER_READS",
           "TASK_LOSS", "Distiller", "RankExchange", "Targets", "TrainingSet", "check_numbers", "kd_kl", "get_method",
           "list_methods", "method_config", "register_method", "unregister_method", "method_code", "method_settings",
           "method_source", "check_method_code", "MethodCodeChangedError"]
