"""The distillers. Importing this package registers every method module in this folder: a new built-in
method is one new file here."""
import importlib
import pkgutil

from .base import Distiller, Targets, kd_kl
from .registry import get_method, list_methods, method_config, register_method, unregister_method

_INFRASTRUCTURE = {"base", "registry"}
for _module in pkgutil.iter_modules(__path__):
    if _module.name not in _INFRASTRUCTURE and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Distiller", "Targets", "kd_kl", "get_method", "list_methods", "method_config", "register_method",
           "unregister_method"]
