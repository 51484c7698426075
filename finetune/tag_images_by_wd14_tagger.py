#!/usr/bin/env python
"""Tag a folder of images with a WD14 tagger (ONNX on onnxruntime); one tag file per image.

    python finetune/tag_images_by_wd14_tagger.py data/posters --batch_size 8 --remove_underscore

Writes ``poster.txt`` next to ``poster.png`` holding e.g. ``1girl, solo, long hair, text``. The model is
``MODEL_DIR/<repo_id with / as _>/model.onnx`` plus ``selected_tags.csv`` (kohya's --model_dir layout);
missing files are downloaded from the Hugging Face Hub unless HF_HUB_OFFLINE is set.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.caption_files import (  # noqa: E402
    list_images,
    load_rgb_on_white,
    normalize_extension,
    read_text_file,
    sidecar_path,
    write_text_file,
)
from library.cli import run_main  # noqa: E402
from library.errors import ConfigError, DataError, ModelError  # noqa: E402
from library.wd14 import TagOptions, parse_tag_list  # noqa: E402

DEFAULT_REPO_ID = "SmilingWolf/wd-v1-4-convnext-tagger-v2"
MODEL_FILES = ("model.onnx", "selected_tags.csv")


@dataclass(frozen=True)
class TaggerSettings:
    folder: Path
    model_folder: Path
    repo_id: str
    force_download: bool
    batch_size: int
    recursive: bool
    caption_extension: str
    caption_separator: str
    append_tags: bool
    tags: TagOptions


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Tag every image in a folder with a WD14 tagger and write one tag file per image "
        "(poster.png -> poster.txt). Tags are written in model order: general tags, then character tags.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("train_data_dir", type=Path, help="folder of images to tag")
    p.add_argument("--repo_id", default=DEFAULT_REPO_ID, help="Hugging Face repo of the tagger")
    p.add_argument("--model_dir", type=Path, default=Path("wd14_tagger_model"),
                   help="models live in MODEL_DIR/<repo_id with / replaced by _>/ (model.onnx, selected_tags.csv)")
    p.add_argument("--force_download", action="store_true", help="download the model files even if present")
    p.add_argument("--batch_size", type=int, default=1, help="images per model call")
    p.add_argument("--caption_extension", "--caption_extention", dest="caption_extension", default=".txt",
                   help="extension of the tag files written next to the images")
    p.add_argument("--recursive", action="store_true", help="also tag images in sub-folders")
    p.add_argument("--thresh", type=float, default=0.35, help="probability at or above which a tag is kept")
    p.add_argument("--general_threshold", type=float, default=None, help="threshold for general tags (default: --thresh)")
    p.add_argument("--character_threshold", type=float, default=None,
                   help="threshold for character tags (default: --thresh)")
    p.add_argument("--undesired_tags", default="", help="tags never written, separated like --caption_separator")
    p.add_argument("--use_rating_tags", action="store_true",
                   help="write the most probable rating tag (general/sensitive/questionable/explicit) first")
    p.add_argument("--use_rating_tags_as_last_tag", action="store_true", help="like --use_rating_tags, but last")
    p.add_argument("--character_tags_first", action="store_true", help="write character tags before general tags")
    p.add_argument("--always_first_tags", default=None,
                   help="tags moved to the front when present, in this order (e.g. '1girl,1boy')")
    p.add_argument("--remove_underscore", action="store_true",
                   help="long_hair -> long hair (tags of 3 characters or fewer, like ^_^, are kept)")
    p.add_argument("--caption_separator", default=", ", help="text between tags in the written file")
    p.add_argument("--append_tags", action="store_true",
                   help="keep the tags already in an existing tag file and add the new ones after them")
    return p


def parse_settings(argv: Sequence[str] | None) -> TaggerSettings:
    args = build_parser().parse_args(argv)
    general = args.thresh if args.general_threshold is None else args.general_threshold
    character = args.thresh if args.character_threshold is None else args.character_threshold
    for flag, value in (("--thresh", args.thresh), ("--general_threshold", general), ("--character_threshold", character)):
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{flag} must be between 0 and 1, got {value}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch_size must be at least 1, got {args.batch_size}")
    if not args.caption_separator.strip() and args.caption_separator != " ":
        raise ConfigError("--caption_separator must not be empty", hint="the default is ', '")
    sep = args.caption_separator
    options = TagOptions(
        general_threshold=general,
        character_threshold=character,
        undesired_tags=frozenset(parse_tag_list(args.undesired_tags, sep, args.remove_underscore)),
        use_rating_tags=args.use_rating_tags or args.use_rating_tags_as_last_tag,
        rating_tags_last=args.use_rating_tags_as_last_tag,
        character_tags_first=args.character_tags_first,
        always_first_tags=parse_tag_list(args.always_first_tags, sep, args.remove_underscore),
        remove_underscore=args.remove_underscore,
    )
    return TaggerSettings(
        folder=args.train_data_dir,
        model_folder=args.model_dir / args.repo_id.replace("/", "_"),
        repo_id=args.repo_id,
        force_download=args.force_download,
        batch_size=args.batch_size,
        recursive=args.recursive,
        caption_extension=normalize_extension(args.caption_extension),
        caption_separator=sep,
        append_tags=args.append_tags,
        tags=options,
    )


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def ensure_model_files(folder: Path, repo_id: str, force_download: bool = False) -> tuple[Path, Path]:
    """``(model.onnx, selected_tags.csv)`` in ``folder``, downloading what is missing when online."""
    missing = [n for n in MODEL_FILES if force_download or not (folder / n).is_file()]
    if missing:
        hint = f"put model.onnx and selected_tags.csv from https://huggingface.co/{repo_id} in this folder"
        if _hub_offline():
            raise ModelError(f"{' and '.join(missing)} not found (HF_HUB_OFFLINE is set)", where=str(folder), hint=hint)
        from huggingface_hub import hf_hub_download

        for name in missing:
            print(f"downloading {name} from {repo_id} to {folder}", file=sys.stderr)
            try:
                hf_hub_download(repo_id=repo_id, filename=name, local_dir=folder, force_download=force_download)
            except Exception as err:  # network, auth, missing repo: all things the user must fix
                raise ModelError(
                    f"cannot download {name} from {repo_id} ({type(err).__name__}: {err})", where=str(folder), hint=hint
                ) from None
    return folder / MODEL_FILES[0], folder / MODEL_FILES[1]


def open_session(model_path: Path):
    """An onnxruntime session (CUDA when available) and the square input size it expects."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    try:
        session = ort.InferenceSession(str(model_path), providers=providers)
    except Exception as err:  # onnxruntime raises its own exception types for bad files
        raise ModelError(f"cannot load the ONNX model ({err})", where=str(model_path)) from None
    shape = session.get_inputs()[0].shape
    if len(shape) != 4 or not isinstance(shape[1], int) or shape[1] != shape[2] or shape[3] != 3:
        raise ModelError(
            f"input shape {shape} is not a square NHWC RGB image", where=str(model_path),
            hint="expected a WD14 tagger exported to ONNX",
        )
    return session, shape[1]


