"""Reading training images: sizes from headers, pixels as upright RGB, bad files counted.

* :func:`read_size` opens only the header (PIL's lazy open) and applies the EXIF orientation, so a
  phone photo stored sideways reports its upright ``(width, height)``.
* :func:`scan_sizes` reads many headers in a thread pool and remembers them in a small JSON sidecar
  keyed by path, file size and mtime: the next start-up only ``stat``s the files and reads no image.
* :func:`load_rgb` decodes one image upright and as 8-bit RGB whatever its mode: RGBA/LA/PA and
  palette images with transparency are composited on white, CMYK/YCbCr/LAB converted, 16-bit and
  32-bit grayscale scaled to 8 bits, 1-bit and grayscale expanded.
* Unreadable files (zero bytes, truncated, not an image, over PIL's decompression-bomb limit, which is
  kept) are skipped and listed in :class:`SkipLog`; with ``strict`` they raise :class:`DataError`.
"""

from __future__ import annotations

import io
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from library.errors import DataError
from library.fileio import atomic_write_text

log = logging.getLogger(__name__)

SIDECAR_VERSION = 1
_EXIF_ORIENTATION = 0x0112
_SWAPPED_ORIENTATIONS = (5, 6, 7, 8)  # rotated by 90 or 270 degrees: width and height swap


@dataclass
class SkipLog:
    """Files that could not be read: ``(path, reason)`` pairs, in the order they were met."""

    skipped: list[tuple[str, str]] = field(default_factory=list)

    def add(self, path, reason: str) -> None:
        self.skipped.append((str(path), reason))

    def __len__(self) -> int:
        return len(self.skipped)

    def report(self, what: str = "images") -> None:
        """Log a one-line count and then every skipped file with its reason."""
        if not self.skipped:
            return
        log.warning("skipped %d unreadable %s (listed below)", len(self.skipped), what)
        for path, reason in self.skipped:
            log.warning("  skipped %s: %s", path, reason)


def _bad_image(path, err: BaseException) -> DataError:
    return DataError(
        f"cannot read image ({type(err).__name__}: {err})",
        where=str(path),
        hint="re-save or remove the file, or run without strict to skip unreadable images",
    )


_READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError)


def _header_orientation(img) -> int:
    """EXIF orientation if the header holds it (JPEG APP1, WebP, PNG eXIf before the pixels).

    ``img.getexif()`` is avoided: for PNG it decodes the whole image to look for a late eXIf chunk.
    """
    from PIL import Image

    raw = img.info.get("exif")
    if not raw:
        return 1
    exif = Image.Exif()
    try:
        exif.load(raw)
    except Exception:  # a broken EXIF block: treat as upright, decoding will tell
        return 1
    return exif.get(_EXIF_ORIENTATION, 1)


def upright_size(img) -> tuple[int, int]:
    """``(width, height)`` of an opened PIL image as displayed, i.e. after its EXIF orientation."""
    width, height = img.size
    return (height, width) if _header_orientation(img) in _SWAPPED_ORIENTATIONS else (width, height)


def read_size(path: str | os.PathLike) -> tuple[int, int]:
    """Upright ``(width, height)`` from the header; :class:`DataError` if it is not a readable image."""
    from PIL import Image

    try:
        if os.path.getsize(path) == 0:
            raise ValueError("empty file (0 bytes)")
        with Image.open(path) as img:
            width, height = img.size
            orientation = _header_orientation(img)
    except (*_READ_ERRORS, Image.DecompressionBombError) as err:
        raise _bad_image(path, err) from None
    if width <= 0 or height <= 0:
        raise _bad_image(path, ValueError(f"bad size {width}x{height}"))
    return (height, width) if orientation in _SWAPPED_ORIENTATIONS else (width, height)


def _to_rgb(img):
    """An 8-bit RGB copy of a loaded PIL image (see the module doc for each mode)."""
    from PIL import Image

    mode = img.mode
    if _has_alpha(img):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I;16") or mode in ("I", "F"):
        import numpy as np

        pixels = np.asarray(img, dtype=np.float64)
        if mode != "F":
            top = 65535.0 if mode.startswith("I;16") or pixels.max(initial=0) > 255 else 255.0
            pixels = pixels * (255.0 / top)
        gray = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    return img if mode == "RGB" else img.convert("RGB")


def decode_rgb(data: bytes, name: str | os.PathLike = "<bytes>"):
    """Decode image bytes to an upright 8-bit RGB PIL image; :class:`DataError` naming ``name``."""
    return decode_rgb_alpha(data, name)[0]


def decode_rgb_alpha(data: bytes, name: str | os.PathLike = "<bytes>", alpha: bool = False):
    """``(rgb, alpha)``: the upright RGB image of :func:`decode_rgb` and, when ``alpha`` is asked and the
    image has transparency, its upright alpha channel as an ``L`` image (255 = opaque); else None."""
    from PIL import Image, ImageOps

    if not data:
        raise _bad_image(name, ValueError("empty file (0 bytes)"))
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            upright = ImageOps.exif_transpose(img)
            mask = upright.convert("RGBA").getchannel("A") if alpha and _has_alpha(upright) else None
            return _to_rgb(upright), mask
    except (*_READ_ERRORS, Image.DecompressionBombError) as err:
        raise _bad_image(name, err) from None


def _has_alpha(img) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info)


