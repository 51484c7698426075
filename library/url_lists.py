"""Read lists of image URLs: CSV, JSON (a list of objects or an object of lists) and JSONL.

Every format comes out the same way: a :class:`UrlList` with the file's column names and its records
as plain ``{column: value}`` dicts, in file order. Bad input is a :class:`DataError` naming the file
(and line where there is one).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from library.errors import DataError
from library.metadata import jsonl_objects

LIST_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".ndjson")


@dataclass(frozen=True)
class UrlList:
    path: Path
    columns: tuple[str, ...]
    records: tuple[dict[str, Any], ...]

    def require_columns(self, names: list[str], flag: str) -> None:
        """Raise a one-line error if a column the user named is not in this list."""
        missing = [name for name in names if name not in self.columns]
        if missing:
            shown = ", ".join(self.columns) if self.columns else "(none)"
            raise DataError(
                f"no column {missing[0]!r}; its columns are: {shown}",
                where=str(self.path),
                hint=f"pick one of them with {flag}",
            )


def cell_text(value: Any) -> str:
    """A record value as manifest text: JSON for lists/objects, '' for null."""
    if value is None:
        return ""
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _columns_of(records: list[dict[str, Any]]) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for record in records:
        for key in record:
            seen.setdefault(str(key), None)
    return tuple(seen)


def _read_csv(path: Path, text: str) -> UrlList:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        columns = tuple(name.strip() for name in (reader.fieldnames or []))
        records = [{key.strip(): value for key, value in row.items() if key is not None} for row in reader]
    except csv.Error as err:
        raise DataError(f"line {reader.line_num}: not valid CSV ({err})", where=str(path)) from None
    return UrlList(path, columns, tuple(records))


def _read_jsonl(path: Path, text: str) -> UrlList:
    records = [record for _, record in jsonl_objects(path, text)]
    return UrlList(path, _columns_of(records), tuple(records))


def _columnar_records(path: Path, data: dict[str, Any]) -> list[dict[str, Any]]:
    """``{"url": [...], "title": [...]}`` (or pandas' ``{"url": {"0": ...}}``) as row dicts."""
    columns = {}
    for name, values in data.items():
        if isinstance(values, dict):
            values = list(values.values())
        if not isinstance(values, list):
            raise DataError(
                f"key {name!r} holds a {type(values).__name__}, not a list",
                where=str(path),
                hint="a JSON list file is a list of objects, or an object whose values are equal-length lists",
            )
        columns[str(name)] = values
    lengths = {len(values) for values in columns.values()}
    if len(lengths) > 1:
        raise DataError(f"the column lists have different lengths {sorted(lengths)}", where=str(path))
    count = lengths.pop() if lengths else 0
    return [{name: values[i] for name, values in columns.items()} for i in range(count)]


def _read_json(path: Path, text: str) -> UrlList:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"line {err.lineno}: not valid JSON ({err.msg})", where=str(path)) from None
    if isinstance(data, dict):
        records = _columnar_records(path, data)
    elif isinstance(data, list):
        for index, record in enumerate(data):
            if not isinstance(record, dict):
                raise DataError(f"item {index} is a {type(record).__name__}, not an object", where=str(path))
        records = data
    else:
        raise DataError("expected a list of objects or an object of lists", where=str(path))
    return UrlList(path, _columns_of(records), tuple(records))


def read_url_list(path: str | Path) -> UrlList:
    """Read one list file; the format comes from the suffix (``.csv``/``.tsv``/``.json``/``.jsonl``)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in LIST_SUFFIXES:
        raise DataError(
            f"unknown list format {suffix or '(no suffix)'!r}",
            where=str(path),
            hint=f"use one of {', '.join(LIST_SUFFIXES)}",
        )
    if not path.is_file():
        raise DataError("file not found", where=str(path))
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DataError("not UTF-8 text", where=str(path), hint="re-save the list as UTF-8") from None
    if suffix in (".csv", ".tsv"):
        return _read_csv(path, text)
    if suffix == ".json":
        return _read_json(path, text)
    return _read_jsonl(path, text)
