"""Run by test_memory_estimate.py in a fresh process: one real training step of the tiny UNet on the
CPU, its peak RSS growth measured, next to --estimate_memory's parts for the same step.

    python tests/memory_probe.py OPTIMIZER BATCH LATENT_SIDE CHECKPOINTING(0|1)

Prints one JSON line: {"measured": bytes, "estimate": {part: bytes}}. The weights are built before
the baseline is taken, so the growth is gradients + optimizer state + activations. glibc's mmap
threshold is set to 64 KiB first: the estimate counts tensors, and with glibc's default threshold
freed tensors stay in a fragmented heap (hundreds of MB here) that RSS would add.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def main() -> None:
    import torch
    from diffusers import UNet2DConditionModel

    from library.memory_estimate import training_step_parts
    from library.optimizers import build_optimizer
    from library.tiny_sdxl import TINY_UNET
    from library.train_setup import limit_cpu_heap_growth

    name, batch, side, checkpointing = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
    assert limit_cpu_heap_growth(64 << 10)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_UNET).train()
    if checkpointing:
        unet.enable_gradient_checkpointing()
    params = list(unet.parameters())
    args = {"relative_step": False, "scale_parameter": False, "warmup_init": False} if name == "AdaFactor" else {}
    optimizer = build_optimizer(name, [{"params": params}], 1e-4, args)
    config = unet.config
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim

    def step(b: int, s: int, update: bool) -> None:
        x = torch.randn(b, 4, s, s)
        context = torch.randn(b, 77, config.cross_attention_dim)
        cond = {"text_embeds": torch.randn(b, pooled), "time_ids": torch.randn(b, 6)}
        out = unet(x, torch.tensor([500] * b), encoder_hidden_states=context, added_cond_kwargs=cond).sample
        out.float().pow(2).mean().backward()
        if update:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(1, 8, update=False)  # kernels and thread pools warmed up outside the measurement
    meta = UNet2DConditionModel(**TINY_UNET).to("meta")
    estimate = training_step_parts(meta, list(meta.parameters()), name, args, fused_backward=False,
                                   gradient_checkpointing=checkpointing, batch=batch, latent_hw=(side, side),
                                   context_len=77, compute_dtype=torch.float32)  # fmt: skip
    del meta
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    baseline = rss("VmRSS")
    step(batch, side, update=True)
    print(json.dumps({"measured": rss("VmHWM") - baseline, "estimate": estimate.parts}))


if __name__ == "__main__":
    main()
