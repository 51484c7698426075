#!/usr/bin/env python
"""Merge WD14 tags (.txt files, from finetune/tag_images_by_wd14_tagger.py) into a kohya metadata JSON.

    python finetune/merge_dd_tags_to_metadata.py data/posters meta.json [--in_json meta.json] [--full_path]

Each image's ``.txt`` file becomes ``metadata[key]["tags"]``; the JSON is written atomically.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.cli import run_main  # noqa: E402
from library.metadata_merge import build_merge_parser, parse_merge_settings, run_merge  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_merge_parser("tags", ".txt", "tag")
    return run_merge(parse_merge_settings(parser, "tags", argv))


if __name__ == "__main__":
    sys.exit(run_main(main))
