"""The set-up steps of ``sdxl_train.py``: accelerator, models, data, text encoding, optimizer.

Each function takes the parsed config (``library.train_args.TrainConfig``) and returns plain objects;
none of them mutates the config.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from library.errors import ConfigError

log = logging.getLogger("sdxl_train")


def weight_dtype(cfg):
    """dtype of the frozen models (and of the trained ones with --full_fp16/--full_bf16)."""
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision or "no", torch.float32)


def limit_cpu_heap_growth(threshold: int = 4 << 20) -> bool:
    """Give tensors of ``threshold`` bytes and more back to the system as soon as they are freed.

    glibc serves allocations below its mmap threshold from the heap, and raises that threshold (up to
    32 MiB) whenever a large block is freed, so the per-parameter temporaries of an optimizer step stay
    in the heap and fragment it: measured on the full-size SDXL UNet with fused Adafactor on the CPU,
    peak RSS 7.5 GiB by default, 6.6 GiB with a fixed 4 MiB threshold (benchmarks/train_step.py).
    Only matters when training runs on the CPU; a no-op (False) where mallopt is unavailable.
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, threshold))  # -3 = M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def check_fused_backward(cfg, accelerator) -> None:
    """--fused_backward_pass steps each parameter as soon as its local gradient exists: with several
    processes that would be before DDP averages it, and the ranks would drift apart."""
    if cfg.fused_backward_pass and accelerator.num_processes > 1:
        raise ConfigError(
            f"--fused_backward_pass runs in one process only, not {accelerator.num_processes}",
            where="--fused_backward_pass", hint="drop it, or launch one process",
        )


def make_accelerator(cfg):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    if cfg.mixed_precision == "fp16":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("--mixed_precision fp16 needs a CUDA GPU", hint="use bf16 or no on a CPU")
    logging_dir = cfg.logging_dir
    project = ProjectConfiguration(project_dir=cfg.output_dir, logging_dir=logging_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=cfg.mixed_precision or "no",
        log_with=_trackers(cfg) if logging_dir else None,
        project_config=project,
    )
    if logging_dir:
        accelerator.init_trackers(cfg.log_tracker_name or "sdxl_train")
    return accelerator


def _trackers(cfg):
    if cfg.log_with in (None, "tensorboard"):
        return "tensorboard"
    if cfg.log_with == "all":
        return "all"
    return cfg.log_with


def _attention_backend(cfg, unet) -> None:
    if cfg.xformers:
        try:
            import xformers  # noqa: F401
        except ImportError:
            raise ConfigError(
                "--xformers needs the xformers package (CUDA only)",
                hint="pip install -r requirements-gpu.txt, or use --sdpa (the default)",
            ) from None
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("--xformers needs a CUDA GPU", hint="use --sdpa (the default) on this machine")
        unet.enable_xformers_memory_efficient_attention()


def load_models(cfg, accelerator):
    """The SDXL model with its (optional) swapped VAE; frozen parts in the weight dtype."""
    from library.sdxl_train_util import load_target_model

    models = load_target_model(
        cfg.pretrained_model_name_or_path, vae=cfg.vae, tokenizer_cache_dir=cfg.tokenizer_cache_dir
    )
    _attention_backend(cfg, models.unet)
    if cfg.gradient_checkpointing:
        models.unet.enable_gradient_checkpointing()
        if cfg.train_text_encoder:
            for te in (models.text_encoder1, models.text_encoder2):
                te.gradient_checkpointing_enable()
    return models


@dataclass
class TrainData:
    items: list
    validation_items: list
    dataset: Any
    sampler: Any
    loader: Any
    cached_latents: bool
    resolution: tuple[int, int]


def dataset_config(cfg):
    """The dataset TOML (or --train_data_dir/--in_json) resolved against the flags; read first, so a
    typo fails before any model is loaded."""
    from library.config_util import config_from_flags, load_dataset_config

    defaults = {
        "resolution": cfg.resolution,
        "batch_size": cfg.train_batch_size,
        "enable_bucket": cfg.enable_bucket,
        "min_bucket_reso": cfg.min_bucket_reso,
        "max_bucket_reso": cfg.max_bucket_reso,
        "bucket_reso_steps": cfg.bucket_reso_steps,
        "bucket_no_upscale": cfg.bucket_no_upscale,
        "caption_extension": cfg.caption_extension,
        "shuffle_caption": cfg.shuffle_caption,
        "keep_tokens": cfg.keep_tokens,
        "flip_aug": cfg.flip_aug,
        "random_crop": cfg.random_crop,
        "color_aug": cfg.color_aug,
        "caption_dropout_rate": cfg.caption_dropout_rate,
        "caption_tag_dropout_rate": cfg.caption_tag_dropout_rate,
        "caption_dropout_every_n_epochs": cfg.caption_dropout_every_n_epochs,
    }
    if cfg.dataset_config:
        return load_dataset_config(cfg.dataset_config, defaults)
    if not cfg.train_data_dir and not cfg.in_json:
        raise ConfigError("no training data", hint="pass --dataset_config, or --train_data_dir (with --in_json)")
    return config_from_flags(train_data_dir=cfg.train_data_dir, in_json=cfg.in_json, defaults=defaults)


