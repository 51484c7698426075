"""State-dict key conversion between diffusers/transformers and the original SGM (single-file) layout.

Each component is a table of rules that renames one diffusers key to its SGM key. The tables work
for any number of UNet/VAE levels and layers (the level/index arithmetic takes the config). The
reverse direction is the same table inverted over the keys of a model built from the config, so
the two directions cannot drift apart. TE2 is the one component that is not a pure rename: OpenCLIP
keeps q/k/v as one ``in_proj`` tensor and stores ``text_projection`` transposed.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, Mapping

from library.errors import ModelError

_UNET_RESNET = [
    ("norm1.", "in_layers.0."),
    ("conv1.", "in_layers.2."),
    ("time_emb_proj.", "emb_layers.1."),
    ("norm2.", "out_layers.0."),
    ("conv2.", "out_layers.3."),
    ("conv_shortcut.", "skip_connection."),
]
_VAE_RESNET = [("conv_shortcut.", "nin_shortcut.")]
_VAE_ATTENTION = [
    ("group_norm.", "norm."),
    ("to_q.", "q."),
    ("to_k.", "k."),
    ("to_v.", "v."),
    ("to_out.0.", "proj_out."),
]
_UNET_FIXED = [
    ("time_embedding.linear_1.", "time_embed.0."),
    ("time_embedding.linear_2.", "time_embed.2."),
    ("add_embedding.linear_1.", "label_emb.0.0."),
    ("add_embedding.linear_2.", "label_emb.0.2."),
    ("conv_in.", "input_blocks.0.0."),
    ("conv_norm_out.", "out.0."),
    ("conv_out.", "out.2."),
]


def _rename_head(rest: str, table: Iterable[tuple[str, str]]) -> str:
    for old, new in table:
        if rest.startswith(old):
            return new + rest[len(old):]
    return rest


def unet_key_to_sgm(key: str, config: Mapping) -> str:
    """One diffusers UNet key -> its SGM key (without ``model.diffusion_model.``)."""
    step = config["layers_per_block"] + 1
    up_attn = [t.startswith("CrossAttn") for t in config["up_block_types"]]
    for old, new in _UNET_FIXED:
        if key.startswith(old):
            return new + key[len(old):]
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        level, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        block = 1 + level * step + j
        if kind == "resnets":
            return f"input_blocks.{block}.0.{_rename_head(rest, _UNET_RESNET)}"
        return f"input_blocks.{block}.1.{rest}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{(int(m[1]) + 1) * step}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"middle_block.{2 * int(m[1])}.{_rename_head(m[2], _UNET_RESNET)}"
    if m := re.match(r"mid_block\.attentions\.0\.(.*)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        level, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        block = level * step + j
        if kind == "resnets":
            return f"output_blocks.{block}.0.{_rename_head(rest, _UNET_RESNET)}"
        return f"output_blocks.{block}.1.{rest}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        level = int(m[1])
        slot = 2 if up_attn[level] else 1
        return f"output_blocks.{level * step + step - 1}.{slot}.conv.{m[2]}"
    raise ModelError(f"no SGM name for UNet key '{key}'")


def vae_key_to_sgm(key: str, config: Mapping) -> str:
    """One diffusers VAE key -> its LDM key (without ``first_stage_model.``)."""
    levels = len(config["block_out_channels"])
    if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{_rename_head(m[3], _VAE_RESNET)}"
    if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", key):
        return f"{m[1]}.mid.attn_1.{_rename_head(m[2], _VAE_ATTENTION)}"
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{_rename_head(m[3], _VAE_RESNET)}"
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        return f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.{_rename_head(m[3], _VAE_RESNET)}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        return f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if m := re.match(r"(encoder|decoder)\.conv_norm_out\.(.*)", key):
        return f"{m[1]}.norm_out.{m[2]}"
    if re.match(r"(encoder|decoder)\.conv_(in|out)\.|(post_)?quant_conv\.", key):
        return key
    raise ModelError(f"no LDM name for VAE key '{key}'")


def is_vae_attention_matrix(sgm_key: str) -> bool:
    """LDM stores the VAE mid-block attention projections as 1x1 convs (diffusers: Linear)."""
    return bool(re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", sgm_key))


def te1_key_to_sgm(key: str) -> str:
    """TE1 (transformers CLIPTextModel) key -> SGM key under ``...transformer.``.

    transformers 5 drops the ``text_model.`` prefix from CLIPTextModel's own state dict; the SGM
    file always has it.
    """
    return key if key.startswith("text_model.") else f"text_model.{key}"


_TE2_LAYER = [
    ("layer_norm1.", "ln_1."),
    ("layer_norm2.", "ln_2."),
    ("self_attn.out_proj.", "attn.out_proj."),
    ("mlp.fc1.", "mlp.c_fc."),
    ("mlp.fc2.", "mlp.c_proj."),
]
_TE2_FIXED = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "text_projection.weight": "text_projection",
}


def te2_key_to_sgm(key: str) -> str:
    """TE2 key -> OpenCLIP key. q/k/v projections all map onto their layer's ``in_proj``."""
    if key in _TE2_FIXED:
        return _TE2_FIXED[key]
    m = re.match(r"text_model\.encoder\.layers\.(\d+)\.(.*)", key)
    if not m:
        raise ModelError(f"no OpenCLIP name for TE2 key '{key}'")
    layer, rest = m[1], m[2]
    if qkv := re.match(r"self_attn\.[qkv]_proj\.(weight|bias)", rest):
        return f"transformer.resblocks.{layer}.attn.in_proj_{qkv[1]}"
    return f"transformer.resblocks.{layer}.{_rename_head(rest, _TE2_LAYER)}"


