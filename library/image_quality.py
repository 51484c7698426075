"""Per-image facts (size, DPI, bytes per pixel, hashes) and the seed's cleaning rules.

The seed drops images whose short side is under 512 or long side over 1024, whose file size in KB
divided by width x height is under 0.0005 (SD's own PNGs measure 0.0011-0.0015: anything far below
is heavily compressed), and whose DPI is under 96. Each threshold is a field of :class:`QualityRules`;
0 turns a rule off. Images without DPI information pass the DPI rule unless ``require_dpi``.

:func:`inspect_image` reads a file once: the header decides the size/DPI/KB-per-pixel rules; only
files that pass them are fully decoded (to catch truncated or corrupt data) and hashed (SHA-256 of
the bytes and a perceptual hash of the pixels for de-duplication).
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

from library.dedup import perceptual_hash
from library.images import upright_size

@dataclass(frozen=True)
class QualityRules:
    min_size: int = 512
    max_size: int = 1024
    min_kb_per_pixel: float = 0.0005
    min_dpi: float = 96.0
    require_dpi: bool = False


@dataclass(frozen=True)
class ImageFacts:
    path: Path
    bytes: int
    width: int | None = None
    height: int | None = None
    dpi: float | None = None
    reasons: tuple[str, ...] = ()
    content_hash: str = ""
    phash: int | None = None

    @property
    def kb_per_pixel(self) -> float | None:
        if not self.width or not self.height:
            return None
        return self.bytes / 1024 / (self.width * self.height)


def image_dpi(info: dict) -> float | None:
    """The smaller of the x/y DPI Pillow found in the file, or None if it has none."""
    dpi = info.get("dpi")
    try:
        values = [float(v) for v in dpi] if isinstance(dpi, (tuple, list)) else [float(dpi)]
    except (TypeError, ValueError):
        return None
    values = [v for v in values if v > 0]
    return round(min(values), 2) if values else None


def rule_reasons(width: int, height: int, size_bytes: int, dpi: float | None, rules: QualityRules) -> list[str]:
    """Which header-level rules an image breaks (empty: it passes)."""
    reasons = []
    if rules.min_size and min(width, height) < rules.min_size:
        reasons.append("too-small")
    if rules.max_size and max(width, height) > rules.max_size:
        reasons.append("too-large")
    if rules.min_kb_per_pixel and size_bytes / 1024 / (width * height) < rules.min_kb_per_pixel:
        reasons.append("low-kb-per-pixel")
    if dpi is None:
        if rules.require_dpi:
            reasons.append("no-dpi")
    elif rules.min_dpi and dpi < rules.min_dpi:
        reasons.append("low-dpi")
    return reasons


def inspect_image(path: Path, rules: QualityRules, hashes: bool = True) -> ImageFacts:
    """Facts and rule-breaking reasons for one file; never raises for bad image data."""
    from PIL import Image

    try:
        data = path.read_bytes()
    except OSError:
        return ImageFacts(path, 0, reasons=("corrupt",))
    width = height = dpi = None
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = upright_size(image)  # a sideways-stored phone photo counts upright
            dpi = image_dpi(image.info)
            if width <= 0 or height <= 0:
                raise ValueError("empty image")
            reasons = rule_reasons(width, height, len(data), dpi, rules)
            if reasons:  # the header settles it: no need to decode
                return ImageFacts(path, len(data), width, height, dpi, tuple(reasons))
            if image.format == "JPEG":
                image.draft("RGB", (64, 64))  # decode at 1/8 scale: every byte is still parsed
            image.load()
            phash = perceptual_hash(image) if hashes else None
    except Image.DecompressionBombError:  # so many pixels that Pillow refuses to open it
        return ImageFacts(path, len(data), reasons=("too-large",))
    except Exception:  # Pillow raises many kinds of errors for broken files
        return ImageFacts(path, len(data), width, height, dpi, ("corrupt",))
    content_hash = hashlib.sha256(data).hexdigest() if hashes else ""
    return ImageFacts(path, len(data), width, height, dpi, (), content_hash, phash)
