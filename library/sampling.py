"""Sample images with the weights being trained, and batched generation for ``tools/evaluate.py``.

``generate_samples`` is what ``sdxl_train.py`` calls for ``--sample_every_n_steps`` /
``--sample_every_n_epochs`` / ``--sample_at_first``: it reads nothing but its arguments, writes
``OUTPUT_DIR/sample/<name>.png`` and leaves the run exactly as it found it:

* the torch CPU RNG (and every CUDA device's when CUDA is available), python's ``random`` and numpy's global
  RNG are saved and restored, so a run with sampling draws the same noise as one without;
* every sub-module's train/eval flag is restored (they are in eval mode while sampling); no weight is cast
  or copied (mixed dtypes, e.g. fp32 UNet with fp16 text encoders, are handled with autocast);
* each image has its own CPU ``torch.Generator``: a prompt's seed (``--d``) gives the same image every time
  (on any device). Without one the seed is :func:`derive_seed` ``(--seed, step, prompt index)``.

File names (kohya's, without the timestamp so they are deterministic; the seed is always there)::

    {output_name}_{step:06d}_{index:02d}_{seed}.png              e.g. poster_000100_00_42.png
    {output_name}_e{epoch:06d}_{step:06d}_{index:02d}_{seed}.png  when an epoch is given

A sample of the same step (after a resume) replaces the earlier one atomically. Each PNG holds the prompt
and settings as text: ``parameters`` (the A1111 layout image viewers show) and ``sample_settings`` (JSON).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from library.fileio import atomic_path
from library.presets import negative_preset
from library.sample_prompts import SamplePrompt, load_prompts  # noqa: F401  (re-exported for callers)
from library.samplers import DEFAULT_SAMPLER, build_scheduler, check_sampler

log = logging.getLogger(__name__)

SAMPLE_FOLDER = "sample"
SIZE_MULTIPLE = 8  # the VAE's factor; the UNet pads odd latent sizes itself (checked in the tests)


@dataclass(frozen=True)
class SampleSettings:
    """Everything one sample image is made from (the prompt file's values merged with the run's)."""

    index: int
    prompt: str
    negative_prompt: str
    width: int
    height: int
    seed: int
    steps: int
    scale: float
    sampler: str
    source: str = ""


def round_size(value: int, multiple: int = SIZE_MULTIPLE) -> int:
    """``value`` rounded down to a multiple of ``multiple`` (at least ``multiple``)."""
    return max(multiple, int(value) // multiple * multiple)


def derive_seed(base: int | None, step: int, index: int) -> int:
    """The seed of a prompt without ``--d``: the first 4 bytes (little-endian) of
    ``sha256("{base}:{step}:{index}")``, with ``base`` 0 when the run has no ``--seed``."""
    digest = hashlib.sha256(f"{base or 0}:{step}:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def resolve_settings(
    prompts: Sequence[SamplePrompt],
    *,
    step: int,
    default_size: tuple[int, int],
    default_steps: int = 30,
    default_scale: float = 7.5,
    sampler_name: str = DEFAULT_SAMPLER,
    seed: int | None = None,
    negative_preset_default: str | None = None,
) -> list[SampleSettings]:
    """Merge each prompt's own values with the run's defaults; sizes rounded down to multiples of 8."""
    sampler = check_sampler(sampler_name)
    if negative_preset_default:
        negative_preset(negative_preset_default)  # an unknown name is a ConfigError before any work
    out = []
    for index, item in enumerate(prompts):
        width, height = item.width or default_size[0], item.height or default_size[1]
        rounded = round_size(width), round_size(height)
        if rounded != (width, height):
            log.info("%s: sample size %dx%d rounded down to %dx%d (multiples of %d)",
                     item.source or f"prompt {index}", width, height, *rounded, SIZE_MULTIPLE)
        out.append(SampleSettings(
            index=index, prompt=item.prompt, negative_prompt=item.negative(negative_preset_default),
            width=rounded[0], height=rounded[1],
            seed=item.seed if item.seed is not None else derive_seed(seed, step, index),
            steps=item.steps or default_steps, scale=item.scale if item.scale is not None else default_scale,
            sampler=item.sampler or sampler, source=item.source,
        ))  # fmt: skip
    return out


def sample_file_name(output_name: str | None, step: int, epoch: int | None, index: int, seed: int) -> str:
    prefix = f"{output_name}_" if output_name else ""
    epoch_part = f"e{epoch:06d}_" if epoch is not None else ""
    return f"{prefix}{epoch_part}{step:06d}_{index:02d}_{seed}.png"


def png_text(settings: SampleSettings, **extra: Any) -> dict[str, str]:
    """The PNG text chunks: A1111-style ``parameters`` and ``sample_settings`` JSON."""
    fields = [f"Steps: {settings.steps}", f"Sampler: {settings.sampler}", f"CFG scale: {settings.scale}",
              f"Seed: {settings.seed}", f"Size: {settings.width}x{settings.height}"]
    fields += [f"{key.replace('_', ' ').capitalize()}: {value}" for key, value in extra.items() if value is not None]
    parameters = f"{settings.prompt}\nNegative prompt: {settings.negative_prompt}\n{', '.join(fields)}"
    return {"parameters": parameters, "sample_settings": json.dumps({**asdict(settings), **extra}, ensure_ascii=False)}


def save_png(image, path: Path, text: dict[str, str]) -> None:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in text.items():
        info.add_itxt(key, value)
    with atomic_path(path, suffix=".png") as tmp:
        image.save(tmp, format="PNG", pnginfo=info)


# --- pipeline -------------------------------------------------------------------------------------


def build_pipeline(models, sampler_name: str = DEFAULT_SAMPLER, prediction_type: str | None = None,
                   progress: bool = False, zero_terminal_snr: bool = False):
    """A ``StableDiffusionXLPipeline`` over ``models``' own modules (shared, not copied) with the
    scheduler for ``sampler_name`` built from ``models.scheduler_config``; progress bars off unless
    ``progress``. Nothing is moved or cast."""
    from diffusers import StableDiffusionXLPipeline

    scheduler = build_scheduler(sampler_name, models.scheduler_config, prediction_type, zero_terminal_snr)
    pipe = StableDiffusionXLPipeline(
        vae=models.vae, text_encoder=models.text_encoder1, text_encoder_2=models.text_encoder2,
        tokenizer=models.tokenizer1, tokenizer_2=models.tokenizer2, unet=models.unet, scheduler=scheduler,
        add_watermarker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=not progress)
    return pipe


def _param_dtype(module):
    return next(module.parameters()).dtype


def _autocast_dtype(pipe, dtype):
    """The autocast dtype: ``dtype`` unless float32/None; else the lower precision when the UNet and
    text encoders differ (the pipeline feeds the text encoders' dtype to the UNet)."""
    import torch

    if dtype is not None and dtype != torch.float32:
        return dtype
    dtypes = {_param_dtype(m) for m in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2)}
    lower = [d for d in dtypes if d != torch.float32]
    return lower[0] if len(dtypes) > 1 and lower else None


