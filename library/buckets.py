"""Aspect-ratio buckets and the SDXL size conditioning of what is cut from each image.

Pure functions, no image decoding: sizes in, sizes out. Conventions: a *size* or *resolution* is
``(width, height)`` as PIL and kohya write it; the SDXL conditioning fields are ``(height, width)``
and ``(top, left)`` as SDXL's ``add_time_ids`` expect them.

Bucket resolutions follow kohya's ``make_bucket_resolutions``: every width from ``min_bucket_reso``
to ``max_bucket_reso`` in steps of ``bucket_reso_steps`` paired with the largest step-multiple height
whose area stays within ``resolution``'s area (capped at ``max_bucket_reso``, dropped below
``min_bucket_reso``), both orientations, plus the square bucket. An image goes to the bucket whose
aspect ratio is nearest its own, is resized to cover it (kohya's scale-to-fill), then cropped.

With ``bucket_no_upscale`` the bucket is made from the image itself (kohya's rule): an image larger
than the area is scaled down to it, and either way the size is rounded down to the step, so nothing is
ever enlarged. Deliberate difference: an image smaller than one step gets a one-step bucket (kohya
made a zero-sized bucket and crashed).

``flip_aug`` and ``crop_top_left``: a horizontal flip of the crop is the same pixels as cropping the
*mirrored* resized image at ``left' = resized_width - target_width - left``. :func:`plan_image` reports
that mirrored ``left'`` for flipped samples, so the conditioning describes the picture the model
actually sees (kohya always reported a centered crop: its issue #1443). ``top`` is unchanged.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

# PIL filter names for kohya's ``resize_interpolation`` values. ``area``/``box`` average whole
# source pixels (what OpenCV's INTER_AREA does when shrinking).
_PIL_FILTERS = {
    "lanczos": "LANCZOS", "nearest": "NEAREST", "bilinear": "BILINEAR", "linear": "BILINEAR",
    "bicubic": "BICUBIC", "cubic": "BICUBIC", "area": "BOX", "box": "BOX",
}  # fmt: skip


@dataclass(frozen=True)
class BucketSpec:
    """The bucket options of one dataset (the matching fields of ``config_util.DatasetConfig``)."""

    resolution: tuple[int, int] = (1024, 1024)  # (width, height); its area is kept
    enable_bucket: bool = True
    min_bucket_reso: int = 256
    max_bucket_reso: int = 2048
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False

    @classmethod
    def from_dataset(cls, dataset) -> "BucketSpec":
        return cls(
            resolution=tuple(dataset.resolution),
            enable_bucket=dataset.enable_bucket,
            min_bucket_reso=dataset.min_bucket_reso,
            max_bucket_reso=dataset.max_bucket_reso,
            bucket_reso_steps=dataset.bucket_reso_steps,
            bucket_no_upscale=dataset.bucket_no_upscale,
        )

    @property
    def max_area(self) -> int:
        return self.resolution[0] * self.resolution[1]


@dataclass(frozen=True)
class ImagePlan:
    """How one image becomes one training sample, and the SDXL conditioning that describes it."""

    bucket: tuple[int, int]  # (width, height) of the sample
    resized_size: tuple[int, int]  # (width, height) the image is resized to before cropping
    crop_left_top: tuple[int, int]  # where the crop is cut from the (unflipped) resized image
    flip: bool
    interpolation: str
    original_size: tuple[int, int]  # SDXL: (height, width) of the source image
    crop_top_left: tuple[int, int]  # SDXL: (top, left) in resized coordinates, mirrored if flipped
    target_size: tuple[int, int]  # SDXL: (height, width) of the sample

    def size_conditioning(self) -> tuple[int, int, int, int, int, int]:
        """``[orig_h, orig_w, crop_top, crop_left, target_h, target_w]`` (SDXL's add_time_ids order)."""
        return (*self.original_size, *self.crop_top_left, *self.target_size)


def bucket_resolutions(spec: BucketSpec) -> list[tuple[int, int]]:
    """All bucket ``(width, height)`` pairs, sorted; only the resolution itself without buckets."""
    if not spec.enable_bucket:
        return [tuple(spec.resolution)]
    steps, area = spec.bucket_reso_steps, spec.max_area
    side = int(math.sqrt(area) // steps) * steps
    resos = {(side, side)}
    width = spec.min_bucket_reso
    while width <= spec.max_bucket_reso:
        height = min(spec.max_bucket_reso, (area // width) // steps * steps)
        if height >= spec.min_bucket_reso:
            resos.add((width, height))
            resos.add((height, width))
        width += steps
    return sorted(resos)


def nearest_bucket(size: tuple[int, int], resos: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio (w/h) is nearest the image's; the first one on a tie."""
    aspect = size[0] / size[1]
    return min(resos, key=lambda r: abs(r[0] / r[1] - aspect))


def _round_to_step(value: float, steps: int) -> int:
    value = int(value + 0.5)
    return value - value % steps


def _no_upscale_bucket(size: tuple[int, int], spec: BucketSpec) -> tuple[int, int]:
    width, height = size
    steps, aspect = spec.bucket_reso_steps, size[0] / size[1]
    if width * height > spec.max_area:
        scaled_w = math.sqrt(spec.max_area * aspect)
        scaled_h = spec.max_area / scaled_w
        w_first = _round_to_step(scaled_w, steps)
        h_of_w = max(steps, _round_to_step(w_first / aspect, steps))
        h_first = _round_to_step(scaled_h, steps)
        w_of_h = _round_to_step(h_first * aspect, steps)
        if w_first and abs(w_first / h_of_w - aspect) < abs(w_of_h / max(h_first, 1) - aspect):
            width, height = w_first, int(w_first / aspect + 0.5)
        else:
            width, height = int(h_first * aspect + 0.5), h_first
    return max(steps, width - width % steps), max(steps, height - height % steps)


def choose_bucket(size: tuple[int, int], spec: BucketSpec, resos: list[tuple[int, int]] | None = None):
    """The bucket ``(width, height)`` for an image of ``size`` (width, height)."""
    width, height = size
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {size}")
    if spec.enable_bucket and spec.bucket_no_upscale:
        return _no_upscale_bucket(size, spec)
    return nearest_bucket(size, resos if resos is not None else bucket_resolutions(spec))


def resized_size(size: tuple[int, int], bucket: tuple[int, int]) -> tuple[int, int]:
    """Scale ``size`` to cover ``bucket`` (kohya's rounding), never smaller than it."""
    width, height = size
    if width / height > bucket[0] / bucket[1]:
        scale = bucket[1] / height
    else:
        scale = bucket[0] / width
    new = (int(width * scale + 0.5), int(height * scale + 0.5))
    return max(new[0], bucket[0]), max(new[1], bucket[1])


def pick_interpolation(size: tuple[int, int], resized: tuple[int, int], name: str | None) -> str:
    """``name`` if given, else ``area`` when shrinking and ``lanczos`` when enlarging (kohya's rule)."""
    if name:
        if name not in _PIL_FILTERS:
            raise ValueError(f"unknown resize_interpolation {name!r}; one of {sorted(_PIL_FILTERS)}")
        return name
    return "area" if resized[0] * resized[1] <= size[0] * size[1] else "lanczos"


def pil_filter(name: str):
    """The ``PIL.Image.Resampling`` member for an interpolation name."""
    from PIL import Image

    return getattr(Image.Resampling, _PIL_FILTERS[name])


def plan_image(
    size: tuple[int, int],
    bucket: tuple[int, int],
    *,
    random_crop: bool = False,
    flip: bool = False,
    rng: random.Random | None = None,
    interpolation: str | None = None,
) -> ImagePlan:
    """Resize-and-crop plan for an image of ``size`` (width, height) into ``bucket``.

    The crop is centered, or uniform over all positions with ``random_crop`` (drawn from ``rng``).
    ``flip`` mirrors the sample horizontally; ``crop_top_left`` then gives the crop's position in the
    mirrored image (see the module doc).
    """
    resized = resized_size(size, bucket)
    spare_w, spare_h = resized[0] - bucket[0], resized[1] - bucket[1]
    if random_crop:
        if rng is None:
            raise ValueError("random_crop needs an rng")
        left, top = rng.randint(0, spare_w), rng.randint(0, spare_h)
    else:
        left, top = spare_w // 2, spare_h // 2
    seen_left = spare_w - left if flip else left
    return ImagePlan(
        bucket=tuple(bucket),
        resized_size=resized,
        crop_left_top=(left, top),
        flip=flip,
        interpolation=pick_interpolation(size, resized, interpolation),
        original_size=(size[1], size[0]),
        crop_top_left=(top, seen_left),
        target_size=(bucket[1], bucket[0]),
    )


def face_from_name(path) -> tuple[int, int, int, int] | None:
    """kohya's face position in a file name, ``NAME_cx_cy_w_h.ext`` (pixels of the stored image), or None."""
    from pathlib import Path

    parts = Path(path).stem.split("_")
    if len(parts) < 5:
        return None
    try:
        cx, cy, w, h = (int(v) for v in parts[-4:])
    except ValueError:
        return None
    return (cx, cy, w, h) if w > 0 and h > 0 else None


def plan_face_crop(
    size: tuple[int, int],
    bucket: tuple[int, int],
    face: tuple[int, int, int, int],
    face_range: tuple[float, float],
    *,
    random_crop: bool = False,
    flip: bool = False,
    rng: random.Random,
    interpolation: str | None = None,
) -> ImagePlan:
    """``face_crop_aug_range``: scale the image so the face's larger side is between 1/high and 1/low
    of the sample's shorter side (never smaller than needed to cover the sample, never enlarged beyond
    that), then cut the sample around the face: centered on it, jittered a little when the range is a
    range, or moved anywhere that keeps it in view with ``random_crop`` (kohya's rules). The plan keeps
    the real geometry for SDXL's conditioning."""
    width, height = size
    cx, cy, face_w, face_h = face
    low, high = face_range
    face_size = max(face_w, face_h)
    short = min(bucket)
    cover = max(bucket[0] / width, bucket[1] / height)
    smallest = max(cover, min(1.0, short / (face_size * high)))
    largest = max(smallest, min(1.0, short / (face_size * low)))
    scale = smallest if smallest >= largest else rng.uniform(smallest, largest)
    resized = (max(int(width * scale + 0.5), bucket[0]), max(int(height * scale + 0.5), bucket[1]))
    position = []
    for target, length, centre in zip(bucket, resized, (int(cx * scale + 0.5), int(cy * scale + 0.5))):
        start = centre - target // 2
        if random_crop:  # anywhere, more often near the face
            reach = max(length - centre, centre)
            start += rng.randint(0, reach) + rng.randint(0, reach) - reach
        elif low != high and face_size > short // 10 and face_size >= 40:
            start += rng.randint(-face_size // 20, face_size // 20)
        position.append(max(0, min(start, length - target)))
    left, top = position
    seen_left = resized[0] - bucket[0] - left if flip else left
    return ImagePlan(
        bucket=tuple(bucket), resized_size=resized, crop_left_top=(left, top), flip=flip,
        interpolation=pick_interpolation(size, resized, interpolation), original_size=(height, width),
        crop_top_left=(top, seen_left), target_size=(bucket[1], bucket[0]),
    )  # fmt: skip


def apply_plan(image, plan: ImagePlan):
    """Resize, crop and (maybe) flip an RGB PIL image as ``plan`` says; returns a PIL image.

    Shrinking by a large factor first reduces by an integer factor (``reducing_gap``), which keeps
    area averaging exact and fast.
    """
    from PIL import Image

    if image.size != plan.resized_size:
        gap = 3.0 if plan.interpolation in ("area", "box") else None
        image = image.resize(plan.resized_size, pil_filter(plan.interpolation), reducing_gap=gap)
    left, top = plan.crop_left_top
    image = image.crop((left, top, left + plan.bucket[0], top + plan.bucket[1]))
    if plan.flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image
