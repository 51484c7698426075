"""Images and their side-car text files, as kohya's captioning tools lay them out.

``poster.png`` gets ``poster.caption`` (BLIP) or ``poster.txt`` (WD14 tags) next to it. A metadata
image key is the file name without extension (``poster``), or with ``--full_path`` the image path as
found under the folder given on the command line (``data/posters/poster.png``), as kohya writes it.
"""

from __future__ import annotations

from pathlib import Path

from library.errors import ConfigError, DataError
from library.fileio import atomic_write_text, is_temp_name

# The image types kohya's tools look for (the dataset loader accepts the same list).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".avif", ".jxl")


def normalize_extension(extension: str) -> str:
    """``"txt"`` -> ``".txt"``; an empty extension or one with a path separator is a user error."""
    ext = extension.strip()
    if not ext or ext == "." or "/" in ext or "\\" in ext:
        raise ConfigError(f"bad file extension {extension!r}", hint="use e.g. .caption or .txt")
    return ext if ext.startswith(".") else "." + ext


def list_images(folder: str | Path, recursive: bool = False) -> list[Path]:
    """The image files in ``folder`` (and its sub-folders with ``recursive``), sorted by path.

    Hidden files and our own atomic-write temp files are skipped.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError("image folder not found", where=str(folder), hint="pass a folder of images")
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    images = [
        p
        for p in candidates
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and not p.name.startswith(".")
        and not is_temp_name(p.name)
        and p.is_file()
    ]
    return sorted(images)


def sidecar_path(image: Path, extension: str) -> Path:
    """The text file that belongs to ``image``: same folder, same stem, ``extension``."""
    return image.with_suffix(normalize_extension(extension))


def read_text_file(path: Path) -> str:
    """A caption/tag file's text, stripped; undecodable bytes are a :class:`DataError` naming the file."""
    try:
        return path.read_text(encoding="utf-8-sig").strip()
    except UnicodeDecodeError as err:
        raise DataError(f"not UTF-8 text (byte {err.start})", where=str(path), hint="save it as UTF-8") from None


def write_text_file(path: Path, text: str) -> None:
    """Write one caption/tag line (plus a newline), atomically."""
    atomic_write_text(path, text.strip() + "\n")


def load_rgb_on_white(path: Path):
    """Open an image as a PIL RGB image; transparent parts (alpha, palette transparency) become white.

    An unreadable, truncated or oversized file is a :class:`DataError` naming it.
    """
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(background, rgba).convert("RGB")
            return img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise DataError(f"cannot read image ({type(err).__name__}: {err})", where=str(path)) from None


def image_key(image: Path, full_path: bool) -> str:
    """kohya's metadata key: the stem, or the path as listed with ``full_path``."""
    return str(image) if full_path else image.stem


def image_keys(images: list[Path], full_path: bool) -> list[str]:
    """Keys for ``images``; two images with the same key (same stem in sub-folders) are an error."""
    seen: dict[str, Path] = {}
    for image in images:
        key = image_key(image, full_path)
        if key in seen:
            raise DataError(
                f"two images share the metadata key {key!r}: {seen[key]} and {image}",
                hint="use --full_path so keys are paths, or rename one of them",
            )
        seen[key] = image
    return list(seen)
