"""Image reading: header sizes (EXIF-aware), every mode to RGB, bad files skipped or strict."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from library.errors import DataError
from library.images import decode_rgb, load_rgb, read_size, scan_sizes


def _save(img: Image.Image, path, **kwargs):
    img.save(path, **kwargs)
    return path


def _exif_rotated_jpeg(path):
    """A 40x20 JPEG whose left half is red, stored with EXIF orientation 6 (rotate 90 CW to view)."""
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(path, exif=exif.tobytes(), quality=95)
    return path


def test_read_size_from_header_applies_exif(tmp_path):
    path = _exif_rotated_jpeg(tmp_path / "phone.jpg")
    assert read_size(path) == (20, 40)  # upright: portrait
    upright = load_rgb(path)
    assert upright.size == (20, 40)
    # orientation 6: the stored left (red) half ends up on top
    assert np.allclose(np.asarray(upright)[5, 10], (255, 0, 0), atol=30)
    assert np.allclose(np.asarray(upright)[35, 10], (0, 0, 255), atol=30)
    png = tmp_path / "phone.png"  # PNG keeps EXIF in an eXIf chunk before the pixels
    Image.open(path).save(png, exif=Image.open(path).getexif().tobytes())
    assert read_size(png) == (20, 40) and load_rgb(png).size == (20, 40)


def test_rgba_and_la_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 128))
    rgb = load_rgb(_save(rgba, tmp_path / "a.png"))
    # 50% red over white: R = 255, G = B = 255 * (1 - 128/255) = 127
    assert rgb.mode == "RGB" and rgb.getpixel((0, 0)) == (255, 127, 127)
    la = Image.new("LA", (4, 4), (0, 0))  # black, fully transparent -> white
    assert load_rgb(_save(la, tmp_path / "la.png")).getpixel((1, 1)) == (255, 255, 255)


def test_palette_with_transparency(tmp_path):
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 255, 0] + [10, 20, 30] * 255)
    pal.putpixel((0, 0), 1)
    pal.info["transparency"] = 0  # index 0 (green) is transparent
    rgb = load_rgb(_save(pal, tmp_path / "p.png", transparency=0))
    assert rgb.getpixel((1, 1)) == (255, 255, 255)
    assert rgb.getpixel((0, 0)) == (10, 20, 30)


def test_cmyk_grayscale_1bit_and_16bit(tmp_path):
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # pure red in CMYK
    assert load_rgb(_save(cmyk, tmp_path / "c.jpg", quality=100)).getpixel((0, 0))[0] > 240
    gray = load_rgb(_save(Image.new("L", (4, 4), 77), tmp_path / "g.png"))
    assert gray.getpixel((2, 2)) == (77, 77, 77)
    one = load_rgb(_save(Image.new("1", (4, 4), 1), tmp_path / "b.png"))
    assert one.getpixel((0, 0)) == (255, 255, 255)
    deep = Image.fromarray(np.full((4, 4), 32896, dtype=np.uint16))  # 32896 / 257 = 128
    path = _save(deep, tmp_path / "d16.png")
    with Image.open(path) as check:
        assert check.mode.startswith("I")  # really stored as 16-bit
    assert load_rgb(path).getpixel((0, 0)) == (128, 128, 128)


def test_corrupt_and_empty_files(tmp_path):
    good = _save(Image.new("RGB", (64, 48), 5), tmp_path / "good.png")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "junk.jpg").write_bytes(b"this is not an image at all")
    data = io.BytesIO()
    Image.new("RGB", (64, 64), 9).save(data, format="PNG")
    (tmp_path / "cut.png").write_bytes(data.getvalue()[:60])  # header fine, pixels cut off
    paths = [good, tmp_path / "empty.png", tmp_path / "junk.jpg"]
    scan = scan_sizes(paths, workers=2)
    assert scan.sizes == {str(good): (64, 48)}
    assert sorted(os.path.basename(p) for p, _ in scan.skipped.skipped) == ["empty.png", "junk.jpg"]
    with pytest.raises(DataError, match="empty.png"):
        scan_sizes(paths, strict=True)
    with pytest.raises(DataError, match="cut.png"):
        load_rgb(tmp_path / "cut.png")


def test_decompression_bomb_limit_kept(tmp_path, monkeypatch):
    path = _save(Image.new("RGB", (200, 200)), tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 2x the limit is an error in PIL
    with pytest.raises(DataError, match="DecompressionBomb"):
        decode_rgb(path.read_bytes(), path)


def test_sidecar_makes_second_scan_read_nothing(tmp_path, monkeypatch):
    paths = [_save(Image.new("RGB", (10 + i, 20)), tmp_path / f"{i}.png") for i in range(5)]
    sidecar = tmp_path / "sizes.json"
    first = scan_sizes(paths, sidecar=sidecar, workers=2)
    assert first.read == 5 and sidecar.is_file()

    def no_reading(path):
        raise AssertionError(f"header read again: {path}")

    monkeypatch.setattr("library.images.read_size", no_reading)
    second = scan_sizes(paths, sidecar=sidecar, workers=2)
    assert second.read == 0 and second.from_cache == 5 and second.sizes == first.sizes
    monkeypatch.undo()
    _save(Image.new("RGB", (99, 20)), paths[2])  # an edited file is read again, only that one
    os.utime(paths[2], ns=(1, 1))
    third = scan_sizes(paths, sidecar=sidecar, workers=2)
    assert third.read == 1 and third.sizes[str(paths[2])] == (99, 20)
    paths[4].write_bytes(b"")  # an unreadable file is remembered too: reported, not re-read
    assert len(scan_sizes(paths, sidecar=sidecar).skipped) == 1
    monkeypatch.setattr("library.images.read_size", no_reading)
    fourth = scan_sizes(paths, sidecar=sidecar)
    assert fourth.read == 0 and [p for p, _ in fourth.skipped.skipped] == [str(paths[4])]
    with pytest.raises(DataError, match="4.png"):
        scan_sizes(paths, sidecar=sidecar, strict=True)
