#!/usr/bin/env python
"""Write a tiny, randomly initialised SDXL in every form the toolkit reads.

    python tools/make_tiny_sdxl.py OUT [--seed N]

OUT/tiny-sdxl.safetensors  single-file checkpoint in the original SGM layout
OUT/diffusers/             the same weights as a diffusers pipeline folder
OUT/tokenizers/            both tokenizers in kohya's --tokenizer_cache_dir layout
OUT/vae-fix.safetensors    a differently seeded VAE as a VAE-only file (to exercise --vae)

The same seed always gives the same weights. It has real SDXL's structure (3-level UNet with
text_time conditioning, two CLIP text encoders of different widths, 4-level VAE) at ~3M parameters,
so every code path can be run on a CPU in seconds.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.cli import run_main  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="output folder (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="weights seed (default 0)")
    args = parser.parse_args(argv)

    from library.tiny_sdxl import make_tiny_sdxl

    start = time.time()
    paths = make_tiny_sdxl(args.out, seed=args.seed)
    for label, path in paths.items():
        print(f"{label:12s} {path}")
    print(f"tiny SDXL (seed {args.seed}) written to {args.out} in {time.time() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