def latent_mask(alpha, size_hw: tuple[int, int]):
    """``alpha_mask``: an ``L`` alpha image already cut to the bucket (or None: fully opaque) as a float
    tensor of the latents' ``(height, width)`` in [0, 1], each value the mean over the pixels it covers."""
    import numpy as np
    import torch

    if alpha is None:
        return torch.ones(*size_hw)
    pixels = torch.from_numpy(np.asarray(alpha, dtype=np.float32) / 255.0)
    return torch.nn.functional.adaptive_avg_pool2d(pixels[None, None], tuple(size_hw))[0, 0]


def load_rgb(path: str | os.PathLike, alpha: bool = False):
    """Read and decode one image file (see :func:`decode_rgb`); with ``alpha``, ``(rgb, alpha)`` as
    :func:`decode_rgb_alpha` returns them."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise _bad_image(path, err) from None
    pair = decode_rgb_alpha(data, path, alpha=alpha)
    return pair if alpha else pair[0]


# ---------------------------------------------------------------------------------------------
# Header scan with a sidecar cache


def _stat_key(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _read_sidecar(sidecar: Path | None) -> dict:
    if sidecar is None or not sidecar.is_file():
        return {}
    try:
        data = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        log.warning("ignoring unreadable size cache %s (it will be rebuilt)", sidecar)
        return {}
    if not isinstance(data, dict) or data.get("version") != SIDECAR_VERSION:
        return {}
    entries = data.get("entries")
    return entries if isinstance(entries, dict) else {}


def _write_sidecar(sidecar: Path, entries: dict) -> None:
    text = json.dumps({"version": SIDECAR_VERSION, "entries": entries}, separators=(",", ":"))
    try:
        atomic_write_text(sidecar, text)
    except OSError as err:  # a read-only dataset folder: fine, just slower next time
        log.warning("cannot write size cache %s (%s); the next start will read headers again", sidecar, err)


def _probe(path: str) -> tuple[str, tuple[int, int] | None, tuple[int, int] | str]:
    stat = _stat_key(path)
    if stat is None:
        return path, None, "file not found"
    try:
        return path, stat, read_size(path)
    except DataError as err:
        return path, stat, err.message


def _record_bad(result: "SizeScan", path: str, reason: str, strict: bool) -> None:
    if strict:
        raise DataError(reason, where=path, hint="fix or remove the file, or run without strict")
    result.skipped.add(path, reason)


@dataclass
class SizeScan:
    """Result of :func:`scan_sizes`: upright sizes of readable files, the skipped ones, counts."""

    sizes: dict[str, tuple[int, int]]
    skipped: SkipLog
    from_cache: int = 0
    read: int = 0


def scan_sizes(
    paths: Iterable[str | os.PathLike],
    sidecar: str | os.PathLike | None = None,
    workers: int = 8,
    strict: bool = False,
) -> SizeScan:
    """Upright ``(width, height)`` of each image, reading only headers of files the sidecar lacks.

    A sidecar entry is reused when the file's size and mtime are unchanged. Unreadable files are in
    ``skipped`` (or raise :class:`DataError` with ``strict``). The sidecar is rewritten only when
    something new was read.
    """
    sidecar = Path(sidecar) if sidecar is not None else None
    cached = _read_sidecar(sidecar)
    result = SizeScan(sizes={}, skipped=SkipLog())
    to_read = []
    for path in map(str, paths):
        entry = cached.get(path)
        if entry is not None and _stat_key(path) == (entry[2], entry[3]):
            result.from_cache += 1
            if entry[0] > 0:
                result.sizes[path] = (entry[0], entry[1])
            else:  # remembered as unreadable: [0, 0, size, mtime, reason]
                _record_bad(result, path, str(entry[4]) if len(entry) > 4 else "unreadable", strict)
        else:
            to_read.append(path)
    fresh = {}
    if to_read:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for path, stat, outcome in pool.map(_probe, to_read, chunksize=64):
                if isinstance(outcome, str):
                    _record_bad(result, path, outcome, strict)
                    if stat is not None:
                        fresh[path] = [0, 0, stat[0], stat[1], outcome]
                    continue
                result.sizes[path] = outcome
                fresh[path] = [outcome[0], outcome[1], stat[0], stat[1]]
        result.read = len(to_read)
    if sidecar is not None and fresh:  # merged: subsets sharing a folder keep each other's entries
        _write_sidecar(sidecar, {**cached, **fresh})
    return result


HUE_SHIFT_DEGREES = 16.0  # at most, either way
GAMMA_RANGE = (0.95, 1.05)


def color_augment(image, rng):
    """``color_aug``: a third of the time, either a random hue rotation of up to 16 degrees or a random
    gamma in [0.95, 1.05] (even odds), as kohya's trainer does; otherwise ``image`` unchanged. ``rng`` is
    a ``random.Random``: the dataset seeds it per (seed, epoch, image, step), so resumes see the same."""
    import numpy as np
    from PIL import Image

    if rng.random() > 1 / 3:
        return image
    if rng.random() < 0.5:
        shift = rng.uniform(-HUE_SHIFT_DEGREES, HUE_SHIFT_DEGREES) * 256 / 360  # PIL's hue runs 0-255
        hsv = np.asarray(image.convert("HSV"), dtype=np.float64)
        hsv[..., 0] = np.mod(hsv[..., 0] + shift, 256)
        return Image.fromarray(np.mod(np.rint(hsv), 256).astype(np.uint8), mode="HSV").convert("RGB")
    gamma = rng.uniform(*GAMMA_RANGE)
    pixels = np.asarray(image, dtype=np.float64) / 255.0
    return Image.fromarray(np.clip(np.rint(255.0 * pixels**gamma), 0, 255).astype(np.uint8), mode="RGB")
