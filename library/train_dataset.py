"""Training items from a :class:`~library.config_util.DatasetsConfig`, and how they become batches.

* :func:`build_items` lists every usable image once: metadata subsets take captions from the
  metadata and sizes from its ``image_size`` when present (no image is opened); other sizes come
  from headers read in parallel and remembered in a sidecar (:func:`library.images.scan_sizes`).
  Each item gets its dataset's bucket.
* :class:`BucketBatchSampler` yields batches drawn from one (dataset, bucket) group at a time,
  shuffled by ``(seed, epoch)``, split across ranks, and resumable at the exact batch.
* :class:`TrainDataset` turns a :class:`SampleRef` into a sample (cached latents or pixels, caption,
  SDXL size conditioning); :func:`collate` stacks them.

Use it with a plain ``torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)``.
The sampler already shards by rank: do **not** pass that DataLoader through ``accelerator.prepare``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Hashable, NamedTuple, Sequence

from library.buckets import (
    BucketSpec,
    apply_plan,
    bucket_resolutions,
    choose_bucket,
    face_from_name,
    plan_face_crop,
    plan_image,
)
from library.config_util import IMAGE_EXTENSIONS, DatasetsConfig, SubsetConfig
from library.errors import ConfigError, DataError
from library.images import SkipLog, color_augment, latent_mask, load_rgb, scan_sizes

log = logging.getLogger(__name__)

SIZE_SIDECAR = ".sdxl-image-sizes.json"


@dataclass(frozen=True)
class TrainItem:
    """One image of one subset (repeats are the sampler's business)."""

    image_path: Path
    image_key: str
    caption: str  # the raw caption; per-step transforms happen in the caption hook
    size: tuple[int, int]  # upright (width, height)
    bucket: tuple[int, int]  # (width, height)
    dataset_index: int
    subset: SubsetConfig

    @property
    def is_reg(self) -> bool:
        return self.subset.is_reg


@dataclass
class ItemList:
    items: list[TrainItem]
    skipped: SkipLog


def _listing(folder: Path) -> dict[str, str]:
    """Images of ``folder`` by stem and by file name: one directory read instead of a stat per key."""
    found: dict[str, str] = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            name = entry.name
            stem, ext = os.path.splitext(name)
            if ext.lower() in IMAGE_EXTENSIONS and not name.startswith("."):
                found.setdefault(stem, entry.path)
                found[name] = entry.path
    return found


def _metadata_image(key: str, image_dir: Path | None, listing: dict[str, str]) -> str | None:
    if key in listing:
        return listing[key]
    candidate = image_dir / key if image_dir is not None else Path(key)
    if candidate.is_file():
        return str(candidate)
    for ext in IMAGE_EXTENSIONS if image_dir is not None and not Path(key).suffix else ():
        if (with_ext := candidate.with_name(candidate.name + ext)).is_file():
            return str(with_ext)
    return None


def _known_size(entry: dict) -> tuple[int, int] | None:
    size = entry.get("image_size")
    if isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size):
        return int(size[0]), int(size[1])
    return None


def _metadata_rows(subset: SubsetConfig, skipped: SkipLog, strict: bool) -> list[tuple[str, str, str, tuple | None]]:
    from library.captions import caption_from_metadata
    from library.metadata import load_metadata

    metadata = load_metadata(subset.metadata_file)
    listing = _listing(subset.image_dir) if subset.image_dir is not None and subset.image_dir.is_dir() else {}
    rows = []
    for key, entry in metadata.items():
        path = _metadata_image(key, subset.image_dir, listing)
        if path is None:
            looked = f"looked in {subset.image_dir or 'the current folder'}"
            if strict:
                raise DataError(f"no image for metadata key {key!r}", where=str(subset.metadata_file), hint=looked)
            skipped.add(key, f"no image for metadata key ({looked})")
            continue
        caption = caption_from_metadata(entry, subset, where=f"{subset.metadata_file}: {key}")
        rows.append((path, key, caption, _known_size(entry)))
    return rows


