#!/usr/bin/env python
"""Convert an SDXL model between a single .safetensors file and a diffusers folder.

    python tools/convert_sdxl.py base.safetensors out_folder/ --tokenizer_cache_dir tokenizers/
    python tools/convert_sdxl.py diffusers_folder/ model.safetensors --save_precision fp16
    python tools/convert_sdxl.py base.safetensors base-fixed-vae.safetensors --vae sdxl_vae.safetensors

The output kind follows DST: a name ending in .safetensors is a single file in the original SGM
layout (what A1111/ComfyUI and kohya read), anything else a diffusers pipeline folder. --vae bakes a
fixed VAE (the SDXL 0.9 VAE or the fp16-fix VAE) into the output: the "integrated base model" the
poster workflow recommends. Nothing existing is overwritten without --overwrite.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.cli import run_main  # noqa: E402
from library.errors import ConfigError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="single .safetensors/.ckpt file, diffusers folder or hub id")
    parser.add_argument("dst", help="output: *.safetensors for a single file, otherwise a folder")
    parser.add_argument("--vae", help="VAE to bake in: VAE file, full SDXL file, diffusers folder or hub id")
    parser.add_argument("--save_precision", choices=("float", "fp16", "bf16"), default="float",
                        help="dtype of the saved weights (default: float = float32)")
    parser.add_argument("--tokenizer_cache_dir",
                        help="kohya-style tokenizer folder (needed offline when SRC is a single file)")
    parser.add_argument("--title", help="modelspec title for a single-file output (default: file name)")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    dst = Path(args.dst)
    if dst.exists() and not args.overwrite:
        raise ConfigError("output already exists", where=str(dst), hint="choose another name or pass --overwrite")

    from library.sdxl_model_util import save_sdxl_checkpoint
    from library.sdxl_train_util import load_target_model, save_diffusers

    start = time.time()
    models = load_target_model(args.src, vae=args.vae, tokenizer_cache_dir=args.tokenizer_cache_dir)
    if dst.suffix.lower() == ".safetensors":
        save_sdxl_checkpoint(dst, models, save_precision=args.save_precision, title=args.title)
        kind = "single file"
    else:
        save_diffusers(dst, models, save_precision=args.save_precision)
        kind = "diffusers folder"
    vae_note = f" with VAE {args.vae}" if args.vae else ""
    print(f"converted {args.src} -> {dst} ({kind}, {args.save_precision}){vae_note} in {time.time() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
