"""Bad-input corpus, data side: odd and broken images, captions and metadata fed to the real CLIs.

Each case runs a CLI as a subprocess and checks the exit status, the one ``error`` line on stderr
naming the file, that no traceback was printed and that no input file changed (``bad_inputs``).
Files that are odd but usable (CMYK, 16-bit, palette with transparency, EXIF-rotated, 1x1) must be
used; broken ones among good ones are skipped, named and counted, and the command still succeeds.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

import bad_inputs as B

BROKEN = {  # file name -> builder; each must be skipped (prepare) or reported corrupt (filter)
    "zero.jpg": B.zero_byte,
    "cut.jpg": lambda p: B.truncated(p, "JPEG"),
    "cutpng.png": lambda p: B.truncated(p, "PNG"),
    "html.jpg": B.text_as_image,
}
USABLE = {
    "good.png": B.good_png,
    "cmyk.jpg": B.cmyk_jpeg,
    "deep16.png": B.png16,
    "palette.png": B.palette_transparent_png,
    "rotated.jpg": B.exif_rotated_jpeg,  # stored 128x64, EXIF orientation 6: upright 64x128
    "one.png": B.tiny_png,
}


def make_mixed_folder(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, build in {**BROKEN, **USABLE}.items():
        build(folder / name)
    B.bomb_header_png(folder / "bomb.png")
    return folder


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    return make_mixed_folder(tmp_path_factory.mktemp("mixed") / "images")


# --- tools/filter_images.py -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def filter_report(mixed, tmp_path_factory):
    report = tmp_path_factory.mktemp("filter") / "report.csv"
    result = B.run_cli("tools/filter_images.py", [
        mixed, "--report", report, "--min_size", "1", "--max_size", "0", "--min_kb_per_pixel", "0",
        "--min_dpi", "0", "--keep_duplicates", "--quiet",
    ], inputs=[mixed])  # fmt: skip
    output = B.assert_handled(result)
    with open(report, newline="", encoding="utf-8") as handle:
        rows = {Path(row["path"]).name: row for row in csv.DictReader(handle)}
    return output, rows


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_filter_reports_broken_image_as_corrupt(filter_report, name):
    output, rows = filter_report
    assert rows[name]["kept"] == "0" and rows[name]["reasons"] == "corrupt"
    assert f"corrupt {len(BROKEN)}" in output  # the closing summary counts them


def test_filter_rejects_decompression_bomb_header_without_decoding(filter_report):
    _, rows = filter_report
    assert rows["bomb.png"]["kept"] == "0" and rows["bomb.png"]["reasons"] == "too-large"


@pytest.mark.parametrize("name", sorted(USABLE))
def test_filter_keeps_odd_but_usable_images(filter_report, name):
    _, rows = filter_report
    assert rows[name]["kept"] == "1", rows[name]


def test_filter_reports_exif_rotated_photo_upright(filter_report):
    _, rows = filter_report
    assert (rows["rotated.jpg"]["width"], rows["rotated.jpg"]["height"]) == ("64", "128")


def test_filter_negative_limit_is_a_user_error(mixed, tmp_path):
    result = B.run_cli("tools/filter_images.py", [mixed, "--report", tmp_path / "r.csv", "--min_size", "-5"],
                       inputs=[mixed])  # fmt: skip
    B.assert_user_error(result, ">= 0")
    assert not (tmp_path / "r.csv").exists()


# --- finetune/prepare_buckets_latents.py ------------------------------------------------------------


def _metadata_for(folder: Path, path: Path) -> Path:
    return B.write_json(path, {p.stem: {"caption": f"a poster {p.stem}"} for p in sorted(folder.iterdir())
                               if p.suffix in (".png", ".jpg")})  # fmt: skip


@pytest.fixture(scope="module")
def prepared(tiny_sdxl, tmp_path_factory):
    root = tmp_path_factory.mktemp("prepare")
    images = make_mixed_folder(root / "images")
    meta = _metadata_for(images, root / "meta.json")
    out = root / "meta_lat.json"
    result = B.run_cli("finetune/prepare_buckets_latents.py", [
        images, meta, out, tiny_sdxl["single_file"], "--max_resolution", "64", "--min_bucket_reso", "32",
        "--max_bucket_reso", "128", "--bucket_reso_steps", "32", "--batch_size", "2",
    ], inputs=[images, meta, tiny_sdxl["single_file"]])  # fmt: skip
    output = B.assert_handled(result)
    return images, output, json.loads(out.read_text(encoding="utf-8"))


def _cached_bucket(images: Path, name: str) -> tuple[int, int] | None:
    entries = list(images.glob(f"{name}.*x*.sdxl-latents.safetensors"))
    if not entries:
        return None
    width, height = re.search(r"\.(\d+)x(\d+)\.sdxl-latents", entries[0].name).groups()
    return int(width), int(height)


@pytest.mark.parametrize("name", sorted([*BROKEN, "bomb.png"]))
def test_prepare_skips_broken_image_and_names_it(prepared, name):
    images, output, metadata = prepared
    assert re.search(rf"skipped \S*{re.escape(name)}: ", output), output
    assert _cached_bucket(images, name) is None
    assert "train_resolution" not in metadata.get(Path(name).stem, {})


def test_prepare_counts_skipped_images(prepared):
    _, output, _ = prepared
    # zero/html/bomb fail at the header scan, the two truncated files when decoded for caching
    assert "3 unreadable at start-up" in output and "2 skipped (unreadable)" in output
    assert f"{len(USABLE)} built" in output


@pytest.mark.parametrize("name", sorted(set(USABLE) - {"rotated.jpg"}))
def test_prepare_caches_odd_but_usable_images(prepared, name):
    images, _, metadata = prepared
    assert _cached_bucket(images, name) is not None
    assert metadata[Path(name).stem]["train_resolution"]


def test_prepare_uses_exif_rotated_photo_upright(prepared):
    images, _, metadata = prepared
    width, height = _cached_bucket(images, "rotated.jpg")
    assert height > width  # stored landscape, shown portrait: the portrait bucket
    assert metadata["rotated"]["image_size"] == [64, 128]


def test_prepare_metadata_not_json(tiny_sdxl, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    B.good_png(images / "a.png")
    meta = tmp_path / "meta.json"
    meta.write_text('{"a": {"caption": "x"},\n  oops}', encoding="utf-8")
    result = B.run_cli("finetune/prepare_buckets_latents.py", [images, meta, tmp_path / "out.json",
                                                              tiny_sdxl["single_file"]], inputs=[images, meta])
    B.assert_user_error(result, str(meta), "line 2")
    assert not (tmp_path / "out.json").exists()


def test_prepare_two_images_with_one_key(tiny_sdxl, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    B.good_png(images / "a.png")
    B.good_jpeg(images / "a.jpg")
    meta = B.write_json(tmp_path / "meta.json", {"a": {"caption": "x"}})
    result = B.run_cli("finetune/prepare_buckets_latents.py", [images, meta, tmp_path / "out.json",
                                                              tiny_sdxl["single_file"]], inputs=[images, meta])
    B.assert_user_error(result, "a.png", "a.jpg", "--full_path")


def test_prepare_out_json_under_a_file(tiny_sdxl, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    B.good_png(images / "a.png")
    meta = B.write_json(tmp_path / "meta.json", {"a": {"caption": "x"}})
    blocker = tmp_path / "taken"
    blocker.write_text("a file, not a folder", encoding="utf-8")
    result = B.run_cli("finetune/prepare_buckets_latents.py", [images, meta, blocker / "out.json",
                                                              tiny_sdxl["single_file"]], inputs=[images, meta, blocker])
    B.assert_user_error(result, str(blocker), "not a folder")
    assert not list(images.glob("*.sdxl-latents.safetensors"))  # stopped before any work


# --- captions and metadata: finetune/merge_captions_to_metadata.py, clean_captions_and_tags.py -----


def test_merge_non_utf8_caption(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    B.good_png(images / "a.png")
    B.good_png(images / "b.png")
    (images / "a.caption").write_text("a red poster", encoding="utf-8")
    (images / "b.caption").write_bytes("caf\u00e9 poster".encode("latin-1"))
    out = tmp_path / "meta.json"
    result = B.run_cli("finetune/merge_captions_to_metadata.py", [images, out], inputs=[images])
    B.assert_user_error(result, str(images / "b.caption"), "UTF-8")
    assert not out.exists()


def test_merge_missing_and_empty_captions_are_counted(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a", "b", "c"):
        B.good_png(images / f"{name}.png")
    (images / "a.caption").write_text("a red poster", encoding="utf-8")
    (images / "b.caption").write_text("   \n", encoding="utf-8")
    out = tmp_path / "meta.json"
    result = B.run_cli("finetune/merge_captions_to_metadata.py", [images, out], inputs=[images])
    output = B.assert_handled(result)
    assert "1 empty" in output and "1 images without a .caption file" in output
    assert json.loads(out.read_text(encoding="utf-8"))["a"] == {"caption": "a red poster"}


def test_clean_metadata_not_json(tmp_path):
    meta = tmp_path / "meta.json"
    meta.write_text('{"a": {"caption": "x"}}}', encoding="utf-8")
    result = B.run_cli("finetune/clean_captions_and_tags.py", [meta, tmp_path / "out.json"], inputs=[meta])
    B.assert_user_error(result, str(meta), "line 1")


def test_clean_metadata_of_the_wrong_shape(tmp_path):
    meta = B.write_json(tmp_path / "meta.json", ["a.png", "b.png"])
    result = B.run_cli("finetune/clean_captions_and_tags.py", [meta, tmp_path / "out.json"], inputs=[meta])
    B.assert_user_error(result, str(meta), "image_key")


def test_clean_metadata_without_captions_is_counted(tmp_path):
    meta = B.write_json(tmp_path / "meta.json", {"a": {"image_size": [64, 64]}, "b": {"caption": " a  cat "}})
    out = tmp_path / "out.json"
    result = B.run_cli("finetune/clean_captions_and_tags.py", [meta, out], inputs=[meta])
    output = B.assert_handled(result)
    assert "1 entries with neither caption nor tags" in output
    assert json.loads(out.read_text(encoding="utf-8")) == {"a": {"image_size": [64, 64]}, "b": {"caption": "a cat"}}