def decode_latents(pipe, latents) -> list:
    """Latents -> PIL images with the pipeline's VAE, outside autocast; a float16 VAE with
    ``force_upcast`` decodes in float32 and is put back (as diffusers' own pipeline does)."""
    import torch

    vae = pipe.vae
    original = _param_dtype(vae)
    upcast = original == torch.float16 and getattr(vae.config, "force_upcast", False)
    with torch.autocast(device_type=latents.device.type, enabled=False):
        try:
            if upcast:
                vae.to(dtype=torch.float32)
            latents = latents.to(_param_dtype(vae))
            mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
            scale = vae.config.scaling_factor
            if mean is not None and std is not None:
                mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents)
                std = torch.tensor(std).view(1, -1, 1, 1).to(latents)
                latents = latents * std / scale + mean
            else:
                latents = latents / scale
            pixels = vae.decode(latents, return_dict=False)[0]
        finally:
            if upcast:
                vae.to(dtype=original)
    return pipe.image_processor.postprocess(pixels.float(), output_type="pil")


def plan_batches(sizes: Sequence[tuple[int, int]], negatives: Sequence[str], batch_size: int) -> list[list[int]]:
    """Indices grouped by (size, has a negative), in first-seen order, cut into ``batch_size`` chunks.

    An empty negative is encoded as zeros (diffusers' SDXL default) and a non-empty one as text, so the
    two never share a batch: an image is the same whatever the batch it is made in."""
    groups: dict[tuple, list[int]] = {}
    for index, (size, negative) in enumerate(zip(sizes, negatives)):
        groups.setdefault((tuple(size), bool(negative)), []).append(index)
    return [group[i:i + batch_size] for group in groups.values() for i in range(0, len(group), batch_size)]


def _per_item(value, count: int, name: str, single: Callable[[Any], bool]) -> list:
    if single(value):
        return [value] * count
    items = list(value)
    if len(items) != count:
        raise ValueError(f"{name}: expected {count} values, got {len(items)}")
    return items