def build_data(cfg, dataset_cfg, accelerator, models) -> TrainData:
    """Items, latent cache (when asked), dataset, sampler and loader for this rank."""
    import torch

    from library.latent_cache import build_latent_cache
    from library.train_dataset import BucketBatchSampler, TrainDataset, build_items, cached_only, collate, make_cache_jobs

    items = list(build_items(dataset_cfg, workers=max(cfg.max_data_loader_n_workers, 2), strict=cfg.strict).items)
    cache_paths = None
    if cfg.cache_latents or cfg.cache_latents_to_disk:
        models.vae.to(accelerator.device, dtype=vae_dtype(cfg))
        jobs = make_cache_jobs(items, None if cfg.cache_latents_to_disk else _cache_dir(cfg))
        build_latent_cache(
            jobs, models.vae, batch_size=cfg.vae_batch_size, rank=accelerator.process_index,
            world_size=accelerator.num_processes, barrier=accelerator.wait_for_everyone,
            check="exists" if cfg.skip_cache_check else "stat", strict=cfg.strict, progress=accelerator.is_main_process,
        )  # fmt: skip
        items, cache_paths = cached_only(items, None if cfg.cache_latents_to_disk else _cache_dir(cfg))
        models.vae.to("cpu")
    items, cache_paths, held_out = _hold_out_validation(dataset_cfg, items, cache_paths)
    dataset = TrainDataset(items, seed=cfg.seed, cache_paths=cache_paths, max_train_steps=cfg.max_train_steps)
    sampler = BucketBatchSampler.from_items(
        items, dataset_cfg, seed=cfg.seed, rank=accelerator.process_index, world_size=accelerator.num_processes
    )
    workers = min(cfg.max_data_loader_n_workers, os.cpu_count() or 1)  # kohya's default 8 oversubscribes small machines
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers,
        persistent_workers=cfg.persistent_data_loader_workers and workers > 0,
    )  # fmt: skip
    resolution = tuple(dataset_cfg.datasets[0].resolution)
    return TrainData(items, held_out, dataset, sampler, loader, cache_paths is not None, resolution)


def _hold_out_validation(dataset_cfg, items, cache_paths):
    """Split off each dataset's ``validation_split`` (by ``validation_seed``): never trained on.
    Returns the training items, their cache paths, and the held-out ``(item, cache_path)`` pairs."""
    from library.train_dataset import split_validation

    paths = cache_paths if cache_paths is not None else [None] * len(items)
    path_of = {id(item): path for item, path in zip(items, paths)}
    train, held = [], []
    for index, dataset in enumerate(dataset_cfg.datasets):
        mine = [item for item in items if item.dataset_index == index]
        kept, out = split_validation(mine, dataset.validation_split, dataset.validation_seed)
        train += kept
        held += out
    order = {id(item): n for n, item in enumerate(items)}
    train.sort(key=lambda item: order[id(item)])
    train_paths = [path_of[id(item)] for item in train] if cache_paths is not None else None
    return train, train_paths, [(item, path_of[id(item)]) for item in held]


def build_validation(cfg, data: TrainData, models, accelerator):
    """The decoded validation set, or None when nothing is held out or validation is off."""
    if not data.validation_items or not cfg.validate_every_n_steps:
        if cfg.validate_every_n_steps and accelerator.is_main_process:
            log.warning("--validate_every_n_steps is set but no image is held out (set validation_split)")
        return None
    from library.train_dataset import TrainDataset
    from library.validation import build_validation_set

    items = [item for item, _ in data.validation_items]
    paths = [path for _, path in data.validation_items]
    dataset = TrainDataset(items, seed=cfg.seed, cache_paths=paths if data.cached_latents else None)
    vset = build_validation_set(dataset, lambda batch: batch_latents(batch, models, accelerator))
    log.info("validation: %d held-out images, timesteps %s", len(items), cfg.validation_timesteps)
    return vset


def _cache_dir(cfg) -> Path:
    """In-memory caching (kohya's --cache_latents) still goes through files, in the output folder."""
    return Path(cfg.output_dir) / ".latent_cache"


