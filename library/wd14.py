"""The WD14 tagger's pure parts: its tag list, its image preprocessing and tag selection.

SmilingWolf's WD14 ONNX taggers take a batch of square BGR images, float32 in 0-255, laid out NHWC,
and return one probability per row of ``selected_tags.csv`` (``tag_id,name,category,count``;
category 9 = rating, 0 = general, 4 = character). Nothing here loads a model, so it is all
unit-testable with arrays.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from library.errors import ModelError

CATEGORY_GENERAL = 0
CATEGORY_CHARACTER = 4
CATEGORY_RATING = 9


@dataclass(frozen=True)
class TagTable:
    """The model's output rows: tag names and their categories, in output order."""

    names: tuple[str, ...]
    categories: tuple[int, ...]

    def indices(self, category: int) -> list[int]:
        return [i for i, c in enumerate(self.categories) if c == category]


def load_selected_tags(path: Path) -> TagTable:
    """Read ``selected_tags.csv``; a missing column or a bad category names the file and line."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
            header = rows[0].keys() if rows else []
    except FileNotFoundError:
        raise ModelError("selected_tags.csv not found", where=str(path)) from None
    except (UnicodeDecodeError, csv.Error) as err:
        raise ModelError(f"cannot read the tag list ({err})", where=str(path)) from None
    if not rows or "name" not in header or "category" not in header:
        raise ModelError(
            "expected a CSV with columns tag_id,name,category,count and at least one row", where=str(path)
        )
    names, categories = [], []
    for line_no, row in enumerate(rows, start=2):
        try:
            categories.append(int(row["category"]))
        except (TypeError, ValueError):
            raise ModelError(f"line {line_no}: category {row['category']!r} is not a number", where=str(path)) from None
        names.append((row["name"] or "").strip())
    return TagTable(tuple(names), tuple(categories))


def preprocess_image(image: Image.Image, size: int) -> np.ndarray:
    """RGB image -> ``(size, size, 3)`` float32 BGR in 0-255: padded to a centred square with white,
    then resized (area averaging when shrinking, bicubic when enlarging)."""
    width, height = image.size
    side = max(width, height)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(image.convert("RGB"), ((side - width) // 2, (side - height) // 2))
    if side != size:
        resample = Image.Resampling.BOX if side > size else Image.Resampling.BICUBIC
        square = square.resize((size, size), resample)
    rgb = np.asarray(square, dtype=np.float32)
    return np.ascontiguousarray(rgb[:, :, ::-1])


@dataclass(frozen=True)
class TagOptions:
    """How probabilities become a tag line (kohya's tag_images_by_wd14_tagger options)."""

    general_threshold: float = 0.35
    character_threshold: float = 0.35
    undesired_tags: frozenset[str] = frozenset()
    use_rating_tags: bool = False
    rating_tags_last: bool = False
    character_tags_first: bool = False
    always_first_tags: tuple[str, ...] = ()
    remove_underscore: bool = False


def display_name(tag: str, remove_underscore: bool) -> str:
    """``long_hair`` -> ``long hair`` with ``remove_underscore``; tags of 3 characters or fewer
    (emoticons like ``^_^``) keep their underscores, as kohya does."""
    return tag.replace("_", " ") if remove_underscore and len(tag) > 3 else tag


def select_tags(probs: np.ndarray, table: TagTable, options: TagOptions) -> list[str]:
    """The tags of one image, in the order they are written.

    General and character tags at or above their threshold, each group in the model's output order;
    with ``character_tags_first`` characters come before general tags. With ``use_rating_tags`` the
    most probable rating tag goes first (or last with ``rating_tags_last``). Then undesired tags are
    removed, duplicates dropped, and ``always_first_tags`` that are present move to the front in
    the order given. Names are compared after ``remove_underscore``.
    """
    if probs.shape != (len(table.names),):
        raise ModelError(
            f"the model gives {probs.shape[-1]} outputs but selected_tags.csv lists {len(table.names)} tags",
            hint="model.onnx and selected_tags.csv must come from the same tagger",
        )

    def name(i: int) -> str:
        return display_name(table.names[i], options.remove_underscore)

    general = [name(i) for i in table.indices(CATEGORY_GENERAL) if probs[i] >= options.general_threshold]
    character = [name(i) for i in table.indices(CATEGORY_CHARACTER) if probs[i] >= options.character_threshold]
    tags = character + general if options.character_tags_first else general + character
    ratings = table.indices(CATEGORY_RATING)
    if options.use_rating_tags and ratings:
        best = name(max(ratings, key=lambda i: probs[i]))
        tags = tags + [best] if options.rating_tags_last else [best] + tags
    tags = [t for t in dict.fromkeys(tags) if t and t not in options.undesired_tags]
    for first in reversed(options.always_first_tags):
        if first in tags:
            tags.remove(first)
            tags.insert(0, first)
    return tags


def parse_tag_list(text: str | None, separator: str, remove_underscore: bool = False) -> tuple[str, ...]:
    """``"a, b_c"`` -> ``("a", "b_c")``, split by the separator (stripped) and by commas."""
    if not text:
        return ()
    seps = {separator.strip() or ",", ","}
    parts = [text]
    for sep in seps:
        parts = [piece for part in parts for piece in part.split(sep)]
    cleaned = (display_name(p.strip(), remove_underscore) for p in parts)
    return tuple(dict.fromkeys(p for p in cleaned if p))


def check_batch_output(output: np.ndarray, batch: int, model_path: Path) -> np.ndarray:
    """The model's output as ``(batch, tags)`` floats, or a :class:`ModelError` if it has another shape."""
    array = np.asarray(output, dtype=np.float32)
    if array.ndim != 2 or array.shape[0] != batch:
        raise ModelError(
            f"unexpected output shape {tuple(array.shape)} for a batch of {batch}",
            where=str(model_path),
            hint="expected a WD14 tagger: NHWC image in, one probability per tag out",
        )
    return array
