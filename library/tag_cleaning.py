"""Clean-ups for captions and tag lists in kohya metadata (pure functions).

Captions (BLIP sentences):
  * surrounding whitespace and commas removed, runs of spaces/tabs/newlines -> one space;
  * no space before ``, . ; : ! ?``; runs of commas (``, ,``) -> one comma;
  * a word repeated right after itself (``a poster poster``, BLIP's stutter) -> once (case-insensitive).
Tags (WD14 / booru tag lists):
  * split at commas; each tag stripped with inner whitespace collapsed; empty tags dropped;
  * duplicates dropped, the first occurrence keeps its place; joined with ``", "``.
Entries: a caption or tag list that is empty after cleaning is removed from the entry (kohya would
otherwise train on ``", tags"``); other fields (``image_size``, ...) are kept as they are.
"""

from __future__ import annotations

import re
from typing import Any

_SPACES = re.compile(r"\s+")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:!?])")
_COMMA_RUNS = re.compile(r",(\s*,)+")
_REPEATED_WORD = re.compile(r"\b(\w+)(\s+\1\b)+", re.IGNORECASE)


def clean_caption(text: str) -> str:
    """A BLIP caption with whitespace, comma runs and stuttered words tidied (see module doc)."""
    text = _SPACES.sub(" ", text)
    text = _SPACE_BEFORE_PUNCT.sub(r"\1", text)
    text = _COMMA_RUNS.sub(",", text)
    text = _REPEATED_WORD.sub(r"\1", text)
    return text.strip(" ,")


def clean_tags(text: str) -> str:
    """A comma-separated tag list stripped, de-duplicated and without empty tags."""
    tags = (_SPACES.sub(" ", tag).strip() for tag in text.split(","))
    return ", ".join(dict.fromkeys(tag for tag in tags if tag))


def clean_entry(entry: dict[str, Any]) -> dict[str, Any]:
    """One metadata entry with its ``caption`` and ``tags`` cleaned; empty ones removed."""
    cleaned = dict(entry)
    for field, clean in (("caption", clean_caption), ("tags", clean_tags)):
        value = cleaned.get(field)
        if isinstance(value, str):
            value = clean(value)
            if value:
                cleaned[field] = value
            else:
                del cleaned[field]
    return cleaned
