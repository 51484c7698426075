"""A small poster-like dataset made on the spot: images, captions and a kohya metadata JSON.

No dataset can be downloaded here, so the demo and the end-to-end tests draw their own "posters":
a two-colour gradient, a few shapes standing for a product or a character, and a title bar. Sizes
vary (portrait 2:3 posters, square and landscape banners) so aspect-ratio bucketing has work to do.
Everything is deterministic for a seed.
"""

from __future__ import annotations

import random
from pathlib import Path

from library.metadata import save_metadata

_GENRES = ["action movie", "romance movie", "horror movie", "animated film", "skincare product", "pet bag product"]
_COLOURS = {
    "red": (200, 40, 40), "blue": (40, 70, 200), "green": (40, 160, 80), "orange": (230, 130, 30),
    "purple": (120, 50, 160), "black": (20, 20, 20), "white": (235, 235, 235), "yellow": (230, 210, 50),
}
_SHAPES = ["circle", "square", "triangle"]
_SIZES = [(192, 288), (256, 384), (288, 192), (256, 256), (224, 336), (320, 240)]


def _gradient(width: int, height: int, top, bottom):
    from PIL import Image

    image = Image.new("RGB", (width, height))
    pixels = image.load()
    for y in range(height):
        mix = y / max(height - 1, 1)
        colour = tuple(int(a * (1 - mix) + b * mix) for a, b in zip(top, bottom))
        for x in range(width):
            pixels[x, y] = colour
    return image


def draw_poster(rng: random.Random, width: int, height: int):
    """One poster image and its caption/tags."""
    from PIL import ImageDraw

    genre = rng.choice(_GENRES)
    top_name, bottom_name = rng.sample(sorted(_COLOURS), 2)
    shape = rng.choice(_SHAPES)
    image = _gradient(width, height, _COLOURS[top_name], _COLOURS[bottom_name])
    draw = ImageDraw.Draw(image)
    cx, cy, r = width // 2, int(height * 0.45), min(width, height) // 4
    fill = _COLOURS[rng.choice(sorted(_COLOURS))]
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    bar = int(height * 0.12)
    draw.rectangle([0, height - bar, width, height], fill=(250, 250, 250))
    draw.text((8, height - bar + 4), "POSTER", fill=(10, 10, 10))
    caption = f"a {genre} poster, {top_name} to {bottom_name} gradient background, a {shape} in the center"
    tags = f"poster, {genre}, {shape}, title text, {top_name} background"
    return image, caption, tags


def make_demo_dataset(folder: str | Path, count: int = 12, seed: int = 0) -> Path:
    """Write ``count`` posters with ``.caption`` files and ``meta.json``; return the metadata path."""
    folder = Path(folder)
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    metadata = {}
    for index in range(count):
        width, height = _SIZES[index % len(_SIZES)]
        image, caption, tags = draw_poster(rng, width, height)
        name = f"poster_{index:03d}"
        image.save(images / f"{name}.png")
        (images / f"{name}.caption").write_text(caption + "\n", encoding="utf-8")
        metadata[name] = {"caption": caption, "tags": tags, "image_size": [width, height]}
    meta_path = folder / "meta.json"
    save_metadata(meta_path, metadata)
    return meta_path