def vae_dtype(cfg):
    import torch

    return torch.float32 if cfg.no_half_vae else weight_dtype(cfg)


def batch_latents(batch, models, accelerator):
    """Latents of a batch: from the cache, or encoded now with the frozen VAE (scaled)."""
    import torch

    from library.latent_cache import SDXL_VAE_SCALE

    if "latents" in batch:
        return batch["latents"].to(accelerator.device, dtype=torch.float32)
    vae = models.vae
    pixels = batch["pixels"].to(accelerator.device, dtype=next(vae.parameters()).dtype)
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.sample() * SDXL_VAE_SCALE
    if not torch.isfinite(latents).all():
        raise ConfigError(
            "the VAE produced NaN/inf latents", hint="pass --vae with the fp16-fix VAE or use --no_half_vae"
        )
    return latents.float()


def make_text_encoder(cfg, models, data, accelerator):
    """A callable ``captions -> TextConditioning``: cached, frozen, or trained encoders."""
    import torch

    from library.text_cache import TextEncoderCache
    from library.text_encoding import encode_captions

    dtype = weight_dtype(cfg)
    for te in (models.text_encoder1, models.text_encoder2):
        te.to(accelerator.device, dtype=torch.float32 if cfg.train_text_encoder else dtype)
        te.requires_grad_(bool(cfg.train_text_encoder))
    if cfg.cache_text_encoder_outputs:
        _check_captions_are_fixed(data)
        folder = Path(cfg.output_dir) if cfg.cache_text_encoder_outputs_to_disk else None
        cache = TextEncoderCache(models, cfg.max_token_length or 75, folder)
        captions = sorted({item.caption for item in data.items} | {i.caption for i, _ in data.validation_items})
        cache.fill(captions, batch_size=max(cfg.train_batch_size, 1))
        return lambda caps: _to_device(cache.get(caps), accelerator)
    if cfg.train_text_encoder:
        return lambda caps: encode_captions(models, caps, cfg.max_token_length or 75)

    def frozen(caps):
        with torch.no_grad():
            return encode_captions(models, caps, cfg.max_token_length or 75)

    return frozen


def _check_captions_are_fixed(data) -> None:
    """Cached text-encoder outputs need each image's caption to be the same at every step."""
    from library.captions import caption_varies

    for item in data.items:
        varying = caption_varies(item.subset)
        if varying:
            raise ConfigError(
                f"--cache_text_encoder_outputs cannot be used when captions change between steps ({', '.join(varying)})",
                where=str(item.subset.metadata_file or item.subset.image_dir),
                hint="turn those options off in the dataset config, or drop --cache_text_encoder_outputs",
            )


def check_sample_prompts(cfg) -> None:
    """Read the sample prompt file at start-up, so a bad line fails before hours of training."""
    if cfg.sample_prompts:
        from library.sample_prompts import load_prompts

        load_prompts(cfg.sample_prompts)


def _to_device(cond, accelerator):
    cond.context = cond.context.to(accelerator.device)
    cond.pooled = cond.pooled.to(accelerator.device)
    return cond


def trainable_parameters(cfg, models) -> list:
    """Parameter groups: the UNet (or its 23 blocks with --block_lr) and the text encoders."""
    models.vae.requires_grad_(False)
    models.unet.requires_grad_(True)
    models.unet.train()
    groups = unet_groups(cfg, models.unet)
    if cfg.train_text_encoder:
        for te, lr in ((models.text_encoder1, cfg.learning_rate_te1), (models.text_encoder2, cfg.learning_rate_te2)):
            rate = cfg.learning_rate if lr is None else lr
            te.requires_grad_(rate > 0)
            if rate > 0:
                te.train()
                groups.append({"params": [p for p in te.parameters()], "lr": rate})
    return groups


def unet_groups(cfg, unet) -> list[dict]:
    """One parameter group, or kohya's 23 UNet blocks with --block_lr (a rate of 0 freezes a block)."""
    if not cfg.block_lr:
        return [{"params": [p for p in unet.parameters()], "lr": cfg.learning_rate}]
    from library.sdxl_keys import unet_key_to_sgm

    rates = list(cfg.block_lr)
    groups: dict[int, list] = {}
    for name, param in unet.named_parameters():
        block = block_index(unet_key_to_sgm(name, unet.config))
        if rates[block] == 0:
            param.requires_grad_(False)
            continue
        groups.setdefault(block, []).append(param)
    return [{"params": groups[b], "lr": rates[b]} for b in sorted(groups)]


