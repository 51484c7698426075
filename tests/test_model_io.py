"""Single file <-> diffusers round trips, third-party reading, VAE swap and loader errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from library.errors import ModelError
from library.sdxl_model_util import (
    load_models_from_sdxl_checkpoint,
    save_sdxl_checkpoint,
    save_vae_checkpoint,
)
from library.sdxl_train_util import load_target_model, load_tokenizers, load_vae, save_diffusers

COMPONENTS = ("unet", "vae", "text_encoder1", "text_encoder2")


def _state(models, name):
    return getattr(models, name).state_dict()


def _assert_equal_models(a, b, exact=True, atol=0.0):
    for name in COMPONENTS:
        sa, sb = _state(a, name), _state(b, name)
        assert sa.keys() == sb.keys(), name
        for key in sa:
            if exact:
                assert torch.equal(sa[key], sb[key]), f"{name}.{key}"
            else:
                torch.testing.assert_close(sa[key].float(), sb[key].float(), atol=atol, rtol=0)


@pytest.fixture(scope="module")
def loaded(tiny_sdxl):
    return load_target_model(str(tiny_sdxl["diffusers"]))


def test_single_file_and_diffusers_folder_hold_the_same_weights(tiny_sdxl, loaded):
    single = load_target_model(str(tiny_sdxl["single_file"]), tokenizer_cache_dir=str(tiny_sdxl["tokenizers"]))
    _assert_equal_models(single, loaded)
    assert single.tokenizer2.pad_token == "!" and single.tokenizer2.pad_token_id == 0
    assert single.tokenizer1("the poster").input_ids == loaded.tokenizer1("the poster").input_ids


def test_round_trip_diffusers_single_diffusers_is_bit_identical(tmp_path, loaded):
    path = save_sdxl_checkpoint(tmp_path / "rt.safetensors", loaded, save_precision="float")
    again = load_models_from_sdxl_checkpoint(path)
    _assert_equal_models(again, loaded)
    # and the written file is itself stable: saving what was read gives the same tensors
    path2 = save_sdxl_checkpoint(tmp_path / "rt2.safetensors", again, save_precision="float")
    first, second = load_file(str(path)), load_file(str(path2))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("precision,dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_precision_saves_are_within_rounding(tmp_path, loaded, precision, dtype):
    path = save_sdxl_checkpoint(tmp_path / f"{precision}.safetensors", loaded, save_precision=precision)
    raw = load_file(str(path))
    floats = [t for t in raw.values() if t.is_floating_point()]
    assert floats and all(t.dtype == dtype for t in floats)
    again = load_models_from_sdxl_checkpoint(path)
    for name in COMPONENTS:
        for key, ref in _state(loaded, name).items():
            got = _state(again, name)[key]
            assert torch.equal(got.float(), ref.to(dtype).float()), f"{name}.{key}"


def test_saved_file_has_sgm_layout_and_modelspec(tmp_path, loaded):
    path = save_sdxl_checkpoint(tmp_path / "m.safetensors", loaded, title="poster", resolution=1024)
    with safe_open(str(path), framework="pt") as handle:
        names = set(handle.keys())
        meta = handle.metadata()
    prefixes = ("model.diffusion_model.", "first_stage_model.", "conditioner.embedders.0.transformer.text_model.",
                "conditioner.embedders.1.model.")
    assert all(n.startswith(prefixes) for n in names)
    for prefix in prefixes:
        assert any(n.startswith(prefix) for n in names), prefix
    assert "conditioner.embedders.1.model.logit_scale" in names
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in names
    assert "model.diffusion_model.output_blocks.8.0.out_layers.3.weight" in names
    assert "model.diffusion_model.input_blocks.8.1.transformer_blocks.1.attn2.to_k.weight" in names
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    assert meta["modelspec.title"] == "poster" and meta["modelspec.resolution"] == "1024x1024"
    assert json.loads(meta["sdxl_poster.configs"])["unet"]["block_out_channels"] == [32, 64, 64]


def test_te2_in_proj_is_q_k_v_concatenated_and_projection_transposed(tmp_path, loaded):
    path = save_sdxl_checkpoint(tmp_path / "te2.safetensors", loaded)
    raw = load_file(str(path))
    te2 = loaded.text_encoder2.state_dict()
    in_proj = raw["conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight"]
    qkv = [te2[f"text_model.encoder.layers.1.self_attn.{p}_proj.weight"] for p in "qkv"]
    assert torch.equal(in_proj, torch.cat(qkv))
    assert torch.equal(raw["conditioner.embedders.1.model.text_projection"], te2["text_projection.weight"].T)
    vae_q = raw["first_stage_model.encoder.mid.attn_1.q.weight"]
    assert vae_q.ndim == 4 and vae_q.shape[2:] == (1, 1)


def test_diffusers_own_single_file_reader_accepts_our_file(tmp_path, tiny_sdxl, loaded):
    from diffusers import StableDiffusionXLPipeline

    path = save_sdxl_checkpoint(tmp_path / "ours.safetensors", loaded)
    pipe = StableDiffusionXLPipeline.from_single_file(
        str(path), config=str(tiny_sdxl["diffusers"]), local_files_only=True
    )
    theirs = {"unet": pipe.unet, "vae": pipe.vae, "text_encoder1": pipe.text_encoder, "text_encoder2": pipe.text_encoder_2}
    for name, module in theirs.items():
        ours, other = _state(loaded, name), module.state_dict()
        assert ours.keys() == other.keys(), name
        assert all(torch.equal(ours[k], other[k]) for k in ours), name


def test_configs_are_inferred_from_shapes_without_our_metadata(tmp_path, tiny_sdxl, loaded):
    raw = load_file(str(tiny_sdxl["single_file"]))
    bare = tmp_path / "bare.safetensors"
    save_file(raw, str(bare))  # no metadata at all, like a third-party file
    models = load_models_from_sdxl_checkpoint(bare)
    _assert_equal_models(models, loaded)
    assert list(models.unet.config.transformer_layers_per_block) == [1, 1, 2]
    assert models.unet.config.addition_time_embed_dim == 8


def test_save_diffusers_folder_offline_round_trips(tmp_path, loaded):
    folder = save_diffusers(tmp_path / "pipe", loaded)
    again = load_target_model(str(folder))
    _assert_equal_models(again, loaded)
    assert again.tokenizer1("a movie poster").input_ids == loaded.tokenizer1("a movie poster").input_ids
    half = save_diffusers(tmp_path / "pipe16", loaded, save_precision="fp16")
    stored = load_file(str(half / "unet" / "diffusion_pytorch_model.safetensors"))
    assert {t.dtype for t in stored.values()} == {torch.float16}
    assert loaded.unet.dtype == torch.float32  # the caller's weights were not cast


# --- VAE swap ----------------------------------------------------------------------------------


def _vae_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def fixed_vae(tiny_sdxl):
    return load_vae(str(tiny_sdxl["vae_fix"]))


def test_vae_swap_from_every_accepted_form(tmp_path, tiny_sdxl, loaded, fixed_vae):
    assert not _vae_equal(fixed_vae, loaded.vae)
    raw = load_file(str(tiny_sdxl["vae_fix"]))
    prefixed = tmp_path / "prefixed.safetensors"
    save_file({f"first_stage_model.{k}": v for k, v in raw.items()}, str(prefixed))
    diffusers_keys = tmp_path / "diffusers_keys.safetensors"
    save_file({k: v.contiguous() for k, v in fixed_vae.state_dict().items()}, str(diffusers_keys))
    full = tmp_path / "full.safetensors"
    from library.sdxl_model_util import SDXLModels

    save_sdxl_checkpoint(full, SDXLModels(loaded.unet, fixed_vae, loaded.text_encoder1, loaded.text_encoder2))
    vae_folder = tmp_path / "vae_folder"
    fixed_vae.save_pretrained(str(vae_folder))
    for spec in (prefixed, diffusers_keys, full, vae_folder):
        swapped = load_vae(str(spec), current_config=dict(loaded.vae.config))
        assert _vae_equal(swapped, fixed_vae), spec


def test_vae_flag_swaps_the_vae_and_later_checkpoints_contain_it(tmp_path, tiny_sdxl, fixed_vae):
    models = load_target_model(
        str(tiny_sdxl["single_file"]), vae=str(tiny_sdxl["vae_fix"]), tokenizer_cache_dir=str(tiny_sdxl["tokenizers"])
    )
    assert _vae_equal(models.vae, fixed_vae)
    path = save_sdxl_checkpoint(tmp_path / "baked.safetensors", models)
    assert _vae_equal(load_models_from_sdxl_checkpoint(path).vae, fixed_vae)


# --- errors ------------------------------------------------------------------------------------


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="model not found"):
        load_target_model(str(tmp_path / "nope.safetensors"))


def test_sd1_checkpoint_is_named_as_such(tmp_path):
    path = tmp_path / "sd15.safetensors"
    save_file(
        {
            "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(4, 4),
            "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
        },
        str(path),
    )
    with pytest.raises(ModelError, match="Stable Diffusion 1.x checkpoint, not SDXL"):
        load_models_from_sdxl_checkpoint(path)


def test_truncated_safetensors_is_a_clear_error(tmp_path, tiny_sdxl):
    data = Path(tiny_sdxl["single_file"]).read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="truncated or corrupt"):
        load_models_from_sdxl_checkpoint(path)


def test_missing_keys_are_counted_and_named(tmp_path, tiny_sdxl):
    with safe_open(str(tiny_sdxl["single_file"]), framework="pt") as handle:
        meta = handle.metadata()
    raw = load_file(str(tiny_sdxl["single_file"]))
    dropped = [k for k in raw if k.startswith("model.diffusion_model.output_blocks.3.")]
    for key in dropped:
        del raw[key]
    path = tmp_path / "holes.safetensors"
    save_file(raw, str(path), metadata=meta)
    with pytest.raises(ModelError) as err:
        load_models_from_sdxl_checkpoint(path)
    assert f"{len(dropped)} missing" in str(err.value) and "up_blocks.1.attentions.0." in str(err.value)


def test_vae_of_the_wrong_shape_is_refused(tmp_path, loaded):
    raw = {k: v for k, v in load_file(str(save_vae_checkpoint(tmp_path / "v.safetensors", loaded.vae))).items()}
    raw["encoder.conv_in.weight"] = torch.zeros(16, 3, 3, 3)
    bad = tmp_path / "bad_vae.safetensors"
    save_file(raw, str(bad))
    with pytest.raises(ModelError, match="VAE"):
        load_vae(str(bad), current_config=dict(loaded.vae.config))


def test_pickle_checkpoints_are_only_read_weights_only(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": Evil()}, str(path))
    with pytest.raises(ModelError, match="cannot be read safely"):
        load_models_from_sdxl_checkpoint(path)


def test_tokenizers_offline_without_cache_name_the_flag(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="--tokenizer_cache_dir"):
        load_tokenizers(str(tmp_path / "empty"))
