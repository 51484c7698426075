"""SDXL single-file checkpoints <-> diffusers/transformers models.

``load_models_from_sdxl_checkpoint`` reads an SGM-layout ``.safetensors`` (or a ``.ckpt`` through
``torch.load(weights_only=True)``) into diffusers/transformers modules; ``save_sdxl_checkpoint``
writes them back in the SGM layout with SAI modelspec metadata, cast to the save precision one
tensor at a time. Key tables live in :mod:`library.sdxl_keys`, configs in :mod:`library.sdxl_configs`.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from library import sdxl_keys as keys
from library.errors import ModelError
from library.sdxl_configs import (
    CONFIG_METADATA_KEY,
    TE1_PREFIX,
    TE2_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    configs_from_metadata,
    infer_sdxl_configs,
    infer_vae_config,
    model_config_dict,
)

SAVE_PRECISIONS = ("float", "fp16", "bf16")
DEFAULT_LOGIT_SCALE = math.log(1 / 0.07)


@dataclass
class SDXLModels:
    """The parts of an SDXL model, as diffusers/transformers modules.

    ``extra`` holds SGM tensors that belong to no module but are written back (TE2's
    ``logit_scale``); ``source_metadata`` the metadata of the file it came from.
    """

    unet: Any
    vae: Any
    text_encoder1: Any
    text_encoder2: Any
    tokenizer1: Any = None
    tokenizer2: Any = None
    scheduler_config: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    source_metadata: dict = field(default_factory=dict)


# --- reading ------------------------------------------------------------------------------------


def read_checkpoint(path: str | Path) -> tuple[dict, dict]:
    """Return ``(state_dict, metadata)`` of a ``.safetensors`` or ``.ckpt``/``.pt``/``.pth`` file.

    safetensors tensors are memory-mapped; pickles are only read with ``weights_only=True``.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise ModelError("checkpoint not found", where=str(path))
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = dict(handle.metadata() or {})
                state = {name: handle.get_tensor(name) for name in handle.keys()}
        except (SafetensorError, OSError, ValueError) as err:
            raise ModelError(
                f"not a readable safetensors file ({str(err).splitlines()[0]})",
                where=str(path),
                hint="the file may be truncated or corrupt: download it again",
            ) from None
        return state, metadata
    try:
        loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors come in many types
        raise ModelError(
            f"cannot be read safely ({type(err).__name__}: {_first_line(err)})",
            where=str(path),
            hint="only weights-only checkpoints are accepted; convert it to .safetensors",
        ) from None
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise ModelError("does not hold a state dict", where=str(path))
    return loaded, {}


def _first_line(err: BaseException) -> str:
    """The first line of an error message without terminal colour codes (torch's pickle errors have them)."""
    import re

    lines = str(err).splitlines() or [""]
    return re.sub(r"\x1b\[[0-9;]*m", "", lines[0])[:160]


def detect_model_kind(state: Mapping[str, Any]) -> str:
    """``"sdxl"``, ``"sdxl-refiner"``, ``"sd1"``, ``"sd2"``, ``"vae"`` or ``"unknown"`` from the keys."""
    names = state.keys()
    if any(k.startswith(TE2_PREFIX) for k in names):
        return "sdxl" if any(k.startswith(TE1_PREFIX) for k in names) else "sdxl-refiner"
    if any(k.startswith("cond_stage_model.transformer.") for k in names):
        return "sd1"
    if any(k.startswith("cond_stage_model.model.") for k in names):
        return "sd2"
    if any(k.startswith(("encoder.", "first_stage_model.encoder.", "decoder.")) for k in names):
        return "vae"
    return "unknown"


def _require_sdxl(state: Mapping[str, Any], path: str) -> None:
    kind = detect_model_kind(state)
    if kind == "sdxl":
        return
    messages = {
        "sd1": "this is a Stable Diffusion 1.x checkpoint, not SDXL",
        "sd2": "this is a Stable Diffusion 2.x checkpoint, not SDXL",
        "sdxl-refiner": "this is an SDXL refiner checkpoint (no first text encoder), not an SDXL base model",
        "vae": "this file holds only a VAE, not a full SDXL model",
    }
    raise ModelError(
        messages.get(kind, "not an SDXL checkpoint (no SGM UNet/text-encoder keys)"),
        where=path,
        hint="pass an SDXL base or fine-tuned single file, or a diffusers SDXL folder",
    )


