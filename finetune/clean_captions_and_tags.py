#!/usr/bin/env python
"""Tidy the captions and tags in a kohya metadata JSON.

    python finetune/clean_captions_and_tags.py meta.json meta_clean.json

See --help for the exact clean-ups. The output is written atomically; it may be the input file.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.cli import run_main  # noqa: E402
from library.errors import ConfigError  # noqa: E402
from library.metadata import load_metadata, save_metadata  # noqa: E402

CLEANUPS = """\
captions (BLIP sentences):
  - whitespace runs (spaces, tabs, newlines) become one space; leading/trailing spaces and commas go
  - no space before , . ; : ! ?   and runs of commas (", ,") become one comma
  - a word repeated right after itself ("a poster poster") is kept once (case-insensitive)
tags (comma-separated lists):
  - each tag stripped, inner whitespace collapsed; empty tags dropped
  - duplicate tags dropped (the first keeps its place); joined with ", "
entries:
  - a caption or tag list that ends up empty is removed from its entry (kohya would train on ", tags")
  - all other fields (image_size, ...) are kept unchanged; entries are never removed
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Clean the 'caption' and 'tags' fields of a kohya metadata JSON.",
        epilog=CLEANUPS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("in_json", type=Path, help="metadata to read (.json or .jsonl)")
    p.add_argument("out_json", type=Path, help="cleaned metadata to write (.json; may be the same file)")
    p.add_argument("--debug", action="store_true", help="print every caption/tag list that changes")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from library.tag_cleaning import clean_entry

    args = build_parser().parse_args(argv)
    if args.out_json.suffix.lower() == ".jsonl":
        raise ConfigError("out_json is written as one JSON object", where=str(args.out_json), hint="name it .json")
    started = time.perf_counter()
    metadata = load_metadata(args.in_json)
    changed = {"caption": 0, "tags": 0}
    bare = 0
    cleaned_all = {}
    for key, entry in metadata.items():
        cleaned = clean_entry(entry)
        for field in changed:
            if cleaned.get(field) != entry.get(field):
                changed[field] += 1
                if args.debug:
                    print(f"{key} {field}: {entry.get(field)!r} -> {cleaned.get(field)!r}")
        bare += "caption" not in cleaned and "tags" not in cleaned
        cleaned_all[key] = cleaned
    save_metadata(args.out_json, cleaned_all)
    print(
        f"cleaned {len(metadata)} entries: {changed['caption']} captions and {changed['tags']} tag lists changed, "
        f"{bare} entries with neither caption nor tags; wrote {args.out_json} in {time.perf_counter() - started:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
