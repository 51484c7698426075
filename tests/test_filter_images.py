"""tools/filter_images.py on generated images placed on each side of every threshold."""

from __future__ import annotations

import csv
import hashlib
import io
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from library.cli import run_main
from library.dedup import DedupItem, find_duplicates, hamming, near_pairs
from tools import filter_images


def blocks(seed: int, width: int, height: int) -> Image.Image:
    """A distinct picture per seed (8x8 random colour blocks): its perceptual hash is its own."""
    grid = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return Image.fromarray(grid).resize((width, height), Image.Resampling.NEAREST)


def noisy(image: Image.Image, amount: int, seed: int) -> Image.Image:
    pixels = np.asarray(image).astype(np.int16)
    pixels += np.random.default_rng(seed).integers(-amount, amount + 1, pixels.shape, dtype=np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def save_png(path: Path, image: Image.Image, size_bytes: int | None = None, kb_per_pixel: float = 0.001,
             dpi: float | None = None) -> Path:
    """Save ``image`` padded (with a text chunk) to exactly ``size_bytes`` (or the given KB per pixel)."""
    target = size_bytes or int(kb_per_pixel * 1024 * image.size[0] * image.size[1]) + 1
    extra = {"dpi": (dpi, dpi)} if dpi else {}
    pad = 0
    for _ in range(2):
        info = PngImagePlugin.PngInfo()
        info.add_text("padding", "x" * pad)
        buffer = io.BytesIO()
        image.save(buffer, "PNG", pnginfo=info, **extra)
        pad += target - len(buffer.getvalue())
    assert len(buffer.getvalue()) == target
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())
    return path


def save_jpeg(path: Path, image: Image.Image, quality: int = 95) -> Path:
    image.save(path, "JPEG", quality=quality)
    return path


THRESHOLD_BYTES_512 = 0.0005 * 1024 * 512 * 512  # 134217.7 bytes: the KB-per-pixel limit at 512x512

