#!/usr/bin/env python
"""The training half of the demo: a generated poster set, then sdxl_train.py on the tiny SDXL.

    python tools/demo_train.py --out demo_out      (run by tools/demo.py after the model is built)

Writes OUT/data (posters, .caption files, meta.json), OUT/dataset.toml, OUT/prompts.txt, then trains
~20 steps with Adafactor (clip_threshold=1.0), cached latents, the fixed VAE, shuffled captions with
keep_tokens, noise offset and a warm-up schedule, samples with a negative-prompt preset every 10
steps, and saves fp16 single files into OUT/train.
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

DATASET_TOML = """\
# Made by tools/demo_train.py: one metadata subset, as in the poster workflow.
[general]
shuffle_caption = true
keep_tokens = 1
caption_extension = ".caption"

[[datasets]]
resolution = 128
batch_size = 2
enable_bucket = true
min_bucket_reso = 64
max_bucket_reso = 256
bucket_reso_steps = 32

  [[datasets.subsets]]
  image_dir = "{images}"
  metadata_file = "{meta}"
  num_repeats = 1
"""

PROMPTS = """\
# one prompt per line; kohya's inline options: --n negative, --w/--h size, --d seed, --s steps, --l CFG
a movie poster, blue to black gradient background, a circle in the center --np basic --d 1 --s 4 --l 5
a skincare product poster, white background --n blurry, low quality --d 2 --s 4 --l 5
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_out", help="the demo folder (OUT/tiny must hold the tiny model)")
    parser.add_argument("--steps", type=int, default=20, help="training steps (default 20)")
    args = parser.parse_args(argv)

    from library.demo_data import make_demo_dataset

    out = Path(args.out).resolve()
    tiny = out / "tiny"
    meta = make_demo_dataset(out / "data", count=12, seed=0)
    dataset_toml = out / "dataset.toml"
    dataset_toml.write_text(DATASET_TOML.format(images=(out / "data" / "images").as_posix(), meta=meta.as_posix()))
    prompts = out / "prompts.txt"
    prompts.write_text(PROMPTS, encoding="utf-8")
    print(f"demo dataset: 12 posters in {out / 'data'}, config {dataset_toml}", flush=True)
    command = [
        sys.executable, "sdxl_train.py",
        "--pretrained_model_name_or_path", str(tiny / "tiny-sdxl.safetensors"),
        "--tokenizer_cache_dir", str(tiny / "tokenizers"),
        "--vae", str(tiny / "vae-fix.safetensors"),
        "--dataset_config", str(dataset_toml),
        "--output_dir", str(out / "train"), "--output_name", "poster",
        "--cache_latents_to_disk",
        "--optimizer_type", "AdaFactor",
        "--optimizer_args", "scale_parameter=False", "relative_step=False", "warmup_init=False", "clip_threshold=1.0",
        "--learning_rate", "1e-4", "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "2",
        "--max_train_steps", str(args.steps), "--noise_offset", "0.05",
        "--gradient_checkpointing", "--mixed_precision", "no",
        "--sample_every_n_steps", "10", "--sample_prompts", str(prompts), "--sample_sampler", "euler_a",
        "--save_every_n_steps", "10", "--save_precision", "fp16", "--save_state", "--seed", "42",
        "--max_data_loader_n_workers", "1",
    ]  # fmt: skip
    start = time.time()
    print("$ " + " ".join(command[1:]), flush=True)
    subprocess.run(command, cwd=REPO, check=True)
    written = sorted(p.relative_to(out) for p in (out / "train").rglob("*") if p.is_file() and "state" not in str(p))
    print(f"training demo finished in {time.time() - start:.0f}s; wrote:")
    for path in written:
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
