"""Caption reading and kohya's caption transforms, one option at a time, with fixed seeds."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from library.captions import (
    caption_from_metadata,
    caption_varies,
    folder_caption,
    process_caption,
    read_caption_file,
    token_warmup_steps,
)
from library.config_util import SubsetConfig
from library.errors import DataError

TAGS = "a, b, c, d, e, f, g, h"


def run(text, seed=0, epoch=1, key="img", step=0, max_steps=None, **options):
    subset = SubsetConfig(**options)
    return process_caption(
        text, subset, seed=seed, epoch=epoch, image_key=key, global_step=step, max_train_steps=max_steps
    )


def split(caption):
    return [t.strip() for t in caption.split(",")] if caption else []


def test_read_caption_file_bom_lines_and_bad_bytes(tmp_path):
    path = tmp_path / "x.caption"
    path.write_bytes(b"\xef\xbb\xbf  first line \r\n\r\n second \n")
    assert read_caption_file(path) == "first line\nsecond"
    path.write_bytes("caf\u00e9, poster".encode())
    assert read_caption_file(path) == "caf\u00e9, poster"
    path.write_bytes(b"")
    assert read_caption_file(path) == ""
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok \xff\xfe")
    with pytest.raises(DataError) as info:
        read_caption_file(bad)
    assert str(info.value) == f"{bad}: caption file is not UTF-8 text (bad byte at offset 3) (re-save it as UTF-8)"
    with pytest.raises(DataError, match="caption file not found"):
        read_caption_file(tmp_path / "missing.txt")


def test_folder_caption_falls_back_to_class_tokens(tmp_path):
    (tmp_path / "a.txt").write_text("from file", encoding="utf-8")
    (tmp_path / "c.txt").write_text("  \n", encoding="utf-8")
    subset = SubsetConfig(caption_extension=".txt", class_tokens="sks poster")
    assert folder_caption(tmp_path / "a.png", subset) == "from file"
    assert folder_caption(tmp_path / "b.png", subset) == "sks poster"
    assert folder_caption(tmp_path / "c.png", subset) == "sks poster"  # empty file
    assert folder_caption(tmp_path / "b.png", SubsetConfig(caption_extension=".txt")) == ""


def test_metadata_caption_and_tags_are_joined():
    subset = SubsetConfig()
    assert caption_from_metadata({"caption": "a poster", "tags": "red, title"}, subset) == "a poster, red, title"
    assert caption_from_metadata({"tags": ["red", "title"]}, subset) == "red, title"
    assert caption_from_metadata({"caption": "only"}, subset) == "only"
    assert caption_from_metadata({"image_size": [1, 2]}, subset) == ""
    assert caption_from_metadata({"caption": "l1\nl2", "tags": "t"}, subset) == "l1, t\nl2, t"
    assert caption_from_metadata({"caption": "x", "tags": "t"}, SubsetConfig(caption_separator=";")) == "x; t"
    with pytest.raises(DataError, match=r"^meta.json: a.png: 'caption' must be text, got int"):
        caption_from_metadata({"caption": 3}, subset, where="meta.json: a.png")


def test_no_options_keeps_the_first_line_unchanged():
    assert run("a,  b ,c\nsecond line") == "a,  b ,c"
    assert caption_varies(SubsetConfig()) == ()


def test_prefix_and_suffix():
    assert run("a, b", caption_prefix="poster,", caption_suffix=", best") == "poster, a, b , best"
    assert run("", caption_prefix="p") == "p"
    # the prefix takes part in keep_tokens like any tag (kohya)
    out = run(TAGS, seed=3, shuffle_caption=True, keep_tokens=1, caption_prefix="poster,")
    assert split(out)[0] == "poster"


def test_shuffle_keeps_the_first_keep_tokens_and_every_tag():
    outs = {run(TAGS, seed=s, shuffle_caption=True, keep_tokens=2) for s in range(20)}
    assert len(outs) > 10  # really shuffled
    for out in outs:
        tags = split(out)
        assert tags[:2] == ["a", "b"]
        assert Counter(tags) == Counter(split(TAGS))
    assert run(TAGS, seed=1, shuffle_caption=True) == run(TAGS, seed=1, shuffle_caption=True)


def test_determinism_is_per_seed_epoch_image_and_step():
    base = dict(shuffle_caption=True)
    ref = run(TAGS, seed=7, epoch=2, key="k", step=5, **base)
    assert ref == run(TAGS, seed=7, epoch=2, key="k", step=5, **base)
    others = [
        run(TAGS, seed=8, epoch=2, key="k", step=5, **base),
        run(TAGS, seed=7, epoch=3, key="k", step=5, **base),
        run(TAGS, seed=7, epoch=2, key="j", step=5, **base),
        run(TAGS, seed=7, epoch=2, key="k", step=6, **base),
    ]
    assert sum(o != ref for o in others) >= 3  # 8 tags: a collision has probability 1/40320
    with pytest.raises(ValueError, match="epoch counts from 1"):
        run(TAGS, epoch=0)


def test_keep_tokens_separator_fixed_head_shuffled_middle_fixed_tail():
    text = "poster, movie ||| a, b, c, d, e, f ||| best, quality"
    outs = {run(text, seed=s, shuffle_caption=True, keep_tokens_separator="|||", keep_tokens=5) for s in range(20)}
    assert len(outs) > 10
    for out in outs:
        tags = split(out)
        assert tags[:2] == ["poster", "movie"] and tags[-2:] == ["best", "quality"]
        assert sorted(tags[2:-2]) == list("abcdef")
    # only a head: the rest is the middle
    out = run("h ||| a, b, c", seed=1, shuffle_caption=True, keep_tokens_separator="|||")
    assert split(out)[0] == "h" and sorted(split(out)[1:]) == ["a", "b", "c"]
    # with no tag option on, the separator is removed rather than fed to the text encoder
    assert run("h ||| a, b ||| t", keep_tokens_separator="|||") == "h, a, b, t"
    # without the separator in the caption, keep_tokens applies
    out = run("x, y, z, w", seed=2, shuffle_caption=True, keep_tokens_separator="|||", keep_tokens=1)
    assert split(out)[0] == "x"


def test_secondary_separator_keeps_groups_together():
    text = "head, red dress;;;long sleeves, a, b, c"
    seen_positions = set()
    for s in range(30):
        out = run(text, seed=s, shuffle_caption=True, keep_tokens=1, secondary_separator=";;;")
        tags = split(out)
        assert ";;;" not in out and tags[0] == "head"
        i = tags.index("red dress")
        assert tags[i + 1] == "long sleeves"  # the group moved as one
        seen_positions.add(i)
        assert Counter(tags) == Counter(["head", "red dress", "long sleeves", "a", "b", "c"])
    assert len(seen_positions) > 1
    assert run("x;;;y", secondary_separator=";;;") == "x, y"


def test_wildcards_and_multiline_captions():
    counts = Counter(run("{red|blue|green} poster", seed=s, enable_wildcard=True) for s in range(300))
    assert set(counts) == {"red poster", "blue poster", "green poster"}
    assert min(counts.values()) > 60
    assert run("{{literal}} {a}", enable_wildcard=True) == "{literal} a"
    assert run("{x|y}") == "{x|y}"  # wildcards off: text unchanged
    lines = "line one\nline two\nline three"
    options = dict(enable_wildcard=True, caption_prefix="P", caption_suffix="S")
    picked = Counter(run(lines, seed=s, **options) for s in range(300))
    assert set(picked) == {"P line one S", "P line two S", "P line three S"}  # prefix/suffix on the chosen line
    assert run(lines) == "line one"


def test_caption_dropout_rate_is_whole_caption_and_statistical():
    drops = sum(run(TAGS, seed=0, key=f"img{i}", caption_dropout_rate=0.3) == "" for i in range(2000))
    assert 0.26 * 2000 < drops < 0.34 * 2000
    assert run(TAGS, caption_dropout_rate=1.0) == ""
    kept = run(TAGS, seed=0, key="img0", caption_dropout_rate=0.3)
    assert kept in ("", TAGS)


def test_caption_dropout_every_n_epochs_counts_epochs_from_one():
    out = [run(TAGS, epoch=e, caption_dropout_every_n_epochs=2) for e in range(1, 6)]
    assert out == [TAGS, "", TAGS, "", TAGS]


def test_tag_dropout_spares_kept_tokens_and_is_statistical():
    text = ", ".join(f"t{i}" for i in range(20))
    kept = 0
    for s in range(100):
        tags = split(run(text, seed=s, keep_tokens=3, caption_tag_dropout_rate=0.5))
        assert tags[:3] == ["t0", "t1", "t2"]
        rest = tags[3:]
        assert rest == sorted(rest, key=lambda t: int(t[1:]))  # no shuffle: order kept
        kept += len(rest)
    assert 0.44 * 1700 < kept < 0.56 * 1700
    sep_text = "h ||| a, b, c, d ||| t"
    for s in range(20):
        tags = split(run(sep_text, seed=s, keep_tokens_separator="|||", caption_tag_dropout_rate=0.9))
        assert tags[0] == "h" and tags[-1] == "t"


def test_token_warmup_by_steps_and_fraction():
    text = ", ".join(f"t{i}" for i in range(11))  # 10 tags after the kept one
    options = dict(keep_tokens=1, token_warmup_min=2, token_warmup_step=8)
    lengths = [len(split(run(text, step=st, **options))) for st in (0, 4, 7, 8, 100)]
    # middle length = floor(step * (10 - 2) / 8) + 2, plus the kept tag; full from step 8 on
    assert lengths == [3, 7, 10, 11, 11]
    assert run(text, step=4, **options) == "t0, t1, t2, t3, t4, t5, t6"
    # fraction of max_train_steps: 0.1 * 80 = 8 steps
    assert token_warmup_steps(SubsetConfig(token_warmup_step=0.1), 80) == 8
    assert token_warmup_steps(SubsetConfig(token_warmup_step=8.0), None) == 8
    assert run(text, step=4, max_steps=80, keep_tokens=1, token_warmup_min=2, token_warmup_step=0.1) == (
        "t0, t1, t2, t3, t4, t5, t6"
    )
    with pytest.raises(ValueError, match="max_train_steps"):
        run(text, token_warmup_step=0.5)


def test_caption_varies_names_the_random_options():
    subset = SubsetConfig(shuffle_caption=True, caption_dropout_every_n_epochs=3, enable_wildcard=True)
    assert caption_varies(subset) == ("shuffle_caption", "caption_dropout_every_n_epochs", "enable_wildcard")
