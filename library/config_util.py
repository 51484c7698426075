"""kohya's TOML dataset schema: ``[general]`` -> ``[[datasets]]`` -> ``[[datasets.subsets]]``.

Values resolve subset -> dataset -> general -> command-line flag -> default. The result is a tree
of frozen dataclasses; nothing downstream reads the TOML or the argparse namespace again.

Entry points: :func:`load_dataset_config` (a ``.toml`` file, or ``.json`` as kohya also reads),
:func:`config_from_flags` (``--train_data_dir`` / ``--in_json`` without a config file) and
:func:`dump_dataset_config` (TOML text that loads back to an equal config).

Which key goes where (kohya's rules):

* subset only: ``image_dir``, ``metadata_file``, ``is_reg``, ``alpha_mask``;
* dataset or ``[general]``: ``resolution``, ``batch_size``, ``enable_bucket``, ``min_bucket_reso``,
  ``max_bucket_reso``, ``bucket_reso_steps``, ``bucket_no_upscale``, ``validation_split``,
  ``validation_seed``;
* everything else (captions, augmentation, ``num_repeats``, ``caption_extension``, ...) at any level.

A subset with ``metadata_file`` is a fine-tuning subset (``image_dir``, if given, is the root its
image keys are relative to); one with only ``image_dir`` is a folder subset (caption files, with
``class_tokens`` as the fallback caption). One dataset holds one kind only. Relative paths are read
from the **current directory**, as kohya does, not from the config file's folder.

Deliberate differences from kohya, all in the direction of failing early with a clear message:
integers are accepted where numbers are expected; out-of-range values (``validation_split`` of 1,
negative ``keep_tokens``, a dropout rate above 1, ...) are errors, not warnings; ``~`` in paths is
expanded; ``caption_extension = "txt"`` gets its dot; ``network_multiplier``, ``cache_info`` and
``custom_attributes`` are accepted but have no effect (listed in ``extra["ignored_keys"]``).
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import tomllib
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

from library.errors import ConfigError


@dataclass(frozen=True)
class SubsetConfig:
    """One subset: a folder of images with caption files, or a kohya metadata file."""

    image_dir: Path | None = None
    metadata_file: Path | None = None
    num_repeats: int = 1
    shuffle_caption: bool = False
    caption_separator: str = ","
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    secondary_separator: str | None = None
    enable_wildcard: bool = False
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    token_warmup_min: int = 1
    token_warmup_step: float = 0.0
    color_aug: bool = False
    flip_aug: bool = False
    random_crop: bool = False
    face_crop_aug_range: tuple[float, float] | None = None
    resize_interpolation: str | None = None
    alpha_mask: bool = False
    caption_extension: str = ".caption"
    class_tokens: str | None = None
    is_reg: bool = False

    @property
    def is_metadata_subset(self) -> bool:
        return self.metadata_file is not None


@dataclass(frozen=True)
class DatasetConfig:
    """One dataset: shared geometry and batch size for its subsets."""

    subsets: tuple[SubsetConfig, ...]
    resolution: tuple[int, int] = (1024, 1024)  # (width, height)
    batch_size: int = 1
    enable_bucket: bool = True
    min_bucket_reso: int = 256
    max_bucket_reso: int = 2048
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    validation_split: float = 0.0
    validation_seed: int | None = None


@dataclass(frozen=True)
class DatasetsConfig:
    """Everything the data pipeline needs; ``source`` is the TOML file it came from, if any."""

    datasets: tuple[DatasetConfig, ...]
    source: Path | None = None
    extra: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# The schema: which keys exist, at which level, of which kind. Levels follow kohya's
# config_util: subset-only keys ("distinct" in kohya), dataset keys (also allowed in
# [general]), and subset keys that may also be written at dataset or general level.


def _by_kind(table: dict[str, str]) -> dict[str, str]:
    return {name: kind for kind, names in table.items() for name in names.split()}


_SUBSET_ONLY = _by_kind({"path": "image_dir metadata_file", "bool": "is_reg alpha_mask"})
_DATASET_KEYS = _by_kind({
    "resolution": "resolution",
    "int": "batch_size min_bucket_reso max_bucket_reso bucket_reso_steps validation_seed",
    "bool": "enable_bucket bucket_no_upscale",
    "float": "validation_split network_multiplier",
})
_ANY_LEVEL = _by_kind({
    "int": "num_repeats keep_tokens caption_dropout_every_n_epochs token_warmup_min",
    "float": "caption_dropout_rate caption_tag_dropout_rate token_warmup_step",
    "bool": "shuffle_caption enable_wildcard color_aug flip_aug random_crop cache_info",
    "str": "caption_separator keep_tokens_separator secondary_separator caption_prefix caption_suffix "
    "resize_interpolation caption_extension class_tokens",
    "pair": "face_crop_aug_range",
    "table": "custom_attributes",
})
_KINDS = {**_SUBSET_ONLY, **_DATASET_KEYS, **_ANY_LEVEL}
# kohya keys accepted so existing configs run, but with no effect on full fine-tuning.
_IGNORED = ("network_multiplier", "cache_info", "custom_attributes")
# Keys kohya refuses in fine-tuning (metadata) datasets: they describe caption files.
_FOLDER_ONLY = ("caption_extension", "class_tokens", "is_reg", "cache_info")
_FLAG_ALIASES = {"train_batch_size": "batch_size", "dataset_repeats": "num_repeats"}
INTERPOLATIONS = ("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".avif", ".jxl")

_AT_LEAST_ONE = ("num_repeats", "batch_size", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps")
_NOT_NEGATIVE = ("keep_tokens", "caption_dropout_every_n_epochs", "token_warmup_min", "token_warmup_step")
_RATES = ("caption_dropout_rate", "caption_tag_dropout_rate")
_EMPTY_MEANS_NONE = ("secondary_separator", "caption_prefix", "caption_suffix", "class_tokens")
_KIND_TEXT = {
    "bool": "true or false", "int": "an integer", "float": "a number", "str": "a string",
    "path": "a string (a path)", "resolution": "an integer or [width, height]",
    "pair": "[low, high] (two numbers)", "table": "a table",
}  # fmt: skip


def _describe(value: Any) -> str:
    for klass, text in ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string")):
        if isinstance(value, klass):
            shown = str(value).lower() if klass is bool else json.dumps(value, ensure_ascii=False)
            return f"{text} ({shown})"
    return "an array" if isinstance(value, (list, tuple)) else "a table" if isinstance(value, dict) else "a value"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _flag_text(value: str) -> Any:
    """kohya's comma-separated flag values ("1024,768", "2.0,4.0") as a list of numbers."""
    parts = [p.strip() for p in value.split(",")]
    try:
        return [int(p) if p.isdigit() else float(p) for p in parts]
    except ValueError:
        return value


