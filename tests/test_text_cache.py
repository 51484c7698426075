"""Cached text-encoder outputs: equal to a direct encode, reused from disk, never stale."""

from __future__ import annotations

import pytest
import torch

from library.text_cache import TextEncoderCache
from library.text_encoding import encode_captions
from test_train_loop import base_args, poster_set, run_train  # noqa: F401  (poster_set is a fixture)


@pytest.fixture(scope="module")
def models(tiny_sdxl):
    from library.sdxl_train_util import load_target_model

    return load_target_model(str(tiny_sdxl["diffusers"]))


def test_cache_equals_direct_encode_and_is_reused_from_disk(models, tmp_path):
    captions = ["a movie poster", "a cat in a bag", "a movie poster"]
    cache = TextEncoderCache(models, 75, tmp_path)
    got = cache.get(captions)
    assert cache.encoded == 2  # the repeated caption is encoded once
    with torch.no_grad():
        direct = encode_captions(models, captions, 75)
    torch.testing.assert_close(got.context, direct.context, rtol=0, atol=1e-6)
    torch.testing.assert_close(got.pooled, direct.pooled, rtol=0, atol=1e-6)
    again = TextEncoderCache(models, 75, tmp_path)
    again.get(captions)
    assert again.encoded == 0 and len(list((tmp_path / "te_cache").glob("*.safetensors"))) == 2


def test_changed_caption_or_weights_are_encoded_again(models, tmp_path):
    cache = TextEncoderCache(models, 75, tmp_path)
    cache.get(["a poster"])
    key = cache.key("a poster")
    assert cache.key("a poster!") != key
    with torch.no_grad():
        models.text_encoder2.text_model.final_layer_norm.bias.add_(0.5)
    try:
        changed = TextEncoderCache(models, 75, tmp_path)
        assert changed.key("a poster") != key
        changed.get(["a poster"])
        assert changed.encoded == 1
    finally:
        with torch.no_grad():
            models.text_encoder2.text_model.final_layer_norm.bias.sub_(0.5)
    assert TextEncoderCache(models, 150, tmp_path).key("a poster") != key


def test_training_with_cached_outputs_and_the_shuffle_error(tiny_sdxl, poster_set, tmp_path):
    from library.errors import ConfigError

    fixed = tmp_path / "fixed.toml"
    fixed.write_text(poster_set.read_text(encoding="utf-8").replace("shuffle_caption = true", "shuffle_caption = false"))
    out = tmp_path / "cached"
    assert run_train(base_args(tiny_sdxl, fixed, out, 2, "--cache_text_encoder_outputs",
                               "--cache_text_encoder_outputs_to_disk", "--max_data_loader_n_workers", "0")) == 0
    assert list((out / "te_cache").glob("*.safetensors"))
    with pytest.raises(ConfigError, match="shuffle_caption"):
        run_train(base_args(tiny_sdxl, poster_set, tmp_path / "bad", 1, "--cache_text_encoder_outputs",
                            "--max_data_loader_n_workers", "0"))
