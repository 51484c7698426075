"""Caption text: reading caption files and metadata, and kohya's per-step caption transforms.

Everything here is a pure function. The randomness of :func:`process_caption` comes from a
``random.Random`` seeded by ``(seed, epoch, image_key, global_step)``, so a resumed run sees the same
caption for the same image at the same step, and the repeats of one image in one epoch differ.

Order of operations (kohya's ``process_caption`` in ``train_util.py``):

1. whole-caption dropout: ``caption_dropout_rate`` or every ``caption_dropout_every_n_epochs``-th
   epoch (epochs count from 1, as in kohya's training loop) -> ``""``;
2. one line of a multi-line caption: a random one with ``enable_wildcard``, else the first;
3. ``caption_prefix`` / ``caption_suffix`` joined with a space;
4. wildcards ``{a|b|c}`` -> one option (``{{`` and ``}}`` are literal braces);
5. split by ``caption_separator`` into a fixed head, a flexible middle and a fixed tail (the head and
   tail from ``keep_tokens_separator``, e.g. ``head ||| middle ||| tail``, or else the first
   ``keep_tokens`` tags); token warm-up cuts the middle to its first n tags; the middle is shuffled
   (``shuffle_caption``), then each middle tag dropped with ``caption_tag_dropout_rate``;
6. ``secondary_separator`` -> the primary separator (tags joined by it move as one while shuffling).

Deliberate differences from kohya: the line is chosen before the prefix/suffix are added (kohya adds
the prefix to the first line and the suffix to the last, so a chosen middle line got neither); the
``keep_tokens_separator`` is removed even when no tag option is on (kohya left ``|||`` in the text);
empty tags are dropped; tags are joined by the caption separator plus a space (``", "`` for the
default ``","``, as kohya), also where a secondary separator or metadata tags are joined.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from pathlib import Path
from typing import Any, Mapping

from library.config_util import SubsetConfig
from library.errors import DataError

_WILDCARD = re.compile(r"\{\{|\}\}|\{([^{}]+)\}")


def read_caption_file(path: str | Path) -> str:
    """A caption file's text: UTF-8 (a BOM is fine), lines stripped, blank lines dropped.

    Multi-line files keep their lines (joined by ``\\n``): :func:`process_caption` uses the first
    line, or a random one with ``enable_wildcard``. An empty file gives ``""``.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError("caption file not found", where=str(path)) from None
    except OSError as err:
        raise DataError(f"cannot read caption file: {err.strerror}", where=str(path)) from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(
            f"caption file is not UTF-8 text (bad byte at offset {err.start})",
            where=str(path),
            hint="re-save it as UTF-8",
        ) from None
    return "\n".join(line.strip() for line in text.splitlines() if line.strip())


def joiner(subset: SubsetConfig) -> str:
    """How tags are joined in the output: the separator plus a space (``", "``)."""
    sep = subset.caption_separator
    return sep if sep[-1:].isspace() else sep + " "


def folder_caption(image_path: str | Path, subset: SubsetConfig) -> str:
    """A folder subset's caption: ``<image stem><caption_extension>``, else ``class_tokens``, else ``""``."""
    image_path = Path(image_path)
    caption_path = image_path.with_name(image_path.stem + subset.caption_extension)
    if caption_path.is_file():
        text = read_caption_file(caption_path)
        if text:
            return text
    return subset.class_tokens or ""


def caption_from_metadata(entry: Mapping[str, Any], subset: SubsetConfig, where: str | None = None) -> str:
    """kohya's metadata caption: ``caption`` and ``tags`` joined by the separator (either may be missing).

    ``tags`` may be a string or a list. With a multi-line caption the tags follow every line, so the
    line chosen by ``enable_wildcard`` keeps them.
    """
    caption, tags = entry.get("caption"), entry.get("tags")
    if isinstance(tags, (list, tuple)):
        tags = joiner(subset).join(str(t) for t in tags)
    for name, value in (("caption", caption), ("tags", tags)):
        if value is not None and not isinstance(value, str):
            raise DataError(f"'{name}' must be text, got {type(value).__name__}", where=where)
    caption, tags = (caption or "").strip(), (tags or "").strip()
    if not caption:
        return tags
    if not tags:
        return caption
    return "\n".join(f"{line}{joiner(subset)}{tags}" for line in caption.split("\n"))