def _type_error(key: str, kind: str, value: Any, where: str) -> ConfigError:
    hint, text = None, value.strip().lower() if isinstance(value, str) else None
    if text is not None and kind == "resolution":
        hint = "write resolution = 1024, or [width, height] such as [832, 1216]"
    elif (kind == "bool" and text in ("true", "false")) or (
        text and kind in ("int", "float") and _flag_text(text) != text
    ):
        hint = f"write {key} = {text} without quotes"
    elif isinstance(value, bool) and kind in ("int", "float"):
        hint = "booleans are not numbers in a dataset config"
    return ConfigError(f"'{key}' must be {_KIND_TEXT[kind]}, got {_describe(value)}", where=where, hint=hint)


def _check_kind(key: str, value: Any, where: str, from_flag: bool) -> Any:
    """Type-check one value and return it normalised (ints as floats, arrays as tuples)."""
    kind = _KINDS[key]
    if from_flag and isinstance(value, str) and kind in ("resolution", "pair"):
        value = _flag_text(value)
    if kind == "resolution" and (_is_int(value) or (isinstance(value, (list, tuple)) and len(value) == 1)):
        value = [value, value] if _is_int(value) else [value[0], value[0]]
    if kind in ("resolution", "pair"):
        item_ok = _is_int if kind == "resolution" else _is_number
        if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(item_ok(v) for v in value)):
            raise _type_error(key, kind, value, where)
        if kind == "resolution" and min(value) < 1:
            raise ConfigError(f"'{key}' must be positive, got {list(value)}", where=where)
        return (value[0], value[1]) if kind == "resolution" else (float(value[0]), float(value[1]))
    ok = {
        "bool": isinstance(value, bool),
        "int": _is_int(value),
        "float": _is_number(value),
        "str": isinstance(value, str),
        "path": isinstance(value, (str, os.PathLike)),
        "table": isinstance(value, dict),
    }[kind]
    if not ok:
        raise _type_error(key, kind, value, where)
    return float(value) if kind == "float" else value