def _sub(state: Mapping[str, Any], prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _load_exact(model, state: dict, component: str, where: str) -> None:
    """``load_state_dict(strict)`` with a one-line error naming counts and first few keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if items:
                parts.append(f"{len(items)} {label} ({', '.join(items[:3])}{', ...' if len(items) > 3 else ''})")
        raise ModelError(f"{component} weights do not match: {'; '.join(parts)}", where=where)
    model.load_state_dict(state, strict=True, assign=True)


def _build_empty(component: str, config: dict):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with init_empty_weights():
        if component == "unet":
            return UNet2DConditionModel.from_config(config)
        if component == "vae":
            return AutoencoderKL.from_config(config)
        text_config = CLIPTextConfig(**config)
        if component == "te1":
            return CLIPTextModel(text_config)
        return CLIPTextModelWithProjection(text_config)


def unet_from_sgm(sgm: Mapping, config: dict, where: str = "UNet"):
    model = _build_empty("unet", config)
    table = keys.rename_map(model.state_dict().keys(), lambda k: keys.unet_key_to_sgm(k, config))
    state = {d: sgm[s] for d, s in table.items() if s in sgm}
    _check_extra(sgm, set(table.values()), "UNet", where)
    _load_exact(model, state, "UNet", where)
    return model


def vae_from_sgm(sgm: Mapping, config: dict, where: str = "VAE"):
    model = _build_empty("vae", config)
    table = keys.rename_map(model.state_dict().keys(), lambda k: keys.vae_key_to_sgm(k, config))
    state = {}
    for d, s in table.items():
        if s in sgm:
            tensor = sgm[s]
            if keys.is_vae_attention_matrix(s) and tensor.ndim == 4:
                tensor = tensor[:, :, 0, 0]
            state[d] = tensor
    _check_extra(sgm, set(table.values()), "VAE", where)
    _load_exact(model, state, "VAE", where)
    return model


def te1_from_sgm(sgm: Mapping, config: dict, where: str = "TE1"):
    model = _build_empty("te1", config)
    table = keys.rename_map(model.state_dict().keys(), keys.te1_key_to_sgm)
    ignored = {"text_model.embeddings.position_ids"}
    _check_extra(sgm, set(table.values()) | ignored, "text encoder 1", where)
    _load_exact(model, {d: sgm[s] for d, s in table.items() if s in sgm}, "text encoder 1", where)
    return model


def te2_from_sgm(sgm: Mapping, config: dict, where: str = "TE2"):
    model = _build_empty("te2", config)
    known = {keys.te2_key_to_sgm(k) for k in model.state_dict()} | {"logit_scale", "attn_mask"}
    _check_extra(sgm, known, "text encoder 2", where)
    state = keys.te2_from_sgm(sgm, model.state_dict().keys(), config["hidden_size"])
    _load_exact(model, state, "text encoder 2", where)
    return model


def _check_extra(sgm: Mapping, known: set, component: str, where: str) -> None:
    extra = [k for k in sgm if k not in known]
    if extra:
        shown = ", ".join(extra[:3]) + (", ..." if len(extra) > 3 else "")
        raise ModelError(f"{component}: {len(extra)} unexpected keys ({shown})", where=where)


def load_models_from_sdxl_checkpoint(path: str | Path) -> SDXLModels:
    """Load UNet, VAE and both text encoders (no tokenizers) from an SGM single file, in float32
    unless the file's own dtype is kept by the caller's later ``.to()``."""
    where = str(path)
    state, metadata = read_checkpoint(path)
    _require_sdxl(state, where)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    configs = configs_from_metadata(metadata) or infer_sdxl_configs(shapes)
    te2_sgm = _sub(state, TE2_PREFIX)
    extra = {"logit_scale": te2_sgm["logit_scale"]} if "logit_scale" in te2_sgm else {}
    models = SDXLModels(
        unet=unet_from_sgm(_sub(state, UNET_PREFIX), configs["unet"], where),
        vae=vae_from_sgm(_sub(state, VAE_PREFIX), configs["vae"], where),
        text_encoder1=te1_from_sgm(_sub(state, TE1_PREFIX), configs["te1"], where),
        text_encoder2=te2_from_sgm(te2_sgm, configs["te2"], where),
        extra=extra,
        source_metadata=metadata,
    )
    for module in (models.unet, models.vae, models.text_encoder1, models.text_encoder2):
        module.eval()
    return models


def load_vae_from_file(path: str | Path, config: dict | None = None):
    """A VAE from a VAE-only single file (LDM or diffusers keys, with or without
    ``first_stage_model.``) or from a full SDXL checkpoint (its VAE is taken)."""
    from diffusers import AutoencoderKL

    where = str(path)
    state, metadata = read_checkpoint(path)
    if any(k.startswith(VAE_PREFIX) for k in state):
        state = _sub(state, VAE_PREFIX)
    if any(".down_blocks." in k for k in state):  # diffusers key names
        if config is None:
            raise ModelError("a VAE in diffusers key layout needs the model's VAE config", where=where)
        model = _build_empty("vae", config)
        _load_exact(model, dict(state), "VAE", where)
        return model.eval()
    if not any(k.startswith("encoder.down.") for k in state):
        raise ModelError("no VAE weights found", where=where, hint="pass an SDXL VAE .safetensors")
    meta_configs = configs_from_metadata(metadata)
    inferred = meta_configs["vae"] if meta_configs else infer_vae_config({k: tuple(v.shape) for k, v in state.items()})
    if config is not None:
        if list(inferred["block_out_channels"]) != list(config["block_out_channels"]):  # before building it
            raise ModelError(
                f"VAE shape {list(inferred['block_out_channels'])} does not match the model's "
                f"{list(config['block_out_channels'])}",
                where=where,
                hint="use a VAE made for SDXL",
            )
        inferred = {**config, **{k: inferred[k] for k in ("block_out_channels", "layers_per_block", "latent_channels")}}
    return vae_from_sgm(state, inferred, where).eval()


# --- writing ------------------------------------------------------------------------------------


def _precision_cast(save_precision: str):
    import torch

    if save_precision not in SAVE_PRECISIONS:
        raise ModelError(f"unknown save precision '{save_precision}'", hint="use float, fp16 or bf16")
    target = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[save_precision]

    def cast(tensor):
        return tensor.to(target) if tensor.is_floating_point() else tensor

    return cast


def sgm_tensors(models: SDXLModels) -> dict[str, Any]:
    """The full SGM state dict as name -> tensor (or a callable producing it), sharing storage
    with the modules wherever the layouts agree (no copy is made here)."""
    import torch

    out: dict[str, Any] = {}
    unet_config = models.unet.config
    for key, tensor in models.unet.state_dict().items():
        out[UNET_PREFIX + keys.unet_key_to_sgm(key, unet_config)] = tensor
    vae_config = models.vae.config
    for key, tensor in models.vae.state_dict().items():
        name = keys.vae_key_to_sgm(key, vae_config)
        if keys.is_vae_attention_matrix(name) and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]
        out[VAE_PREFIX + name] = tensor
    for key, tensor in models.text_encoder1.state_dict().items():
        out[TE1_PREFIX + keys.te1_key_to_sgm(key)] = tensor
    te2_state = models.text_encoder2.state_dict()
    hidden = models.text_encoder2.config.hidden_size
    for name, tensor in keys.te2_to_sgm(te2_state, hidden).items():
        out[TE2_PREFIX + name] = tensor
    logit_scale = models.extra.get("logit_scale")
    out[TE2_PREFIX + "logit_scale"] = (
        logit_scale if logit_scale is not None else torch.tensor(DEFAULT_LOGIT_SCALE)
    )
    return out


def modelspec_metadata(title: str, resolution: int, prediction_type: str = "epsilon") -> dict[str, str]:
    """Stability AI's model-spec fields, so UIs and hubs recognise the file as SDXL base."""
    return {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-xl-v1-base",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": title,
        "modelspec.date": _dt.date.today().isoformat(),
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.prediction_type": prediction_type,
    }


def _configs_json(models: SDXLModels) -> str:
    return json.dumps(
        {
            "unet": model_config_dict(models.unet),
            "vae": model_config_dict(models.vae),
            "te1": model_config_dict(models.text_encoder1),
            "te2": model_config_dict(models.text_encoder2),
        },
        default=list,
    )


def save_sdxl_checkpoint(
    path: str | Path,
    models: SDXLModels,
    save_precision: str = "float",
    title: str | None = None,
    resolution: int = 1024,
    prediction_type: str = "epsilon",
    extra_metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write a single-file SDXL checkpoint (SGM layout) atomically; return its path."""
    from library.safetensors_stream import save_file_streaming

    path = Path(path)
    metadata = modelspec_metadata(title or path.stem, resolution, prediction_type)
    metadata[CONFIG_METADATA_KEY] = _configs_json(models)
    metadata.update(extra_metadata or {})
    save_file_streaming(sgm_tensors(models), path, metadata=metadata, cast=_precision_cast(save_precision))
    return path


def save_vae_checkpoint(path: str | Path, vae, save_precision: str = "float") -> Path:
    """Write a VAE-only single file in LDM key layout (like the published fixed SDXL VAEs)."""
    from library.safetensors_stream import save_file_streaming

    tensors = {}
    for key, tensor in vae.state_dict().items():
        name = keys.vae_key_to_sgm(key, vae.config)
        if keys.is_vae_attention_matrix(name) and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]
        tensors[name] = tensor
    save_file_streaming(tensors, path, cast=_precision_cast(save_precision))
    return Path(path)
