"""Real SDXL sizes (UNet ~2.6B params, ViT-L/14 and bigG text encoders, VAE) on the meta device:
our tables map every key and shape to SGM and back, and diffusers' own SGM -> diffusers
converters agree with our SGM names exactly. No weights are allocated."""

from __future__ import annotations

import pytest
import torch
from accelerate import init_empty_weights

from library import sdxl_keys as keys
from library.sdxl_configs import (
    SDXL_TE1_CONFIG,
    SDXL_TE2_CONFIG,
    SDXL_UNET_CONFIG,
    SDXL_VAE_CONFIG,
    TE1_PREFIX,
    TE2_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    infer_sdxl_configs,
)
from library.sdxl_model_util import SDXLModels, sgm_tensors


@pytest.fixture(scope="module")
def full_size():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(SDXL_UNET_CONFIG)
        vae = AutoencoderKL.from_config(SDXL_VAE_CONFIG)
        te1 = CLIPTextModel(CLIPTextConfig(**SDXL_TE1_CONFIG))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TE2_CONFIG))
    models = SDXLModels(unet=unet, vae=vae, text_encoder1=te1, text_encoder2=te2)
    models.extra["logit_scale"] = torch.empty((), device="meta")
    return models, sgm_tensors(models)


def test_full_size_parameter_count_is_sdxl(full_size):
    models, _ = full_size
    count = sum(p.numel() for p in models.unet.parameters())
    assert 2.55e9 < count < 2.6e9


def test_full_size_sgm_names_are_the_published_layout(full_size):
    _, sgm = full_size
    names = set(sgm)
    # a few names every SDXL base 1.0 file has, with their shapes
    expected = {
        "model.diffusion_model.input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
        "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
        "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.5.2.conv.weight": (640, 640, 3, 3),
        "model.diffusion_model.middle_block.1.transformer_blocks.9.ff.net.2.weight": (1280, 5120),
        "first_stage_model.decoder.up.3.block.0.conv1.weight": (512, 512, 3, 3),
        "first_stage_model.decoder.up.0.block.2.conv2.weight": (128, 128, 3, 3),
        "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
        "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
        "conditioner.embedders.1.model.text_projection": (1280, 1280),
        "conditioner.embedders.1.model.positional_embedding": (77, 1280),
        "conditioner.embedders.1.model.logit_scale": (),
    }
    for name, shape in expected.items():
        assert name in names, name
        assert tuple(sgm[name].shape) == shape, name
    unet_blocks = {int(n.split(".")[3]) for n in names if n.startswith("model.diffusion_model.input_blocks.")}
    out_blocks = {int(n.split(".")[3]) for n in names if n.startswith("model.diffusion_model.output_blocks.")}
    assert unet_blocks == set(range(9)) and out_blocks == set(range(9))


def test_configs_inferred_from_full_size_shapes_are_sdxl(full_size):
    _, sgm = full_size
    configs = infer_sdxl_configs({k: tuple(v.shape) for k, v in sgm.items()})
    for key, value in SDXL_UNET_CONFIG.items():
        assert configs["unet"][key] == (list(value) if isinstance(value, (list, tuple)) else value), key
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        assert configs["te1"][key] == SDXL_TE1_CONFIG[key]
        assert configs["te2"][key] == SDXL_TE2_CONFIG[key]
    assert configs["vae"]["block_out_channels"] == SDXL_VAE_CONFIG["block_out_channels"]


def test_our_tables_invert_exactly_at_full_size(full_size):
    models, sgm = full_size
    for module, rule, prefix in (
        (models.unet, lambda k: keys.unet_key_to_sgm(k, models.unet.config), UNET_PREFIX),
        (models.vae, lambda k: keys.vae_key_to_sgm(k, models.vae.config), VAE_PREFIX),
        (models.text_encoder1, keys.te1_key_to_sgm, TE1_PREFIX),
    ):
        state = module.state_dict()
        table = keys.rename_map(state.keys(), rule)
        assert {prefix + v for v in table.values()} == {k for k in sgm if k.startswith(prefix)}
        for diffusers_key, sgm_key in table.items():
            ours = state[diffusers_key].shape
            theirs = sgm[prefix + sgm_key].shape
            assert ours.numel() == theirs.numel(), diffusers_key
    te2_sgm = {k[len(TE2_PREFIX):]: v for k, v in sgm.items() if k.startswith(TE2_PREFIX)}
    te2_state = models.text_encoder2.state_dict()
    back = keys.te2_from_sgm(te2_sgm, te2_state.keys(), 1280)
    for key, tensor in te2_state.items():
        assert back[key].shape == tensor.shape, key


def test_diffusers_converters_read_our_sgm_names(full_size):
    from diffusers.loaders import single_file_utils as sfu

    models, sgm = full_size
    unet = sfu.convert_ldm_unet_checkpoint(sgm, dict(models.unet.config))
    assert _shapes(unet) == _shapes(models.unet.state_dict())
    vae = sfu.convert_ldm_vae_checkpoint(sgm, dict(models.vae.config))
    vae_ref = _shapes(models.vae.state_dict())
    assert vae.keys() == vae_ref.keys()
    for key, shape in _shapes(vae).items():  # diffusers keeps LDM's 1x1 conv shape; the loader squeezes it
        assert (shape[:2] if len(shape) == 4 and len(vae_ref[key]) == 2 else shape) == vae_ref[key], key
    te1 = sfu.convert_ldm_clip_checkpoint(sgm)
    te1_ref = {f"text_model.{k}": v for k, v in _shapes(models.text_encoder1.state_dict()).items()}
    assert _shapes(te1) == te1_ref
    te2 = sfu.convert_open_clip_checkpoint(models.text_encoder2, sgm, prefix=TE2_PREFIX)
    assert _shapes(te2) == _shapes(models.text_encoder2.state_dict())


def _shapes(state):
    return {k: tuple(v.shape) for k, v in state.items()}
