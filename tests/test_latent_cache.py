"""Latent cache: entries equal a direct encode, and are rebuilt exactly when their inputs change."""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from library.buckets import apply_plan, plan_image
from library.errors import DataError
from library.latent_cache import (
    SDXL_VAE_SCALE,
    CacheJob,
    build_latent_cache,
    cache_path_for,
    load_entry,
)


def make_vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
        norm_num_groups=4, layers_per_block=1, sample_size=32,
    ).eval()  # fmt: skip


@pytest.fixture(scope="module")
def vae():
    return make_vae(0)


def _image(path, size, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def jobs(tmp_path):
    sizes = [(40, 60), (60, 40), (50, 50), (44, 66)]
    buckets = [(32, 48), (48, 32), (32, 32), (32, 48)]
    out = []
    for i, (size, bucket) in enumerate(zip(sizes, buckets)):
        path = _image(tmp_path / f"img{i}.png", size, i)
        cache = cache_path_for(path, bucket, tmp_path / "cache")
        out.append(CacheJob(path, cache, plan_image(size, bucket), flip_variant=i == 0))
    return out


def _mtimes(jobs):
    return [os.stat(j.cache_path).st_mtime_ns for j in jobs]


def _direct(vae, job, flip=False):
    from library.images import load_rgb

    img = apply_plan(load_rgb(job.image_path), replace(job.plan, flip=flip))
    x = torch.from_numpy(np.asarray(img)).permute(2, 0, 1).float() / 127.5 - 1
    with torch.no_grad():
        return vae.encode(x[None]).latent_dist.mean[0] * SDXL_VAE_SCALE


def test_cache_equals_direct_encode_and_is_reused(vae, jobs):
    first = build_latent_cache(jobs, vae, batch_size=2, workers=2, progress=False)
    assert (first.built, first.reused, len(first.skipped)) == (4, 0, 0)
    for job in jobs:
        latents, meta = load_entry(job.cache_path)
        assert latents.shape == (4, job.plan.bucket[1] // 2, job.plan.bucket[0] // 2)
        torch.testing.assert_close(latents, _direct(vae, job), rtol=1e-5, atol=1e-5)
        assert meta["scale"] == repr(SDXL_VAE_SCALE)
    flipped, _ = load_entry(jobs[0].cache_path, flipped=True)
    torch.testing.assert_close(flipped, _direct(vae, jobs[0], flip=True), rtol=1e-5, atol=1e-5)
    before = _mtimes(jobs)
    again = build_latent_cache(jobs, vae, batch_size=2, progress=False)
    assert (again.built, again.reused) == (0, 4) and _mtimes(jobs) == before


def test_edited_image_same_size_rebuilt_only(vae, jobs):
    build_latent_cache(jobs, vae, progress=False)
    before = _mtimes(jobs)
    _image(jobs[1].image_path, (60, 40), seed=99)  # new pixels, same size
    report = build_latent_cache(jobs, vae, progress=False)
    after = _mtimes(jobs)
    assert report.built == 1 and after[1] != before[1] and after[0] == before[0] and after[2:] == before[2:]
    torch.testing.assert_close(load_entry(jobs[1].cache_path)[0], _direct(vae, jobs[1]), rtol=1e-5, atol=1e-5)
    # an edit that keeps byte size AND mtime (BMP: fixed size) is caught by check="hash" only
    bmp = _image(jobs[2].image_path.with_suffix(".bmp"), (50, 50), seed=5)
    job = CacheJob(bmp, cache_path_for(bmp, (32, 32)), plan_image((50, 50), (32, 32)))
    build_latent_cache([job], vae, progress=False)
    stat = os.stat(bmp)
    _image(bmp, (50, 50), seed=6)
    os.utime(bmp, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(bmp).st_size == stat.st_size
    assert build_latent_cache([job], vae, check="stat", progress=False).built == 0  # trusted stat
    assert build_latent_cache([job], vae, check="hash", progress=False).built == 1
    torch.testing.assert_close(load_entry(job.cache_path)[0], _direct(vae, job), rtol=1e-5, atol=1e-5)


def test_vae_swap_and_geometry_change_rebuild(vae, jobs):
    build_latent_cache(jobs, vae, progress=False)
    assert build_latent_cache(jobs, make_vae(1), progress=False).built == 4
    changed = list(jobs)
    changed[2] = replace(jobs[2], flip_variant=True)
    changed[3] = replace(jobs[3], plan=plan_image((44, 66), (32, 48), interpolation="bicubic"))
    report = build_latent_cache(changed, make_vae(1), progress=False)
    assert (report.built, report.reused) == (2, 2)


def test_nan_latents_refused_with_name_and_hint(jobs):
    broken = make_vae(0)
    with torch.no_grad():
        broken.encoder.conv_in.weight.fill_(float("nan"))
    with pytest.raises(DataError, match=r"img.\.png.*NaN.*(--no_half_vae)"):
        build_latent_cache(jobs[:1], broken, progress=False)
    assert not jobs[0].cache_path.exists()


def test_unreadable_images_skipped_or_strict(vae, jobs):
    jobs[1].image_path.write_bytes(b"")
    report = build_latent_cache(jobs, vae, progress=False)
    assert report.built == 3 and [p for p, _ in report.skipped.skipped] == [str(jobs[1].image_path)]
    assert not jobs[1].cache_path.exists()
    with pytest.raises(DataError, match="img1.png"):
        build_latent_cache(jobs, vae, strict=True, progress=False)


def test_ranks_build_disjoint_shares_then_wait(vae, jobs):
    waits = []
    reports = [
        build_latent_cache(jobs, vae, rank=r, world_size=2, barrier=lambda r=r: waits.append(r), progress=False)
        for r in (0, 1)
    ]
    assert [r.built for r in reports] == [2, 2] and waits == [0, 1]
    assert all(j.cache_path.is_file() for j in jobs)


def test_prepare_buckets_latents_cli(vae, tmp_path, capsys):
    import json

    from finetune.prepare_buckets_latents import main

    data = tmp_path / "imgs"
    data.mkdir()
    for i, size in enumerate([(128, 192), (192, 128)]):
        _image(data / f"im{i}.png", size, i)
    (data / "bad.png").write_bytes(b"")
    (tmp_path / "in.json").write_text(json.dumps({"im0": {"caption": "a poster"}}))
    vae.save_pretrained(tmp_path / "vae")
    argv = [str(data), str(tmp_path / "in.json"), str(tmp_path / "out.json"), str(tmp_path / "vae"),
            "--max_resolution", "128,128", "--min_bucket_reso", "64", "--max_bucket_reso", "256",
            "--batch_size", "2", "--flip_aug"]
    assert main(argv) == 0
    out = json.loads((tmp_path / "out.json").read_text())
    # buckets of a 128x128 area, steps 64: 2:3 ties between 64x192 and 128x128; the first wins (as kohya)
    assert out["im0"] == {"caption": "a poster", "image_size": [128, 192], "train_resolution": [64, 192]}
    assert out["im1"] == {"image_size": [192, 128], "train_resolution": [128, 128]}  # 3:2 -> 1:1 beats 3:1
    printed = capsys.readouterr().out
    assert "2 built" in printed and "1 unreadable at start-up" in printed
    latents, meta = load_entry(data / "im1.png.128x128.sdxl-latents.safetensors", flipped=True)
    assert meta["bucket"] == ",".join(map(str, out["im1"]["train_resolution"]))
    assert main(argv) == 0 and "0 built" in capsys.readouterr().out


def test_alpha_mask_is_cached_on_the_latent_grid_and_added_to_old_entries(vae, tmp_path):
    from library.latent_cache import load_entry_mask

    rgba = np.zeros((48, 32, 4), dtype=np.uint8)
    rgba[..., :3] = np.random.default_rng(0).integers(0, 256, (48, 32, 3))
    rgba[:, :16, 3], rgba[:, 16:, 3] = 255, 64  # left half opaque, right half mostly transparent
    path = tmp_path / "cutout.png"
    Image.fromarray(rgba, "RGBA").save(path)
    bucket = (32, 48)
    plain = CacheJob(path, cache_path_for(path, bucket, tmp_path / "cache"), plan_image((32, 48), bucket),
                     flip_variant=True)  # fmt: skip
    masked = replace(plain, alpha_mask=True)
    assert build_latent_cache([plain], vae, progress=False).built == 1
    assert build_latent_cache([masked], vae, progress=False).built == 1  # the old entry had no mask
    latents, meta = load_entry(plain.cache_path)
    mask = load_entry_mask(plain.cache_path)
    assert meta["alpha_mask"] == "1" and mask.shape == latents.shape[-2:] == (24, 16)  # this VAE halves
    assert torch.all(mask[:, :8] == 1.0)
    torch.testing.assert_close(mask[:, 8:], torch.full((24, 8), 64 / 255))
    assert torch.equal(load_entry_mask(plain.cache_path, flipped=True), mask.flip(-1))
    assert build_latent_cache([masked], vae, progress=False).reused == 1
    assert build_latent_cache([plain], vae, progress=False).reused == 1  # a masked entry serves both
    opaque = _image(tmp_path / "opaque.png", (32, 48), 3)
    job = CacheJob(opaque, cache_path_for(opaque, bucket, tmp_path / "cache"), plan_image((32, 48), bucket),
                   alpha_mask=True)  # fmt: skip
    build_latent_cache([job], vae, progress=False)
    assert torch.equal(load_entry_mask(job.cache_path), torch.ones(24, 16))