def _check_range(key: str, value: Any, where: str) -> Any:
    """Range checks and small normalisations that need only the one value."""
    problem = None
    if key in _AT_LEAST_ONE and value < 1:
        problem = f"'{key}' must be a positive integer, got {value}"
    elif key in _NOT_NEGATIVE and value < 0:
        problem = f"'{key}' must not be negative, got {value}"
    elif key in _RATES and not 0.0 <= value <= 1.0:
        problem = f"'{key}' must be between 0 and 1, got {value}"
    elif key == "validation_split" and not 0.0 <= value < 1.0:
        problem = f"'validation_split' must be at least 0 and below 1, got {value}"
    elif key == "face_crop_aug_range" and not 0.0 < value[0] <= value[1]:
        problem = f"'face_crop_aug_range' must be [low, high] with 0 < low <= high, got {list(value)}"
    elif key == "resize_interpolation" and value not in INTERPOLATIONS:
        near = difflib.get_close_matches(value, INTERPOLATIONS, n=1)
        hint = f"did you mean '{near[0]}'?" if near else f"use one of: {', '.join(INTERPOLATIONS)}"
        raise ConfigError(f"unknown resize_interpolation '{value}'", where=where, hint=hint)
    elif key in ("caption_separator", "caption_extension") and value == "":
        problem = f"'{key}' must not be empty"
    if problem:
        raise ConfigError(problem, where=where)
    if key == "caption_extension" and not value.startswith("."):
        return "." + value  # kohya users write "txt" as often as ".txt"
    return value


@dataclass(frozen=True)
class _Source:
    """Where values come from, for messages: the name the user gave and the folder paths are read from."""

    name: str
    config_dir: Path | None = None


def _check_path(key: str, value: Any, where: str, src: _Source) -> Path:
    text = os.fspath(value)
    if not text.strip():
        raise ConfigError(f"'{key}' is empty", where=where)
    path = Path(os.path.abspath(os.path.expanduser(text)))
    want_dir = key == "image_dir"
    if path.is_dir() if want_dir else path.is_file():
        return path
    if path.exists():
        kind = "a folder" if want_dir else "a file"
        raise ConfigError(f"{key} '{text}' is not {kind}", where=where)
    hint = f"relative paths are read from the current directory ({Path.cwd()}), as in kohya's sd-scripts"
    if src.config_dir is not None and not Path(text).is_absolute() and (src.config_dir / text).exists():
        hint = (
            f"it exists next to the config file, but relative paths are read from the current directory "
            f"({Path.cwd()}): run from {src.config_dir} or write an absolute path"
        )
    raise ConfigError(f"{key} '{text}' does not exist", where=where, hint=hint)


def _unknown_key(key: str, where: str, candidates) -> ConfigError:
    near = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.6)
    hint = f"did you mean '{near[0]}'?" if near else "see the examples in dataset_configs/ for the valid keys"
    return ConfigError(f"unknown key '{key}'", where=where, hint=hint)


def _check_table(table: Mapping, where: str, level: str, src: _Source) -> dict:
    """Validate one [general], [[datasets]] or [[datasets.subsets]] table; return normalised values."""
    values = {}
    for key, value in table.items():
        if key not in _KINDS:
            raise _unknown_key(key, where, _KINDS)
        if level == "subset" and key in _DATASET_KEYS:
            raise ConfigError(
                f"'{key}' is a dataset setting and cannot go in a subset",
                where=where,
                hint="move it to its [[datasets]] table or to [general]",
            )
        if level != "subset" and key in _SUBSET_ONLY:
            raise ConfigError(
                f"'{key}' belongs in a subset, not in {'[general]' if level == 'general' else 'a dataset'}",
                where=where,
                hint="put it under [[datasets.subsets]]",
            )
        value = _check_kind(key, value, where, from_flag=False)
        if _KINDS[key] == "path":
            values[key] = _check_path(key, value, where, src)
        else:
            values[key] = _check_range(key, value, where)
    return values


def _clean_flags(defaults: Mapping[str, Any] | None) -> dict:
    """The trainer's flag values that count: known keys, not None, kohya's flag names mapped."""
    out: dict = {}
    items = sorted((defaults or {}).items(), key=lambda kv: kv[0] not in _FLAG_ALIASES)  # aliases first
    for name, value in items:
        key = _FLAG_ALIASES.get(name, name)
        if value is None or key not in _KINDS or key in _IGNORED or _KINDS[key] == "path":
            continue
        where = f"command line: --{name}"
        out[key] = _check_range(key, _check_kind(key, value, where, from_flag=True), where)
    return out