def _merge_existing(path: Path, tags: list[str], settings: TaggerSettings) -> list[str]:
    if not (settings.append_tags and path.is_file()):
        return tags
    existing = parse_tag_list(read_text_file(path), settings.caption_separator)
    return list(dict.fromkeys([*existing, *tags]))


def tag_folder(settings: TaggerSettings) -> dict:
    """Tag every image; returns counts and the failed files. Unreadable images do not stop the run."""
    import numpy as np
    from tqdm import tqdm

    from library.wd14 import check_batch_output, load_selected_tags, preprocess_image, select_tags

    images = list_images(settings.folder, settings.recursive)
    if not images:
        return {"images": 0, "written": 0, "failed": []}
    model_path, tags_path = ensure_model_files(settings.model_folder, settings.repo_id, settings.force_download)
    table = load_selected_tags(tags_path)
    session, size = open_session(model_path)
    input_name = session.get_inputs()[0].name
    written, failed = 0, []
    with tqdm(total=len(images), unit="img", desc="tagging") as bar:
        for start in range(0, len(images), settings.batch_size):
            batch, arrays = [], []
            for path in images[start : start + settings.batch_size]:
                try:
                    arrays.append(preprocess_image(load_rgb_on_white(path), size))
                    batch.append(path)
                except DataError as err:
                    failed.append(err.one_line())
            if batch:
                probs = check_batch_output(session.run(None, {input_name: np.stack(arrays)})[0], len(batch), model_path)
                for path, row in zip(batch, probs):
                    out = sidecar_path(path, settings.caption_extension)
                    tags = _merge_existing(out, select_tags(row, table, settings.tags), settings)
                    write_text_file(out, settings.caption_separator.join(tags))
                    written += 1
            bar.update(len(images[start : start + settings.batch_size]))
    return {"images": len(images), "written": written, "failed": failed}


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_settings(argv)
    started = time.perf_counter()
    result = tag_folder(settings)
    for line in result["failed"]:
        print(f"unreadable image: {line}", file=sys.stderr)
    print(
        f"tagged {result['written']} of {result['images']} images, failed {len(result['failed'])}, "
        f"in {time.perf_counter() - started:.1f} s"
    )
    return 1 if result["failed"] and not result["written"] else 0


if __name__ == "__main__":
    sys.exit(run_main(main))