def caption_rng(seed: int, epoch: int, image_key: str, global_step: int) -> random.Random:
    """The random source for one image at one step: the same inputs always give the same stream."""
    digest = hashlib.sha256(f"{seed}\0{epoch}\0{image_key}\0{global_step}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def token_warmup_steps(subset: SubsetConfig, max_train_steps: int | None) -> int:
    """Warm-up length in steps: ``token_warmup_step`` below 1 is a fraction of ``max_train_steps``."""
    step = subset.token_warmup_step
    if step <= 0:
        return 0
    if step < 1:
        if not max_train_steps:
            raise ValueError("a fractional token_warmup_step needs max_train_steps")
        return math.floor(step * max_train_steps)
    return int(step)


def caption_varies(subset: SubsetConfig) -> tuple[str, ...]:
    """Names of the options that make one image's caption change between steps (none -> cacheable)."""
    active = {
        "shuffle_caption": subset.shuffle_caption,
        "caption_dropout_rate": subset.caption_dropout_rate > 0,
        "caption_dropout_every_n_epochs": subset.caption_dropout_every_n_epochs > 0,
        "caption_tag_dropout_rate": subset.caption_tag_dropout_rate > 0,
        "token_warmup_step": subset.token_warmup_step > 0,
        "enable_wildcard": subset.enable_wildcard,
    }
    return tuple(name for name, on in active.items() if on)


def _expand_wildcards(text: str, rng: random.Random) -> str:
    def pick(match: re.Match) -> str:
        token = match.group(0)
        if token in ("{{", "}}"):
            return token[0]
        return rng.choice(match.group(1).split("|"))

    return _WILDCARD.sub(pick, text)


def _tags(text: str, sep: str) -> list[str]:
    return [t.strip() for t in text.split(sep) if t.strip()]


def _split_fixed(caption: str, subset: SubsetConfig) -> tuple[list[str], list[str], list[str]]:
    """(fixed head, flexible middle, fixed tail) tags."""
    sep, keep_sep = subset.caption_separator, subset.keep_tokens_separator
    if keep_sep and keep_sep in caption:
        head, rest = caption.split(keep_sep, 1)
        middle, tail = rest.split(keep_sep, 1) if keep_sep in rest else (rest, "")
        tail = tail.replace(keep_sep, sep)
        return _tags(head, sep), _tags(middle, sep), _tags(tail, sep)
    tags = _tags(caption, sep)
    keep = subset.keep_tokens
    return tags[:keep], tags[keep:], []


def _transform_tags(caption: str, subset: SubsetConfig, rng, global_step: int, max_train_steps) -> str:
    head, middle, tail = _split_fixed(caption, subset)
    warmup = token_warmup_steps(subset, max_train_steps)
    if warmup and global_step < warmup:
        count = math.floor(global_step * (len(middle) - subset.token_warmup_min) / warmup)
        middle = middle[: max(0, count + subset.token_warmup_min)]
    if subset.shuffle_caption:
        rng.shuffle(middle)
    if subset.caption_tag_dropout_rate > 0:
        middle = [t for t in middle if rng.random() >= subset.caption_tag_dropout_rate]
    return joiner(subset).join(head + middle + tail)


def transform_caption(
    text: str,
    subset: SubsetConfig,
    rng: random.Random,
    epoch: int,
    global_step: int = 0,
    max_train_steps: int | None = None,
) -> str:
    """:func:`process_caption` with an explicit random source (for callers that manage their own)."""
    if epoch < 1:
        raise ValueError(f"epoch counts from 1 (kohya's convention), got {epoch}")
    dropped = subset.caption_dropout_rate > 0 and rng.random() < subset.caption_dropout_rate
    every = subset.caption_dropout_every_n_epochs
    if dropped or (every > 0 and epoch % every == 0):
        return ""
    lines = [line.strip() for line in text.split("\n") if line.strip()] or [""]
    caption = rng.choice(lines) if subset.enable_wildcard and len(lines) > 1 else lines[0]
    caption = " ".join(part for part in (subset.caption_prefix, caption, subset.caption_suffix) if part)
    if subset.enable_wildcard:
        caption = _expand_wildcards(caption, rng)
    tag_options = subset.shuffle_caption or subset.token_warmup_step > 0 or subset.caption_tag_dropout_rate > 0
    if tag_options or (subset.keep_tokens_separator and subset.keep_tokens_separator in caption):
        caption = _transform_tags(caption, subset, rng, global_step, max_train_steps)
    if subset.secondary_separator:
        caption = caption.replace(subset.secondary_separator, joiner(subset))
    return caption


def process_caption(
    text: str,
    subset: SubsetConfig,
    *,
    seed: int,
    epoch: int,
    image_key: str,
    global_step: int = 0,
    max_train_steps: int | None = None,
) -> str:
    """The caption one image trains with at one step, deterministic in (seed, epoch, image_key, step).

    ``text`` is the raw caption (:func:`read_caption_file`, :func:`folder_caption` or
    :func:`caption_from_metadata`); ``epoch`` counts from 1; ``max_train_steps`` is needed only for a
    fractional ``token_warmup_step``.
    """
    rng = caption_rng(seed, epoch, str(image_key), global_step)
    return transform_caption(text, subset, rng, epoch, global_step, max_train_steps)
