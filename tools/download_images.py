#!/usr/bin/env python
"""Download the images listed in CSV / JSON / JSONL files, many at a time, resumably.

    python tools/download_images.py tvs.csv movies.csv --url_column poster_path \\
        --url_prefix https://image.tmdb.org/t/p/w600_and_h900_bestv2 --output_dir data/raw \\
        --keep_columns name,overview

Each row's URL comes from --url_column; relative values (like TMDB's "/abc.jpg") get --url_prefix in
front. Only http/https URLs are fetched. The file name is --name_column's value or the URL's last
path part, made safe (no folders, no "..") and unique (name_1.jpg, name_2.jpg ...).

A file is saved only when all of it arrived and it decodes as an image (HTML error pages and cut-off
bodies are rejected); it is written to a hidden temp name and renamed at the end, so the folder never
holds a partial file. Files already in --output_dir are skipped, so re-running after an interruption
fetches only what is missing.

The manifest CSV (default OUTPUT_DIR/manifest.csv) has one line per row of the lists:
row, url, file, status, bytes, width, height, and the --keep_columns. Statuses: ok, skipped-existing,
duplicate-url, no-url, bad-url, http-404 (any http-CODE), timeout, connection-error, truncated,
not-an-image, too-large, bad-redirect, too-many-redirects, tls-error, write-error, cancelled.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.cli import run_main  # noqa: E402
from library.download_plan import DownloadJob, PlanOptions, plan_downloads  # noqa: E402
from library.downloader import Downloader, FetchOptions, FetchResult  # noqa: E402
from library.errors import ConfigError  # noqa: E402
from library.fileio import atomic_write_text  # noqa: E402
from library.url_lists import read_url_list  # noqa: E402

MANIFEST_COLUMNS = ("row", "url", "file", "status", "bytes", "width", "height")
SAVED = ("ok", "skipped-existing", "duplicate-url")


@dataclass(frozen=True)
class DownloadArgs:
    inputs: tuple[Path, ...]
    output_dir: Path
    manifest: Path
    plan: PlanOptions
    fetch: FetchOptions
    workers: int
    limit: int | None
    quiet: bool


def parse_bytes(text: str) -> int:
    units = {"K": 1024, "M": 1024**2, "G": 1024**3}
    text = text.strip().upper().removesuffix("B")
    factor = units.get(text[-1:], 1)
    try:
        value = float(text[:-1] if text[-1:] in units else text) * factor
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 5000000, 20M, 1G)") from None
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("inputs", nargs="+", help="list files: .csv, .tsv, .json (list of objects or object of lists), .jsonl")
    add("--output_dir", required=True, help="folder the images go to (created if missing)")
    add("--url_column", default="poster_path", help="column holding the image URL or path (default: poster_path)")
    add("--url_prefix", default="", help="put in front of relative URLs, e.g. https://image.tmdb.org/t/p/original")
    add("--name_column", default=None, help="column holding the file name (default: the URL's last path part)")
    add("--keep_columns", default="", help="comma-separated columns copied into the manifest, e.g. title,overview")
    add("--manifest", default=None, help="manifest CSV path (default: OUTPUT_DIR/manifest.csv)")
    add("--workers", type=int, default=16, help="downloads at the same time (default: 16)")
    add("--timeout", type=float, default=30.0,
        help="seconds to wait for a connection or for more bytes (default: 30)")
    add("--retries", type=int, default=3,
        help="extra tries after a timeout, broken connection, 429 or 5xx; never after a 404 (default: 3)")
    add("--backoff", type=float, default=1.0,
        help="seconds to wait before the first retry, doubled each time (default: 1)")
    add("--max_bytes", type=parse_bytes, default=50_000_000, help="largest file to accept, e.g. 20M (default: 50M)")
    add("--limit", type=int, default=None, help="only the first N rows (to try a list out)")
    add("--insecure", action="store_true", help="do not verify TLS certificates (only for hosts you trust)")
    add("--quiet", action="store_true", help="no progress bar")
    return parser


def parse_args(argv=None) -> DownloadArgs:
    args = build_parser().parse_args(argv)
    for flag, value, low in (("--workers", args.workers, 1), ("--retries", args.retries, 0)):
        if value < low:
            raise ConfigError(f"{flag} must be at least {low}, got {value}")
    if args.timeout <= 0 or args.backoff < 0 or args.max_bytes <= 0:
        raise ConfigError("--timeout and --max_bytes must be > 0 and --backoff >= 0")
    output_dir = Path(args.output_dir)
    keep = tuple(c.strip() for c in args.keep_columns.split(",") if c.strip())
    plan = PlanOptions(args.url_column, args.url_prefix, args.name_column, keep)
    fetch = FetchOptions(args.timeout, args.retries, args.backoff, args.max_bytes, verify_tls=not args.insecure)
    manifest = Path(args.manifest) if args.manifest else output_dir / "manifest.csv"
    inputs = tuple(Path(p) for p in args.inputs)
    return DownloadArgs(inputs, output_dir, manifest, plan, fetch, args.workers, args.limit, args.quiet)


def load_jobs(args: DownloadArgs) -> list[DownloadJob]:
    lists = [read_url_list(path) for path in args.inputs]
    for url_list in lists:
        url_list.require_columns([args.plan.url_column], "--url_column")
        if args.plan.name_column:
            url_list.require_columns([args.plan.name_column], "--name_column")
        url_list.require_columns(list(args.plan.keep_columns), "--keep_columns")
    jobs = plan_downloads(lists, args.plan)
    return jobs[: args.limit] if args.limit is not None else jobs


def download_all(jobs: list[DownloadJob], downloader: Downloader, workers: int, quiet: bool, results: dict) -> None:
    """Fetch every job without a status into ``results`` (by row; filled as they finish)."""
    from tqdm import tqdm

    results.update({job.row: FetchResult(job.status) for job in jobs if job.status})
    todo = [job for job in jobs if not job.status]
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="download")
    try:
        futures = {pool.submit(downloader.download, job): job for job in todo}
        with tqdm(total=len(todo), unit="img", disable=quiet, dynamic_ncols=True) as bar:
            for future in as_completed(futures):
                results[futures[future].row] = future.result()
                bar.update(1)
    except BaseException:
        downloader.stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        pool.shutdown(wait=True)
        downloader.close()
    for job in jobs:  # a repeated URL points at the first row's file
        if job.same_as_row is not None:
            first = results.get(job.same_as_row, FetchResult(""))
            results[job.row] = replace(first, status="duplicate-url", attempts=0)


def manifest_text(jobs: list[DownloadJob], results: dict[int, FetchResult], keep: tuple[str, ...]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(MANIFEST_COLUMNS + keep)
    for job in jobs:
        result = results.get(job.row) or FetchResult("cancelled")
        sizes = [result.bytes or "", result.width or "", result.height or ""]
        writer.writerow([job.row, job.url, result.file, result.status, *sizes, *(v for _, v in job.kept)])
    return buffer.getvalue()


def summary_line(results: dict[int, FetchResult], seconds: float) -> str:
    counts = Counter(result.status for result in results.values())
    retries = sum(max(0, result.attempts - 1) for result in results.values())
    failed = {status: n for status, n in counts.items() if status not in SAVED}
    failed_text = ", ".join(f"{status} {n}" for status, n in sorted(failed.items()))
    return (
        f"downloaded {counts['ok']}, skipped {counts['skipped-existing']} existing and "
        f"{counts['duplicate-url']} repeated URLs, failed {sum(failed.values())}"
        f"{f' ({failed_text})' if failed_text else ''}, {retries} retries, {seconds:.1f} s"
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    jobs = load_jobs(args)
    try:
        args.output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a file where the folder should be, no permission, ...
        raise ConfigError(f"cannot create the output folder ({err.strerror})", where=str(args.output_dir),
                          hint="pass --output_dir a folder path that no file is in the way of") from None
    start = time.perf_counter()
    downloader = Downloader(args.output_dir, args.fetch)
    results: dict[int, FetchResult] = {}
    try:
        download_all(jobs, downloader, args.workers, args.quiet, results)
    finally:  # on Ctrl-C the manifest still records what was done
        atomic_write_text(args.manifest, manifest_text(jobs, results, args.plan.keep_columns))
    print(f"{summary_line(results, time.perf_counter() - start)}; manifest: {args.manifest}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