def _folder_rows(subset: SubsetConfig) -> list[tuple[str, str, str, None]]:
    from library.caption_files import list_images
    from library.captions import folder_caption

    return [(str(p), p.stem, folder_caption(p, subset), None) for p in list_images(subset.image_dir)]


def _sidecar_for(subset: SubsetConfig, sidecar_dir: Path | None) -> Path:
    source = subset.image_dir or subset.metadata_file.parent
    if sidecar_dir is None:
        return source / SIZE_SIDECAR
    tag = hashlib.sha1(str(Path(source).resolve()).encode()).hexdigest()[:12]
    return Path(sidecar_dir) / f"image-sizes-{tag}.json"


def _subset_items(subset, where, di, spec, resos, *, strict, workers, sidecar_dir, skipped) -> list[TrainItem]:
    rows = _metadata_rows(subset, skipped, strict) if subset.is_metadata_subset else _folder_rows(subset)
    unknown = [path for path, _, _, size in rows if size is None]
    sizes = {}
    if unknown:
        scan = scan_sizes(unknown, sidecar=_sidecar_for(subset, sidecar_dir), workers=workers, strict=strict)
        sizes = scan.sizes
        skipped.skipped.extend(scan.skipped.skipped)
    items, bucket_of = [], {}  # many images share a size: choose each size's bucket once
    for path, key, caption, size in rows:
        size = size or sizes.get(path)
        if size is None:
            continue
        bucket = bucket_of.get(size) or bucket_of.setdefault(size, choose_bucket(size, spec, resos))
        items.append(TrainItem(Path(path), key, caption, size, bucket, di, subset))
    uncaptioned = sum(1 for item in items if not item.caption.strip())
    if uncaptioned:  # kohya warns too: a missing or empty caption trains the image with an empty prompt
        log.warning("%s: %d of %d images have no caption (missing or empty caption file or metadata entry); "
                    "they train with an empty prompt", where, uncaptioned, len(items))  # fmt: skip
    if subset.face_crop_aug_range and items:
        faces = sum(face_from_name(item.image_path) is not None for item in items)
        log.info("%s: face_crop_aug_range: %d of %d images name a face position (NAME_cx_cy_w_h.ext); the "
                 "others are cropped as usual", where, faces, len(items))  # fmt: skip
    if not items:
        raise DataError(
            "subset has no usable images",
            where=where,
            hint="check image_dir / metadata_file (and the skipped files listed in the log)",
        )
    return items


def build_items(
    config: DatasetsConfig,
    *,
    strict: bool = False,
    workers: int = 8,
    sidecar_dir: str | os.PathLike | None = None,
) -> ItemList:
    """Every usable image of every subset, with its caption text, upright size and bucket.

    Images that cannot be found or read are skipped and listed (``strict`` raises instead); a subset
    left with no image is a :class:`DataError`. ``sidecar_dir`` holds the header-size caches (default:
    a hidden file in each image folder).
    """
    skipped = SkipLog()
    items: list[TrainItem] = []
    source = config.source or "dataset config"
    sidecar_dir = Path(sidecar_dir) if sidecar_dir is not None else None
    for di, dataset in enumerate(config.datasets):
        spec = BucketSpec.from_dataset(dataset)
        resos = bucket_resolutions(spec)
        for si, subset in enumerate(dataset.subsets):
            where = f"{source}: datasets[{di}].subsets[{si}]"
            items += _subset_items(
                subset, where, di, spec, resos, strict=strict, workers=workers,
                sidecar_dir=sidecar_dir, skipped=skipped,
            )  # fmt: skip
    skipped.report("images or metadata keys")
    return ItemList(items=items, skipped=skipped)


def split_validation(items: Sequence[TrainItem], split: float, seed: int | None) -> tuple[list, list]:
    """``(train, validation)``: a ``split`` fraction of images, the same for the same seed and keys."""
    if split <= 0:
        return list(items), []

    def rank(item: TrainItem) -> bytes:
        return hashlib.sha256(f"{seed}\0{item.image_path}".encode()).digest()

    ordered = sorted(items, key=rank)
    count = max(1, math.floor(len(ordered) * split))
    held = {id(i) for i in ordered[:count]}
    return [i for i in items if id(i) not in held], [i for i in items if id(i) in held]


