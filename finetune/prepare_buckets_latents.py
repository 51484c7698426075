"""Assign each image a bucket and cache its VAE latents, as kohya's prepare_buckets_latents.py does.

Example (from the repository root):

    python finetune/prepare_buckets_latents.py data/posters meta_cap_dd.json meta_lat.json \\
        models/sdxl.safetensors --batch_size 4 --max_resolution 1024,1024 \\
        --min_bucket_reso 512 --max_bucket_reso 2048 --mixed_precision bf16

For every image in TRAIN_DATA_DIR it writes ``<image name>.<W>x<H>.sdxl-latents.safetensors`` next
to the image (latents already multiplied by SDXL's VAE factor 0.13025), and OUT_JSON: the metadata of
IN_JSON plus ``image_size`` ``[w, h]`` and ``train_resolution`` ``[bucket w, bucket h]`` per image.
Entries that are still valid (same image bytes, VAE, bucket, crop, flip) are kept; stale ones are
rebuilt. Unreadable images are skipped and listed (``--strict`` stops instead).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.cli import run_main  # noqa: E402
from library.errors import ConfigError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Pick an aspect-ratio bucket for each image and cache its SDXL VAE latents "
        "(kohya's prepare_buckets_latents.py arguments).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("train_data_dir", help="folder of training images")
    p.add_argument("in_json", help="metadata JSON to read (from merge_captions/merge_dd_tags_to_metadata.py)")
    p.add_argument("out_json", help="metadata JSON to write, with image_size and train_resolution added")
    p.add_argument("model_name_or_path", help="SDXL .safetensors file or diffusers folder (its VAE is used)")
    p.add_argument("--vae", help="use this VAE instead (file or diffusers folder), e.g. the fp16-fix VAE")
    p.add_argument("--batch_size", type=int, default=1, help="images per VAE call")
    p.add_argument("--max_data_loader_n_workers", type=int, default=2, help="threads decoding images")
    p.add_argument("--max_resolution", default="1024,1024", help="training resolution 'width,height' (or one number)")
    p.add_argument("--min_bucket_reso", type=int, default=256, help="smallest bucket side")
    p.add_argument("--max_bucket_reso", type=int, default=1024, help="largest bucket side (SDXL users often use 2048)")
    p.add_argument("--bucket_reso_steps", type=int, default=64, help="bucket sides are multiples of this")
    p.add_argument("--bucket_no_upscale", action="store_true", help="buckets from each image's own size, never enlarge")
    p.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default="no", help="VAE precision")
    p.add_argument("--no_half_vae", action="store_true", help="keep the VAE in float32 even with --mixed_precision")
    p.add_argument("--full_path", action="store_true", help="metadata keys are image paths, not file stems")
    p.add_argument("--recursive", action="store_true", help="also look in sub-folders of train_data_dir")
    p.add_argument("--flip_aug", action="store_true", help="also cache the latents of each mirrored image")
    p.add_argument("--skip_existing", action="store_true",
                   help="accepted for kohya compatibility: valid entries are always kept, stale ones rebuilt")
    p.add_argument("--check", choices=("stat", "hash"), default="stat",
                   help="how to detect edited images: size+mtime then hash (stat), or always hash")
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable image instead of skipping it")
    return p


def _resolution(text: str) -> tuple[int, int]:
    try:
        parts = [int(v) for v in text.split(",")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) <= 0:
        raise ConfigError(f"--max_resolution {text!r} is not 'width,height'", hint="e.g. --max_resolution 1024,1024")
    return parts[0], parts[1]


def _check_out_json(path: str) -> None:
    """A folder at out_json, or a file in the way of its folder, is found now, not after caching every latent."""
    target = Path(path)
    if target.is_dir():
        raise ConfigError("out_json is a folder", where=path, hint="give a .json file path")
    for part in target.resolve().parents:
        if part.exists():
            if not part.is_dir():
                raise ConfigError(f"{part} is a file, not a folder", where=path, hint="choose another out_json path")
            return


def _load_vae(args):
    import torch

    from library.sdxl_train_util import load_vae

    vae = load_vae(args.vae or args.model_name_or_path)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)
    if args.no_half_vae:
        dtype = torch.float32
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return vae.to(device=device, dtype=dtype).eval()


def _jobs(args, metadata: dict, spec):
    from library.buckets import bucket_resolutions, choose_bucket, plan_image
    from library.caption_files import image_keys, list_images
    from library.images import scan_sizes
    from library.latent_cache import CacheJob, cache_path_for

    images = list_images(args.train_data_dir, recursive=args.recursive)
    keys = image_keys(images, args.full_path)
    scan = scan_sizes(images, sidecar=Path(args.train_data_dir) / ".sdxl-image-sizes.json",
                      workers=args.max_data_loader_n_workers, strict=args.strict)
    scan.skipped.report()
    resos, jobs = bucket_resolutions(spec), []
    for image, key in zip(images, keys):
        size = scan.sizes.get(str(image))
        if size is None:
            continue
        bucket = choose_bucket(size, spec, resos)
        jobs.append((key, CacheJob(image, cache_path_for(image, bucket), plan_image(size, bucket), args.flip_aug)))
        entry = metadata.setdefault(key, {})
        entry["image_size"], entry["train_resolution"] = list(size), list(bucket)
    return jobs, len(scan.skipped)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from library.buckets import BucketSpec
    from library.latent_cache import build_latent_cache
    from library.metadata import load_metadata, save_metadata

    if Path(args.out_json).resolve() == Path(args.in_json).resolve():
        raise ConfigError("out_json is the same file as in_json", hint="write to a new file, e.g. meta_lat.json")
    _check_out_json(args.out_json)
    for flag in ("batch_size", "max_data_loader_n_workers", "bucket_reso_steps"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag} must be at least 1")
    spec = BucketSpec(
        resolution=_resolution(args.max_resolution), min_bucket_reso=args.min_bucket_reso,
        max_bucket_reso=args.max_bucket_reso, bucket_reso_steps=args.bucket_reso_steps,
        bucket_no_upscale=args.bucket_no_upscale,
    )  # fmt: skip
    metadata = load_metadata(args.in_json)
    jobs, unreadable = _jobs(args, metadata, spec)
    vae = _load_vae(args)
    report = build_latent_cache(
        [job for _, job in jobs], vae, batch_size=args.batch_size,
        workers=args.max_data_loader_n_workers, check=args.check, strict=args.strict,
    )  # fmt: skip
    failed = {path for path, _ in report.skipped.skipped}
    for key, job in jobs:
        if str(job.image_path) in failed:
            metadata[key].pop("train_resolution", None)
    save_metadata(args.out_json, metadata)
    print(f"{report.summary()}; {unreadable} unreadable at start-up; metadata written to {args.out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