# --- whole state dicts --------------------------------------------------------------------------


def rename_map(keys: Iterable[str], rule: Callable[[str], str]) -> dict[str, str]:
    """``{diffusers_key: sgm_key}`` for every key, checking that no two keys collide."""
    mapping = {key: rule(key) for key in keys}
    if len(set(mapping.values())) != len(mapping):
        raise ModelError("two diffusers keys map onto one SGM key; the rename table is wrong")
    return mapping


def te2_to_sgm(state_dict: Mapping, hidden_size: int) -> dict:
    """TE2 diffusers state dict -> OpenCLIP state dict (q/k/v concatenated, projection transposed)."""
    import torch

    out: dict = {}
    pending: dict[str, dict[str, object]] = {}
    for key, tensor in state_dict.items():
        sgm = te2_key_to_sgm(key)
        if ".attn.in_proj_" in sgm:
            part = re.search(r"self_attn\.([qkv])_proj", key)[1]  # type: ignore[index]
            pending.setdefault(sgm, {})[part] = tensor
        elif sgm == "text_projection":
            out[sgm] = tensor.t()
        else:
            out[sgm] = tensor
    for sgm, parts in pending.items():
        if set(parts) != {"q", "k", "v"}:
            raise ModelError(f"TE2 layer '{sgm}' lacks one of q/k/v")
        out[sgm] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def te2_from_sgm(sgm: Mapping, model_keys: Iterable[str], hidden_size: int) -> dict:
    """OpenCLIP state dict -> TE2 diffusers state dict for a model with ``model_keys``."""
    out: dict = {}
    for key in model_keys:
        name = te2_key_to_sgm(key)
        if name not in sgm:
            raise ModelError(f"missing TE2 tensor '{name}'")
        tensor = sgm[name]
        if ".attn.in_proj_" in name:
            part = "qkv".index(re.search(r"self_attn\.([qkv])_proj", key)[1])  # type: ignore[index]
            tensor = tensor[part * hidden_size:(part + 1) * hidden_size]
        elif name == "text_projection":
            tensor = tensor.t()
        out[key] = tensor.contiguous()
    return out