MAX_TEXT_CHUNKS = 3  # 225 tokens, kohya's longest --max_token_length


def long_text_embeds(pipeline, prompts: Sequence[str], negatives: Sequence[str] | None) -> dict | None:
    """Pipeline keyword arguments with the texts encoded in 75-token chunks (as training encodes
    captions, ``library.text_encoding``) when a prompt or negative is longer than one CLIP window,
    which the pipeline would cut at 77 tokens: the poster workflow's negative presets run to 100-200
    tokens. None when every text fits (the pipeline's own encoding, unchanged). Texts beyond 225 tokens
    are cut there, with a warning."""
    import math

    from library.text_encoding import CHUNK, encode_tokens, tokenize_chunks

    texts = list(prompts) + list(negatives or [])
    lengths = [len(pipeline.tokenizer(text, truncation=False).input_ids) - 2 for text in texts]
    longest = max(lengths, default=0)
    if longest <= CHUNK:
        return None
    chunks = min(MAX_TEXT_CHUNKS, math.ceil(longest / CHUNK))
    if longest > chunks * CHUNK:
        log.warning("%d prompt(s) longer than %d tokens are cut there", sum(n > chunks * CHUNK for n in lengths),
                    chunks * CHUNK)  # fmt: skip

    def encode(batch: list[str]):
        ids1 = tokenize_chunks(pipeline.tokenizer, batch, chunks * CHUNK)
        ids2 = tokenize_chunks(pipeline.tokenizer_2, batch, chunks * CHUNK)
        return encode_tokens(pipeline.text_encoder, pipeline.text_encoder_2, ids1, ids2)

    positive = encode(list(prompts))
    out = {"prompt_embeds": positive.context, "pooled_prompt_embeds": positive.pooled}
    if negatives:  # without one the pipeline uses zeros, as for a short empty negative
        negative = encode(list(negatives))
        out.update(negative_prompt_embeds=negative.context, negative_pooled_prompt_embeds=negative.pooled)
    return out


def generate_images(
    pipeline,
    prompts: Sequence[str],
    *,
    seeds: Sequence[int],
    negatives: str | Sequence[str] | None = None,
    sizes: tuple[int, int] | Sequence[tuple[int, int]] = (1024, 1024),
    batch_size: int = 1,
    steps: int = 30,
    guidance: float = 7.5,
    dtype=None,
    on_batch: Callable[[list[int], list], None] | None = None,
) -> list:
    """Generate ``len(prompts)`` PIL images, image ``i`` from ``prompts[i]``, ``seeds[i]``,
    ``negatives[i]`` and ``sizes[i]`` (a single negative or ``(width, height)`` applies to all).

    Used by ``tools/evaluate.py generate`` and by :func:`generate_samples`. Every image has its own CPU
    ``torch.Generator(seed)``, and images are batched only with others of the same size and the same
    kind of negative (see :func:`plan_batches`), so ``batch_size`` does not change an image. ``dtype``
    is an autocast dtype for the UNet/text encoders (None: automatic, see ``_autocast_dtype``); weights
    are never cast. ``on_batch(indices, images)`` is called after each batch (e.g. to save and resume).
    Returns the images in the order of ``prompts``. Runs under ``torch.no_grad()``; the caller sets
    eval mode and the scheduler (``pipeline.scheduler``).
    """
    import torch

    count = len(prompts)
    seeds = _per_item(seeds, count, "seeds", lambda v: isinstance(v, int))
    negatives = _per_item(negatives or "", count, "negatives", lambda v: isinstance(v, str))
    sizes = _per_item(sizes, count, "sizes", lambda v: len(v) == 2 and isinstance(v[0], int))
    autocast = _autocast_dtype(pipeline, dtype)
    device_type = pipeline.unet.device.type
    images: list = [None] * count
    with torch.no_grad():
        for indices in plan_batches(sizes, negatives, max(1, batch_size)):
            width, height = sizes[indices[0]]
            negative = [negatives[i] for i in indices] if negatives[indices[0]] else None
            generators = [torch.Generator(device="cpu").manual_seed(int(seeds[i])) for i in indices]
            with torch.autocast(device_type=device_type, dtype=autocast, enabled=autocast is not None):
                text = long_text_embeds(pipeline, [prompts[i] for i in indices], negative)
                if text is None:  # every text fits in one 77-token window: the pipeline encodes it
                    text = {"prompt": [prompts[i] for i in indices], "negative_prompt": negative}
                latents = pipeline(
                    **text, generator=generators, num_inference_steps=steps, guidance_scale=guidance,
                    width=width, height=height, output_type="latent",
                ).images  # fmt: skip
            batch = decode_latents(pipeline, latents)
            for index, image in zip(indices, batch):
                images[index] = image
            if on_batch is not None:
                on_batch(indices, batch)
    return images


