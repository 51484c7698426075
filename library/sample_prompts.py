"""Sample prompt files (``--sample_prompts``): kohya's .txt, .toml and .json formats.

``.txt``: one prompt per line; blank lines and lines starting with ``#`` are skipped. Options follow the
prompt inline, as in kohya's sd-scripts (names are case-insensitive)::

    a movie poster, blue gradient --n blurry, text --w 832 --h 1216 --d 42 --s 30 --l 7 --ss euler_a --np basic

``--n`` negative prompt, ``--w``/``--h`` width/height, ``--d`` seed, ``--s`` steps, ``--l`` CFG scale,
``--ss`` sampler (a ``--sample_sampler`` name), and ours: ``--np`` named negative preset(s) from
:mod:`library.presets` (``basic``, ``anime``, ``realistic``, ``non_adult``; join several with ``+``).
``--np`` and ``--n`` together give the explicit negative followed by the preset's terms. ``{preset:NAME}``
inside a prompt or negative is replaced by that preset's text.

``.toml``: ``[[prompt]]`` tables, or kohya's ``[prompt]`` table of defaults with ``[[prompt.subset]]``
tables; ``.json``: a list of objects (or of plain prompt strings). Keys: ``prompt``, ``negative_prompt``,
``width``, ``height``, ``seed``, ``sample_steps``, ``scale``, ``sample_sampler``, ``negative_preset``.

Any bad option or value is a :class:`~library.errors.ConfigError` naming the file and line
(``prompts.txt:3: unknown option --q``) or entry (``prompts.toml: prompt[2].width``).
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from library.errors import ConfigError
from library.presets import negative_preset
from library.samplers import check_sampler

MAX_SIDE = 8192
MAX_STEPS = 1000

# inline option -> SamplePrompt field
INLINE_OPTIONS = {"n": "negative_prompt", "w": "width", "h": "height", "d": "seed", "s": "steps",
                  "l": "scale", "ss": "sampler", "np": "negative_preset"}
# TOML/JSON key -> SamplePrompt field
RECORD_KEYS = {"prompt": "prompt", "negative_prompt": "negative_prompt", "width": "width", "height": "height",
               "seed": "seed", "sample_steps": "steps", "scale": "scale", "sample_sampler": "sampler",
               "negative_preset": "negative_preset"}
_OPTION = re.compile(r"(?:^|\s)--([A-Za-z][A-Za-z0-9_+]*)(?=\s|$)")
_PRESET_REF = re.compile(r"\{preset:([^{}]*)\}")


@dataclass(frozen=True)
class SamplePrompt:
    """One prompt of a sample prompt file; ``None`` means "use the run's default".

    ``negative_prompt`` is the explicit negative (``--n``, ``{preset:..}`` already expanded);
    ``negative_preset`` the checked ``--np`` spec; ``source`` says where it came from (``file:line``).
    """

    prompt: str
    negative_prompt: str | None = None
    negative_preset: str | None = None
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    steps: int | None = None
    scale: float | None = None
    sampler: str | None = None
    source: str = ""

    def negative(self, default_preset: str | None = None) -> str:
        """The negative prompt to use: explicit + preset terms; ``default_preset`` only when the
        prompt names neither a negative nor a preset."""
        preset = self.negative_preset
        if preset is None and self.negative_prompt is None:
            preset = default_preset
        return combine_negative(self.negative_prompt, preset)


def combine_negative(explicit: str | None, preset: str | None) -> str:
    """``explicit`` followed by the terms of ``preset`` it does not already contain."""
    explicit = (explicit or "").strip()
    if not preset:
        return explicit
    have = {term.strip().lower() for term in explicit.split(",")}
    extra = [term.strip() for term in negative_preset(preset).split(",") if term.strip().lower() not in have]
    return ", ".join(part for part in [explicit] + extra if part)


def expand_preset_refs(text: str, where: str) -> str:
    """Replace each ``{preset:NAME}`` in ``text`` by the preset's negative prompt."""

    def replace(match: re.Match) -> str:
        return _preset_text(match.group(1), where)

    return _PRESET_REF.sub(replace, text)


