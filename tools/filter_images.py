#!/usr/bin/env python
"""Clean a folder of downloaded images with the seed's quality rules and drop duplicates.

    python tools/filter_images.py data/raw --report report.csv --reject_dir data/rejected
    python tools/filter_images.py data/raw --keep_list keep.txt --min_size 768 --dry_run

An image is rejected when (defaults are the seed's rules; 0 turns a rule off):
  too-small         its short side is under --min_size (512)
  too-large         its long side is over --max_size (1024)
  low-kb-per-pixel  file size in KB / (width x height) is under --min_kb_per_pixel (0.0005); SD's own
                    PNGs measure 0.0011-0.0015, so far lower means heavy compression
  low-dpi / no-dpi  its DPI is under --min_dpi (96); files without DPI pass unless --require_dpi
  corrupt           it cannot be read or decoded to the end (truncated downloads, wrong formats)
  duplicate         the same bytes as a better image
  near-duplicate    a perceptual hash within --dedup_distance bits of a better image (re-encoded,
                    resized or slightly edited copies); "better" = more pixels, then more bytes
Duplicates are looked for only among images that pass the other rules, so the copy kept is one you
can train on.

Outputs: --report CSV (path,kept,reasons,width,height,kb_per_pixel,dpi,duplicate_of), --keep_list
(kept paths, one a line) and/or --reject_dir (rejected files are moved there, keeping sub-folders;
nothing is ever deleted or overwritten). --dry_run prints what would happen and writes nothing.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import shutil
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.cli import run_main  # noqa: E402
from library.errors import ConfigError  # noqa: E402
from library.fileio import atomic_write_text, is_temp_name  # noqa: E402
from library.image_quality import ImageFacts, QualityRules, inspect_image  # noqa: E402

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".avif")
REPORT_COLUMNS = ("path", "kept", "reasons", "width", "height", "kb_per_pixel", "dpi", "duplicate_of")


@dataclass(frozen=True)
class FilterArgs:
    folder: Path
    recursive: bool
    rules: QualityRules
    dedup: bool
    dedup_distance: int
    report: Path | None
    keep_list: Path | None
    reject_dir: Path | None
    dry_run: bool
    workers: int
    quiet: bool


@dataclass(frozen=True)
class Decision:
    facts: ImageFacts
    reasons: tuple[str, ...]
    duplicate_of: Path | None = None

    @property
    def kept(self) -> bool:
        return not self.reasons


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("folder", help="folder of images to check")
    add("--recursive", action="store_true", help="also look in sub-folders")
    add("--min_size", type=int, default=512, help="smallest allowed short side in pixels (default: 512)")
    add("--max_size", type=int, default=1024, help="largest allowed long side in pixels (default: 1024)")
    add("--min_kb_per_pixel", type=float, default=0.0005, help="smallest KB / (width x height) (default: 0.0005)")
    add("--min_dpi", type=float, default=96, help="smallest DPI for files that record one (default: 96)")
    add("--require_dpi", action="store_true", help="also reject files that record no DPI")
    add("--dedup_distance", type=int, default=6,
        help="near-duplicates: perceptual hashes at most this many bits apart (of 64; default 6; -1: exact only)")
    add("--keep_duplicates", action="store_true", help="do not look for duplicates at all")
    add("--report", default=None, help="write a CSV with one line per image and why it was kept or not")
    add("--keep_list", default=None, help="write the kept image paths to this text file, one a line")
    add("--reject_dir", default=None, help="move rejected images here (sub-folders kept; never overwrites)")
    add("--dry_run", action="store_true", help="print what would happen; write and move nothing")
    add("--workers", type=int, default=os.cpu_count() or 1, help="files read and hashed at the same time")
    add("--quiet", action="store_true", help="no progress bar")
    return parser


def parse_args(argv=None) -> FilterArgs:
    args = build_parser().parse_args(argv)
    folder = Path(args.folder)
    if not folder.is_dir():
        raise ConfigError("not a folder", where=str(folder))
    if not (args.report or args.keep_list or args.reject_dir or args.dry_run):
        raise ConfigError("nothing to do", hint="give --report, --keep_list or --reject_dir (or --dry_run to look)")
    if min(args.min_size, args.max_size) < 0 or args.min_kb_per_pixel < 0 or args.min_dpi < 0:
        raise ConfigError("size, KB-per-pixel and DPI limits must be >= 0 (0 turns a rule off)")
    if args.max_size and args.min_size > args.max_size:
        raise ConfigError(f"--min_size {args.min_size} is larger than --max_size {args.max_size}")
    if args.workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {args.workers}")
    rules = QualityRules(args.min_size, args.max_size, args.min_kb_per_pixel, args.min_dpi, args.require_dpi)
    optional = [Path(p) if p else None for p in (args.report, args.keep_list, args.reject_dir)]
    return FilterArgs(folder, args.recursive, rules, not args.keep_duplicates, args.dedup_distance, *optional,
                      args.dry_run, args.workers, args.quiet)


def list_images(folder: Path, recursive: bool, exclude: Path | None) -> list[Path]:
    """Image files by suffix, sorted; hidden and temp files and ``exclude`` (the reject folder) skipped."""
    skip: tuple[str, ...] | None = None
    if exclude is not None:
        try:
            skip = exclude.resolve().relative_to(folder.resolve()).parts
        except ValueError:  # the reject folder is somewhere else
            skip = None
    found = []
    for path in folder.rglob("*") if recursive else folder.glob("*"):
        parts = path.relative_to(folder).parts
        if any(part.startswith(".") for part in parts) or is_temp_name(path.name):
            continue
        if skip is not None and parts[: len(skip)] == skip:
            continue
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            found.append(path)
    return sorted(found)


def inspect_all(paths: list[Path], args: FilterArgs) -> list[ImageFacts]:
    from tqdm import tqdm

    with ThreadPoolExecutor(max_workers=args.workers, thread_name_prefix="inspect") as pool:
        jobs = pool.map(lambda p: inspect_image(p, args.rules, hashes=args.dedup), paths)
        return list(tqdm(jobs, total=len(paths), unit="img", disable=args.quiet, dynamic_ncols=True))


def decide(facts: list[ImageFacts], args: FilterArgs) -> list[Decision]:
    from library.dedup import DedupItem, find_duplicates

    passing = [i for i, f in enumerate(facts) if not f.reasons]
    dropped = {}
    if args.dedup:
        items = [
            DedupItem(f.content_hash, f.phash or 0, (-(f.width * f.height), -f.bytes, str(f.path)))
            for f in (facts[i] for i in passing)
        ]
        for k, (kept, why) in find_duplicates(items, args.dedup_distance).items():
            dropped[passing[k]] = (passing[kept], why)
    decisions = []
    for i, fact in enumerate(facts):
        if i in dropped:
            kept, why = dropped[i]
            decisions.append(Decision(fact, (why,), facts[kept].path))
        else:
            decisions.append(Decision(fact, fact.reasons))
    return decisions


def report_text(decisions: list[Decision]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(REPORT_COLUMNS)
    for d in decisions:
        f = d.facts
        kbpp = f"{f.kb_per_pixel:.6g}" if f.kb_per_pixel is not None else ""
        writer.writerow([f.path, int(d.kept), ";".join(d.reasons), f.width or "", f.height or "", kbpp,
                         "" if f.dpi is None else f"{f.dpi:g}", d.duplicate_of or ""])
    return buffer.getvalue()


def free_destination(target: Path) -> Path:
    """``target``, or ``name_1.ext``, ``name_2.ext`` ... if something is already there."""
    candidate, counter = target, 0
    while candidate.exists():
        counter += 1
        candidate = target.with_name(f"{target.stem}_{counter}{target.suffix}")
    return candidate


def move_rejected(decisions: list[Decision], folder: Path, reject_dir: Path) -> int:
    moved = 0
    for d in decisions:
        if d.kept:
            continue
        target = free_destination(reject_dir / d.facts.path.relative_to(folder))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(d.facts.path), str(target))
        moved += 1
    return moved


def summary_line(decisions: list[Decision], seconds: float, action: str) -> str:
    reasons = Counter(reason for d in decisions for reason in d.reasons)
    kept = sum(d.kept for d in decisions)
    why = ", ".join(f"{reason} {n}" for reason, n in reasons.most_common())
    rejected = f"rejected {len(decisions) - kept}" + (f" ({why})" if why else "")
    return f"kept {kept} of {len(decisions)}, {rejected}{action}, {seconds:.1f} s"


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    paths = list_images(args.folder, args.recursive, args.reject_dir)
    decisions = decide(inspect_all(paths, args), args)
    action = ""
    if args.dry_run:
        for d in decisions:
            if not d.kept:
                extra = f" (duplicate of {d.duplicate_of})" if d.duplicate_of else ""
                print(f"would reject {d.facts.path}: {';'.join(d.reasons)}{extra}")
        action = "; dry run: nothing written or moved"
    else:
        if args.report:
            atomic_write_text(args.report, report_text(decisions))
        if args.keep_list:
            atomic_write_text(args.keep_list, "".join(f"{d.facts.path}\n" for d in decisions if d.kept))
        if args.reject_dir:
            action = f"; moved {move_rejected(decisions, args.folder, args.reject_dir)} to {args.reject_dir}"
    print(summary_line(decisions, time.perf_counter() - start, action))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
