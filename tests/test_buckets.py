"""Bucket resolutions, bucket choice, crop geometry and SDXL size conditioning (pure functions)."""

from __future__ import annotations

import random

import pytest
from PIL import Image

from library.buckets import (
    BucketSpec,
    apply_plan,
    bucket_resolutions,
    choose_bucket,
    pick_interpolation,
    plan_image,
    resized_size,
)

# Hand-computed with kohya's rule for resolution 1024x1024 (area 1048576), min 256, max 2048:
# height = min(2048, floor(1048576 / width / steps) * steps) for width = 256, 256+steps, ..., 2048.
STEP64 = [
    (256, 2048), (320, 2048), (384, 2048), (448, 2048), (512, 2048), (576, 1792), (640, 1600),
    (704, 1472), (768, 1344), (832, 1216), (896, 1152), (960, 1088), (1024, 1024), (1088, 960),
    (1152, 896), (1216, 832), (1280, 768), (1344, 768), (1408, 704), (1472, 704), (1536, 640),
    (1600, 640), (1664, 576), (1728, 576), (1792, 576), (1856, 512), (1920, 512), (1984, 512),
    (2048, 512),
]  # fmt: skip
STEP32 = [
    (256, 2048), (288, 2048), (320, 2048), (352, 2048), (384, 2048), (416, 2048), (448, 2048),
    (480, 2048), (512, 2048), (544, 1920), (576, 1792), (608, 1696), (640, 1632), (672, 1536),
    (704, 1472), (736, 1408), (768, 1344), (800, 1280), (832, 1248), (864, 1184), (896, 1152),
    (928, 1120), (960, 1088), (992, 1056), (1024, 1024), (1056, 992), (1088, 960), (1120, 928),
    (1152, 896), (1184, 864), (1216, 832), (1248, 832), (1280, 800), (1312, 768), (1344, 768),
    (1376, 736), (1408, 736), (1440, 704), (1472, 704), (1504, 672), (1536, 672), (1568, 640),
    (1600, 640), (1632, 640), (1664, 608), (1696, 608), (1728, 576), (1760, 576), (1792, 576),
    (1824, 544), (1856, 544), (1888, 544), (1920, 544), (1952, 512), (1984, 512), (2016, 512),
    (2048, 512),
]  # fmt: skip


@pytest.mark.parametrize("steps, pairs", [(64, STEP64), (32, STEP32)])
def test_bucket_resolutions_match_kohya(steps, pairs):
    spec = BucketSpec(resolution=(1024, 1024), min_bucket_reso=256, max_bucket_reso=2048, bucket_reso_steps=steps)
    expected = sorted(set(pairs) | {(h, w) for w, h in pairs})
    got = bucket_resolutions(spec)
    assert got == expected
    assert all(w * h <= 1024 * 1024 and w % steps == 0 and h % steps == 0 for w, h in got)


def test_bucket_resolutions_small_max_and_disabled():
    spec = BucketSpec(resolution=(1024, 1024), min_bucket_reso=512, max_bucket_reso=1024)
    heights_capped = [(w, 1024) for w in range(512, 1025, 64)]  # every height is capped at 1024
    assert bucket_resolutions(spec) == sorted(set(heights_capped) | {(h, w) for w, h in heights_capped})
    assert bucket_resolutions(BucketSpec(resolution=(768, 512), enable_bucket=False)) == [(768, 512)]


def test_choose_bucket_nearest_aspect():
    spec = BucketSpec()
    assert choose_bucket((2000, 3000), spec) == (832, 1216)  # 0.667 -> 0.684 is nearest
    assert choose_bucket((3000, 2000), spec) == (1216, 832)
    assert choose_bucket((500, 500), spec) == (1024, 1024)
    assert choose_bucket((1000, 4000), spec) == (512, 2048)


def test_no_upscale_buckets():
    spec = BucketSpec(bucket_no_upscale=True)
    assert choose_bucket((500, 300), spec) == (448, 256)  # small: rounded down, never enlarged
    assert choose_bucket((30, 20), spec) == (64, 64)  # below one step: one-step bucket
    # 4000x3000 scaled to the area: 1182.4 x 886.8. Width first: 1152 x 832 (ratio 1.385); height
    # first: 1088 x 832 (1.308); the latter is nearer 4:3, so 1109 x 832, rounded down to 1088 x 832.
    assert choose_bucket((4000, 3000), spec) == (1088, 832)


