#!/usr/bin/env python
"""Caption a folder of images with BLIP (transformers); one caption file per image.

    python finetune/make_captions.py data/posters --batch_size 8 --beam_search --num_beams 3

Writes ``poster.caption`` next to ``poster.png``. Images that already have a caption file are skipped
unless ``--overwrite``; unreadable images are listed at the end and do not stop the run.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.caption_files import (  # noqa: E402
    list_images,
    load_rgb_on_white,
    normalize_extension,
    sidecar_path,
    write_text_file,
)
from library.cli import run_main  # noqa: E402
from library.errors import ConfigError, DataError, ModelError  # noqa: E402

DEFAULT_MODEL = "Salesforce/blip-image-captioning-large"


@dataclass(frozen=True)
class CaptionSettings:
    folder: Path
    model: str
    batch_size: int
    beam_search: bool
    num_beams: int
    top_p: float
    max_length: int
    min_length: int
    caption_extension: str
    recursive: bool
    overwrite: bool
    seed: int
    device: str | None
    debug: bool

    def generate_kwargs(self) -> dict:
        """kohya's choice: beam search with ``num_beams``, or else nucleus sampling with ``top_p``."""
        common = {"max_length": self.max_length, "min_length": self.min_length}
        if self.beam_search:
            return {**common, "do_sample": False, "num_beams": self.num_beams}
        return {**common, "do_sample": True, "top_p": self.top_p, "num_beams": 1}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Write a BLIP caption for every image in a folder (poster.png -> poster.caption). "
        "Without --beam_search captions are sampled (nucleus sampling, --top_p); with it they are the "
        "most likely sentence found by a beam search of --num_beams beams.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("train_data_dir", type=Path, help="folder of images to caption")
    p.add_argument("--model_name_or_path", default=DEFAULT_MODEL,
                   help="BLIP captioning model: a Hugging Face repo id or a local folder saved with save_pretrained")
    p.add_argument("--batch_size", type=int, default=1, help="images per model call")
    p.add_argument("--beam_search", action="store_true", help="beam search instead of nucleus sampling")
    p.add_argument("--num_beams", type=int, default=1, help="beams for --beam_search")
    p.add_argument("--top_p", type=float, default=0.9, help="nucleus sampling probability mass (without --beam_search)")
    p.add_argument("--max_length", type=int, default=75, help="longest caption, in tokens")
    p.add_argument("--min_length", type=int, default=5, help="shortest caption, in tokens")
    p.add_argument("--caption_extension", "--caption_extention", dest="caption_extension", default=".caption",
                   help="extension of the caption files written next to the images")
    p.add_argument("--recursive", action="store_true", help="also caption images in sub-folders")
    p.add_argument("--overwrite", action="store_true", help="replace existing caption files (default: skip those images)")
    p.add_argument("--seed", type=int, default=42, help="random seed for sampling")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--debug", action="store_true", help="print each caption as it is written")
    return p


def parse_settings(argv: Sequence[str] | None) -> CaptionSettings:
    a = build_parser().parse_args(argv)
    for flag, value, low in (("--batch_size", a.batch_size, 1), ("--num_beams", a.num_beams, 1),
                             ("--min_length", a.min_length, 0), ("--max_length", a.max_length, 1)):
        if value < low:
            raise ConfigError(f"{flag} must be at least {low}, got {value}")
    if a.min_length > a.max_length:
        raise ConfigError(f"--min_length {a.min_length} is larger than --max_length {a.max_length}")
    if not 0.0 < a.top_p <= 1.0:
        raise ConfigError(f"--top_p must be in (0, 1], got {a.top_p}")
    return CaptionSettings(
        folder=a.train_data_dir, model=a.model_name_or_path, batch_size=a.batch_size, beam_search=a.beam_search,
        num_beams=a.num_beams, top_p=a.top_p, max_length=a.max_length, min_length=a.min_length,
        caption_extension=normalize_extension(a.caption_extension), recursive=a.recursive, overwrite=a.overwrite,
        seed=a.seed, device=a.device, debug=a.debug,
    )


def load_blip(name: str, device: str):
    """``(processor, model)`` from a repo id or local folder; a missing model is a one-line error."""
    from transformers import BlipForConditionalGeneration, BlipProcessor

    try:
        processor = BlipProcessor.from_pretrained(name)
        model = BlipForConditionalGeneration.from_pretrained(name)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(
            f"cannot load the BLIP model ({first})", where=name,
            hint="pass --model_name_or_path with a local folder holding the model and processor files, "
            "or go online so the Hub repo can be downloaded",
        ) from None
    return processor, model.to(device).eval()


def caption_batch(images, processor, model, settings: CaptionSettings) -> list[str]:
    """Captions for a list of PIL images, in order."""
    import torch

    pixel_values = processor(images=images, return_tensors="pt")["pixel_values"].to(model.device, model.dtype)
    with torch.inference_mode():
        tokens = model.generate(pixel_values=pixel_values, **settings.generate_kwargs())
    return [text.strip() for text in processor.batch_decode(tokens, skip_special_tokens=True)]


def caption_folder(settings: CaptionSettings) -> dict:
    """Caption every image without a caption file (all with ``overwrite``); returns the counts."""
    import torch
    from tqdm import tqdm

    images = list_images(settings.folder, settings.recursive)
    todo = [p for p in images if settings.overwrite or not sidecar_path(p, settings.caption_extension).exists()]
    result = {"images": len(images), "written": 0, "skipped": len(images) - len(todo), "failed": []}
    if not todo:
        return result
    device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    processor, model = load_blip(settings.model, device)
    torch.manual_seed(settings.seed)
    with tqdm(total=len(todo), unit="img", desc="captioning") as bar:
        for start in range(0, len(todo), settings.batch_size):
            chunk = todo[start : start + settings.batch_size]
            loaded = []
            for path in chunk:
                try:
                    loaded.append((path, load_rgb_on_white(path)))
                except DataError as err:
                    result["failed"].append(err.one_line())
            if loaded:
                captions = caption_batch([img for _, img in loaded], processor, model, settings)
                for (path, _), caption in zip(loaded, captions):
                    write_text_file(sidecar_path(path, settings.caption_extension), caption)
                    result["written"] += 1
                    if settings.debug:
                        tqdm.write(f"{path}: {caption}")
            bar.update(len(chunk))
    return result


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_settings(argv)
    started = time.perf_counter()
    result = caption_folder(settings)
    for line in result["failed"]:
        print(f"unreadable image: {line}", file=sys.stderr)
    print(
        f"captioned {result['written']} of {result['images']} images, skipped {result['skipped']} "
        f"(caption file exists), failed {len(result['failed'])}, in {time.perf_counter() - started:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
