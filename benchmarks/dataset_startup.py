"""Dataset start-up at POSTER-TEXT's size, and cached-latent batch loading: ours vs kohya's .npz.

    python benchmarks/dataset_startup.py                 # 114,009 entries (about a minute)
    python benchmarks/dataset_startup.py --entries 5000  # a quick check

Start-up = read the metadata, find every image, get every size, assign buckets, build the sampler.
Each start runs in a fresh process (so peak RSS is its own):

* cold: metadata without ``image_size``, no size sidecar: every image header is read (in parallel);
* warm: the same, with the sidecar written by the cold start: no image is opened;
* metadata sizes: metadata with ``image_size`` (as prepare_buckets_latents.py writes it).

The images are a few small PNGs of poster-like sizes hard-linked under 114,009 names (headers are all
start-up reads). The OS page cache is warm in every case: "cold" means no sidecar, not a cold disk.

Batch load: ``--batch`` SDXL 1024x1024-sized latents (4x128x128 float32, with the mirrored variant,
as flip_aug stores them) read from our ``.safetensors`` entries vs kohya-style uncompressed ``.npz``
files holding the same arrays; median of ``--rounds``; the ratio is npz time / ours.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

POSTER_SIZES = [(832, 1216), (896, 1152), (768, 1344), (1024, 1024), (1200, 1800), (2000, 3000),
                (1080, 1350), (1536, 640), (640, 1536), (1500, 2100), (700, 1000), (3000, 4500)]


def make_dataset(folder: Path, entries: int) -> None:
    """Images (hard links to a few PNGs) plus two metadata files: without and with image_size."""
    from PIL import Image

    sources = []
    for i, size in enumerate(POSTER_SIZES):
        path = folder / f".source{i}.png"
        Image.new("RGB", size, (10 * i, 80, 160)).save(path)
        sources.append((path, size))
    images = folder / "images"
    images.mkdir()
    plain, sized = {}, {}
    for n in range(entries):
        source, size = sources[n % len(sources)]
        key = f"poster_{n:06d}"
        target = images / f"{key}.png"
        try:
            os.link(source, target)
        except OSError:
            shutil.copyfile(source, target)
        plain[key] = {"caption": f"a movie poster number {n}", "tags": "poster, title, text"}
        sized[key] = {**plain[key], "image_size": list(size)}
    (folder / "meta.json").write_text(json.dumps(plain))
    (folder / "meta_sized.json").write_text(json.dumps(sized))


def child_startup(folder: Path, metadata: str) -> None:
    start = time.perf_counter()
    from library.config_util import DatasetConfig, DatasetsConfig, SubsetConfig
    from library.train_dataset import BucketBatchSampler, build_items

    subset = SubsetConfig(metadata_file=folder / metadata, image_dir=folder / "images")
    config = DatasetsConfig(datasets=(DatasetConfig(subsets=(subset,), batch_size=4, min_bucket_reso=512),))
    items = build_items(config, workers=8).items
    sampler = BucketBatchSampler.from_items(items, config, seed=0)
    batches = len(sampler)
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_mb, "items": len(items), "batches": batches}))


def run_start(folder: Path, metadata: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(folder), metadata],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_batch_load(folder: Path, batch: int, rounds: int) -> tuple[float, float]:
    import numpy as np
    import torch

    from library.latent_cache import _write_entry, load_entry

    rng = np.random.default_rng(0)
    ours, npz = [], []
    for i in range(batch):
        lat = rng.standard_normal((4, 128, 128), dtype=np.float32)
        flipped = np.ascontiguousarray(lat[:, :, ::-1])
        path = folder / f"latent{i}.safetensors"
        meta = {"bucket": "1024,1024", "used_resized": "1024,1024", "used_crop_left_top": "0,0",
                "original_size": "1024,1024"}
        _write_entry(path, {"latents": torch.from_numpy(lat), "latents_flipped": torch.from_numpy(flipped)}, meta)
        ours.append(path)
        np.savez(folder / f"latent{i}.npz", latents=lat, original_size=np.array([1024, 1024]),
                 crop_ltrb=np.array([0, 0, 1024, 1024]), latents_flipped=flipped)
        npz.append(folder / f"latent{i}.npz")

    def load_ours():
        return torch.stack([load_entry(p)[0] for p in ours])

    def load_npz():
        tensors = []
        for p in npz:
            with np.load(p) as data:
                tensors.append(torch.from_numpy(data["latents"]))
                _ = data["original_size"], data["crop_ltrb"]
        return torch.stack(tensors)

    assert torch.equal(load_ours(), load_npz())

    def timed(fn):
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    return timed(load_ours), timed(load_npz)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--entries", type=int, default=114_009, help="metadata entries (POSTER-TEXT has 114,009)")
    p.add_argument("--batch", type=int, default=16, help="latents per batch in the load benchmark")
    p.add_argument("--rounds", type=int, default=20, help="timed repetitions of the batch load")
    p.add_argument("--workdir", help="where to build the data (default: a temp folder, removed afterwards)")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child_startup(Path(args.child[0]), args.child[1])
        return 0
    work = Path(args.workdir or tempfile.mkdtemp(prefix="dataset_startup_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        start = time.perf_counter()
        make_dataset(work, args.entries)
        print(f"built {args.entries} entries in {time.perf_counter() - start:.1f}s ({work})")
        rows = [("cold (headers read)", run_start(work, "meta.json")),
                ("warm (size sidecar)", run_start(work, "meta.json")),
                ("metadata image_size", run_start(work, "meta_sized.json"))]
        for name, r in rows:
            print(f"start-up {name:22s} {r['seconds']:7.2f} s   peak RSS {r['peak_rss_mb']:7.1f} MB   "
                  f"{r['items']} items, {r['batches']} batches")
        ours, npz = bench_batch_load(work, args.batch, args.rounds)
        print(f"cached batch of {args.batch} (4x128x128 fp32): safetensors {ours * 1000:.2f} ms, "
              f"kohya .npz {npz * 1000:.2f} ms, ratio npz/ours {npz / ours:.1f}x")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