def _pick(name: str, layers: list[Mapping], default: Any) -> Any:
    for layer in layers:
        if layer.get(name) is not None:
            return layer[name]
    return default


def _resolve(klass, layers: list[Mapping], **given) -> Any:
    kwargs = dict(given)
    for f in fields(klass):
        if f.name not in kwargs and f.name != "subsets":
            default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
            kwargs[f.name] = _pick(f.name, layers, default)
    return klass(**kwargs)


def _subset_kind(raw: Mapping, where: str) -> str:
    if "metadata_file" in raw:
        return "metadata"
    if "image_dir" in raw:
        return "folder"
    raise ConfigError(
        "a subset needs 'image_dir' (a folder of images with caption files) "
        "or 'metadata_file' (a kohya metadata JSON/JSONL)",
        where=where,
        hint="add one of them to this [[datasets.subsets]] table",
    )


def _check_kinds(kinds: list[str], dataset_vals: Mapping, subset_vals: list[dict], where: str) -> None:
    if len(set(kinds)) > 1:
        folder, meta = kinds.index("folder"), kinds.index("metadata")
        raise ConfigError(
            f"folder subsets (image_dir only) and metadata subsets (metadata_file) cannot be mixed "
            f"in one dataset (subsets[{folder}] and subsets[{meta}])",
            where=where,
            hint="split them into two [[datasets]] tables",
        )
    if kinds[0] != "metadata":
        return
    for key in _FOLDER_ONLY:
        for j, vals in [(None, dataset_vals), *enumerate(subset_vals)]:
            if key in vals:
                at = where if j is None else f"{where}.subsets[{j}]"
                raise ConfigError(
                    f"'{key}' only applies to folder subsets (images with caption files)",
                    where=at,
                    hint="a metadata subset takes its captions from metadata_file; remove the key",
                )


def _check_dataset(ds: DatasetConfig, where: str) -> None:
    lo, hi = ds.min_bucket_reso, ds.max_bucket_reso
    if lo > hi:
        raise ConfigError(f"min_bucket_reso ({lo}) is larger than max_bucket_reso ({hi})", where=where)
    w, h = ds.resolution
    if ds.enable_bucket and not (lo <= min(w, h) and max(w, h) <= hi):
        raise ConfigError(
            f"resolution {w}x{h} does not fit between min_bucket_reso ({lo}) and max_bucket_reso ({hi})",
            where=where,
            hint="lower min_bucket_reso / raise max_bucket_reso, or change resolution",
        )


def _build_dataset(raw: Mapping, i: int, general: dict, flags: dict, src: _Source) -> DatasetConfig:
    where = f"{src.name}: datasets[{i}]"
    if not isinstance(raw, dict):
        raise ConfigError("each dataset must be a table", where=where, hint="write [[datasets]]")
    subsets_raw = raw.get("subsets")
    if not subsets_raw:
        raise ConfigError("dataset has no subsets", where=where, hint="add a [[datasets.subsets]] table")
    if not isinstance(subsets_raw, list) or not all(isinstance(s, dict) for s in subsets_raw):
        raise ConfigError("'subsets' must be an array of tables", where=where, hint="write [[datasets.subsets]]")
    dataset_vals = _check_table({k: v for k, v in raw.items() if k != "subsets"}, where, "dataset", src)
    subset_vals, kinds = [], []
    for j, sub in enumerate(subsets_raw):
        sub_where = f"{where}.subsets[{j}]"
        subset_vals.append(_check_table(sub, sub_where, "subset", src))
        kinds.append(_subset_kind(sub, sub_where))
    _check_kinds(kinds, dataset_vals, subset_vals, where)
    subsets = []
    for vals, kind in zip(subset_vals, kinds):
        sub = _resolve(SubsetConfig, [vals, dataset_vals, general, flags])
        # "" overrides a value from a lower level (as in kohya), then means "none"
        sub = replace(sub, **{k: None for k in _EMPTY_MEANS_NONE if getattr(sub, k) == ""})
        if kind == "metadata":  # kohya's fine-tuning subsets have no caption-file settings
            sub = replace(sub, class_tokens=None, caption_extension=".caption", is_reg=False)
        subsets.append(sub)
    dataset = _resolve(DatasetConfig, [dataset_vals, general, flags], subsets=tuple(subsets))
    _check_dataset(dataset, where)
    return dataset