def _preset_text(spec: str, where: str) -> str:
    try:
        return negative_preset(spec)
    except ConfigError as err:
        raise ConfigError(err.message, where=where, hint=err.hint) from None


# --- values ---------------------------------------------------------------------------------------


def _value(field: str, raw: Any, where: str, label: str) -> Any:
    """Check and convert one option value (a string from a .txt line or a TOML/JSON value)."""
    if field in ("negative_prompt", "prompt"):
        if not isinstance(raw, str):
            raise ConfigError(f"{label} must be text, got {raw!r}", where=where)
        return expand_preset_refs(raw.strip(), where)
    if field == "negative_preset":
        if not isinstance(raw, str) or not raw.strip():
            raise ConfigError(f"{label} needs a preset name, got {raw!r}", where=where)
        _preset_text(raw.strip(), where)
        return raw.strip()
    if field == "sampler":
        return check_sampler(str(raw), where=where)
    if field == "scale":
        number = _number(raw, float, where, label, "a number such as 7.5")
        if not 0 <= number <= 100:
            raise ConfigError(f"{label} must be between 0 and 100, got {raw}", where=where)
        return number
    number = _number(raw, int, where, label, "a whole number")
    low, high = {"width": (8, MAX_SIDE), "height": (8, MAX_SIDE), "steps": (1, MAX_STEPS),
                 "seed": (0, 2**63 - 1)}[field]
    if not low <= number <= high:
        raise ConfigError(f"{label} must be between {low} and {high}, got {raw}", where=where)
    return number


def _number(raw: Any, kind: type, where: str, label: str, expected: str):
    if isinstance(raw, bool):
        raise ConfigError(f"{label} must be {expected}, got {raw!r}", where=where)
    if isinstance(raw, str):
        try:
            return kind(raw.strip())
        except ValueError:
            raise ConfigError(f"{label} must be {expected}, got '{raw.strip()}'", where=where) from None
    if kind is int and isinstance(raw, int):
        return raw
    if kind is float and isinstance(raw, (int, float)):
        return float(raw)
    raise ConfigError(f"{label} must be {expected}, got {raw!r}", where=where)


def _unknown(name: str, known, where: str, prefix: str = "", noun: str = "option") -> ConfigError:
    near = difflib.get_close_matches(name.lower(), list(known), n=1, cutoff=0.5)
    hint = f"did you mean {prefix}{near[0]}?" if near else "known: " + ", ".join(prefix + k for k in known)
    return ConfigError(f"unknown {noun} {prefix}{name}", where=where, hint=hint)


# --- .txt -----------------------------------------------------------------------------------------


def parse_prompt_line(line: str, where: str = "") -> SamplePrompt:
    """One .txt line (no comment, not blank) -> :class:`SamplePrompt`."""
    matches = list(_OPTION.finditer(line))
    prompt = line[: matches[0].start()] if matches else line
    values: dict[str, Any] = {}
    for number, match in enumerate(matches):
        name = match.group(1)
        field = INLINE_OPTIONS.get(name.lower())
        if field is None:
            raise _unknown(name, INLINE_OPTIONS, where, prefix="--")
        end = matches[number + 1].start() if number + 1 < len(matches) else len(line)
        raw = line[match.end():end].strip()
        if field in values:
            raise ConfigError(f"option --{name} is given twice", where=where)
        if not raw:
            raise ConfigError(f"option --{name} has no value", where=where)
        values[field] = _value(field, raw, where, f"--{name}")
    prompt = expand_preset_refs(prompt.strip(), where)
    if not prompt:
        raise ConfigError("no prompt text before the options", where=where,
                          hint="write the prompt first, then options such as --n, --w, --d")
    return SamplePrompt(prompt=prompt, source=where, **values)


