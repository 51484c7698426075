"""SDXL text conditioning: tokenize in 75-token chunks, encode with both text encoders.

SDXL conditions the UNet on the concatenation of TE1's and TE2's penultimate hidden states
(``[B, L, 768 + 1280]`` at full size) and on TE2's projected pooled output (``[B, 1280]``), plus six
size numbers (``original_size``, ``crop_top_left``, ``target_size``) embedded by the UNet itself.

Captions longer than 75 tokens (``--max_token_length 150|225``) are split into chunks of 75 tokens;
each chunk is wrapped in BOS ... EOS and encoded on its own, and the hidden states are joined as
``[BOS of chunk 0] + [75 body states of every chunk] + [last state of the last chunk]`` so the
sequence length is ``max_token_length + 2``. The pooled output comes from the first chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

from library.errors import ConfigError

CHUNK = 75
VALID_MAX_TOKEN_LENGTHS = (75, 150, 225)


@dataclass
class TextConditioning:
    """What the UNet needs from the text: ``context`` [B, L, D1+D2] and ``pooled`` [B, P]."""

    context: object
    pooled: object


def check_max_token_length(value: int | None) -> int:
    value = CHUNK if value is None else int(value)
    if value not in VALID_MAX_TOKEN_LENGTHS:
        raise ConfigError(f"--max_token_length must be one of 75, 150, 225, not {value}")
    return value


def tokenize_chunks(tokenizer, captions: list[str], max_token_length: int = CHUNK):
    """Token ids ``[B, n_chunks, 77]``: each chunk is BOS + 75 tokens + EOS/pad."""
    import torch

    max_token_length = check_max_token_length(max_token_length)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id
    encoded = tokenizer(
        list(captions),
        padding="max_length",
        truncation=True,
        max_length=max_token_length + 2,
        return_tensors="pt",
    ).input_ids
    body = encoded[:, 1:-1]
    chunks = []
    for start in range(0, max_token_length, CHUNK):
        part = body[:, start:start + CHUNK].clone()
        # a chunk that starts in the padding still needs an EOS for its pooled/attention position
        empty = part[:, 0] == pad
        part[empty, 0] = eos
        last = part[:, -1]
        closing = torch.where((last == eos) | (last == pad), torch.full_like(last, pad), torch.full_like(last, eos))
        if pad == eos:
            closing = torch.full_like(last, eos)
        chunk = torch.cat([torch.full_like(last, bos)[:, None], part, closing[:, None]], dim=1)
        chunks.append(chunk)
    return torch.stack(chunks, dim=1)


def _join_chunks(states, batch: int, n_chunks: int):
    """``[B*C, 77, D]`` -> ``[B, 1 + 75*C + 1, D]``."""
    import torch

    states = states.reshape(batch, n_chunks, states.shape[-2], states.shape[-1])
    if n_chunks == 1:
        return states[:, 0]
    pieces = [states[:, 0, :1]]
    pieces += [states[:, c, 1:-1] for c in range(n_chunks)]
    pieces.append(states[:, -1, -1:])
    return torch.cat(pieces, dim=1)


def encode_tokens(text_encoder1, text_encoder2, ids1, ids2) -> TextConditioning:
    """Encode chunked ids (``[B, C, 77]`` each) into SDXL's context and pooled embedding."""
    import torch

    batch, n_chunks, length = ids1.shape
    device1 = next(text_encoder1.parameters()).device
    device2 = next(text_encoder2.parameters()).device
    out1 = text_encoder1(ids1.reshape(-1, length).to(device1), output_hidden_states=True)
    out2 = text_encoder2(ids2.reshape(-1, length).to(device2), output_hidden_states=True)
    hidden1 = _join_chunks(out1.hidden_states[-2], batch, n_chunks)
    hidden2 = _join_chunks(out2.hidden_states[-2], batch, n_chunks)
    pooled = out2.text_embeds.reshape(batch, n_chunks, -1)[:, 0]
    context = torch.cat([hidden1, hidden2.to(hidden1.dtype)], dim=-1)
    return TextConditioning(context=context, pooled=pooled)


def encode_captions(models, captions: list[str], max_token_length: int = CHUNK) -> TextConditioning:
    """Tokenize and encode ``captions`` with ``models``' tokenizers and text encoders."""
    ids1 = tokenize_chunks(models.tokenizer1, captions, max_token_length)
    ids2 = tokenize_chunks(models.tokenizer2, captions, max_token_length)
    return encode_tokens(models.text_encoder1, models.text_encoder2, ids1, ids2)


def size_conditioning(original_hw, crop_top_left, target_hw):
    """SDXL's ``time_ids`` rows ``[orig_h, orig_w, crop_top, crop_left, target_h, target_w]``."""
    import torch

    rows = [list(o) + list(c) + list(t) for o, c, t in zip(original_hw, crop_top_left, target_hw)]
    return torch.tensor(rows, dtype=torch.float32)
