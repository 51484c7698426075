"""Score a folder of model folders: ``tools/evaluate.py score``.

``IMAGES_ROOT/<model>/*.png`` -> ``OUTPUT/per_image/<model>.csv`` (ClipScore, LAIONScore, ImageIndex,
File, Prompt) and ``OUTPUT/summary.csv`` (one row per model, the seed's columns). Models already in the
summary are skipped unless ``rescore``. The prompt of an image comes from ``IMAGES_ROOT/manifest.csv``
when it lists the file, else from the prompt file at the image name's prompt index.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from library.errors import DataError
from library.evaluation.prompts import load_manifest, load_prompts, prompt_index_from_name
from library.evaluation.stats import PER_IMAGE_COLUMNS, merge_summary, read_summary, summarize_model, write_csv
from library.fileio import is_temp_name

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class ScoreOptions:
    images_root: Path
    output_dir: Path
    prompts: Path | None = None
    clip_model: str = "openai/clip-vit-large-patch14"
    aesthetic_model: str | None = None
    batch_size: int = 16
    device: str = "auto"
    clip_score_scale: float | None = None
    rescore: bool = False
    progress: bool = True


@dataclass
class ScoreOutcome:
    scored: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    unreadable_images: int = 0
    seconds: float = 0.0

    def one_line(self) -> str:
        return (f"scored {len(self.scored)} model(s), skipped {len(self.skipped)} already in the summary, "
                f"failed {len(self.failed)}; {self.unreadable_images} unreadable image(s); {self.seconds:.1f}s")


def _natural_key(name: str):
    import re

    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def model_folders(images_root: Path, output_dir: Path) -> list[Path]:
    if not images_root.is_dir():
        raise DataError("images root is not a folder", where=str(images_root),
                        hint="pass --images_root with one sub-folder of images per model")
    skip = output_dir.resolve()
    folders = [p for p in images_root.iterdir()
               if p.is_dir() and not p.name.startswith((".", "_")) and p.resolve() != skip]
    if not folders:
        raise DataError("images root has no model sub-folders", where=str(images_root),
                        hint="put each model's images in IMAGES_ROOT/<model>/")
    return sorted(folders, key=lambda p: _natural_key(p.name))


def list_images(folder: Path) -> list[Path]:
    files = [p for p in folder.iterdir()
             if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not is_temp_name(p.name)]
    return sorted(files, key=lambda p: _natural_key(p.name))


class PromptLookup:
    """Prompt text for an image file: the manifest first, then the prompt list by name index."""

    def __init__(self, images_root: Path, prompts_file: Path | None):
        self.images_root = images_root
        self.manifest = load_manifest(images_root / "manifest.csv")
        self.prompts_file = prompts_file
        self.prompts = load_prompts(prompts_file) if prompts_file else None

    def __call__(self, path: Path) -> str:
        row = self.manifest.get(path.relative_to(self.images_root).as_posix())
        if row is not None:
            return str(row["prompt"])
        if self.prompts is None:
            raise DataError("image is not in manifest.csv and no prompt file was given", where=str(path),
                            hint="pass --prompts with the prompt list used to generate the images")
        index = prompt_index_from_name(path.name)
        if index is None:
            raise DataError("file name has no prompt index (expected <model>-<prompt_index>-<n>.png)",
                            where=str(path), hint="rename the file or list it in manifest.csv")
        if index >= len(self.prompts):
            raise DataError(f"prompt index {index} but the prompt file has {len(self.prompts)} prompts",
                            where=str(path), hint=f"check --prompts ({self.prompts_file})")
        return self.prompts[index]


def _collect(folder: Path, lookup: PromptLookup, warn: Callable[[str], None]):
    """``(files, prompts)`` of one model folder, or None (with a message) when it has no images."""
    try:
        files = list_images(folder)
    except OSError as err:
        warn(f"model '{folder.name}': cannot read folder {folder} ({err.strerror}); skipped")
        return None
    if not files:
        warn(f"model '{folder.name}': no images in {folder} (looked for {', '.join(IMAGE_SUFFIXES)}); skipped")
        return None
    return files, [lookup(path) for path in files]


def _score_one_model(scorer, name: str, files: list[Path], prompts: list[str], options: ScoreOptions,
                     outcome: ScoreOutcome, warn: Callable[[str], None]):
    """Per-image table for one model, or None (with a message) when no image could be read."""
    import pandas as pd
    from tqdm import tqdm

    with tqdm(total=len(files), desc=name, unit="img", disable=not options.progress, leave=False) as bar:
        results, failed = scorer.score_files(files, prompts, on_batch=bar.update)
    for path, reason in failed:
        warn(f"model '{name}': cannot read image {path} ({reason}); left out")
    outcome.unreadable_images += len(failed)
    rows = [(results[p][0], results[p][1], p.name, prompt) for p, prompt in zip(files, prompts) if p in results]
    if not rows:
        warn(f"model '{name}': none of its {len(files)} images could be read; skipped")
        return None
    frame = pd.DataFrame(rows, columns=["ClipScore", "LAIONScore", "File", "Prompt"])
    frame.insert(2, "ImageIndex", range(1, len(frame) + 1))
    return frame[PER_IMAGE_COLUMNS]


def run_score(options: ScoreOptions, warn: Callable[[str], None] | None = None) -> ScoreOutcome:
    """Score every model folder not yet in the summary; write per-image CSVs, summary and report."""
    from library.evaluation.report import write_report
    from library.evaluation.scoring import Scorer

    warn = warn or (lambda message: print(message, file=sys.stderr))
    start = time.time()
    outcome = ScoreOutcome()
    folders = model_folders(options.images_root, options.output_dir)
    summary_path = options.output_dir / "summary.csv"
    summary = read_summary(summary_path)
    done = set() if options.rescore else set(summary["Model"])
    outcome.skipped = [folder.name for folder in folders if folder.name in done]
    todo = [folder for folder in folders if folder.name not in done]
    if not todo:
        warn("There are no models to analyze (all are in the summary; use --rescore to score them again).")
    lookup = PromptLookup(options.images_root, options.prompts) if todo else None
    work = []  # every prompt is resolved before the (slow) model load, so a bad prompt file fails fast
    for folder in todo:
        collected = _collect(folder, lookup, warn)
        if collected is None:
            outcome.failed.append(folder.name)
        else:
            work.append((folder.name, *collected))
    if work:
        scorer = Scorer(options.clip_model, options.aesthetic_model, options.device, options.batch_size,
                        options.clip_score_scale)
    for name, files, prompts in work:
        frame = _score_one_model(scorer, name, files, prompts, options, outcome, warn)
        if frame is None:
            outcome.failed.append(name)
            continue
        write_csv(frame, options.output_dir / "per_image" / f"{name}.csv")
        summary = merge_summary(summary, [summarize_model(name, frame)])
        write_csv(summary, summary_path)  # after every model: an interrupted run resumes from here
        outcome.scored.append(name)
    if not summary.empty:
        write_report(options.output_dir, options.images_root)
    outcome.seconds = time.time() - start
    return outcome
