"""Deterministic validation loss: the same number for the same weights, every time.

The validation images (``validation_split`` / ``validation_seed`` in the dataset TOML) are held out of
training. Every ``--validate_every_n_steps`` each of them is noised at a few fixed timesteps spread over
the schedule (``--validation_timesteps``, default 100, 300, 500, 700, 900) with noise drawn from a
generator seeded by the image and the timestep, and the plain MSE to the target is averaged: no
offset noise, no caption transforms, no random crop or flip, no loss weighting. The UNet runs in eval
mode under ``no_grad`` and every RNG of the training run is left as it was.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

DEFAULT_TIMESTEPS = (100, 300, 500, 700, 900)


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256("\0".join(map(str, parts)).encode()).digest()[:8], "big")


@dataclass
class ValidationSet:
    """Validation samples, decoded once: latents [C, H, W] (scaled), size conditioning, caption."""

    latents: list
    size_cond: list
    captions: list
    keys: list


def build_validation_set(dataset, latents_of) -> ValidationSet:
    """``dataset`` is a TrainDataset over the held-out items; ``latents_of(batch) -> latents``."""
    from library.errors import DataError
    from library.train_dataset import SampleRef, collate

    latents, conds, captions, keys = [], [], [], []
    for index, item in enumerate(dataset.items):
        sample = dataset[SampleRef(index, 1, 0)]
        if "unreadable" in sample:  # decoded once, before training starts
            path, why = sample["unreadable"]
            raise DataError(f"validation image cannot be read ({why})", where=path,
                            hint="re-save or remove it, or use --cache_latents to skip unreadable images")  # fmt: skip
        batch = collate([sample])
        latents.append(latents_of(batch)[0].detach().to("cpu"))
        conds.append(batch["size_cond"][0])
        captions.append(item.caption)  # the raw caption: no shuffle/dropout in validation
        keys.append(item.image_key)
    return ValidationSet(latents, conds, captions, keys)


def validation_loss(unet, encode_text, schedule, vset: ValidationSet, timesteps=DEFAULT_TIMESTEPS,
                    v_prediction: bool = False, seed: int = 0, device="cpu") -> dict[str, float]:
    """``{"loss/validation": mean, "loss/validation_t100": ..., ...}`` over every image and timestep."""
    import torch

    from library.noise import add_noise, v_target
    from library.sampling import eval_mode, preserved_rng

    per_t: dict[int, list[float]] = {t: [] for t in timesteps}
    with preserved_rng(), eval_mode([unet]), torch.no_grad():
        for index, latents in enumerate(vset.latents):
            latents = latents[None].to(device, dtype=torch.float32)
            cond = encode_text([vset.captions[index]])
            time_ids = vset.size_cond[index][None].to(device, dtype=cond.context.dtype)
            for t in timesteps:
                generator = torch.Generator().manual_seed(_seed(seed, vset.keys[index], t))
                noise = torch.randn(latents.shape, generator=generator).to(device)
                steps = torch.tensor([t], device=device)
                noisy = add_noise(schedule, latents, noise, steps)
                pred = unet(noisy, steps, encoder_hidden_states=cond.context,
                            added_cond_kwargs={"text_embeds": cond.pooled, "time_ids": time_ids}).sample
                target = v_target(schedule, latents, noise, steps) if v_prediction else noise
                per_t[t].append(torch.nn.functional.mse_loss(pred.float(), target.float()).item())
    logs = {f"loss/validation_t{t}": sum(v) / len(v) for t, v in per_t.items() if v}
    if logs:
        logs["loss/validation"] = sum(logs.values()) / len(logs)
    return logs
