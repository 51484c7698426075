"""Training items, the bucket batch sampler (resume, ranks) and samples with SDXL conditioning."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from library.config_util import DatasetConfig, DatasetsConfig, SubsetConfig
from library.errors import ConfigError, DataError
from library.train_dataset import (
    BucketBatchSampler,
    SampleRef,
    TrainDataset,
    build_items,
    cached_only,
    collate,
    make_cache_jobs,
    split_validation,
)

SMALL = dict(resolution=(64, 64), min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=16)


def _png(path, size, value=0):
    Image.fromarray(np.full((size[1], size[0], 3), value, dtype=np.uint8)).save(path)


@pytest.fixture
def data(tmp_path):
    posters = tmp_path / "posters"
    posters.mkdir()
    meta = {}
    for i in range(6):
        size = (48, 80) if i % 2 else (80, 48)
        _png(posters / f"p{i}.png", size, 20 * i)
        meta[f"p{i}"] = {"caption": f"poster {i}", "tags": "title, rain"}
    meta["p0"]["image_size"] = [48, 80]  # deliberately "wrong": proves metadata sizes are used unread
    meta["missing"] = {"caption": "no file"}
    (posters / "p5.png").write_bytes(b"broken")
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    folder = tmp_path / "folder"
    folder.mkdir()
    for i in range(3):
        _png(folder / f"f{i}.png", (64, 64), 100 + i)
    (folder / "f0.caption").write_text("a folder caption")
    metadata_subset = SubsetConfig(metadata_file=tmp_path / "meta.json", image_dir=posters, flip_aug=True)
    folder_subset = SubsetConfig(image_dir=folder, num_repeats=2, class_tokens="sks poster")
    return DatasetsConfig(datasets=(
        DatasetConfig(subsets=(metadata_subset,), batch_size=2, **SMALL),
        DatasetConfig(subsets=(folder_subset,), batch_size=3, **SMALL),
    ))  # fmt: skip


def test_build_items(data, monkeypatch):
    built = build_items(data, workers=2)
    by_key = {it.image_key: it for it in built.items}
    assert sorted(by_key) == ["f0", "f1", "f2", "p0", "p1", "p2", "p3", "p4"]
    assert sorted(p.split("/")[-1] for p, _ in built.skipped.skipped) == ["missing", "p5.png"]
    assert by_key["p0"].size == (48, 80) and by_key["p0"].bucket == (48, 80)  # from metadata
    assert by_key["p2"].size == (80, 48) and by_key["p2"].bucket == (80, 48)  # from the header
    assert by_key["p1"].caption == "poster 1, title, rain"
    assert by_key["f0"].caption == "a folder caption" and by_key["f1"].caption == "sks poster"
    assert by_key["f1"].dataset_index == 1 and by_key["f1"].subset.num_repeats == 2
    with pytest.raises(DataError, match="missing"):
        build_items(data, strict=True)
    del_meta = json.loads(data.datasets[0].subsets[0].metadata_file.read_text())
    del del_meta["missing"]
    data.datasets[0].subsets[0].metadata_file.write_text(json.dumps(del_meta))
    with pytest.raises(DataError, match="p5.png"):
        build_items(data, strict=True)

    def no_reading(path):
        raise AssertionError("a header was read on the warm start")

    monkeypatch.setattr("library.images.read_size", no_reading)
    again = build_items(data, workers=2)  # sidecar: nothing opened
    assert [it.size for it in again.items] == [it.size for it in built.items]


def _epoch(sampler, epoch):
    sampler.set_epoch(epoch)
    return [[ref.index for ref in batch] for batch in sampler]


def _sampler(**kw):
    groups = ["a"] * 7 + ["b"] * 5 + ["c"] * 3
    return BucketBatchSampler(groups, 2, repeats=[1] * 12 + [2] * 3, seed=kw.pop("seed", 7), **kw), groups


def test_sampler_groups_repeats_and_order():
    sampler, groups = _sampler()
    first = _epoch(sampler, 1)
    assert all(len({groups[i] for i in b}) == 1 and 1 <= len(b) <= 2 for b in first)
    counts = Counter(i for b in first for i in b)
    assert all(counts[i] == (2 if i >= 12 else 1) for i in range(15))
    assert first == _epoch(_sampler()[0], 1)  # same seed and epoch -> same order
    assert first != _epoch(sampler, 2) and first != _epoch(_sampler(seed=8)[0], 1)


def test_sampler_resume_yields_identical_remaining_batches():
    sampler, _ = _sampler()
    sampler.set_epoch(3)
    it = iter(sampler)
    seen = [next(it) for _ in range(4)]
    state = sampler.state_dict()
    rest = list(it)
    resumed, _ = _sampler()
    resumed.load_state_dict(state)
    resumed.set_epoch(3)  # the loop calls this again on resume: it must not restart the epoch
    assert list(resumed) == rest and len(seen) + len(rest) == len(sampler)
    assert [ref.step for ref in rest[0]] == [2 * len(sampler) + 4] * len(rest[0])
    # a state saved with the loop's own count (DataLoader workers run the sampler ahead)
    resumed, _ = _sampler()
    resumed.load_state_dict(sampler.state_dict(batches_done=2) | {"epoch": 3})
    assert list(resumed) == seen[2:] + rest
    with pytest.raises(ConfigError, match="seed"):
        _sampler(seed=1)[0].load_state_dict(state)


def test_two_ranks_disjoint_and_in_step():
    shards = [_epoch(_sampler(rank=r, world_size=2)[0], 1) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) > 0
    flat = [[tuple(b) for b in s] for s in shards]
    assert not set(flat[0]) & set(flat[1])
    everything = [tuple(b) for b in _epoch(_sampler()[0], 1)]  # 10 batches
    interleaved = [b for pair in zip(flat[0], flat[1]) for b in pair]
    assert interleaved == everything
    thirds = [_epoch(_sampler(rank=r, world_size=3)[0], 1) for r in (0, 1, 2)]
    assert [len(t) for t in thirds] == [3, 3, 3]  # the 10th batch is left out so ranks stay in step
    assert sorted(tuple(b) for t in thirds for b in t) == sorted(everything[:9])


def test_samples_pixels_and_cached_latents_agree_on_conditioning(data, tmp_path):
    from tests.test_latent_cache import make_vae

    from library.latent_cache import build_latent_cache

    items = build_items(data, workers=2).items
    sampler = BucketBatchSampler.from_items(items, data, seed=3)
    pixels = TrainDataset(items, seed=3)
    vae = make_vae(0)
    jobs = make_cache_jobs(items, tmp_path / "cache")
    assert build_latent_cache(jobs, vae, progress=False).built == 8
    assert build_latent_cache(jobs, vae, progress=False).built == 0  # p0's wrong metadata size is stable
    kept, paths = cached_only(items, tmp_path / "cache")
    assert kept == items
    latents = TrainDataset(items, seed=3, cache_paths=paths)
    loader = torch.utils.data.DataLoader(latents, batch_sampler=sampler, collate_fn=collate)
    batches = list(loader)
    assert sum(len(b["captions"]) for b in batches) == 5 + 3 * 2
    for batch in batches:
        assert batch["latents"].shape[1] == 4 and batch["size_cond"].shape == (len(batch["captions"]), 6)
        for key, cond in zip(batch["image_keys"], batch["size_cond"].tolist()):
            item = next(it for it in items if it.image_key == key)
            assert cond[4:] == [item.bucket[1], item.bucket[0]]
    for ref in [SampleRef(i, e, s) for i in range(len(items)) for e, s in ((1, 0), (1, 5), (2, 9))]:
        a, b = pixels[ref], latents[ref]
        assert a["size_cond"].tolist() == b["size_cond"].tolist() and a["caption"] == b["caption"]
    # p0 is really 80x48 but metadata says 48x80: the conditioning reports the real original size
    p0 = pixels[SampleRef([it.image_key for it in items].index("p0"), 1, 0)]
    assert p0["size_cond"][:2].tolist() == [48, 80]
    # an entry damaged after start-up is reported by the sample (the training loop stops on it), not raised
    data_bytes = paths[0].read_bytes()
    paths[0].write_bytes(data_bytes[: len(data_bytes) // 2])
    broken = latents[SampleRef(0, 1, 0)]
    assert broken["unreadable"][0] == str(paths[0]) and "cannot be read" in broken["unreadable"][1]
    assert collate([broken, latents[SampleRef(1, 1, 0)]]) == {"unreadable": [broken["unreadable"]]}


def test_flip_mirrors_crop_left_in_conditioning(tmp_path):
    folder = tmp_path / "wide"
    folder.mkdir()
    _png(folder / "w.png", (100, 64))  # resized to 100x64 -> crop 64 of 100, left 18 (center)
    sub = SubsetConfig(image_dir=folder, flip_aug=True, random_crop=True)
    cfg = DatasetsConfig(datasets=(DatasetConfig(subsets=(sub,), resolution=(64, 64), enable_bucket=False),))
    items = build_items(cfg, workers=1).items
    ds = TrainDataset(items, seed=0)
    seen = set()
    for step in range(40):
        cond = ds[SampleRef(0, 1, step)]["size_cond"].tolist()
        assert cond[:3] == [64, 100, 0] and 0 <= cond[3] <= 36 and cond[4:] == [64, 64]
        seen.add(cond[3])
    assert len(seen) > 5  # random crops really move
    with pytest.raises(ConfigError, match="random_crop"):
        make_cache_jobs(items)


def test_color_aug_changes_hue_or_gamma_a_third_of_the_time_and_repeats_exactly(tmp_path):
    import colorsys
    import random

    from library.images import color_augment

    rgb = np.zeros((8, 8, 3), dtype=np.uint8)
    rgb[:4], rgb[4:] = (200, 80, 40), (128, 128, 128)  # an orange (hue 12 degrees) over a grey
    image = Image.fromarray(rgb)
    changed, hues, gammas = 0, [], 0
    for seed in range(300):
        out = np.asarray(color_augment(image, random.Random(seed)), dtype=np.int16)
        assert np.array_equal(out, np.asarray(color_augment(image, random.Random(seed)), dtype=np.int16))
        if np.array_equal(out, rgb):
            continue
        changed += 1
        if out[7, 0, 0] != 128:  # a gamma moves the grey and every channel of a pixel the same way
            gammas += 1
            assert len({int(np.sign(d)) for d in out[7, 0] - 128}) == 1
        else:  # a hue rotation leaves the grey alone and keeps the orange's brightest channel
            h, _, v = colorsys.rgb_to_hsv(*(out[0, 0] / 255.0))
            assert abs(v * 255 - 200) <= 1
            hues.append(h * 360 - 12)
    assert 70 <= changed <= 130  # about a third of 300
    assert gammas > 20 and len(hues) > 20
    assert max(abs(h) for h in hues) <= 16 + 2.9 and max(abs(h) for h in hues) > 8  # PIL keeps hue in 1.4-degree steps
    # in the dataset: deterministic per (epoch, step), different across steps, and not with cached latents
    folder = tmp_path / "aug"
    folder.mkdir()
    Image.fromarray(np.tile(rgb, (8, 8, 1))).save(folder / "a.png")
    sub = SubsetConfig(image_dir=folder, color_aug=True)
    cfg = DatasetsConfig(datasets=(DatasetConfig(subsets=(sub,), resolution=(64, 64), enable_bucket=False),))
    items = build_items(cfg, workers=1).items
    ds = TrainDataset(items, seed=0)
    samples = [ds[SampleRef(0, 1, step)]["pixels"] for step in range(12)]
    assert torch.equal(samples[3], ds[SampleRef(0, 1, 3)]["pixels"])
    assert len({tuple(s[:, 0, 0].tolist()) for s in samples}) > 1
    with pytest.raises(ConfigError, match="color_aug cannot be used with cached latents"):
        make_cache_jobs(items)


def test_alpha_mask_samples_follow_the_crop_and_flip(tmp_path):
    folder = tmp_path / "cutouts"
    folder.mkdir()
    rgba = np.zeros((64, 64, 4), dtype=np.uint8)
    rgba[..., :3] = 90
    rgba[:, :16, 3] = 255  # an opaque stripe on the left, transparent elsewhere
    Image.fromarray(rgba, "RGBA").save(folder / "a.png")
    _png(folder / "b.png", (64, 64), 30)  # no alpha channel: fully opaque
    sub = SubsetConfig(image_dir=folder, alpha_mask=True, flip_aug=True)
    cfg = DatasetsConfig(datasets=(DatasetConfig(subsets=(sub,), resolution=(64, 64), enable_bucket=False),))
    items = build_items(cfg, workers=1).items
    ds = TrainDataset(items, seed=0)
    a = [it.image_key for it in items].index("a")
    left = torch.zeros(8, 8)
    left[:, :2] = 1.0
    masks = {tuple(ds[SampleRef(a, 1, step)]["alpha_mask"][0].tolist()) for step in range(16)}
    assert masks == {tuple(left[0].tolist()), tuple(left.flip(-1)[0].tolist())}  # flipped with the image
    b = ds[SampleRef(1 - a, 1, 0)]
    assert torch.equal(b["alpha_mask"], torch.ones(8, 8))
    mixed = collate([ds[SampleRef(a, 1, 0)], {k: v for k, v in b.items() if k != "alpha_mask"}])
    assert mixed["alpha_mask"].shape == (2, 8, 8) and torch.equal(mixed["alpha_mask"][1], torch.ones(8, 8))
    assert "alpha_mask" not in collate([{k: v for k, v in b.items() if k != "alpha_mask"}])


def test_face_crop_aug_range_cuts_around_the_face_named_in_the_file(tmp_path):
    folder = tmp_path / "faces"
    folder.mkdir()
    pixels = np.full((300, 400, 3), 200, dtype=np.uint8)
    pixels[80:120, 280:320] = (255, 0, 0)  # a 40 px "face" centred at (300, 100)
    Image.fromarray(pixels).save(folder / "hero_300_100_40_40.png")
    Image.fromarray(pixels).save(folder / "plain.png")  # no face position: cropped as usual
    sub = SubsetConfig(image_dir=folder, face_crop_aug_range=(2.0, 2.0))
    cfg = DatasetsConfig(datasets=(DatasetConfig(subsets=(sub,), resolution=(64, 64), enable_bucket=False),))
    items = build_items(cfg, workers=1).items
    ds = TrainDataset(items, seed=0)
    hero = ds[SampleRef([it.image_key for it in items].index("hero_300_100_40_40"), 1, 0)]
    # face 40 px -> 64 / 2 = 32 px: scale 0.8, face centre (240, 80), window left 208, top 48
    assert hero["size_cond"].tolist() == [300, 400, 48, 208, 64, 64]
    red = (hero["pixels"][0] > 0.9) & (hero["pixels"][1] < -0.9)
    assert red[32, 32] and 0.2 < red.float().mean() < 0.3  # the 32 px face fills a quarter of the sample
    plain = ds[SampleRef([it.image_key for it in items].index("plain"), 1, 0)]
    assert plain["size_cond"].tolist() == [300, 400, 0, 10, 64, 64]  # centre crop of 85x64
    with pytest.raises(ConfigError, match="face_crop_aug_range cannot be used with cached latents"):
        make_cache_jobs(items)


def test_validation_split_is_stable(data):
    items = build_items(data, workers=2).items
    train, val = split_validation(items, 0.25, seed=42)
    assert len(val) == 2 and len(train) == len(items) - 2
    assert split_validation(items, 0.25, seed=42)[1] == val


def test_cache_jobs_distinct_names_and_merged_flip(tmp_path):
    folder = tmp_path / "same_stem"
    folder.mkdir()
    _png(folder / "a.png", (64, 64), 1)
    Image.new("RGB", (64, 64), 2).save(folder / "a.jpg")
    plain = SubsetConfig(image_dir=folder)
    flipped = SubsetConfig(image_dir=folder, flip_aug=True, num_repeats=2)
    cfg = DatasetsConfig(datasets=(DatasetConfig(subsets=(plain, flipped), **SMALL),))
    items = build_items(cfg, workers=1).items
    jobs = make_cache_jobs(items)
    assert len(items) == 4 and len(jobs) == 2  # a.png and a.jpg: two entries, each shared by two subsets
    assert sorted(j.cache_path.name for j in jobs) == [
        "a.jpg.64x64.sdxl-latents.safetensors", "a.png.64x64.sdxl-latents.safetensors"]
    assert all(j.flip_variant for j in jobs)  # one subset flips, so the shared entry holds both
