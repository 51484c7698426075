"""The latent cache: VAE latents of each training sample in a ``.safetensors`` file, never stale.

Layout: one file per image and bucket, ``<image name>.<W>x<H>.sdxl-latents.safetensors`` next to the
image (``poster.png.832x1216.sdxl-latents.safetensors``), or the same name prefixed by a hash of the
image path in a cache folder. It holds
``latents`` (C, H/8, W/8) and, when ``flip_aug`` is on, ``latents_flipped`` (the mirrored sample).
Its metadata holds the cache key and the geometry really used (``original_size`` as ``h,w``,
``used_resized`` and ``used_crop_left_top`` as ``w,h`` / ``left,top`` of the unflipped crop).

**Latents are stored scaled**: ``vae.encode(x).latent_dist.mean * 0.13025`` (SDXL's VAE scaling
factor, recorded in the entry as ``scale``), float32. The training loop uses them as they are, without
multiplying again. The distribution's mean is used rather than a sample (kohya samples), so a cache is
a deterministic function of the image and the VAE.

An entry is valid only for the same image bytes (SHA-256, recorded with the file's size and mtime;
with ``check="stat"`` an unchanged size+mtime trusts the recorded hash, any change re-hashes; with
``check="hash"`` every file is re-hashed), the same VAE (a fingerprint of its state dict, dtype
included), the same bucket, resize, crop, flip variant, interpolation and scale. Anything else is
rebuilt, only that entry. ``check="exists"`` (``--skip_cache_check``) trusts any existing file.

Building: images are read, hashed, decoded and resized in a thread pool while the VAE encodes batches
of one bucket; a progress bar and a one-line summary. With several processes each rank builds
``jobs[rank::world_size]`` and then calls ``barrier()`` so every rank sees a complete cache.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

from library.buckets import ImagePlan, apply_plan, plan_image
from library.errors import DataError
from library.fileio import atomic_path
from library.images import SkipLog, decode_rgb_alpha, latent_mask

log = logging.getLogger(__name__)

SDXL_VAE_SCALE = 0.13025
FORMAT = "sdxl-poster-latents/1"
SUFFIX = ".sdxl-latents.safetensors"
CHECKS = ("stat", "hash", "exists")
NAN_HINT = (
    "the fp16 SDXL VAE overflows: pass --vae with the fixed VAE (madebyollin/sdxl-vae-fp16-fix) "
    "or use --no_half_vae"
)


@dataclass(frozen=True)
class CacheJob:
    """One image to cache: where it is, where its entry goes, and how it is cut (unflipped plan)."""

    image_path: Path
    cache_path: Path
    plan: ImagePlan
    flip_variant: bool = False  # also store the latents of the mirrored sample
    alpha_mask: bool = False  # also store the alpha channel at latent resolution (ones when opaque)


@dataclass
class CacheReport:
    reused: int = 0
    built: int = 0
    skipped: SkipLog = field(default_factory=SkipLog)
    seconds: float = 0.0

    def summary(self) -> str:
        return (
            f"latent cache: {self.reused} reused, {self.built} built, {len(self.skipped)} skipped "
            f"(unreadable) in {self.seconds:.1f}s"
        )


def cache_path_for(
    image_path: str | os.PathLike, bucket: tuple[int, int], cache_dir: str | os.PathLike | None = None
) -> Path:
    """Where the entry of ``image_path`` in ``bucket`` lives (next to the image, or in ``cache_dir``).

    The file name keeps the image's full name (``a.png`` and ``a.jpg`` do not collide) and the
    bucket (one image used at two resolutions has two entries, as in kohya's newer npz names).
    """
    image_path = Path(image_path)
    name = f"{image_path.name}.{bucket[0]}x{bucket[1]}{SUFFIX}"
    if cache_dir is None:
        return image_path.with_name(name)
    tag = hashlib.sha1(str(image_path.resolve()).encode("utf-8")).hexdigest()[:12]
    return Path(cache_dir) / f"{tag}-{name}"


def _pair(values) -> str:
    return f"{values[0]},{values[1]}"


def geometry_fields(plan: ImagePlan, flip_variant: bool, vae_id: str, scale: float) -> dict[str, str]:
    """What, besides the image bytes, an entry must match (safetensors metadata is str -> str)."""
    return {
        "format": FORMAT,
        "vae": vae_id,
        "scale": repr(float(scale)),
        "bucket": _pair(plan.bucket),
        "resized": _pair(plan.resized_size),
        "crop_left_top": _pair(plan.crop_left_top),
        "flip_variant": "1" if flip_variant else "0",
        "interpolation": plan.interpolation,
    }


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_entry_metadata(path: Path) -> dict[str, str] | None:
    """The metadata of a cache entry (header only), or None if it is missing or unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as handle:
            return dict(handle.metadata() or {})
    except Exception:  # a truncated or foreign file is simply not a valid entry
        return None


def entry_is_valid(job: CacheJob, vae_id: str, scale: float, check: str = "stat") -> bool:
    """True when ``job.cache_path`` holds latents of exactly this image, VAE and geometry."""
    if check not in CHECKS:
        raise ValueError(f"check must be one of {CHECKS}, got {check!r}")
    if check == "exists":
        return job.cache_path.is_file()
    meta = read_entry_metadata(job.cache_path)
    if meta is None:
        return False
    if any(meta.get(k) != v for k, v in geometry_fields(job.plan, job.flip_variant, vae_id, scale).items()):
        return False
    if job.alpha_mask and meta.get("alpha_mask") != "1":  # an entry made without the mask: rebuilt with it
        return False
    try:
        st = job.image_path.stat()
    except OSError:
        return False
    same_stat = meta.get("image_size_bytes") == str(st.st_size) and meta.get("image_mtime_ns") == str(st.st_mtime_ns)
    if same_stat and check == "stat":
        return True
    return meta.get("image_sha256") == _file_sha256(job.image_path)


def load_entry(path: str | os.PathLike, flipped: bool = False):
    """``(latents, metadata)`` of one entry; ``flipped`` picks the mirrored sample's latents."""
    from safetensors import safe_open

    name = "latents_flipped" if flipped else "latents"
    try:
        with safe_open(str(path), framework="pt") as handle:
            if name not in handle.keys():
                raise DataError(f"cache entry has no {name}", where=str(path), hint="rebuild the latent cache")
            return handle.get_tensor(name), dict(handle.metadata() or {})
    except DataError:
        raise
    except Exception as err:  # truncated or overwritten after the start-up check
        raise DataError(f"cache entry cannot be read ({type(err).__name__}: {str(err).splitlines()[0][:120]})",
                        where=str(path), hint="delete it: the next start rebuilds it") from None


def load_entry_mask(path: str | os.PathLike, flipped: bool = False):
    """The entry's ``alpha_mask`` (latent resolution, 1 = opaque), mirrored for the flipped sample."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        if "alpha_mask" not in handle.keys():
            raise DataError("cache entry has no alpha_mask", where=str(path), hint="rebuild the latent cache")
        mask = handle.get_tensor("alpha_mask")
    return mask.flip(-1) if flipped else mask


# ---------------------------------------------------------------------------------------------
# Building


def _to_tensor(image):
    import numpy as np
    import torch

    array = np.array(image, dtype=np.uint8)
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def _prepare(job: CacheJob):
    """Thread-pool work: read, hash, decode, resize, crop. Returns (job, pixels, extra meta) or an error."""
    try:
        data = job.image_path.read_bytes()
    except OSError as err:
        return job, None, f"cannot read ({err.strerror})"
    try:
        image, alpha = decode_rgb_alpha(data, job.image_path, alpha=job.alpha_mask)
    except DataError as err:
        return job, None, err.message
    plan = job.plan
    if (image.size[1], image.size[0]) != plan.original_size:  # the size we were told was wrong
        log.warning("%s: real size %s differs from the size given %s", job.image_path, image.size,
                    plan.original_size[::-1])
        plan = plan_image(image.size, plan.bucket, interpolation=plan.interpolation)
    pixels = [_to_tensor(apply_plan(image, plan))]
    if job.flip_variant:
        pixels.append(_to_tensor(apply_plan(image, replace(plan, flip=True))))
    st = job.image_path.stat()
    extra = {"alpha_mask": None if alpha is None else apply_plan(alpha, plan)} if job.alpha_mask else {}
    extra = {
        **extra,
        "image_sha256": hashlib.sha256(data).hexdigest(),
        "image_size_bytes": str(st.st_size),
        "image_mtime_ns": str(st.st_mtime_ns),
        "image": str(job.image_path),
        # the geometry really used (the key fields above are the requested one)
        "original_size": _pair(plan.original_size),
        "used_resized": _pair(plan.resized_size),
        "used_crop_left_top": _pair(plan.crop_left_top),
    }
    return job, pixels, extra


def _prepared(jobs: Sequence[CacheJob], workers: int) -> Iterable[tuple]:
    """Results of :func:`_prepare` in order, at most a few batches decoded ahead."""
    ahead = max(4, 4 * workers)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pending: deque = deque()
        for job in jobs:
            pending.append(pool.submit(_prepare, job))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


@dataclass(frozen=True)
class _Encoder:
    vae: object
    vae_id: str
    scale: float
    device: str
    dtype: object

    def __call__(self, batch: list[tuple]) -> None:
        """Encode one same-bucket batch and write its entries."""
        import torch

        pixels = torch.stack([p for _, tensors, _ in batch for p in tensors])
        with torch.no_grad():
            dist = self.vae.encode(pixels.to(self.device, self.dtype)).latent_dist
            latents = (dist.mean * self.scale).float().cpu()
        at = 0
        for job, tensors, extra in batch:
            names = ["latents", "latents_flipped"][: len(tensors)]
            entry = {name: latents[at + i].contiguous() for i, name in enumerate(names)}
            at += len(tensors)
            if not all(torch.isfinite(t).all() for t in entry.values()):
                raise DataError("VAE produced NaN/inf latents", where=str(job.image_path), hint=NAN_HINT)
            extra = dict(extra)
            if "alpha_mask" in extra:  # the cut alpha image, averaged onto the latent grid
                entry["alpha_mask"] = latent_mask(extra.pop("alpha_mask"), entry["latents"].shape[-2:]).contiguous()
                extra["alpha_mask"] = "1"
            meta = {**geometry_fields(job.plan, job.flip_variant, self.vae_id, self.scale), **extra}
            _write_entry(job.cache_path, entry, meta)


def _write_entry(path: Path, tensors: dict, meta: dict[str, str]) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def vae_fingerprint(vae) -> str:
    from library.fingerprint import module_fingerprint

    return module_fingerprint(vae)


def build_latent_cache(
    jobs: Sequence[CacheJob],
    vae,
    *,
    batch_size: int = 1,
    workers: int = 2,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] | None = None,
    check: str = "stat",
    strict: bool = False,
    scale: float = SDXL_VAE_SCALE,
    progress: bool = True,
) -> CacheReport:
    """Make every entry of this rank's share of ``jobs`` valid; then wait for the other ranks.

    Unreadable images are skipped (listed in the report and the log) or, with ``strict``, raise
    :class:`DataError`. Latents with NaN/inf always raise :class:`DataError` naming the image.
    """
    from tqdm import tqdm

    start = time.perf_counter()
    report = CacheReport()
    vae_id = vae_fingerprint(vae)
    param = next(vae.parameters())
    encode = _Encoder(vae, vae_id, scale, str(param.device), param.dtype)
    mine = list(jobs)[rank::world_size]
    todo = [job for job in mine if not entry_is_valid(job, vae_id, scale, check)]
    report.reused = len(mine) - len(todo)
    todo.sort(key=lambda j: j.plan.bucket)  # stable: one bucket after another
    bar = tqdm(total=len(todo), desc="caching latents", unit="img", disable=not progress or rank != 0)
    batch: list[tuple] = []
    for job, pixels, outcome in _prepared(todo, workers):
        bar.update(1)
        if pixels is None:
            if strict:
                raise DataError(outcome, where=str(job.image_path), hint="fix or remove it, or run without strict")
            report.skipped.add(job.image_path, outcome)
            continue
        if batch and (batch[0][0].plan.bucket != job.plan.bucket or len(batch) >= batch_size):
            encode(batch)
            report.built += len(batch)
            batch = []
        batch.append((job, pixels, outcome))
    if batch:
        encode(batch)
        report.built += len(batch)
    bar.close()
    report.skipped.report()
    if barrier is not None:
        barrier()
    report.seconds = time.perf_counter() - start
    log.info("%s%s", report.summary(), f" (rank {rank}/{world_size})" if world_size > 1 else "")
    return report
