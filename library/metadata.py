"""kohya's fine-tuning metadata: ``{image_key: {"caption": ..., "tags": ..., "image_size": [w, h], ...}}``.

Read from ``.json`` (one object) or ``.jsonl`` (one ``{"image_key": ..., ...}`` object per line, or
``{"file_name": ...}`` as Hugging Face image folders write it). Written back as ``.json``, atomically.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from library.errors import DataError
from library.fileio import atomic_write_text

Metadata = dict[str, dict[str, Any]]

_JSONL_KEY_FIELDS = ("image_key", "file_name", "image", "path")


def jsonl_objects(path: Path, text: str):
    """``(line number, object)`` for each non-blank line of a JSONL file; a DataError naming the file
    and line for a line that is not JSON or not an object."""
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"line {line_no}: not valid JSON ({err.msg})", where=str(path)) from None
        if not isinstance(row, dict):
            raise DataError(f"line {line_no}: expected a JSON object per line", where=str(path))
        yield line_no, row


def _load_jsonl(path: Path, text: str) -> Metadata:
    entries: Metadata = {}
    for line_no, row in jsonl_objects(path, text):
        key_field = next((k for k in _JSONL_KEY_FIELDS if k in row), None)
        if key_field is None:
            raise DataError(
                f"line {line_no}: no image key",
                where=str(path),
                hint=f"each line needs one of {', '.join(_JSONL_KEY_FIELDS)}",
            )
        key = str(row.pop(key_field))
        entries[key] = row
    return entries


def load_metadata(path: str | Path) -> Metadata:
    """Load a metadata file; raise :class:`DataError` naming the file (and line) when it is bad."""
    path = Path(path)
    if not path.is_file():
        raise DataError("metadata file not found", where=str(path))
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"not UTF-8 text (byte {err.start})", where=str(path)) from None
    if path.suffix.lower() == ".jsonl":
        return _load_jsonl(path, text)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(
            f"not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})", where=str(path)
        ) from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise DataError(
            "expected an object of {image_key: {caption, tags, ...}}",
            where=str(path),
            hint="this is kohya's metadata format; make it with finetune/merge_captions_to_metadata.py",
        )
    return data


def save_metadata(path: str | Path, metadata: Metadata) -> None:
    """Write ``metadata`` as pretty JSON, atomically (the old file stays until the new one is whole)."""
    text = json.dumps(metadata, ensure_ascii=False, indent=2) + "\n"
    atomic_write_text(path, text)
