"""Turn URL-list records into download jobs: full URLs, safe unique file names, what to skip.

Pure functions, no network and no file system: the same list always gives the same plan, so a
re-run maps every row to the same file name (that is what makes resuming work).

File names come from ``--name_column`` or the URL's last path part and are sanitised: only the
last path component is kept (no ``..``, no absolute paths, no drive letters), control and
Windows-reserved characters become ``_``, leading dots go (no hidden files). Names are unique by
*stem*, case-insensitively (``a.jpg`` and ``A.png`` would share ``a.caption``), with ``_1``, ``_2``
... suffixes in row order.
"""

from __future__ import annotations

import os
import unicodedata
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from library.url_lists import UrlList, cell_text

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".avif")
FETCHABLE_SCHEMES = ("http", "https")
_BAD_CHARS = set('<>:"|?*\\/')
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul"} | {f"{p}{i}" for p in ("com", "lpt") for i in range(1, 10)}
_MAX_NAME_BYTES = 180


@dataclass(frozen=True)
class PlanOptions:
    url_column: str = "poster_path"
    url_prefix: str = ""
    name_column: str | None = None
    keep_columns: tuple[str, ...] = ()


@dataclass(frozen=True)
class DownloadJob:
    """One list row. ``status`` is set when the row is settled without fetching (no-url, bad-url,
    duplicate-url); ``suffix`` is '' when the file type is only known after download."""

    row: int
    url: str
    stem: str
    suffix: str
    status: str = ""
    kept: tuple[tuple[str, str], ...] = field(default=())
    same_as_row: int | None = None

    @property
    def name(self) -> str:
        return self.stem + self.suffix


def resolve_url(value: str, prefix: str) -> str:
    """The full URL for a list value: absolute URLs as they are, relative ones after ``prefix``."""
    value = value.strip()
    if not value or "://" in value or value.startswith("//") or not prefix:
        return value
    if prefix.endswith("/") and value.startswith("/"):
        return prefix + value[1:]
    if not prefix.endswith("/") and not value.startswith("/"):
        return prefix + "/" + value
    return prefix + value


def is_fetchable(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme.lower() in FETCHABLE_SCHEMES and bool(parts.hostname)


def sanitize_name(raw: str) -> str:
    """A safe single file name from anything ('' if nothing usable is left)."""
    name = unicodedata.normalize("NFC", raw.replace("\\", "/").split("/")[-1])
    name = "".join("_" if ch in _BAD_CHARS or ord(ch) < 32 or ord(ch) == 127 else ch for ch in name)
    name = name.strip().lstrip(".").rstrip(". ").strip()
    stem, suffix = os.path.splitext(name)
    if stem.lower() in _WINDOWS_RESERVED:
        stem = "_" + stem
    while len((stem + suffix).encode("utf-8")) > _MAX_NAME_BYTES and stem:
        stem = stem[:-1]
    return stem + suffix if stem else ""


def split_image_name(name: str, url: str) -> tuple[str, str]:
    """(stem, suffix): keep an image suffix the name has, else borrow the URL's, else ''."""
    stem, suffix = os.path.splitext(name)
    if suffix.lower() in IMAGE_SUFFIXES:
        return stem, suffix
    url_suffix = os.path.splitext(urlsplit(url).path)[1]
    return name, url_suffix if url_suffix.lower() in IMAGE_SUFFIXES else ""


def _raw_name(record: dict, url: str, options: PlanOptions) -> str:
    if options.name_column and cell_text(record.get(options.name_column)).strip():
        return cell_text(record.get(options.name_column))
    return unquote(urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1]) if url else ""


def _unique_stem(stem: str, taken: set[str]) -> str:
    candidate, counter = stem, 0
    while candidate.lower() in taken:
        counter += 1
        candidate = f"{stem}_{counter}"
    taken.add(candidate.lower())
    return candidate


def plan_downloads(lists: list[UrlList], options: PlanOptions) -> list[DownloadJob]:
    """One job per record of every list, rows numbered from 1 across all lists in order."""
    jobs: list[DownloadJob] = []
    taken: set[str] = set()
    first_row_of_url: dict[str, int] = {}
    row = 0
    for url_list in lists:
        for record in url_list.records:
            row += 1
            kept = tuple((column, cell_text(record.get(column))) for column in options.keep_columns)
            url = resolve_url(cell_text(record.get(options.url_column)), options.url_prefix)
            if not url:
                jobs.append(DownloadJob(row, "", "", "", status="no-url", kept=kept))
                continue
            if not is_fetchable(url):
                jobs.append(DownloadJob(row, url, "", "", status="bad-url", kept=kept))
                continue
            if url in first_row_of_url:
                jobs.append(DownloadJob(row, url, "", "", "duplicate-url", kept, first_row_of_url[url]))
                continue
            first_row_of_url[url] = row
            stem, suffix = split_image_name(sanitize_name(_raw_name(record, url, options)), url)
            stem = _unique_stem(stem or f"row{row}", taken)
            jobs.append(DownloadJob(row, url, stem, suffix, kept=kept))
    return jobs
