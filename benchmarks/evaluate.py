#!/usr/bin/env python
"""Batched scoring (library.evaluation.Scorer) against the seed's one-image-at-a-time loop.

    python benchmarks/evaluate.py [--images 64] [--prompts 16] [--batch_size 32]

Both score the same PNG files with the same tiny random CLIP and aesthetic MLP. The seed's loop opens
each image, preprocesses and encodes it twice (once for the CLIP score, once for the LAION score) and
encodes its prompt, one image per forward pass. Ours encodes each image once, each distinct prompt
once, in batches, with the next batch loaded in a background thread. Prints both times, the ratio
(goal >= 4x) and the largest score difference between the two (should be ~1e-6).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def seed_loop(paths, prompts, clip, processor, mlp, preprocess):
    """The seed's per-image computation (get_clip_score + PredictionLAION), on transformers' CLIP.

    ``preprocess`` is the scorer's own (the same resize path), so only the loop structure differs.
    """
    import numpy as np
    import torch
    from PIL import Image

    from library.evaluation.scoring import _pooled

    clip_scores, laion_scores = [], []
    for path, prompt in zip(paths, prompts):
        image = Image.open(path)
        with torch.no_grad():
            pixels = preprocess([image.convert("RGB")])
            tokens = processor.tokenizer([prompt], truncation=True, max_length=77, return_tensors="pt")
            image_features = _pooled(clip.get_image_features(pixel_values=pixels))
            text_features = _pooled(clip.get_text_features(**tokens))
            image_features = image_features / image_features.norm(dim=-1, keepdim=True)
            text_features = text_features / text_features.norm(dim=-1, keepdim=True)
            clip_scores.append(torch.matmul(image_features, text_features.T).item())
            pixels = preprocess([image.convert("RGB")])
            embedding = _pooled(clip.get_image_features(pixel_values=pixels)).numpy()
            embedding = embedding / np.linalg.norm(embedding, axis=-1, keepdims=True)
            laion_scores.append(float(mlp(torch.from_numpy(embedding).float())))
    return clip_scores, laion_scores


def make_images(folder: Path, count: int, prompt_count: int, size: int) -> tuple[list[Path], list[str]]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    words = ["poster", "cat", "bag", "white", "movie", "bottle", "sunset", "bicycle"]
    prompt_list = [" ".join(rng.choice(words, 6)) for _ in range(prompt_count)]
    paths, prompts = [], []
    for index in range(count):
        prompt_index = index % prompt_count
        path = folder / f"bench-{prompt_index}-{index // prompt_count}.png"
        Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8")).save(path)
        paths.append(path)
        prompts.append(prompt_list[prompt_index])
    return paths, prompts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64, help="number of images (default: 64)")
    parser.add_argument("--prompts", type=int, default=16, help="distinct prompts (default: 16)")
    parser.add_argument("--image_size", type=int, default=512, help="PNG side in pixels (default: 512)")
    parser.add_argument("--batch_size", type=int, default=32, help="batch size of the batched scorer")
    parser.add_argument("--repeat", type=int, default=3, help="best of N timings (default: 3)")
    parser.add_argument("--clip_image_size", type=int, default=224,
                        help="input size of the tiny CLIP (default 224, as ViT-L/14)")
    parser.add_argument("--clip_patch", type=int, default=16, help="vision patch size (default: 16)")
    parser.add_argument("--clip_width", type=int, default=128, help="vision width (default: 128; ViT-L: 1024)")
    parser.add_argument("--clip_layers", type=int, default=4, help="vision layers (default: 4; ViT-L: 24)")
    args = parser.parse_args(argv)

    import torch

    from library.evaluation.aesthetic import load_aesthetic_model
    from library.evaluation.scoring import Scorer, load_clip
    from library.evaluation.tiny_clip import make_random_aesthetic, make_tiny_clip

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        clip_dir = make_tiny_clip(root / "clip", projection_dim=16, image_size=args.clip_image_size,
                                  patch_size=args.clip_patch, vision_width=args.clip_width,
                                  vision_layers=args.clip_layers)
        mlp_path = make_random_aesthetic(root / "aesthetic.pth", input_size=16)
        (root / "images").mkdir()
        paths, prompts = make_images(root / "images", args.images, args.prompts, args.image_size)
        clip, processor = load_clip(clip_dir)
        mlp = load_aesthetic_model(mlp_path)
        scorer = Scorer((clip, processor), mlp, "cpu", args.batch_size)
        seed_loop(paths[:2], prompts[:2], clip, processor, mlp, scorer.preprocess)  # warm-up
        scorer.score_files(paths[:2], prompts[:2])

        loop_seconds = batched_seconds = float("inf")
        for _ in range(args.repeat):  # best of N: the machine may be shared
            start = time.perf_counter()
            loop_clip, loop_laion = seed_loop(paths, prompts, clip, processor, mlp, scorer.preprocess)
            loop_seconds = min(loop_seconds, time.perf_counter() - start)
            start = time.perf_counter()
            results, failed = scorer.score_files(paths, prompts)
            batched_seconds = min(batched_seconds, time.perf_counter() - start)

    assert not failed
    clip_diff = max(abs(results[p][0] - c) for p, c in zip(paths, loop_clip))
    laion_diff = max(abs(results[p][1] - s) for p, s in zip(paths, loop_laion))
    print(f"tiny CLIP (ViT {args.clip_layers} layers x {args.clip_width}, {args.clip_image_size} px input, "
          f"patch {args.clip_patch}, 16-d), {args.images} images {args.image_size}px, {args.prompts} prompts, "
          f"torch threads {torch.get_num_threads()}")
    print(f"seed loop (1 image/pass, 2 image passes): {loop_seconds:7.3f}s  {args.images / loop_seconds:7.1f} img/s")
    print(f"batched (batch {args.batch_size}, background loading): {batched_seconds:7.3f}s  "
          f"{args.images / batched_seconds:7.1f} img/s")
    print(f"speed-up: {loop_seconds / batched_seconds:.1f}x (goal >= 4x); "
          f"max |diff| CLIP {clip_diff:.1e}, LAION {laion_diff:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
