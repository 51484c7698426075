"""Chunked tokenization and SDXL text conditioning against diffusers' own encode_prompt."""

from __future__ import annotations

import pytest
import torch

from library.errors import ConfigError
from library.text_encoding import encode_captions, size_conditioning, tokenize_chunks


@pytest.fixture(scope="module")
def models(tiny_sdxl):
    from library.sdxl_train_util import load_target_model

    return load_target_model(str(tiny_sdxl["diffusers"]))


def test_chunks_wrap_every_75_tokens_in_bos_eos(models):
    tok = models.tokenizer2
    long_caption = " ".join(["poster"] * 100)  # 100 tokens
    ids = tokenize_chunks(tok, [long_caption, "the cat"], 225)
    assert ids.shape == (2, 3, 77)
    bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    assert (ids[:, :, 0] == bos).all()
    # caption 0: chunk 0 full of words -> closes with EOS; chunk 1 holds the rest then EOS; chunk 2 empty
    assert ids[0, 0, -1] == eos
    assert (ids[0, 1, 1:26] == ids[0, 0, 1]).all() and ids[0, 1, 26] == eos
    assert ids[0, 2, 1] == eos and (ids[0, 2, 2:] == pad).all()
    # caption 1: short -> the first chunk is what a plain 77-token call gives
    plain = tok(["the cat"], padding="max_length", max_length=77, truncation=True).input_ids[0]
    assert ids[1, 0].tolist() == plain


def test_bad_max_token_length_is_a_config_error(models):
    with pytest.raises(ConfigError, match="75, 150, 225"):
        tokenize_chunks(models.tokenizer1, ["x"], 100)


def _diffusers_pipe(models):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=models.vae, text_encoder=models.text_encoder1, text_encoder_2=models.text_encoder2,
        tokenizer=models.tokenizer1, tokenizer_2=models.tokenizer2, unet=models.unet,
        scheduler=EulerDiscreteScheduler.from_config(models.scheduler_config),
    )


@pytest.mark.parametrize("caption", ["a movie poster of the cat", " ".join(["bag"] * 90)])
def test_conditioning_matches_diffusers(models, caption):
    pipe = _diffusers_pipe(models)
    with torch.no_grad():
        ref_embeds, _, ref_pooled, _ = pipe.encode_prompt(caption, device="cpu", do_classifier_free_guidance=False)
        ours = encode_captions(models, [caption], 75)
    assert ours.context.shape == ref_embeds.shape == (1, 77, 32 + 48)
    torch.testing.assert_close(ours.context, ref_embeds, rtol=0, atol=0)
    torch.testing.assert_close(ours.pooled, ref_pooled, rtol=0, atol=0)


def test_long_captions_give_longer_context_and_first_chunk_pooled(models):
    caption = " ".join(["poster"] * 100)
    with torch.no_grad():
        long = encode_captions(models, [caption], 150)
        short = encode_captions(models, [caption], 75)
    assert long.context.shape == (1, 152, 80)
    # the first chunk is encoded in a batch of two here: equal up to float summation order
    torch.testing.assert_close(long.pooled, short.pooled, rtol=0, atol=1e-6)
    torch.testing.assert_close(long.context[:, :76], short.context[:, :76], rtol=0, atol=1e-6)
    assert not torch.allclose(long.context[:, 76:151], short.context[:, 76:77].expand(-1, 75, -1))


def test_size_conditioning_rows():
    ids = size_conditioning([(1200, 800)], [(16, 0)], [(1024, 768)])
    assert ids.tolist() == [[1200.0, 800.0, 16.0, 0.0, 1024.0, 768.0]]