def parse_prompt_text(text: str, name: str) -> list[SamplePrompt]:
    """All prompts of a .txt file's ``text``; ``name`` is used in messages (``name:line``)."""
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if line and not line.startswith("#"):
            prompts.append(parse_prompt_line(line, where=f"{name}:{number}"))
    return prompts


# --- .toml / .json --------------------------------------------------------------------------------


def prompt_from_record(record: Any, where: str) -> SamplePrompt:
    """One TOML table / JSON object (or a plain string) -> :class:`SamplePrompt`."""
    if isinstance(record, str):
        record = {"prompt": record}
    if not isinstance(record, Mapping):
        raise ConfigError(f"expected a table of prompt settings, got {record!r}", where=where)
    values: dict[str, Any] = {}
    for key, raw in record.items():
        field = RECORD_KEYS.get(key)
        if field is None:
            raise _unknown(key, RECORD_KEYS, f"{where}.{key}", noun="key")
        values[field] = _value(field, raw, f"{where}.{key}", key)
    if not values.get("prompt"):
        raise ConfigError("has no prompt", where=where, hint='add prompt = "..."')
    return SamplePrompt(source=where, **values)


def prompts_from_toml(data: Mapping, name: str) -> list[SamplePrompt]:
    """``[[prompt]]`` tables, or kohya's ``[prompt]`` defaults + ``[[prompt.subset]]``."""
    extra = [key for key in data if key != "prompt"]
    if extra:
        raise ConfigError(f"unknown top-level key '{extra[0]}'", where=name,
                          hint="write each prompt as a [[prompt]] table")
    tables = data.get("prompt")
    if isinstance(tables, list):
        return [prompt_from_record(table, f"{name}: prompt[{i}]") for i, table in enumerate(tables)]
    if isinstance(tables, Mapping) and isinstance(tables.get("subset"), list):
        defaults = {k: v for k, v in tables.items() if k != "subset"}
        return [prompt_from_record({**defaults, **(sub if isinstance(sub, Mapping) else {"prompt": sub})},
                                   f"{name}: prompt.subset[{i}]")
                for i, sub in enumerate(tables["subset"])]
    raise ConfigError("no prompts found", where=name,
                      hint='write [[prompt]] tables, each with prompt = "..." (or [prompt] with [[prompt.subset]])')


def prompts_from_json(data: Any, name: str) -> list[SamplePrompt]:
    if not isinstance(data, list):
        raise ConfigError("expected a JSON list of prompt objects", where=name,
                          hint='e.g. [{"prompt": "a poster", "seed": 1}]')
    return [prompt_from_record(item, f"{name}: [{i}]") for i, item in enumerate(data)]


def load_prompts(path: str | Path) -> list[SamplePrompt]:
    """Read a sample prompt file (.txt, .toml or .json, by its extension; others are read as .txt)."""
    path = Path(path).expanduser()
    name = str(path)
    if not path.is_file():
        raise ConfigError("sample prompt file not found", where=name,
                          hint="pass --sample_prompts with a .txt, .toml or .json file")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError(f"not UTF-8 text (byte {err.start})", where=name, hint="save it as UTF-8") from None
    suffix = path.suffix.lower()
    if suffix == ".toml":
        import tomllib

        try:
            prompts = prompts_from_toml(tomllib.loads(text), name)
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"invalid TOML: {err}", where=name) from None
    elif suffix == ".json":
        try:
            prompts = prompts_from_json(json.loads(text), name)
        except json.JSONDecodeError as err:
            raise ConfigError(f"invalid JSON: {err.msg}", where=f"{name}:{err.lineno}") from None
    else:
        prompts = parse_prompt_text(text, name)
    if not prompts:
        raise ConfigError("holds no prompts", where=name, hint="write one prompt per line (lines with # are comments)")
    return prompts