def _ignored_keys(raw: Mapping) -> tuple[str, ...]:
    found = [f"general.{k}" for k in raw.get("general", {}) if k in _IGNORED]
    for i, ds in enumerate(raw.get("datasets", [])):
        found += [f"datasets[{i}].{k}" for k in ds if k in _IGNORED]
        for j, sub in enumerate(ds.get("subsets", [])):
            found += [f"datasets[{i}].subsets[{j}].{k}" for k in sub if k in _IGNORED]
    return tuple(found)


def _build(raw: Mapping, src: _Source, flags: dict, source: Path | None) -> DatasetsConfig:
    for key in raw:
        if key in ("general", "datasets"):
            continue
        if key in _KINDS:
            raise ConfigError(
                f"'{key}' is outside any table",
                where=src.name,
                hint="put it under [general], [[datasets]] or [[datasets.subsets]]",
            )
        near = difflib.get_close_matches(key, ["general", "datasets"], n=1)
        what = "section" if isinstance(raw[key], (dict, list)) else "key"
        hint = f"did you mean '{near[0]}'?" if near else "a dataset config has [general] and [[datasets]] only"
        raise ConfigError(f"unknown {what} '{key}'", where=src.name, hint=hint)
    general_raw = raw.get("general", {})
    if not isinstance(general_raw, dict):
        raise ConfigError("'general' must be a table", where=src.name, hint="write [general]")
    general = _check_table(general_raw, f"{src.name}: general", "general", src)
    datasets_raw = raw.get("datasets")
    if isinstance(datasets_raw, dict):
        raise ConfigError("'datasets' must be an array of tables", where=src.name, hint="write [[datasets]]")
    if not datasets_raw or not isinstance(datasets_raw, list):
        raise ConfigError("no datasets", where=src.name, hint="add a [[datasets]] table with [[datasets.subsets]]")
    datasets = tuple(_build_dataset(ds, i, general, flags, src) for i, ds in enumerate(datasets_raw))
    ignored = _ignored_keys(raw)
    extra = {"ignored_keys": ignored} if ignored else {}
    return DatasetsConfig(datasets=datasets, source=source, extra=extra)


# --------------------------------------------------------------------------------------------
# Public entry points.

_TOML_AT = re.compile(r"^(.*?)\s*\(at line (\d+), column (\d+)\)$", re.S)


def _read_user_config(path: Path) -> dict:
    name = str(path)
    if not path.is_file():
        raise ConfigError("dataset config not found", where=name, hint=f"current directory is {Path.cwd()}")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError(f"not UTF-8 text (byte {err.start})", where=name, hint="save it as UTF-8") from None
    except OSError as err:
        raise ConfigError(f"cannot read: {err.strerror}", where=name) from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            where = f"{name}: line {err.lineno}, column {err.colno}"
            raise ConfigError(f"invalid JSON: {err.msg}", where=where) from None
        if not isinstance(data, dict):
            raise ConfigError("expected a JSON object with 'general' and 'datasets'", where=name)
        return data
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        found = _TOML_AT.match(str(err))
        where = f"{name}: line {found[2]}, column {found[3]}" if found else name
        message = found[1] if found else str(err)
        raise ConfigError(
            f"invalid TOML: {message}", where=where, hint="check the quotes, brackets and '=' there"
        ) from None


def load_dataset_config(path: str | os.PathLike, defaults: Mapping[str, Any] | None = None) -> DatasetsConfig:
    """Read, validate and resolve a kohya dataset config.

    ``defaults`` are the trainer's command-line values (``{"resolution": "1024,1024",
    "train_batch_size": 4, ...}``, kohya's flag names accepted); only entries that are not None
    count, and they rank below every level of the file. Raises :class:`ConfigError` naming the file,
    the table (``datasets[0].subsets[1]``) and the fix.
    """
    path = Path(path)
    raw = _read_user_config(path)
    absolute = Path(os.path.abspath(path))
    src = _Source(str(path), absolute.parent)
    return _build(raw, src, _clean_flags(defaults), absolute)


_REPEATS_DIR = re.compile(r"^(\d+)(?:_(.*))?$", re.S)


def _flag_path(flag: str, value: Any, want_dir: bool) -> str:
    path = Path(os.path.abspath(os.path.expanduser(os.fspath(value))))
    if path.is_dir() if want_dir else path.is_file():
        return str(path)
    kind = "folder" if want_dir else "file"
    problem = "does not exist" if not path.exists() else f"is not a {kind}"
    raise ConfigError(f"{kind} '{value}' {problem}", where=f"command line: {flag}")


