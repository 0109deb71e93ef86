"""``hkdbench config``: a resolved run config, every field with its value, its default and its help, all read from
the dataclasses (core/config.py: field_docs) and, for the method's hyperparameters, from the method's Config."""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Dict, List

import yaml

from hkdbench.benchmark.core.config import REQUIRED, FieldDoc, RunConfig, field_docs


def config_rows(cfg: RunConfig) -> List[Dict[str, Any]]:
    """One row per field of ``cfg``: key, value, default, help. The method's hyperparameters are ``method.<field>``
    rows (as a key=value override spells them); a run without a teacher has one ``teacher`` row."""
    values = cfg.to_dict()
    rows = []
    for doc in field_docs():
        if doc.key == "method_cfg":
            rows.extend(_method_rows(cfg))
        elif doc.key.startswith("teacher.") and cfg.teacher is None:
            if doc.key == "teacher.name":
                rows.append({"key": "teacher", "value": None, "default": None,
                             "help": RunConfig.__dataclass_fields__["teacher"].metadata["help"]})
        else:
            rows.append({"key": doc.key, "value": _at(values, doc.key), "default": doc.default, "help": doc.help})
    return rows


def _method_rows(cfg: RunConfig) -> List[Dict[str, Any]]:
    from hkdbench.methods import get_method

    method = get_method(cfg.method)
    defaults = dataclasses.asdict(method.Config())
    return [{"key": f"method.{f.name}", "value": cfg.method_cfg.get(f.name), "default": defaults[f.name],
             "help": f.metadata.get("help") or f"a hyperparameter of {cfg.method} ({method.paper})"}
            for f in dataclasses.fields(method.Config)]


def _at(values: Dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        values = values[part]
    return values


def _text(value: Any) -> str:
    """A value as a key=value override or a YAML file writes it: strings bare, null, lists in brackets."""
    if value == REQUIRED:
        return value
    return value if isinstance(value, str) else json.dumps(value)


def format_config(cfg: RunConfig, fmt: str = "table") -> str:
    """``cfg`` as a table (field, value, default, help; '*' marks a value other than the default), as YAML that
    ``hkdbench train -c`` replays, or as JSON rows."""
    if fmt == "yaml":
        return f"# {cfg.run_name()}\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None)
    rows = config_rows(cfg)
    if fmt == "json":
        return json.dumps({"run": cfg.run_name(), "fields": rows}, indent=2)
    texts = [(r["key"], _text(r["value"]), _text(r["default"]), r["help"],
              "*" if r["default"] != REQUIRED and r["value"] != r["default"] else " ") for r in rows]
    # a long value (teacher_overrides, teacher_run) runs over its column rather than widening it for every row
    widths = [max(len(t[i]) for t in texts + [("field", "value", "default", "", "")] if len(t[i]) <= 26)
              for i in range(3)]
    lines = [f"run {cfg.run_name()}" + (f"; its teacher run {cfg.teacher_run}" if cfg.teacher_run else ""),
             f"  {'field':<{widths[0]}}  {'value':<{widths[1]}}  {'default':<{widths[2]}}  help"]
    lines += [f"{mark} {key:<{widths[0]}}  {value:<{widths[1]}}  {default:<{widths[2]}}  {text}"
              for key, value, default, text, mark in texts]
    return "\n".join(lines + ["(* differs from the field's default: set by the recipe, the config file or the "
                              "command line)"])


__all__ = ["config_rows", "format_config", "FieldDoc"]
