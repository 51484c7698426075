"""Prompt lists, the seed's file naming, and the generation manifest.

Prompt files: a CSV with a ``Prompts`` column (the seed's ``mytest.csv``) or a ``.txt`` with one prompt
per line (blank lines are skipped). Indices start at 0, as the seed's ``PromptsList[prompt_index]``.
Image names are ``<model>-<prompt_index>-<image_index>.png``: the prompt index is the second
dash-separated field.
"""

from __future__ import annotations

import re
from pathlib import Path

from library.errors import ConfigError, DataError

MANIFEST_COLUMNS = ["file", "model", "prompt_index", "prompt", "negative", "seed", "steps", "guidance"]
MODEL_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.+]+$")


def load_prompts(path: str | Path) -> list[str]:
    """Prompts from a CSV (``Prompts`` column) or a text file (one per line)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError("prompt file not found", where=str(path), hint="pass --prompts with a .csv or .txt file")
    if path.suffix.lower() == ".csv":
        prompts = _csv_prompts(path)
    else:
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError:
            raise DataError("prompt file is not UTF-8 text", where=str(path)) from None
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise DataError("prompt file holds no prompts", where=str(path))
    return prompts


def _csv_prompts(path: Path) -> list[str]:
    import pandas as pd

    try:
        frame = pd.read_csv(path, encoding="utf-8-sig", dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read prompt CSV ({str(err).splitlines()[0][:120]})", where=str(path)) from None
    if "Prompts" not in frame.columns:
        found = ", ".join(map(str, frame.columns)) or "none"
        raise DataError(f"no 'Prompts' column (columns: {found})", where=str(path),
                        hint="name the prompt column 'Prompts', as in the seed's CSV")
    prompts = [str(value).strip() for value in frame["Prompts"]]
    for index, prompt in enumerate(prompts):
        if not prompt:
            raise DataError(f"empty prompt at data row {index + 1}", where=str(path))
    return prompts


def prompt_index_from_name(name: str) -> int | None:
    """The second dash-separated field of a file name as an int, or None when there is none."""
    fields = Path(name).stem.split("-")
    if len(fields) < 2 or not fields[1].strip().isdigit():
        return None
    return int(fields[1])


def check_model_name(name: str, where: str = "--model") -> str:
    if not name or not MODEL_NAME_PATTERN.match(name):
        raise ConfigError(f"model name '{name}' must use only letters, digits, '_', '.' or '+'", where=where,
                        hint="no '-': image names are <model>-<prompt_index>-<image_index>.png")
    return name


def image_name(model: str, prompt_index: int, image_index: int) -> str:
    return f"{model}-{prompt_index}-{image_index}.png"


def load_manifest(path: Path) -> dict[str, dict]:
    """``manifest.csv`` rows keyed by their ``file`` (relative to the images root, ``/`` separated)."""
    import pandas as pd

    if not path.is_file():
        return {}
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read manifest ({str(err).splitlines()[0][:120]})", where=str(path)) from None
    missing = [c for c in ("file", "prompt") if c not in frame.columns]
    if missing:
        raise DataError(f"manifest lacks columns {missing}", where=str(path), hint="regenerate it or move it away")
    return {row["file"]: row for row in frame.to_dict("records")}
