#!/usr/bin/env python
"""The README's demo: the whole pipeline on the embedded tiny SDXL, offline, on a CPU.

    python tools/demo.py --out demo_out

1. builds the tiny SDXL (single file, diffusers folder, tokenizers, a fixed VAE),
2. converts it both ways (single file -> diffusers folder -> single file with the fixed VAE baked in),
3. (when the training recipe is present) makes a small poster-like dataset with captions and a
   metadata JSON, caches latents, trains with Adafactor, samples with a negative prompt and saves a
   single file.
Each step prints what it wrote.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from library.cli import run_main  # noqa: E402


def _run(*args: str) -> None:
    print(f"\n$ python {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, *args], cwd=REPO, check=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_out", help="folder for everything the demo writes")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    start = time.time()
    tiny = out / "tiny"
    _run("tools/make_tiny_sdxl.py", str(tiny))
    _run("tools/convert_sdxl.py", str(tiny / "tiny-sdxl.safetensors"), str(out / "converted-diffusers"),
         "--tokenizer_cache_dir", str(tiny / "tokenizers"), "--overwrite")
    _run("tools/convert_sdxl.py", str(out / "converted-diffusers"), str(out / "tiny-sdxl-fixed-vae.safetensors"),
         "--vae", str(tiny / "vae-fix.safetensors"), "--save_precision", "fp16", "--overwrite")
    _run("tools/show_metadata.py", str(out / "tiny-sdxl-fixed-vae.safetensors"))
    train_demo = REPO / "tools" / "demo_train.py"
    if train_demo.is_file():
        _run(str(train_demo.relative_to(REPO)), "--out", str(out))
    print(f"\ndemo finished in {time.time() - start:.0f}s; everything is under {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
