"""Loading the model to train: ``_load_target_model`` as kohya users know it, plus VAE swap.

A path to a file is a single-file SDXL checkpoint; a folder or a hub id is a diffusers pipeline
(``from_pretrained``). Tokenizers come from ``--tokenizer_cache_dir`` (kohya's layout: one folder per
hub id with ``/`` replaced by ``_``), from a diffusers folder's ``tokenizer``/``tokenizer_2``, or from the
hub; offline without any of these is a clear error naming the flag.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from library.errors import ModelError
from library.sdxl_configs import SDXL_SCHEDULER_CONFIG, TOKENIZER_IDS
from library.sdxl_model_util import SDXLModels, load_models_from_sdxl_checkpoint, load_vae_from_file

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _looks_like_hub_id(spec: str) -> bool:
    return spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and not Path(spec).exists()


def load_tokenizers(tokenizer_cache_dir: str | None = None, diffusers_dir: Path | None = None):
    """Both CLIP tokenizers; TE2's pads with ``!`` (id 0) as OpenCLIP does."""
    from transformers import CLIPTokenizer

    tokenizers = []
    for index, repo in enumerate(TOKENIZER_IDS):
        subfolder = "tokenizer" if index == 0 else "tokenizer_2"
        candidates = []
        if tokenizer_cache_dir:
            candidates.append(Path(tokenizer_cache_dir) / repo.replace("/", "_"))
        if diffusers_dir is not None:
            candidates.append(diffusers_dir / subfolder)
        local = next((c for c in candidates if (c / "vocab.json").is_file() or (c / "tokenizer.json").is_file()), None)
        if local is not None:
            tokenizer = CLIPTokenizer.from_pretrained(str(local), model_max_length=77)
        elif _offline():
            where = ", ".join(str(c) for c in candidates) or "no local folder"
            raise ModelError(
                f"tokenizer '{repo}' is not available offline (looked in: {where})",
                hint="pass --tokenizer_cache_dir with kohya's layout, or unset HF_HUB_OFFLINE to download it",
            )
        else:
            tokenizer = CLIPTokenizer.from_pretrained(repo, model_max_length=77)
            if tokenizer_cache_dir:
                tokenizer.save_pretrained(str(Path(tokenizer_cache_dir) / repo.replace("/", "_")))
        if index == 1:
            tokenizer.pad_token = "!"
        tokenizers.append(tokenizer)
    return tokenizers[0], tokenizers[1]


def _load_diffusers(spec: str) -> SDXLModels:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    local = Path(spec)
    kwargs: dict[str, Any] = {"local_files_only": _offline()}
    if local.is_dir() and not (local / "unet").is_dir():
        raise ModelError(
            "folder is not a diffusers SDXL pipeline (no unet/ sub-folder)",
            where=spec,
            hint="pass a single .safetensors file or a folder saved by save_pretrained",
        )
    try:
        unet = UNet2DConditionModel.from_pretrained(spec, subfolder="unet", **kwargs)
        vae = AutoencoderKL.from_pretrained(spec, subfolder="vae", **kwargs)
        te1 = CLIPTextModel.from_pretrained(spec, subfolder="text_encoder", **kwargs)
        te2 = CLIPTextModelWithProjection.from_pretrained(spec, subfolder="text_encoder_2", **kwargs)
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load diffusers model ({str(err).splitlines()[0][:200]})", where=spec) from None
    scheduler_config = dict(SDXL_SCHEDULER_CONFIG)
    scheduler_file = local / "scheduler" / "scheduler_config.json"
    if scheduler_file.is_file():
        import json

        scheduler_config.update(json.loads(scheduler_file.read_text(encoding="utf-8")))
    for module in (unet, vae, te1, te2):
        module.eval()
    return SDXLModels(unet=unet, vae=vae, text_encoder1=te1, text_encoder2=te2, scheduler_config=scheduler_config)


def load_vae(spec: str, current_config: dict | None = None):
    """``--vae``: a diffusers VAE folder or hub id, a VAE-only single file, or a full SDXL file."""
    from diffusers import AutoencoderKL

    path = Path(spec).expanduser()
    if path.is_file():
        return load_vae_from_file(path.resolve(), config=current_config)
    if path.is_dir():
        sub = "vae" if (path / "vae" / "config.json").is_file() else None
        if sub is None and not (path / "config.json").is_file():
            raise ModelError("folder holds no VAE (no config.json or vae/config.json)", where=spec)
        return AutoencoderKL.from_pretrained(str(path), subfolder=sub, local_files_only=True).eval()
    if _looks_like_hub_id(spec):
        if _offline():
            raise ModelError("VAE hub id cannot be downloaded offline", where=spec, hint="pass a local file or folder")
        return AutoencoderKL.from_pretrained(spec).eval()
    raise ModelError("VAE not found", where=spec, hint="pass a .safetensors file, a diffusers folder or a hub id")