# file -> reasons with the default rules and --recursive ("" = kept)
EXPECTED = {
    "keep_512x768.png": "",
    "keep_512x768_copy.png": "duplicate",
    "keep_1024x512.png": "",
    "small_511x768.png": "too-small",
    "big_600x1025.png": "too-large",
    "kbpp_below.png": "low-kb-per-pixel",
    "kbpp_above.png": "",
    "dpi_95.png": "low-dpi",
    "nodpi_noise.jpg": "",
    "truncated.jpg": "corrupt",
    "truncated.png": "corrupt",
    "page.jpg": "corrupt",
    "empty.png": "corrupt",
    "z_original.png": "",
    "a_resized.png": "near-duplicate",
    "b_reencoded.jpg": "near-duplicate",
    "h_huge.png": "too-large",
    "h_smaller.png": "",
    "sub/keep_sub.png": "",
    "sub/tiny.png": "too-small;low-kb-per-pixel",
}
DUPLICATE_OF = {"keep_512x768_copy.png": "keep_512x768.png", "a_resized.png": "z_original.png",
                "b_reencoded.jpg": "z_original.png"}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("source")
    save_png(root / "keep_512x768.png", blocks(1, 512, 768), dpi=96)
    shutil.copy(root / "keep_512x768.png", root / "keep_512x768_copy.png")
    save_png(root / "keep_1024x512.png", blocks(2, 1024, 512))
    save_png(root / "small_511x768.png", blocks(3, 511, 768))
    save_png(root / "big_600x1025.png", blocks(4, 600, 1025))
    save_png(root / "kbpp_below.png", blocks(5, 512, 512), size_bytes=int(THRESHOLD_BYTES_512) - 100)
    save_png(root / "kbpp_above.png", blocks(6, 512, 512), size_bytes=int(THRESHOLD_BYTES_512) + 100)
    save_png(root / "dpi_95.png", blocks(7, 512, 512), dpi=95)
    save_jpeg(root / "nodpi_noise.jpg", noisy(blocks(8, 512, 512), 40, 8))
    whole = save_jpeg(root / "whole.jpg", noisy(blocks(9, 512, 512), 40, 9)).read_bytes()
    (root / "truncated.jpg").write_bytes(whole[: len(whole) * 3 // 4])
    (root / "whole.jpg").unlink()
    whole = save_png(root / "truncated.png", blocks(10, 512, 512), kb_per_pixel=0.004).read_bytes()
    (root / "truncated.png").write_bytes(whole[: len(whole) * 3 // 4])
    (root / "page.jpg").write_bytes(b"<html><body>404 poster not found</body></html>")
    (root / "empty.png").write_bytes(b"")
    original = blocks(11, 768, 768)
    save_png(root / "z_original.png", original)
    save_png(root / "a_resized.png", original.resize((700, 700), Image.Resampling.BILINEAR))
    save_jpeg(root / "b_reencoded.jpg", noisy(original, 40, 11))
    save_png(root / "h_huge.png", blocks(12, 1100, 1100))
    save_png(root / "h_smaller.png", blocks(12, 800, 800))
    save_png(root / "sub" / "keep_sub.png", blocks(13, 600, 600))
    save_jpeg(root / "sub" / "tiny.png", blocks(14, 64, 64))  # a JPEG named .png: read by content
    (root / ".hidden.png.tmp-x1").write_bytes(b"partial download")
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.fixture
def folder(source, tmp_path) -> Path:
    return Path(shutil.copytree(source, tmp_path / "images"))


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def read_report(path: Path, root: Path) -> dict[str, dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["path", "kept", "reasons", "width", "height", "kb_per_pixel", "dpi", "duplicate_of"]
    return {Path(r["path"]).relative_to(root).as_posix(): r for r in rows}


def test_kept_set_reasons_and_report(source, folder, tmp_path):
    report, keep = tmp_path / "report.csv", tmp_path / "keep.txt"
    assert filter_images.main([str(folder), "--recursive", "--report", str(report), "--keep_list", str(keep),
                               "--quiet"]) == 0
    rows = read_report(report, folder)
    assert {name: row["reasons"] for name, row in rows.items()} == EXPECTED
    assert all(row["kept"] == ("0" if EXPECTED[name] else "1") for name, row in rows.items())
    kept = {Path(line).relative_to(folder).as_posix() for line in keep.read_text().splitlines()}
    assert kept == {name for name, reasons in EXPECTED.items() if not reasons}
    for name, row in rows.items():
        target = row["duplicate_of"] and Path(row["duplicate_of"]).relative_to(folder).as_posix()
        assert target == DUPLICATE_OF.get(name, ""), name
    below, above = rows["kbpp_below.png"], rows["kbpp_above.png"]
    assert float(below["kb_per_pixel"]) < 0.0005 < float(above["kb_per_pixel"])
    size = (folder / "kbpp_above.png").stat().st_size
    assert float(above["kb_per_pixel"]) == pytest.approx(size / 1024 / (512 * 512), rel=1e-5)
    assert (rows["dpi_95.png"]["dpi"], rows["keep_512x768.png"]["dpi"], rows["nodpi_noise.jpg"]["dpi"]) == (
        "95", "96.01", "")
    assert (rows["keep_1024x512.png"]["width"], rows["keep_1024x512.png"]["height"]) == ("1024", "512")
    assert snapshot(folder) == snapshot(source)  # no --reject_dir: nothing moved


def test_switches_change_the_rules(folder, tmp_path):
    report = tmp_path / "r.csv"
    argv = [str(folder), "--report", str(report), "--quiet", "--require_dpi", "--min_size", "0", "--max_size", "0",
            "--keep_duplicates"]
    assert filter_images.main(argv) == 0
    rows = read_report(report, folder)
    assert "sub/keep_sub.png" not in rows  # not --recursive
    assert rows["nodpi_noise.jpg"]["reasons"] == "no-dpi" and rows["keep_512x768.png"]["reasons"] == ""
    assert rows["small_511x768.png"]["reasons"] == "no-dpi" and rows["big_600x1025.png"]["reasons"] == "no-dpi"
    assert rows["keep_512x768_copy.png"]["reasons"] == "" and rows["dpi_95.png"]["reasons"] == "low-dpi"
    assert filter_images.main([str(folder), "--report", str(report), "--quiet", "--dedup_distance", "-1"]) == 0
    rows = read_report(report, folder)
    assert rows["keep_512x768_copy.png"]["reasons"] == "duplicate" and rows["a_resized.png"]["reasons"] == ""


def test_reject_dir_moves_and_never_deletes(folder, tmp_path):
    before = snapshot(folder)
    rejected = tmp_path / "rejected"
    (rejected / "sub").mkdir(parents=True)
    (rejected / "sub" / "tiny.png").write_bytes(b"already here")
    assert filter_images.main([str(folder), "--recursive", "--reject_dir", str(rejected), "--quiet"]) == 0
    after, moved = snapshot(folder), snapshot(rejected)
    assert moved.pop("sub/tiny.png") == hashlib.sha256(b"already here").hexdigest()  # not overwritten
    assert moved.pop("sub/tiny_1.png") == before["sub/tiny.png"]
    assert set(moved) == {name for name, reasons in EXPECTED.items() if reasons and name != "sub/tiny.png"}
    assert {**after, **moved, "sub/tiny.png": before["sub/tiny.png"]} == before  # every byte still somewhere
    # a second run finds nothing more to move (the reject folder inside the tree would be skipped too)
    assert filter_images.main([str(folder), "--recursive", "--reject_dir", str(rejected), "--quiet"]) == 0
    assert snapshot(folder) == after


def test_dry_run_changes_nothing(folder, tmp_path, capsys):
    before = snapshot(folder)
    report = tmp_path / "report.csv"
    argv = [str(folder), "--recursive", "--dry_run", "--report", str(report), "--reject_dir",
            str(folder / "rejected"), "--quiet"]
    assert filter_images.main(argv) == 0
    assert snapshot(folder) == before and not report.exists() and not (folder / "rejected").exists()
    out = capsys.readouterr().out
    assert out.count("would reject") == sum(1 for reasons in EXPECTED.values() if reasons)
    assert "kept 7 of 20, rejected 13" in out


def test_nothing_to_do_is_one_line_error(folder, capsys):
    assert run_main(filter_images.main, [str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--report" in err


def test_near_pairs_match_brute_force():
    rng = random.Random(0)
    hashes = [rng.getrandbits(64) for _ in range(300)]
    for i in range(0, 60, 3):  # plant close copies: 0..8 bits flipped
        flips = rng.sample(range(64), i % 9)
        hashes[i + 1] = hashes[i] ^ sum(1 << b for b in flips)
    for distance in (0, 3, 6, 10):
        brute = {(i, j) for i in range(300) for j in range(i + 1, 300) if hamming(hashes[i], hashes[j]) <= distance}
        assert near_pairs(hashes, distance) == brute
        assert len(brute) >= 2


def test_best_of_each_group_is_kept():
    items = [DedupItem("h1", 0b0000, (-100, -5, "a")), DedupItem("h2", 0b0001, (-400, -5, "b")),
             DedupItem("h3", 0b0011, (-200, -5, "c")), DedupItem("h1", 0b0000, (-100, -5, "d")),
             DedupItem("h4", 0xFFFF, (-50, -5, "e"))]
    dropped = find_duplicates(items, distance=1)
    # b (largest) keeps a and c (1 bit away); d, a's exact copy, goes with a; e is far from everything
    assert dropped == {0: (1, "near-duplicate"), 2: (1, "near-duplicate"), 3: (1, "near-duplicate")}
    assert find_duplicates(items, distance=-1) == {3: (0, "duplicate")}