# ---------------------------------------------------------------------------------------------
# Sampling


class SampleRef(NamedTuple):
    """What the sampler hands the dataset: which item, in which epoch, at which step of this rank."""

    index: int
    epoch: int
    step: int


def _rng(*parts) -> random.Random:
    digest = hashlib.sha256("\0".join(map(str, parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


class BucketBatchSampler:
    """Batches from one group (dataset, bucket) at a time; order fixed by ``(seed, epoch)``.

    Each item appears ``repeats[i]`` times per epoch. Every epoch: the entries of each group are
    shuffled and cut into batches (the last one of a group may be smaller, as in kohya), then the
    batch order is shuffled. Rank ``r`` of ``world_size`` takes batches ``r, r+world_size, ...``; the
    batch list is cut to a multiple of ``world_size`` so every rank runs the same number of steps
    (the few dropped batches change every epoch), and ranks never share a batch.

    ``state_dict()`` / ``load_state_dict()`` hold ``(epoch, position)``; a restored sampler yields
    exactly the remaining batches of that epoch. With DataLoader workers the sampler runs ahead of
    the training loop, so save ``state_dict(batches_done=<batches the loop consumed this epoch>)``.
    Epochs count from 1 (the captions' convention); ``SampleRef.step`` counts this rank's batches
    over all epochs from 0.
    """

    def __init__(
        self,
        groups: Sequence[Hashable],
        batch_size: int | Callable[[Hashable], int],
        *,
        repeats: Sequence[int] | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.groups = list(groups)
        self.repeats = list(repeats) if repeats is not None else [1] * len(self.groups)
        self.batch_size = batch_size if callable(batch_size) else (lambda _group, size=batch_size: size)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch, self.position = 1, 0
        self._layout_cache: tuple[int, list[list[int]]] | None = None

    @classmethod
    def from_items(cls, items: Sequence[TrainItem], config: DatasetsConfig, **kwargs) -> "BucketBatchSampler":
        sizes = [d.batch_size for d in config.datasets]
        return cls(
            [(it.dataset_index, it.bucket) for it in items],
            lambda group: sizes[group[0]],
            repeats=[it.subset.num_repeats for it in items],
            **kwargs,
        )

    def _all_batches(self, epoch: int) -> list[list[int]]:
        rng = _rng("batches", self.seed, epoch)
        by_group: dict[Hashable, list[int]] = {}
        for index, (group, times) in enumerate(zip(self.groups, self.repeats)):
            by_group.setdefault(group, []).extend([index] * times)
        batches = []
        for group in sorted(by_group, key=repr):
            members = by_group[group]
            rng.shuffle(members)
            size = self.batch_size(group)
            batches += [members[k : k + size] for k in range(0, len(members), size)]
        rng.shuffle(batches)
        if len(batches) < self.world_size:  # too few to share: every rank needs a step
            batches = (batches * self.world_size)[: self.world_size] if batches else []
        return batches[: len(batches) - len(batches) % self.world_size]

    def _layout(self, epoch: int) -> list[list[int]]:
        if self._layout_cache is None or self._layout_cache[0] != epoch:
            self._layout_cache = (epoch, self._all_batches(epoch)[self.rank :: self.world_size])
        return self._layout_cache[1]

    def __len__(self) -> int:
        return len(self._layout(self.epoch))

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first batch (unless a restored state already points into it)."""
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def __iter__(self):
        batches = self._layout(self.epoch)
        base = (self.epoch - 1) * len(batches)
        while self.position < len(batches):
            position = self.position
            self.position += 1
            yield [SampleRef(i, self.epoch, base + position) for i in batches[position]]
        self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self, batches_done: int | None = None, epoch: int | None = None) -> dict:
        """With DataLoader workers the sampler runs ahead of the loop (even into the next epoch):
        pass the ``epoch`` the loop is in and the ``batches_done`` it consumed in it."""
        position = self.position if batches_done is None else batches_done
        epoch = self.epoch if epoch is None else epoch
        return {
            "seed": self.seed, "epoch": epoch, "position": position,
            "world_size": self.world_size, "num_items": len(self.groups),
            "batches_per_epoch": len(self._layout(epoch)),
        }  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        for key, mine in (("seed", self.seed), ("world_size", self.world_size), ("num_items", len(self.groups))):
            if state.get(key) != mine:
                raise ConfigError(
                    f"cannot resume the data order: {key} was {state.get(key)}, now {mine}",
                    hint="resume with the same dataset, seed and number of processes",
                )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


# ---------------------------------------------------------------------------------------------
# Samples and batches


def make_cache_jobs(items: Sequence[TrainItem], cache_dir: str | os.PathLike | None = None) -> list:
    """One :class:`~library.latent_cache.CacheJob` per distinct image (center crop, flip variant)."""
    from library.latent_cache import CacheJob, cache_path_for

    jobs: dict[Path, object] = {}
    for item in items:
        for name, why in (("random_crop", "a new crop"), ("color_aug", "new colours"),
                          ("face_crop_aug_range", "a new face crop")):
            if getattr(item.subset, name):
                raise ConfigError(
                    f"{name} cannot be used with cached latents (each step needs {why})",
                    where=str(item.subset.metadata_file or item.subset.image_dir),
                    hint=f"turn off {name} or --cache_latents",
                )
        path = cache_path_for(item.image_path, item.bucket, cache_dir)
        if path in jobs:  # the same image in two subsets: one entry, flipped too / with a mask if either asks
            if item.subset.flip_aug:
                jobs[path] = replace(jobs[path], flip_variant=True)
            if item.subset.alpha_mask:
                jobs[path] = replace(jobs[path], alpha_mask=True)
            continue
        plan = plan_image(item.size, item.bucket, interpolation=item.subset.resize_interpolation)
        jobs[path] = CacheJob(item.image_path, path, plan, flip_variant=item.subset.flip_aug,
                              alpha_mask=item.subset.alpha_mask)  # fmt: skip
    return list(jobs.values())


def default_caption(item: TrainItem, ref: SampleRef, seed: int, max_train_steps: int | None) -> str:
    """The caption hook: kohya's transforms (``library.captions.process_caption``)."""
    from library.captions import process_caption

    return process_caption(
        item.caption, item.subset, seed=seed, epoch=max(1, ref.epoch), image_key=item.image_key,
        global_step=ref.step, max_train_steps=max_train_steps,
    )  # fmt: skip


def _pixels(image):
    import numpy as np
    import torch

    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def _pair(text: str) -> tuple[int, int]:
    first, second = text.split(",")
    return int(first), int(second)


class TrainDataset:
    """Map-style dataset over :class:`SampleRef`: cached latents (when ``cache_paths`` is given) or pixels.

    A sample is ``{"latents" | "pixels", "caption", "size_cond", "is_reg", "image_key"}``;
    ``size_cond`` is ``[orig_h, orig_w, crop_top, crop_left, target_h, target_w]`` of what was really
    cut (with latents: read from the cache entry, mirrored for a flipped sample). Flip and random crop
    are drawn from ``(seed, epoch, image, step)``, so a resumed run sees the same samples. Cached
    latents are already scaled by the VAE factor (see ``library.latent_cache``).
    """

    def __init__(
        self,
        items: Sequence[TrainItem],
        *,
        seed: int = 0,
        cache_paths: Sequence[Path] | None = None,
        caption_fn: Callable[[TrainItem, SampleRef], str] | None = None,
        max_train_steps: int | None = None,
    ):
        self.items = list(items)
        self.seed = seed
        self.cache_paths = list(cache_paths) if cache_paths is not None else None
        self.caption_fn = caption_fn
        self.max_train_steps = max_train_steps

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, ref: SampleRef) -> dict:
        import torch

        ref = SampleRef(*ref) if not isinstance(ref, SampleRef) else ref
        item = self.items[ref.index]
        rng = _rng("augment", self.seed, ref.epoch, item.image_key, ref.step)
        flip = item.subset.flip_aug and rng.random() < 0.5
        try:  # a file that broke after start-up's checks (truncated body, replaced file, damaged cache entry)
            if self.cache_paths is not None:
                sample, cond = self._cached(self.cache_paths[ref.index], flip, item.subset.alpha_mask)
            else:
                sample, cond = self._decoded(item, flip, rng)
        except DataError as err:
            return {"unreadable": (err.where or str(item.image_path), err.message)}
        return {
            **sample,
            "caption": self.caption_fn(item, ref) if self.caption_fn else default_caption(
                item, ref, self.seed, self.max_train_steps
            ),
            "size_cond": torch.tensor(cond, dtype=torch.float32),
            "is_reg": item.is_reg,
            "image_key": item.image_key,
        }

    @staticmethod
    def _cached(path: Path, flip: bool, alpha_mask: bool = False):
        from library.latent_cache import load_entry, load_entry_mask

        latents, meta = load_entry(path, flipped=flip)
        bucket, resized = _pair(meta["bucket"]), _pair(meta["used_resized"])
        left, top = _pair(meta["used_crop_left_top"])
        if flip:
            left = resized[0] - bucket[0] - left
        sample = {"latents": latents}
        if alpha_mask:
            sample["alpha_mask"] = load_entry_mask(path, flipped=flip)
        return sample, (*_pair(meta["original_size"]), top, left, bucket[1], bucket[0])

    @staticmethod
    def _decoded(item: TrainItem, flip: bool, rng: random.Random):
        image, alpha = load_rgb(item.image_path, alpha=True) if item.subset.alpha_mask else (load_rgb(item.image_path), None)
        face = face_from_name(item.image_path) if item.subset.face_crop_aug_range else None
        if face is not None:
            plan = plan_face_crop(
                image.size, item.bucket, face, item.subset.face_crop_aug_range, random_crop=item.subset.random_crop,
                flip=flip, rng=rng, interpolation=item.subset.resize_interpolation,
            )  # fmt: skip
        else:
            plan = plan_image(
                image.size, item.bucket, random_crop=item.subset.random_crop, flip=flip, rng=rng,
                interpolation=item.subset.resize_interpolation,
            )  # fmt: skip
        image = apply_plan(image, plan)
        if item.subset.color_aug:
            image = color_augment(image, rng)
        sample = {"pixels": _pixels(image)}
        if item.subset.alpha_mask:
            cut = None if alpha is None else apply_plan(alpha, plan)
            sample["alpha_mask"] = latent_mask(cut, (plan.bucket[1] // 8, plan.bucket[0] // 8))  # SDXL's VAE: 1/8
        return sample, plan.size_conditioning()


def collate(samples: list[dict]) -> dict:
    """Stack a same-bucket batch: ``latents`` or ``pixels`` (B, C, H, W), ``size_cond`` (B, 6), lists."""
    import torch

    unreadable = [s["unreadable"] for s in samples if "unreadable" in s]
    if unreadable:  # not raised in the worker: the training loop stops cleanly on every process
        return {"unreadable": unreadable}
    key = "latents" if "latents" in samples[0] else "pixels"
    masks = {}
    if any("alpha_mask" in s for s in samples):  # a batch may mix subsets with and without alpha_mask
        shape = next(s["alpha_mask"].shape for s in samples if "alpha_mask" in s)
        masks["alpha_mask"] = torch.stack([s.get("alpha_mask", torch.ones(shape)) for s in samples])
    return {
        **masks,
        key: torch.stack([s[key] for s in samples]),
        "captions": [s["caption"] for s in samples],
        "size_cond": torch.stack([s["size_cond"] for s in samples]),
        "is_reg": torch.tensor([s["is_reg"] for s in samples], dtype=torch.bool),
        "image_keys": [s["image_key"] for s in samples],
    }


def cached_only(items: Sequence[TrainItem], cache_dir: str | os.PathLike | None = None):
    """``(items, cache_paths)`` for the items whose cache entry exists (after the cache build; the
    images it skipped as unreadable drop out). Every rank gets the same list after the barrier."""
    from library.latent_cache import cache_path_for

    kept = [(item, cache_path_for(item.image_path, item.bucket, cache_dir)) for item in items]
    kept = [(item, path) for item, path in kept if path.is_file()]
    return [item for item, _ in kept], [path for _, path in kept]
