"""Generate the same prompts with the same seeds for several models: ``tools/evaluate.py generate``.

``OUTPUT/<model>/<model>-<prompt_index>-<image_index>.png`` (the seed's naming; indices from 0) plus
``OUTPUT/manifest.csv`` (file, model, prompt_index, prompt, negative, seed, steps, guidance). Image
``j`` of prompt ``i`` uses seed ``SEED + i * images_per_prompt + j`` for every model, so the comparison
is paired; each image has its own generator, so batching does not change an image. Existing images
are kept (the run resumes); their manifest rows are kept too.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

from library.errors import ConfigError
from library.evaluation.prompts import MANIFEST_COLUMNS, check_model_name, image_name, load_manifest, load_prompts
from library.fileio import atomic_path

DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class GenerateOptions:
    models: tuple[tuple[str, str], ...]
    prompts: Path
    output_dir: Path
    vae: str | None = None
    images_per_prompt: int = 4
    seed: int = 0
    steps: int = 30
    guidance_scale: float = 7.0
    width: int = 1024
    height: int = 1024
    sampler: str = "euler_a"
    negative_prompt: str = ""
    batch_size: int = 1
    tokenizer_cache_dir: str | None = None
    device: str = "auto"
    dtype: str = "float32"
    progress: bool = True


@dataclass(frozen=True)
class Job:
    model: str
    prompt_index: int
    image_index: int
    seed: int
    file: str  # relative to the output folder, "/" separated


def parse_model_specs(specs: list[str]) -> tuple[tuple[str, str], ...]:
    """``["base=sdxl.safetensors", ...]`` -> ``(("base", "sdxl.safetensors"), ...)``, names checked."""
    if not specs:
        raise ConfigError("no model given", where="--model", hint="pass --model NAME=PATH, once per model")
    parsed: list[tuple[str, str]] = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not path.strip():
            raise ConfigError(f"'{spec}' is not NAME=PATH", where="--model", hint="e.g. --model base=sdxl.safetensors")
        name = check_model_name(name.strip(), where=f"--model {spec}")
        if name in (n for n, _ in parsed):
            raise ConfigError(f"model name '{name}' is given twice", where="--model")
        _check_model_path(path.strip(), spec)
        parsed.append((name, path.strip()))
    return tuple(parsed)


def _check_model_path(path: str, spec: str) -> None:
    local = Path(path).expanduser()
    hub_id = path.count("/") == 1 and not path.startswith((".", "/", "~")) and not local.suffix
    if not local.exists() and not hub_id:
        raise ConfigError(f"model path '{path}' does not exist", where=f"--model {spec}",
                          hint="a single .safetensors file, a diffusers folder or a hub id (user/name)")


def check_options(options: GenerateOptions) -> None:
    for label, value in (("--images_per_prompt", options.images_per_prompt), ("--steps", options.steps),
                         ("--batch_size", options.batch_size)):
        if value < 1:
            raise ConfigError(f"must be at least 1 (got {value})", where=label)
    for label, value in (("--width", options.width), ("--height", options.height)):
        if value < 8 or value % 8:
            raise ConfigError(f"must be a positive multiple of 8 (got {value})", where=label)
    if options.dtype not in DTYPES:
        raise ConfigError(f"unknown dtype '{options.dtype}'", where="--dtype", hint=f"one of {', '.join(DTYPES)}")


def plan_jobs(options: GenerateOptions, prompt_count: int) -> list[Job]:
    jobs = []
    for model, _ in options.models:
        for prompt_index in range(prompt_count):
            for image_index in range(options.images_per_prompt):
                seed = options.seed + prompt_index * options.images_per_prompt + image_index
                jobs.append(Job(model, prompt_index, image_index, seed,
                                f"{model}/{image_name(model, prompt_index, image_index)}"))
    return jobs


class Manifest:
    """``manifest.csv`` rows by file; rows of earlier runs are kept, rewritten atomically on ``save``."""

    def __init__(self, path: Path):
        self.path = path
        self.rows = {file: {c: row.get(c, "") for c in MANIFEST_COLUMNS} for file, row in load_manifest(path).items()}

    def record(self, job: Job, prompt: str, options: GenerateOptions, keep_existing: bool) -> None:
        if keep_existing and job.file in self.rows:
            return
        self.rows[job.file] = {"file": job.file, "model": job.model, "prompt_index": job.prompt_index,
                               "prompt": prompt, "negative": options.negative_prompt, "seed": job.seed,
                               "steps": options.steps, "guidance": options.guidance_scale}

    def save(self) -> None:
        import pandas as pd

        frame = pd.DataFrame(list(self.rows.values()), columns=MANIFEST_COLUMNS)
        with atomic_path(self.path, suffix=".csv") as tmp:
            frame.to_csv(tmp, index=False)


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def _generate_model(path: str, jobs: list[Job], prompts: list[str], options: GenerateOptions,
                    manifest: Manifest, bar) -> None:
    import torch

    from library.evaluation.scoring import resolve_device
    from library.sampling import build_pipeline
    from library.sdxl_train_util import load_target_model

    device = resolve_device(options.device)
    dtype = None if options.dtype == "float32" else _torch_dtype(options.dtype)  # loaded weights are float32
    models = load_target_model(path, vae=options.vae, tokenizer_cache_dir=options.tokenizer_cache_dir,
                               dtype=dtype, device=device)
    pipe = build_pipeline(models, options.sampler)
    pipe.set_progress_bar_config(disable=True)
    for prompt_index, group in groupby(jobs, key=lambda job: job.prompt_index):
        group = list(group)
        for start in range(0, len(group), options.batch_size):
            chunk = group[start:start + options.batch_size]
            generators = [torch.Generator(device="cpu").manual_seed(job.seed) for job in chunk]
            images = pipe(prompt=prompts[prompt_index], negative_prompt=options.negative_prompt or None,
                          num_images_per_prompt=len(chunk), generator=generators,
                          num_inference_steps=options.steps, guidance_scale=options.guidance_scale,
                          width=options.width, height=options.height, output_type="pil").images
            for job, image in zip(chunk, images):
                with atomic_path(options.output_dir / job.file, suffix=".png") as tmp:
                    image.save(tmp, format="PNG")
                manifest.record(job, prompts[prompt_index], options, keep_existing=False)
            manifest.save()
            bar.update(len(chunk))
    del pipe, models
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_generate(options: GenerateOptions) -> str:
    """Generate every missing image; returns the closing summary line."""
    from tqdm import tqdm

    check_options(options)
    start = time.time()
    prompts = load_prompts(options.prompts)
    jobs = plan_jobs(options, len(prompts))
    manifest = Manifest(options.output_dir / "manifest.csv")
    pending = [job for job in jobs if not (options.output_dir / job.file).is_file()]
    known = len(manifest.rows)
    for job in jobs:
        if job not in pending:  # made by an earlier run: keep its row, or describe it with these settings
            manifest.record(job, prompts[job.prompt_index], options, keep_existing=True)
    if len(manifest.rows) != known:
        manifest.save()
    loaded = 0
    with tqdm(total=len(pending), desc="generate", unit="img", disable=not options.progress) as bar:
        for model, path in options.models:
            model_jobs = [job for job in pending if job.model == model]
            if model_jobs:
                bar.set_postfix_str(model)
                _generate_model(path, model_jobs, prompts, options, manifest, bar)
                loaded += 1
    kept = len(jobs) - len(pending)
    return (f"generated {len(pending)} image(s), kept {kept} existing, {len(options.models)} model(s) "
            f"({loaded} loaded) x {len(prompts)} prompt(s) x {options.images_per_prompt}; "
            f"{time.time() - start:.1f}s -> {options.output_dir}")
