#!/usr/bin/env python
"""Compare models: generate the same prompts with each, score the images, write a report.

    # 1. the same prompts and seeds for every model (paired comparison)
    python tools/evaluate.py generate --model base=sdxl_base.safetensors --model poster=poster.safetensors \\
        --prompts prompts.csv --images_per_prompt 4 --negative_preset basic --output_dir eval/images

    # 2. CLIP score + LAION aesthetic score per image, statistics per model, report
    python tools/evaluate.py score --images_root eval/images --prompts prompts.csv \\
        --aesthetic_model sac+logos+ava1-l14-linearMSE.pth --output_dir eval/scores

    # 3. rebuild the report from the CSVs alone
    python tools/evaluate.py report --output_dir eval/scores --images_root eval/images

Images are named <model>-<prompt_index>-<image_index>.png inside one folder per model; the prompt
index (from 0) selects the row of the prompt file (a CSV with a 'Prompts' column, or a .txt with one
prompt per line). score writes per_image/<model>.csv (ClipScore, LAIONScore, ImageIndex, File, Prompt),
summary.csv (one row per model: LAION count/mean/std/min/quartiles/max/skew/kurtosis, CLIP mean/std),
report.html and plots/*.png. Models already in summary.csv are skipped unless --rescore.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.cli import run_main  # noqa: E402
from library.errors import ConfigError, DataError  # noqa: E402

NEGATIVE_PRESET_HELP = "negative prompt preset: basic, anime, realistic, non_adult, or several joined by '+'"


def _add_score(sub) -> None:
    p = sub.add_parser("score", help="CLIP + LAION aesthetic scores per image, statistics per model, report",
                       description="Score every model folder under --images_root (one sub-folder per model).")
    p.add_argument("--images_root", required=True, type=Path, help="folder with one sub-folder of images per model")
    p.add_argument("--output_dir", required=True, type=Path,
                   help="where per_image/*.csv, summary.csv, report.html and plots/ go")
    p.add_argument("--prompts", type=Path,
                   help="prompt file (.csv with a 'Prompts' column or .txt); "
                        "IMAGES_ROOT/manifest.csv wins when present")
    p.add_argument("--clip_model", default="openai/clip-vit-large-patch14",
                   help="transformers CLIP id or local folder (default: %(default)s)")
    p.add_argument("--aesthetic_model", required=True,
                   help="LAION sac+logos+ava1-l14-linearMSE.pth (or the same weights as .safetensors)")
    p.add_argument("--batch_size", type=int, default=16, help="images per CLIP forward pass (default: 16)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when present)")
    p.add_argument("--clip_score_scale", type=float, default=None,
                   help="report S*max(cos,0) instead of the raw cosine; 100 gives torchmetrics' CLIPScore")
    p.add_argument("--rescore", action="store_true", help="score models that are already in summary.csv again")


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="rebuild report.html and the plots from the CSVs written by 'score'")
    p.add_argument("--output_dir", required=True, type=Path, help="the --output_dir given to 'score'")
    p.add_argument("--images_root", required=True, type=Path, help="the --images_root given to 'score'")
    p.add_argument("--max_grid_rows", type=int, default=60, help="rows in the side-by-side grid (default: 60)")


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate the same prompts with the same seeds for every model",
                       description="Write OUTPUT/<model>/<model>-<prompt_index>-<image_index>.png and "
                                   "OUTPUT/manifest.csv; existing images are kept, so a run can be resumed.")
    p.add_argument("--model", action="append", required=True, metavar="NAME=PATH",
                   help="a model to compare (repeat): NAME (no '-') = single file, diffusers folder or hub id")
    p.add_argument("--prompts", required=True, type=Path, help="prompt file: .csv with a 'Prompts' column or .txt")
    p.add_argument("--output_dir", required=True, type=Path, help="images root to write (one folder per model)")
    p.add_argument("--vae", help="VAE to use for every model (file, diffusers folder or hub id), as in training")
    p.add_argument("--images_per_prompt", type=int, default=4, help="images per prompt and model (default: 4)")
    p.add_argument("--seed", type=int, default=0,
                   help="base seed; image j of prompt i uses SEED + i*images_per_prompt + j (default: 0)")
    p.add_argument("--steps", type=int, default=30, help="sampling steps (default: 30)")
    p.add_argument("--guidance_scale", type=float, default=7.0, help="classifier-free guidance (default: 7.0)")
    p.add_argument("--width", type=int, default=1024, help="image width, multiple of 8 (default: 1024)")
    p.add_argument("--height", type=int, default=1024, help="image height, multiple of 8 (default: 1024)")
    p.add_argument("--sampler", default="euler_a",
                   help="sampler name as in training's --sample_sampler (default: euler_a)")
    negative = p.add_mutually_exclusive_group()
    negative.add_argument("--negative_prompt", default="", help="negative prompt text")
    negative.add_argument("--negative_preset", help=NEGATIVE_PRESET_HELP)
    p.add_argument("--batch_size", type=int, default=1, help="images per pipeline call (default: 1)")
    p.add_argument("--tokenizer_cache_dir", help="kohya-style tokenizer folder (needed offline for single files)")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda when present)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                   help="model precision (default: float32; float16 on GPUs saves memory)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{generate,score,report}")
    _add_generate(sub)
    _add_score(sub)
    _add_report(sub)
    return parser


def _positive(value: int, flag: str) -> int:
    if value < 1:
        raise ConfigError(f"must be at least 1 (got {value})", where=flag)
    return value


def cmd_score(args) -> int:
    from library.evaluation.score_folders import ScoreOptions, run_score

    options = ScoreOptions(images_root=args.images_root, output_dir=args.output_dir, prompts=args.prompts,
                           clip_model=args.clip_model, aesthetic_model=args.aesthetic_model,
                           batch_size=_positive(args.batch_size, "--batch_size"), device=args.device,
                           clip_score_scale=args.clip_score_scale, rescore=args.rescore)
    outcome = run_score(options)
    if outcome.failed and not outcome.scored and not outcome.skipped:
        raise DataError(f"no model could be scored ({', '.join(outcome.failed)}; see the messages above)",
                        where=str(args.images_root))
    print(f"{outcome.one_line()} -> {args.output_dir / 'summary.csv'}")
    return 0


def cmd_report(args) -> int:
    from library.evaluation.report import write_report

    if not (args.output_dir / "summary.csv").is_file():
        raise DataError("no summary.csv here", where=str(args.output_dir), hint="run 'evaluate.py score' first")
    path = write_report(args.output_dir, args.images_root, max_grid_rows=args.max_grid_rows)
    print(f"report written: {path}")
    return 0


def cmd_generate(args) -> int:
    from library.evaluation.generate import GenerateOptions, parse_model_specs, run_generate
    from library.presets import negative_preset

    negative = negative_preset(args.negative_preset) if args.negative_preset else args.negative_prompt
    options = GenerateOptions(
        models=parse_model_specs(args.model), prompts=args.prompts, output_dir=args.output_dir, vae=args.vae,
        images_per_prompt=args.images_per_prompt, seed=args.seed, steps=args.steps,
        guidance_scale=args.guidance_scale, width=args.width, height=args.height, sampler=args.sampler,
        negative_prompt=negative, batch_size=args.batch_size, tokenizer_cache_dir=args.tokenizer_cache_dir,
        device=args.device, dtype=args.dtype)
    print(run_generate(options))
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return {"score": cmd_score, "report": cmd_report, "generate": cmd_generate}[args.command](args)


if __name__ == "__main__":
    sys.exit(run_main(main))