def load_target_model(
    path: str,
    vae: str | None = None,
    tokenizer_cache_dir: str | None = None,
    dtype=None,
    device: str = "cpu",
) -> SDXLModels:
    """Load an SDXL model for training or inference, swapping in ``vae`` when given."""
    spec = str(path)
    local = Path(spec).expanduser()
    if local.is_symlink():
        local = local.resolve()
    if local.is_file():
        if local.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise ModelError(f"unknown checkpoint type '{local.suffix}'", where=spec, hint="use .safetensors")
        models = load_models_from_sdxl_checkpoint(local)
        models.tokenizer1, models.tokenizer2 = load_tokenizers(tokenizer_cache_dir)
        models.scheduler_config = dict(SDXL_SCHEDULER_CONFIG)
    elif local.is_dir() or _looks_like_hub_id(spec):
        if not local.is_dir() and _offline():
            raise ModelError("model not found locally and HF_HUB_OFFLINE is set", where=spec)
        models = _load_diffusers(str(local) if local.is_dir() else spec)
        models.tokenizer1, models.tokenizer2 = load_tokenizers(
            tokenizer_cache_dir, local if local.is_dir() else None
        ) if local.is_dir() else _hub_tokenizers(spec, tokenizer_cache_dir)
    else:
        raise ModelError("model not found", where=spec, hint="pass a .safetensors file, a diffusers folder or a hub id")
    if vae:
        models.vae = load_vae(vae, current_config=dict(models.vae.config))
    if dtype is not None or device != "cpu":
        for name in ("unet", "vae", "text_encoder1", "text_encoder2"):
            setattr(models, name, getattr(models, name).to(device=device, dtype=dtype))
    return models


def _hub_tokenizers(spec: str, tokenizer_cache_dir: str | None):
    from transformers import CLIPTokenizer

    if tokenizer_cache_dir:
        return load_tokenizers(tokenizer_cache_dir)
    first = CLIPTokenizer.from_pretrained(spec, subfolder="tokenizer", model_max_length=77)
    second = CLIPTokenizer.from_pretrained(spec, subfolder="tokenizer_2", model_max_length=77)
    second.pad_token = "!"
    return first, second


def _load_target_model(args, accelerator=None, model_version: str = "sdxl", weight_dtype=None) -> SDXLModels:
    """kohya's entry point name: reads ``pretrained_model_name_or_path``, ``vae`` and
    ``tokenizer_cache_dir`` from ``args`` (an argparse namespace or our config dataclass)."""
    if model_version not in ("sdxl", "sdxl_base_v1-0"):
        raise ModelError(f"unsupported model version '{model_version}'")
    device = "cpu" if accelerator is None or getattr(args, "lowram", False) is False else str(accelerator.device)
    return load_target_model(
        args.pretrained_model_name_or_path,
        vae=getattr(args, "vae", None),
        tokenizer_cache_dir=getattr(args, "tokenizer_cache_dir", None),
        dtype=weight_dtype,
        device=device,
    )


def save_diffusers(folder: str | Path, models: SDXLModels, save_precision: str = "float", safe: bool = True) -> Path:
    """Write a diffusers pipeline folder offline (tokenizers and scheduler from what was loaded)."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    if models.tokenizer1 is None or models.tokenizer2 is None:
        raise ModelError("cannot save a diffusers folder without tokenizers", hint="pass --tokenizer_cache_dir")
    dtype = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[save_precision]
    scheduler = EulerDiscreteScheduler.from_config(models.scheduler_config or SDXL_SCHEDULER_CONFIG)
    pipe = StableDiffusionXLPipeline(
        vae=models.vae,
        text_encoder=models.text_encoder1,
        text_encoder_2=models.text_encoder2,
        tokenizer=models.tokenizer1,
        tokenizer_2=models.tokenizer2,
        unet=models.unet,
        scheduler=scheduler,
    )
    folder = Path(folder)
    if dtype != torch.float32:
        import copy

        # A cast copy, so the caller's (training) weights keep their precision.
        pipe = copy.deepcopy(pipe)
        pipe.to(dtype=dtype)
    pipe.save_pretrained(str(folder), safe_serialization=safe)
    return folder
