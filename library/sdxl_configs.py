"""SDXL model configurations: the published base model's, and inference from a checkpoint's shapes.

A single-file checkpoint carries weights, not configs. Files we write keep the exact configs in
their safetensors metadata (``sdxl_poster.configs``); for any other file (the published SDXL base,
community fine-tunes) the configs are read off the tensor shapes, with SDXL's fixed choices for what
shapes cannot tell (64-channel attention heads, 32 norm groups, activations).
"""

from __future__ import annotations

import json
import re
from typing import Mapping, Sequence

from library.errors import ModelError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TE1_PREFIX = "conditioner.embedders.0.transformer."
TE2_PREFIX = "conditioner.embedders.1.model."
CONFIG_METADATA_KEY = "sdxl_poster.configs"

TOKENIZER_IDS = ("openai/clip-vit-large-patch14", "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k")
VAE_SCALING_FACTOR = 0.13025
HEAD_CHANNELS = 64

SDXL_SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "clip_sample": False,
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
}

SDXL_UNET_CONFIG = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "cross_attention_dim": 2048,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "use_linear_projection": True,
    "norm_num_groups": 32,
}

SDXL_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": VAE_SCALING_FACTOR,
    "force_upcast": True,
}

SDXL_TE1_CONFIG = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}

SDXL_TE2_CONFIG = {
    "vocab_size": 49408,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 1280,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}

Shapes = Mapping[str, Sequence[int]]


def _count(shapes: Shapes, pattern: str) -> int:
    """Number of distinct integers captured by ``pattern`` (one group) over the keys."""
    regex = re.compile(pattern)
    found = {int(m.group(1)) for key in shapes if (m := regex.match(key))}
    return len(found)


def _shape(shapes: Shapes, key: str) -> Sequence[int]:
    if key not in shapes:
        raise ModelError(f"expected tensor '{key}' is missing", hint="the file is not a complete SDXL checkpoint")
    return shapes[key]


