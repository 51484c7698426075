#!/usr/bin/env python
"""Merge one or more kohya-format LoRA files into an SDXL model and save a new single file.

    python tools/merge_lora.py --model base.safetensors --lora style.safetensors:0.7 \\
        --lora detail.safetensors:0.3 --save_to merged.safetensors --save_precision fp16

Each --lora is FILE[:RATIO] (ratio 1.0 when omitted; negative ratios subtract a LoRA). The LoRAs are
applied in the order given: W += ratio * alpha / rank * (up @ down), for the UNet (kohya SGM names or
diffusers names) and both text encoders. Entries that match no module, or are other LoRA kinds
(LoCon lora_mid, DoRA, LoHa, LoKr), are listed as a warning and left out; --strict makes them an error.
The output records the merged files and ratios in its metadata (sdxl_poster.merged_loras). Nothing
existing is overwritten without --overwrite.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.cli import run_main  # noqa: E402
from library.errors import ConfigError  # noqa: E402
from library.lora_merge import MERGE_DTYPES, MERGED_LORAS_METADATA_KEY, parse_lora_arg  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="SDXL model to merge into: a single .safetensors file or a "
                        "diffusers folder")
    parser.add_argument("--lora", action="append", required=True, metavar="FILE[:RATIO]",
                        help="kohya LoRA .safetensors and its ratio (default 1.0); repeat for several")
    parser.add_argument("--save_to", required=True, help="output .safetensors file")
    parser.add_argument("--save_precision", choices=("float", "fp16", "bf16"), default="float",
                        help="dtype of the saved weights (default: float = float32)")
    parser.add_argument("--merge_dtype", choices=MERGE_DTYPES, default="float",
                        help="dtype the updates are computed in (default: float = float32)")
    parser.add_argument("--strict", action="store_true",
                        help="fail when a LoRA has entries that match no module or cannot be merged")
    parser.add_argument("--overwrite", action="store_true", help="replace --save_to if it exists")
    return parser


def _source_modelspec(metadata: dict) -> dict:
    """Resolution and prediction type of the base model, so the merged file says the same."""
    out = {}
    resolution = metadata.get("modelspec.resolution", "").split("x")[0]
    if resolution.isdigit():
        out["resolution"] = int(resolution)
    if metadata.get("modelspec.prediction_type") in ("epsilon", "v_prediction"):
        out["prediction_type"] = metadata["modelspec.prediction_type"]
    return out


def _merged_loras_json(metadata: dict, loras: list[tuple[Path, float]]) -> str:
    """The base model's own merged-LoRA list (if it was merged before) plus this run's."""
    try:
        earlier = json.loads(metadata.get(MERGED_LORAS_METADATA_KEY, "[]"))
    except json.JSONDecodeError:
        earlier = []
    earlier = earlier if isinstance(earlier, list) else []
    return json.dumps(earlier + [{"file": path.name, "ratio": ratio} for path, ratio in loras])


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    loras = [parse_lora_arg(text) for text in args.lora]
    save_to = Path(args.save_to)
    if save_to.suffix.lower() != ".safetensors":
        raise ConfigError("the output must be a .safetensors file", where=f"--save_to {save_to}")
    if save_to.exists() and not args.overwrite:
        raise ConfigError("output already exists", where=str(save_to), hint="choose another name or pass --overwrite")

    from library.lora_merge import lora_targets, merge_lora_into, read_lora_file
    from library.sdxl_model_util import load_models_from_sdxl_checkpoint, save_sdxl_checkpoint

    start = time.time()
    states = [read_lora_file(path) for path, _ in loras]  # every file readable before the slow part
    if Path(args.model).is_dir():  # a diffusers folder (its tokenizers come along; not used here)
        from library.sdxl_train_util import load_target_model

        models = load_target_model(args.model)
    else:
        models = load_models_from_sdxl_checkpoint(args.model)
    targets = lora_targets(models)
    for (path, ratio), state in zip(loras, states):
        report = merge_lora_into(models, state, ratio, str(path), merge_dtype=args.merge_dtype,
                                 strict=args.strict, targets=targets)
        if report.skipped:
            print(f"merge_lora.py: warning: {report.skipped_warning()}", file=sys.stderr)
        print(report.summary())
    metadata = {MERGED_LORAS_METADATA_KEY: _merged_loras_json(models.source_metadata, loras)}
    save_sdxl_checkpoint(save_to, models, save_precision=args.save_precision, extra_metadata=metadata,
                         **_source_modelspec(models.source_metadata))
    print(f"saved {save_to} ({args.save_precision}, {len(loras)} LoRA{'s' if len(loras) != 1 else ''}) "
          f"in {time.time() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