def block_index(sgm_name: str) -> int:
    """kohya's --block_lr order for SDXL: 0 time/label embeddings, 1-9 input_blocks 0-8,
    10-12 middle_block 0-2, 13-21 output_blocks 0-8, 22 out (final norm and conv)."""
    parts = sgm_name.split(".")
    if parts[0] == "input_blocks":
        return 1 + int(parts[1])
    if parts[0] == "middle_block":
        return 10 + int(parts[1])
    if parts[0] == "output_blocks":
        return 13 + int(parts[1])
    if parts[0] == "out":
        return 22
    return 0


def make_optimizer(cfg, groups):
    from library.optimizers import build_optimizer, parse_optimizer_args

    return build_optimizer(
        cfg.optimizer_type, groups, cfg.learning_rate, parse_optimizer_args(cfg.optimizer_args or []),
        lr_scheduler=cfg.lr_scheduler, max_grad_norm=cfg.max_grad_norm,
    )


def total_steps(cfg, data: TrainData, accelerator) -> int:
    """--max_train_steps, or --max_train_epochs turned into steps."""
    per_epoch = math.ceil(len(data.sampler) / cfg.gradient_accumulation_steps)
    if cfg.max_train_epochs:
        return cfg.max_train_epochs * per_epoch
    return cfg.max_train_steps


def make_scheduler(cfg, optimizer, max_steps: int, num_processes: int = 1):
    """The LR schedule. accelerate's prepared scheduler steps once per process for every optimizer
    step, so the schedule is laid out over ``max_steps * num_processes`` (as kohya does)."""
    from library.lr_schedulers import build_scheduler, warmup_to_steps

    warmup = cfg.lr_warmup_steps
    if isinstance(warmup, int):
        warmup = warmup * num_processes
    elif warmup is not None:
        warmup = warmup_to_steps(warmup, max_steps) * num_processes
    return build_scheduler(
        cfg.lr_scheduler, optimizer, num_training_steps=max_steps * num_processes, warmup_steps=warmup,
        num_cycles=cfg.lr_scheduler_num_cycles, power=cfg.lr_scheduler_power,
        scheduler_type=cfg.lr_scheduler_type, scheduler_args=cfg.lr_scheduler_args,
    )  # fmt: skip


def prepare_models(cfg, models, accelerator) -> None:
    """Devices and dtypes: the trained UNet in float32 (or bf16/fp16 with --full_*), the VAE frozen."""
    import torch

    unet_dtype = torch.float32
    if cfg.full_bf16:
        unet_dtype = torch.bfloat16
    elif cfg.full_fp16:
        unet_dtype = torch.float16
    models.unet.to(accelerator.device, dtype=unet_dtype)
    models.vae.requires_grad_(False)
    models.vae.eval()
    models.vae.to(accelerator.device, dtype=vae_dtype(cfg))


def resume(cfg, accelerator, sampler, noise_rng):
    import torch

    from library.checkpointing import load_training_state

    state = load_training_state(accelerator, Path(cfg.resume))
    sampler.load_state_dict(state.sampler_state)
    if state.noise_rng_state:
        noise_rng.set_state(torch.tensor(state.noise_rng_state, dtype=torch.uint8))
    log.info("resumed from %s at step %d (epoch %d)", cfg.resume, state.global_step, state.epoch)
    return state


def print_summary(cfg, accelerator, models, data, optimizer, max_steps, state) -> None:
    if not accelerator.is_main_process:
        return
    buckets = sorted({item.bucket for item in data.items})
    trained = "UNet" + (" + text encoders" if cfg.train_text_encoder else "")
    savers = [n for n, on in (("gradient checkpointing", cfg.gradient_checkpointing),
                              ("cached latents", data.cached_latents),
                              ("cached text encoder outputs", cfg.cache_text_encoder_outputs),
                              ("full bf16", cfg.full_bf16)) if on]  # fmt: skip
    images = len(data.items)
    per_epoch = len(data.sampler)
    log.info(
        "training %s: %d images, %d buckets %s, %d batches/epoch/process, %d steps (from %d), optimizer %s, "
        "processes %d, precision %s, memory savers: %s",
        trained, images, len(buckets), buckets[:6], per_epoch, max_steps, state.global_step,
        type(optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer).__name__,
        accelerator.num_processes, cfg.mixed_precision or "no", ", ".join(savers) or "none",
    )  # fmt: skip
    views = max_steps * cfg.gradient_accumulation_steps * max(cfg.train_batch_size, 1) * accelerator.num_processes
    if images and views / images > 200:
        log.warning(
            "each image will be seen about %d times: small sets overfit past ~5k steps (the EMU tip); "
            "consider fewer steps or more images", views // images,
        )  # fmt: skip