def _folder_layout(base: str, is_reg: bool, flag: str) -> tuple[list[dict], list[str]]:
    """kohya's DreamBooth layout: ``base/10_sks poster/`` -> 10 repeats, class tokens 'sks poster'."""
    subsets, skipped = [], []
    children = sorted(Path(base).iterdir())
    for sub in (p for p in children if p.is_dir() and not p.name.startswith(".")):
        found = _REPEATS_DIR.match(sub.name)
        if not found or int(found[1]) < 1:
            skipped.append(str(sub))  # kohya ignores folders without a repeat count
            continue
        entry: dict = {"image_dir": str(sub), "num_repeats": int(found[1]), "is_reg": is_reg}
        if found[2]:
            entry["class_tokens"] = found[2]
        subsets.append(entry)
    if not subsets and any(p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS for p in children):
        subsets.append({"image_dir": base, "is_reg": is_reg})  # plain folder of images: 1 repeat
    if not subsets:
        raise ConfigError(
            f"no 'N_name' subfolders and no images in '{base}'",
            where=f"command line: {flag}",
            hint="kohya's layout is DIR/10_sks poster/*.png (10 = repeats, 'sks poster' = class tokens); "
            "or pass --in_json with a metadata file, or --dataset_config",
        )
    return subsets, skipped


def config_from_flags(
    train_data_dir: str | os.PathLike | None = None,
    in_json: str | os.PathLike | None = None,
    defaults: Mapping[str, Any] | None = None,
    reg_data_dir: str | os.PathLike | None = None,
) -> DatasetsConfig:
    """The one-dataset config kohya builds from flags when there is no ``--dataset_config``.

    ``in_json`` -> one metadata subset whose image root is ``train_data_dir``. ``train_data_dir``
    alone -> kohya's folder layout: each ``N_class tokens`` subfolder is a subset with N repeats
    (``reg_data_dir`` the same with ``is_reg``); other subfolders are skipped as kohya does and
    listed in ``extra["skipped_folders"]``. A folder holding images directly (no ``N_`` subfolders)
    is one subset with 1 repeat (``--dataset_repeats``), where kohya would find nothing.
    """
    extra: dict = {}
    if in_json is not None:
        if reg_data_dir is not None:
            raise ConfigError("--reg_data_dir works with folder datasets only", where="command line: --in_json")
        subset = {"metadata_file": _flag_path("--in_json", in_json, want_dir=False)}
        if train_data_dir is not None:
            subset["image_dir"] = _flag_path("--train_data_dir", train_data_dir, want_dir=True)
        subsets = [subset]
    elif train_data_dir is not None:
        base = _flag_path("--train_data_dir", train_data_dir, want_dir=True)
        subsets, skipped = _folder_layout(base, False, "--train_data_dir")
        if reg_data_dir is not None:
            reg_base = _flag_path("--reg_data_dir", reg_data_dir, want_dir=True)
            reg_subsets, reg_skipped = _folder_layout(reg_base, True, "--reg_data_dir")
            subsets, skipped = subsets + reg_subsets, skipped + reg_skipped
        if skipped:
            extra["skipped_folders"] = tuple(skipped)
    else:
        raise ConfigError(
            "no training data given",
            hint="pass --dataset_config FILE.toml, or --train_data_dir DIR (with --in_json META.json)",
        )
    cfg = _build({"datasets": [{"subsets": subsets}]}, _Source("command line"), _clean_flags(defaults), None)
    return replace(cfg, extra={**cfg.extra, **extra})


def toml_value(value: Any) -> str:
    """One value as TOML text (bool, number, string/path, list/tuple, dict); also used by train_args."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, Path)):
        return json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def dump_dataset_config(cfg: DatasetsConfig) -> str:
    """TOML text with every value explicit (absolute paths) that loads back to equal datasets."""
    lines = ["# Dataset config written by sdxl-poster: every value explicit, paths absolute.", ""]
    for ds in cfg.datasets:
        lines.append("[[datasets]]")
        for f in fields(DatasetConfig):
            value = getattr(ds, f.name)
            if f.name != "subsets" and value is not None:
                lines.append(f"{f.name} = {toml_value(value)}")
        for sub in ds.subsets:
            lines += ["", "  [[datasets.subsets]]"]
            for f in fields(SubsetConfig):
                value = getattr(sub, f.name)
                if value is None or (sub.is_metadata_subset and f.name in _FOLDER_ONLY):
                    continue
                lines.append(f"  {f.name} = {toml_value(value)}")
        lines.append("")
    return "\n".join(lines)