def infer_unet_config(shapes: Shapes, projection_dim: int) -> dict:
    """The diffusers UNet config of an SGM UNet (keys with ``model.diffusion_model.`` removed)."""
    n_down = _count(shapes, r"input_blocks\.(\d+)\.0\.op\.weight")
    levels = n_down + 1
    n_input = _count(shapes, r"input_blocks\.(\d+)\.")
    layers = (n_input - 1 - n_down) // levels
    channels, depths, has_attn = [], [], []
    for level in range(levels):
        block = 1 + level * (layers + 1)
        channels.append(int(_shape(shapes, f"input_blocks.{block}.0.out_layers.3.weight")[0]))
        depth = _count(shapes, rf"input_blocks\.{block}\.1\.transformer_blocks\.(\d+)\.")
        has_attn.append(depth > 0)
        depths.append(max(depth, 1))
    attn_key = next((k for k in shapes if k.endswith("attn2.to_k.weight")), None)
    if attn_key is None:
        raise ModelError("the UNet has no cross-attention", hint="not an SDXL UNet")
    label_in = int(_shape(shapes, "label_emb.0.0.weight")[1])
    return {
        "sample_size": 128,
        "in_channels": int(_shape(shapes, "input_blocks.0.0.weight")[1]),
        "out_channels": int(_shape(shapes, "out.2.weight")[0]),
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attn],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attn)],
        "block_out_channels": channels,
        "layers_per_block": layers,
        "transformer_layers_per_block": depths,
        "attention_head_dim": [max(c // HEAD_CHANNELS, 1) for c in channels],
        "cross_attention_dim": int(shapes[attn_key][1]),
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": (label_in - projection_dim) // 6,
        "projection_class_embeddings_input_dim": label_in,
        "use_linear_projection": len(_shape(shapes, f"input_blocks.{1 + (layers + 1) * has_attn.index(True)}.1.proj_in.weight")) == 2,
        "norm_num_groups": 32,
    }


def infer_vae_config(shapes: Shapes) -> dict:
    """The diffusers AutoencoderKL config of an LDM VAE (keys without ``first_stage_model.``)."""
    levels = _count(shapes, r"encoder\.down\.(\d+)\.")
    layers = _count(shapes, r"encoder\.down\.0\.block\.(\d+)\.")
    if levels == 0 or layers == 0:
        raise ModelError("no VAE encoder blocks found", hint="not an SDXL VAE")
    channels = [int(_shape(shapes, f"encoder.down.{i}.block.0.conv1.weight")[0]) for i in range(levels)]
    config = dict(SDXL_VAE_CONFIG)
    config.update(
        in_channels=int(_shape(shapes, "encoder.conv_in.weight")[1]),
        out_channels=int(_shape(shapes, "decoder.conv_out.weight")[0]),
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        block_out_channels=channels,
        layers_per_block=layers,
        latent_channels=int(_shape(shapes, "post_quant_conv.weight")[0]),
    )
    return config


def infer_te1_config(shapes: Shapes) -> dict:
    """CLIPTextConfig kwargs for TE1 (HF layout, keys without the ``...transformer.`` prefix)."""
    prefix = "text_model." if any(k.startswith("text_model.") for k in shapes) else ""
    hidden = int(_shape(shapes, f"{prefix}embeddings.token_embedding.weight")[1])
    config = dict(SDXL_TE1_CONFIG)
    config.update(
        vocab_size=int(shapes[f"{prefix}embeddings.token_embedding.weight"][0]),
        hidden_size=hidden,
        intermediate_size=int(_shape(shapes, f"{prefix}encoder.layers.0.mlp.fc1.weight")[0]),
        num_hidden_layers=_count(shapes, rf"{re.escape(prefix)}encoder\.layers\.(\d+)\."),
        num_attention_heads=max(hidden // HEAD_CHANNELS, 1),
        max_position_embeddings=int(_shape(shapes, f"{prefix}embeddings.position_embedding.weight")[0]),
        projection_dim=hidden,
    )
    return config


def infer_te2_config(shapes: Shapes) -> dict:
    """CLIPTextConfig kwargs for TE2 (OpenCLIP layout, keys without ``conditioner.embedders.1.model.``)."""
    hidden = int(_shape(shapes, "token_embedding.weight")[1])
    config = dict(SDXL_TE2_CONFIG)
    config.update(
        vocab_size=int(shapes["token_embedding.weight"][0]),
        hidden_size=hidden,
        intermediate_size=int(_shape(shapes, "transformer.resblocks.0.mlp.c_fc.weight")[0]),
        num_hidden_layers=_count(shapes, r"transformer\.resblocks\.(\d+)\."),
        num_attention_heads=max(hidden // HEAD_CHANNELS, 1),
        max_position_embeddings=int(_shape(shapes, "positional_embedding")[0]),
        projection_dim=int(_shape(shapes, "text_projection")[1]),
    )
    return config


def _strip(shapes: Shapes, prefix: str) -> dict[str, Sequence[int]]:
    return {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}


def infer_sdxl_configs(shapes: Shapes) -> dict[str, dict]:
    """All four configs from the shapes of a full SGM checkpoint."""
    te2 = infer_te2_config(_strip(shapes, TE2_PREFIX))
    return {
        "unet": infer_unet_config(_strip(shapes, UNET_PREFIX), te2["projection_dim"]),
        "vae": infer_vae_config(_strip(shapes, VAE_PREFIX)),
        "te1": infer_te1_config(_strip(shapes, TE1_PREFIX)),
        "te2": te2,
    }


def configs_from_metadata(metadata: Mapping[str, str] | None) -> dict[str, dict] | None:
    """The exact configs a file written by this toolkit carries, or None."""
    if not metadata or CONFIG_METADATA_KEY not in metadata:
        return None
    try:
        configs = json.loads(metadata[CONFIG_METADATA_KEY])
    except json.JSONDecodeError:
        return None
    if not isinstance(configs, dict) or not {"unet", "vae", "te1", "te2"} <= set(configs):
        return None
    return configs


def model_config_dict(model) -> dict:
    """A JSON-able config of a diffusers model or a transformers CLIP text model."""
    config = model.config
    if hasattr(config, "to_diff_dict"):  # transformers
        keys = set(SDXL_TE1_CONFIG)
        full = config.to_dict()
        return {k: full[k] for k in keys if k in full}
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}
