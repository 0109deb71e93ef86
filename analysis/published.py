"""PUBLISHED numbers, not measured by this suite: tables of top-1 (%) cells that a paper reports, each cell with the
source that states it and who states it there. The report sets them beside our cells
(``tables.published_side_by_side``).

A table is a CSV file, one cell per row:

    dataset    the dataset (``cifar100``, ``imagenet``, ...)
    teacher    the teacher model (this suite's zoo name); empty for a student trained alone
    student    the student model; empty for a teacher's own accuracy
    method     ``teacher`` (the teacher's accuracy), ``none`` (the student alone) or a method label of our tables
               (``kd``, ``ofa``, ``kd[temperature=4]``)
    value      top-1 in percent
    source     where the value is stated: a URL or a citation
    quoted_by  who states it there (the authors, a user quoting the paper, another paper reprinting the table)
    paper      optional: the paper whose table the value is from
    note       optional: what a reader should know (a disagreement between sources, a cell not re-checked)

One cell may have several rows with different sources (all are shown); the same cell twice from one source is an
error. The shipped table, ``published.csv`` beside this module (package data, ``--published ofa-kd``), holds the
OFA-KD paper's cells that a public source states; the paper itself could not be read here, so a cell without such a
source is not listed. ``hkdbench report --published FILE`` reads a user's table in the same format, checked row by
row before anything is written.
"""
from __future__ import annotations

import csv
import math
from importlib import resources
from pathlib import Path
from typing import Dict, List, Sequence

import pandas as pd

from hkdbench.benchmark.core.config import ConfigError

SHIPPED = "ofa-kd"  # the name of the shipped table on the command line
COLUMNS = ("dataset", "teacher", "student", "method", "value", "source", "quoted_by", "paper", "note")
OPTIONAL = ("paper", "note")
CELL_KEY = ["dataset", "teacher", "student", "method"]


def shipped_path() -> Path:
    return Path(str(resources.files("hkdbench.analysis") / "published.csv"))


def published_cells(tables: Sequence[str] = (SHIPPED,)) -> pd.DataFrame:
    """Every cell of the named tables (``ofa-kd``: the shipped one; else a CSV file), with ``file`` and ``row`` (the
    row's number, the first cell's 1). Raises ConfigError naming the file, row and field of what is wrong."""
    cells: List[Dict[str, object]] = []
    for name in tables:
        cells += _read_table(shipped_path() if name == SHIPPED else Path(name))
    frame = pd.DataFrame(cells, columns=[*COLUMNS, "file", "row"])
    _refuse_repeats(frame)
    return frame


def lookup(cells: pd.DataFrame, dataset: str, teacher: str, student: str, column: str) -> pd.DataFrame:
    """The published rows (none, one or several sources) for one cell of one of our tables."""
    hit = (cells["dataset"] == dataset) & (cells["method"] == column)
    if column != "none":  # a student trained alone is the same whatever teacher its table row names
        hit &= cells["teacher"] == teacher
    if column != "teacher":  # a teacher's accuracy is the same whatever its student
        hit &= cells["student"] == student
    return cells[hit]


def _read_table(path: Path) -> List[Dict[str, object]]:
    where = f"published table {path}"
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such file") from None
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ConfigError(f"{where}: cannot be read as a UTF-8 CSV file ({err})") from None
    if not rows or not any(rows[0]):
        raise ConfigError(f"{where} is empty: its first line must name the columns {', '.join(COLUMNS)}")
    header = [name.strip() for name in rows[0]]
    _check_header(header, where)
    cells = []
    for number, values in enumerate(rows[1:], 1):
        if not any(v.strip() for v in values):
            continue  # a blank line
        if len(values) != len(header):
            raise ConfigError(f"{where}, row {number}: {len(values)} fields, the header names {len(header)}")
        cell = {name: "" for name in OPTIONAL} | {k: v.strip() for k, v in zip(header, values)}
        cells.append(_checked_cell(cell, f"{where}, row {number}") | {"file": str(path), "row": number})
    if not cells:
        raise ConfigError(f"{where} holds no cells (only its header)")
    return cells


def _check_header(header: List[str], where: str) -> None:
    unknown = [name for name in header if name not in COLUMNS]
    missing = [name for name in COLUMNS if name not in header and name not in OPTIONAL]
    repeated = sorted({name for name in header if header.count(name) > 1})
    if unknown or missing or repeated:
        problems = [f"unknown column(s) {', '.join(map(repr, unknown))}" if unknown else "",
                    f"missing column(s) {', '.join(missing)}" if missing else "",
                    f"repeated column(s) {', '.join(repeated)}" if repeated else ""]
        raise ConfigError(f"{where}: {'; '.join(p for p in problems if p)}; the columns are {', '.join(COLUMNS)} "
                          f"({' and '.join(OPTIONAL)} optional)")


def _checked_cell(cell: Dict[str, str], where: str) -> Dict[str, object]:
    for name in ("dataset", "method", "source", "quoted_by"):
        if not cell[name]:
            raise ConfigError(f"{where}, field {name}: empty; {_NEEDED[name]}")
    # a student trained alone has no teacher, a teacher's own accuracy no student; every other cell has both
    for name, empty_for in (("teacher", "none"), ("student", "teacher")):
        if cell["method"] == empty_for and cell[name]:
            raise ConfigError(f"{where}, field {name}: {cell[name]!r}, but method {empty_for} has no {name} "
                              f"(leave it empty)")
        if cell["method"] != empty_for and not cell[name]:
            raise ConfigError(f"{where}, field {name}: empty; method {cell['method']} needs the {name} model")
    return cell | {"value": _percent(cell["value"], f"{where}, field value")}


_NEEDED = {"dataset": "the dataset the value was measured on (cifar100, imagenet, ...)",
           "method": "teacher, none or a method label (kd, ofa, kd[temperature=4])",
           "source": "where the value is stated (a URL or a citation)",
           "quoted_by": "who states the value in the source (the authors, a user quoting the paper, ...)"}


def _percent(text: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{where}: {text!r} is not a number (top-1 in percent, e.g. 78.74)") from None
    if not math.isfinite(value) or not 0.0 <= value <= 100.0:
        raise ConfigError(f"{where}: {text} is not a top-1 in percent (0 to 100)")
    return value


def _refuse_repeats(frame: pd.DataFrame) -> None:
    """One cell from one source twice (in one file or across files) is a typo or a merge, never two values."""
    repeated = frame[frame.duplicated([*CELL_KEY, "source"], keep=False)]
    if repeated.empty:
        return
    first = repeated.iloc[0]
    same = repeated[(repeated[[*CELL_KEY, "source"]] == first[[*CELL_KEY, "source"]]).all(axis=1)]
    places = " and ".join(f"{r.file}, row {r.row}" for r in same.itertuples())
    pair = f"{first['teacher'] or '-'} -> {first['student'] or '-'}"
    raise ConfigError(f"published tables: the cell {first['dataset']} {pair} {first['method']} from {first['source']} "
                      f"is given twice ({places}); keep one")


def source_text(row) -> str:
    """How a table cites one published row: the paper, who states the value, where."""
    where = f"<{row['source']}>" if str(row["source"]).startswith(("http://", "https://")) else row["source"]
    paper = f"{row['paper']}, " if row.get("paper") else ""
    return f"{paper}as stated by {row['quoted_by']}: {where}"

