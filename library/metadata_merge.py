"""Merge side-car caption/tag files into kohya metadata (shared by the two finetune/merge_* tools)."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from library.caption_files import image_keys, list_images, normalize_extension, read_text_file, sidecar_path
from library.errors import ConfigError
from library.metadata import Metadata, load_metadata, save_metadata


@dataclass(frozen=True)
class MergeSettings:
    folder: Path
    out_json: Path
    in_json: Path | None
    extension: str
    full_path: bool
    recursive: bool
    field: str  # "caption" or "tags"


def build_merge_parser(field: str, default_extension: str, what: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=f"Collect the {what} files next to the images in a folder into a kohya metadata JSON "
        f"({{image_key: {{\"{field}\": ...}}}}). Keys are file names without extension, or image paths with "
        "--full_path. With --in_json the existing entries are kept and only their "
        f"'{field}' is replaced; images without a {default_extension} file are left out (and counted).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("train_data_dir", type=Path, help="folder of images with their side-car files")
    p.add_argument("out_json", type=Path, help="metadata JSON to write (written atomically; may equal --in_json)")
    p.add_argument("--in_json", type=Path, default=None, help="existing metadata (.json or .jsonl) to extend")
    p.add_argument("--caption_extension", "--caption_extention", dest="caption_extension",
                   default=default_extension, help=f"extension of the {what} files")
    p.add_argument("--full_path", action="store_true",
                   help="key entries by image path as found under train_data_dir (pass an absolute folder for "
                   "absolute keys) instead of the file name without extension")
    p.add_argument("--recursive", action="store_true", help="also read images in sub-folders")
    return p


def parse_merge_settings(parser: argparse.ArgumentParser, field: str, argv: Sequence[str] | None) -> MergeSettings:
    a = parser.parse_args(argv)
    if a.out_json.suffix.lower() == ".jsonl":
        raise ConfigError("out_json is written as one JSON object", where=str(a.out_json), hint="name it .json")
    return MergeSettings(
        folder=a.train_data_dir, out_json=a.out_json, in_json=a.in_json,
        extension=normalize_extension(a.caption_extension), full_path=a.full_path, recursive=a.recursive, field=field,
    )


def merge_sidecars(metadata: Metadata, settings: MergeSettings) -> dict:
    """Put each image's side-car text into ``metadata[key][field]`` (in place); returns counts."""
    from tqdm import tqdm

    images = list_images(settings.folder, settings.recursive)
    keys = image_keys(images, settings.full_path)  # same-key clashes fail here, before anything is written
    counts = {"images": len(images), "merged": 0, "new": 0, "missing": 0, "empty": 0}
    for image, key in tqdm(zip(images, keys), total=len(images), unit="img", desc=f"reading {settings.extension}"):
        path = sidecar_path(image, settings.extension)
        if not path.is_file():
            counts["missing"] += 1
            continue
        text = read_text_file(path)
        counts["empty"] += not text
        counts["new"] += key not in metadata
        metadata.setdefault(key, {})[settings.field] = text
        counts["merged"] += 1
    return counts


def run_merge(settings: MergeSettings) -> int:
    started = time.perf_counter()
    metadata = load_metadata(settings.in_json) if settings.in_json else {}
    before = len(metadata)
    counts = merge_sidecars(metadata, settings)
    save_metadata(settings.out_json, metadata)
    print(
        f"merged {counts['merged']} {settings.extension} files of {counts['images']} images "
        f"({counts['new']} new entries, {counts['merged'] - counts['new']} updated, {counts['empty']} empty), "
        f"{counts['missing']} images without a {settings.extension} file; {settings.out_json} has "
        f"{len(metadata)} entries (was {before}), in {time.perf_counter() - started:.1f} s"
    )
    if counts["missing"]:
        print(f"note: {counts['missing']} images have no {settings.extension} file and were left out", file=sys.stderr)
    return 0
