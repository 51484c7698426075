#!/usr/bin/env python
"""Merge BLIP captions (.caption files, from finetune/make_captions.py) into a kohya metadata JSON.

    python finetune/merge_captions_to_metadata.py data/posters meta.json [--in_json meta.json] [--full_path]

Each image's ``.caption`` file becomes ``metadata[key]["caption"]``; the JSON is written atomically.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.cli import run_main  # noqa: E402
from library.metadata_merge import build_merge_parser, parse_merge_settings, run_merge  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_merge_parser("caption", ".caption", "caption")
    return run_merge(parse_merge_settings(parser, "caption", argv))


if __name__ == "__main__":
    sys.exit(run_main(main))