# --- leaving the training run as it was -----------------------------------------------------------


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Restore python's, numpy's, torch's CPU and (when available) every CUDA device's RNG state."""
    import numpy as np
    import torch

    python_state, numpy_state, cpu_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


@contextlib.contextmanager
def eval_mode(modules: Sequence[Any]) -> Iterator[None]:
    """Put ``modules`` in eval mode; restore every sub-module's own ``training`` flag afterwards."""
    flags = [(sub, sub.training) for module in modules for sub in module.modules()]
    try:
        for module in modules:
            module.eval()
        yield
    finally:
        for sub, flag in flags:
            sub.training = flag


@contextlib.contextmanager
def on_device(modules: Sequence[Any], device) -> Iterator[None]:
    """Move modules that are elsewhere (e.g. a VAE kept on the CPU) to ``device``, and back after."""
    moved = []
    try:
        for module in modules:
            where = next(module.parameters()).device
            if where != device:
                module.to(device)
                moved.append((module, where))
        yield
    finally:
        for module, where in moved:
            module.to(where)


def generate_samples(
    models,
    prompts: Sequence[SamplePrompt],
    out_dir: str | Path,
    *,
    step: int,
    epoch: int | None = None,
    output_name: str | None = None,
    default_size: tuple[int, int] = (1024, 1024),
    default_steps: int = 30,
    default_scale: float = 7.5,
    sampler_name: str = DEFAULT_SAMPLER,
    seed: int | None = None,
    device=None,
    dtype=None,
    negative_preset_default: str | None = None,
    prediction_type: str | None = None,
    zero_terminal_snr: bool = False,
) -> list[Path]:
    """Write one image per prompt to ``out_dir/sample/`` (names in the module docstring); returns the paths.

    ``default_size`` is ``(width, height)``, normally the training resolution; ``seed`` the run's
    ``--seed``; ``device`` defaults to the UNet's; ``dtype`` is an autocast dtype (weights are never
    cast); ``negative_preset_default`` applies to prompts with neither ``--n`` nor ``--np``;
    ``prediction_type="v_prediction"`` for a ``--v_parameterization`` model; ``zero_terminal_snr`` for a
    ``--zero_terminal_snr`` one (see ``build_scheduler``).
    """
    import torch

    if not prompts:
        return []
    start = time.time()
    settings = resolve_settings(
        prompts, step=step, default_size=default_size, default_steps=default_steps, default_scale=default_scale,
        sampler_name=sampler_name, seed=seed, negative_preset_default=negative_preset_default,
    )  # fmt: skip
    folder = Path(out_dir) / SAMPLE_FOLDER
    modules = [models.unet, models.text_encoder1, models.text_encoder2, models.vae]
    device = torch.device(device) if device is not None else next(models.unet.parameters()).device
    paths = []
    with preserved_rng(), eval_mode(modules), on_device(modules, device), torch.no_grad():
        pipe = build_pipeline(models, settings[0].sampler, prediction_type, zero_terminal_snr=zero_terminal_snr)
        current = settings[0].sampler
        for item in settings:
            if item.sampler != current:
                pipe.scheduler = build_scheduler(item.sampler, models.scheduler_config, prediction_type,
                                                 zero_terminal_snr)  # fmt: skip
                current = item.sampler
            image = generate_images(
                pipe, [item.prompt], seeds=[item.seed], negatives=[item.negative_prompt],
                sizes=[(item.width, item.height)], steps=item.steps, guidance=item.scale, dtype=dtype,
            )[0]  # fmt: skip
            path = folder / sample_file_name(output_name, step, epoch, item.index, item.seed)
            save_png(image, path, png_text(item, training_step=step, epoch=epoch, model=output_name))
            paths.append(path)
    log.info("sampled %d image(s) at step %d in %.1fs -> %s", len(paths), step, time.time() - start, folder)
    return paths


__all__ = [
    "SamplePrompt", "SampleSettings", "build_pipeline", "derive_seed", "generate_images",
    "generate_samples", "load_prompts", "resolve_settings", "sample_file_name",
]