def test_resize_covers_bucket():
    assert resized_size((2000, 3000), (832, 1216)) == (832, 1248)
    assert resized_size((3000, 2000), (1216, 832)) == (1248, 832)
    assert pick_interpolation((2000, 3000), (832, 1248), None) == "area"
    assert pick_interpolation((100, 150), (832, 1248), None) == "lanczos"
    assert pick_interpolation((100, 150), (832, 1248), "bicubic") == "bicubic"


def test_center_crop_conditioning():
    plan = plan_image((2000, 3000), (832, 1216))
    assert plan.original_size == (3000, 2000)
    assert plan.crop_top_left == (16, 0)  # (1248 - 1216) / 2
    assert plan.target_size == (1216, 832)
    assert plan.size_conditioning() == (3000, 2000, 16, 0, 1216, 832)


def test_random_crop_and_flip_conditioning_is_real_geometry():
    rng = random.Random(3)
    plan = plan_image((1300, 1000), (1152, 896), random_crop=True, rng=rng)
    left, top = plan.crop_left_top
    assert plan.resized_size == (1165, 896) and 0 <= left <= 13 and top == 0
    assert plan.crop_top_left == (top, left)
    flipped = plan_image((1300, 1000), (1152, 896), random_crop=True, flip=True, rng=random.Random(3))
    assert flipped.crop_left_top == (left, top)
    assert flipped.crop_top_left == (top, 13 - left)  # position in the mirrored image


def test_apply_plan_pixels_match_geometry():
    # A horizontal gradient makes every column distinct: the flipped crop must equal the
    # mirrored image cropped at the reported crop_left.
    img = Image.new("RGB", (40, 20))
    img.putdata([(x * 6, y * 10, 0) for y in range(20) for x in range(40)])
    plan = plan_image((40, 20), (32, 16), random_crop=True, flip=True, rng=random.Random(1),
                      interpolation="nearest")
    out = apply_plan(img, plan)
    assert out.size == (32, 16)
    top, left = plan.crop_top_left
    mirrored = img.resize(plan.resized_size, Image.Resampling.NEAREST).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    assert out.tobytes() == mirrored.crop((left, top, left + 32, top + 16)).tobytes()



def test_face_crop_scales_the_face_into_range_and_centres_it():
    from library.buckets import face_from_name, plan_face_crop

    assert face_from_name("posters/hero_300_200_100_80.png") == (300, 200, 100, 80)
    assert face_from_name("posters/hero.png") is None and face_from_name("a_b_c_d_e.png") is None
    size, bucket, face = (1000, 800), (256, 256), (300, 200, 100, 80)
    # range [2, 2]: the face's larger side (100) becomes 256 / 2 = 128 px -> scale 1.28 (capped at 1.0,
    # and the image must still cover the sample: 256 / 800 = 0.32)
    plan = plan_face_crop(size, bucket, face, (2.0, 2.0), rng=random.Random(0))
    assert plan.resized_size == (1000, 800)  # no enlargement
    assert plan.crop_left_top == (300 - 128, 200 - 128)  # centred on the face
    small = plan_face_crop(size, bucket, face, (8.0, 8.0), rng=random.Random(0))  # face -> 32 px: scale 0.32
    assert small.resized_size == (320, 256)
    assert small.crop_left_top == (0, 0)  # centred at (96, 64), clamped into the image
    assert small.size_conditioning() == (800, 1000, 0, 0, 256, 256)
    flipped = plan_face_crop(size, bucket, face, (2.0, 2.0), flip=True, rng=random.Random(0))
    assert flipped.crop_top_left == (72, 1000 - 256 - 172)  # mirrored left, as plan_image reports it
    scales, lefts = set(), set()
    for seed in range(40):  # a real range: the scale varies inside it; random_crop moves the window
        one = plan_face_crop(size, bucket, face, (2.0, 6.0), random_crop=True, rng=random.Random(seed))
        scales.add(one.resized_size)
        lefts.add(one.crop_left_top[0])
        ratio = one.resized_size[0] / 1000
        assert 256 / (100 * 6) - 0.01 <= ratio <= 1.0
        assert 0 <= one.crop_left_top[0] <= one.resized_size[0] - 256
        assert 0 <= one.crop_left_top[1] <= one.resized_size[1] - 256
    assert len(scales) > 10 and len(lefts) > 10
