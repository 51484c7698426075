#!/usr/bin/env python
"""Training-step cost: our loop against a bare diffusers loop, and the full-size UNet's peak memory.

    python benchmarks/train_step.py [--steps 40] [--skip_full_size] [--latent 32]

1. Step time. sdxl_train.py (in this process, the real recipe: cached latents on disk, the data
   loader, caption handling, both text encoders, our noise/loss code, Adafactor with clip_threshold,
   gradient clipping, the scheduler, logging) against the same step written with diffusers and
   transformers alone (latents encoded once and kept in memory, tokenizers + text encoders,
   DDPMScheduler.add_noise, UNet, MSE, backward, clip_grad_norm_, Adafactor, scheduler). Same tiny
   SDXL, same images and captions, batch 2 at 128x128, float32, one data-loading process. Each side
   runs three times, alternating; the per-step time is the median over the steps after a warm-up. Goal:
   ours / bare <= 1.05.
2. Full-size memory (in a fresh child process, so its peak RSS is its own): the full SDXL UNet
   (2.57 B parameters) in bf16 on the CPU, gradient checkpointing, Adafactor (transformers',
   clip_threshold=1.0) stepped inside backward by our --fused_backward_pass hook with per-tensor
   clipping at 1.0, one step at batch 1 and a small latent. Prints peak RSS (VmHWM) against the bf16
   weight bytes (goal <= 1.3x, the interpreter and torch included) and --estimate_memory's parts for
   the same step against the measured growth over the baseline (goal: within 20%). With
   --compare_unfused the plain step (every gradient at once) runs too, for the memory the fusion saves.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars would bury the figures

GiB = 1024**3
BATCH, RESOLUTION, WARMUP, ROUNDS = 2, 128, 5, 3
ADAFACTOR_ARGS = {"scale_parameter": False, "relative_step": False, "warmup_init": False, "clip_threshold": 1.0}
LR = 1e-5

DATASET_TOML = """\
[[datasets]]
resolution = {resolution}
batch_size = {batch}

  [[datasets.subsets]]
  image_dir = "{images}"
  metadata_file = "{meta}"
"""


# ----------------------------------------------------------------------------------- step time


def ours(tiny: Path, toml: Path, out: Path, steps: int) -> list[float]:
    """Per-step wall times of sdxl_train.py's loop (time between consecutive steps' ends)."""
    from accelerate.state import AcceleratorState

    import sdxl_train
    from library import train_events

    stamps: list[float] = []
    original = train_events.after_step

    def timed(run, batches_done):
        original(run, batches_done)
        stamps.append(time.perf_counter())

    args = [
        "--pretrained_model_name_or_path", str(tiny / "tiny-sdxl.safetensors"),
        "--tokenizer_cache_dir", str(tiny / "tokenizers"),
        "--dataset_config", str(toml), "--output_dir", str(out), "--output_name", "bench",
        "--cache_latents_to_disk", "--max_data_loader_n_workers", "0",
        "--optimizer_type", "AdaFactor", "--optimizer_args", *[f"{k}={v}" for k, v in ADAFACTOR_ARGS.items()],
        "--learning_rate", str(LR), "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "2",
        "--max_grad_norm", "1.0", "--max_train_steps", str(steps), "--seed", "1",
    ]  # fmt: skip
    train_events.after_step = timed
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        if sdxl_train.main(args) != 0:
            raise SystemExit("sdxl_train.py failed")
    finally:
        train_events.after_step = original
        AcceleratorState._reset_state(reset_partial_state=True)
    return [b - a for a, b in zip(stamps, stamps[1:])]


def bare_setup(tiny: Path, meta_path: Path):
    """The models and in-memory latents of the diffusers-only loop."""
    import json

    import numpy as np
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from PIL import Image
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    folder = tiny / "diffusers"
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    te1 = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").eval().requires_grad_(False)
    te2 = CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2").eval().requires_grad_(False)
    tok1 = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    tok2 = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2")
    scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    latents, captions = [], []
    with torch.no_grad():
        for key, entry in meta.items():
            image = Image.open(meta_path.parent / "images" / f"{key}.png").convert("RGB")
            image = image.resize((RESOLUTION, RESOLUTION), Image.BICUBIC)
            pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
            latents.append(vae.encode(pixels).latent_dist.sample()[0] * vae.config.scaling_factor)
            captions.append(", ".join(t for t in (entry.get("caption"), entry.get("tags")) if t))  # as our metadata subsets
    return unet, (te1, te2, tok1, tok2), scheduler, torch.stack(latents), captions


def bare(setup, steps: int) -> list[float]:
    """Per-step wall times of the same step written with diffusers/transformers alone."""
    import torch
    import torch.nn.functional as F
    from diffusers.optimization import get_constant_schedule_with_warmup
    from transformers.optimization import Adafactor

    unet, (te1, te2, tok1, tok2), noise_scheduler, latents, captions = setup
    torch.manual_seed(1)
    unet.train()
    optimizer = Adafactor(unet.parameters(), lr=LR, **ADAFACTOR_ARGS)
    lr_scheduler = get_constant_schedule_with_warmup(optimizer, num_warmup_steps=2)
    time_ids = torch.tensor([[RESOLUTION, RESOLUTION, 0, 0, RESOLUTION, RESOLUTION]] * BATCH, dtype=torch.float32)
    stamps = []
    order: list[int] = []
    for _ in range(steps):
        if len(order) < BATCH:
            order = torch.randperm(len(captions)).tolist()
        picked, order = order[:BATCH], order[BATCH:]
        x0 = latents[picked]
        texts = [captions[i] for i in picked]
        with torch.no_grad():
            ids1 = tok1(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            ids2 = tok2(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            out1 = te1(ids1, output_hidden_states=True)
            out2 = te2(ids2, output_hidden_states=True)
            context = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
            pooled = out2.text_embeds
        noise = torch.randn_like(x0)
        timesteps = torch.randint(0, 1000, (BATCH,))
        noisy = noise_scheduler.add_noise(x0, noise, timesteps)
        pred = unet(noisy, timesteps, encoder_hidden_states=context,
                    added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample  # fmt: skip
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        stamps.append(time.perf_counter())
    return [b - a for a, b in zip(stamps, stamps[1:])]


def step_time(steps: int) -> None:
    import logging

    from library.demo_data import make_demo_dataset
    from library.tiny_sdxl import make_tiny_sdxl

    logging.disable(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tiny = tmp / "tiny"
        make_tiny_sdxl(tiny, seed=0)
        meta = make_demo_dataset(tmp / "data", count=16, seed=0)
        toml = tmp / "dataset.toml"
        toml.write_text(DATASET_TOML.format(resolution=RESOLUTION, batch=BATCH, images=(tmp / "data" / "images").as_posix(),
                                            meta=meta.as_posix()), encoding="utf-8")  # fmt: skip
        setup = bare_setup(tiny, meta)
        ours_times, bare_times = [], []
        for round_ in range(ROUNDS):
            ours_times += ours(tiny, toml, tmp / f"out{round_}", steps)[WARMUP:]
            bare_times += bare(setup, steps)[WARMUP:]
    a, b = statistics.median(ours_times), statistics.median(bare_times)
    print(f"step time, tiny SDXL, batch {BATCH} at {RESOLUTION}x{RESOLUTION}, float32, "
          f"{len(ours_times)} timed steps each:")  # fmt: skip
    print(f"  ours (sdxl_train.py loop)   median {a * 1000:7.1f} ms   mean {statistics.mean(ours_times) * 1000:7.1f} ms")
    print(f"  bare diffusers loop         median {b * 1000:7.1f} ms   mean {statistics.mean(bare_times) * 1000:7.1f} ms")
    print(f"  ratio ours / bare: {a / b:.3f} (median), {statistics.mean(ours_times) / statistics.mean(bare_times):.3f} "
          f"(mean)  goal <= 1.05")  # fmt: skip


# ------------------------------------------------------------------------- full-size peak memory


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def full_size_child(latent: int, batch: int, glibc_default: bool = False, unfused: bool = False) -> None:
    """Runs in its own process: one (fused, unless ``unfused``) Adafactor step of the bf16 full-size UNet."""
    import logging

    import torch
    import torch.nn.functional as F

    from library.memory_estimate import training_step_parts
    from library.optimizers import attach_fused_backward, build_optimizer
    from library.sdxl_configs import SDXL_UNET_CONFIG
    from library.sdxl_model_util import _build_empty
    from library.train_setup import limit_cpu_heap_growth

    logging.disable(logging.WARNING)
    heap_limited = False if glibc_default else limit_cpu_heap_growth()  # as sdxl_train.py does on the CPU
    meta = _build_empty("unet", SDXL_UNET_CONFIG).to(torch.bfloat16)
    import transformers.optimization  # noqa: F401  (every import done before the baseline)

    baseline = _status("VmRSS")
    estimate = training_step_parts(meta, list(meta.parameters()), "AdaFactor", ADAFACTOR_ARGS, fused_backward=not unfused,
                                   gradient_checkpointing=True, batch=batch, latent_hw=(latent, latent),
                                   context_len=77, compute_dtype=torch.bfloat16)  # fmt: skip
    del meta

    start = time.time()
    unet = _build_empty("unet", SDXL_UNET_CONFIG).to(torch.bfloat16)
    unet.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.dim() == 1:  # norm scales
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02, generator=generator)
    params = list(unet.parameters())
    weights = sum(p.numel() * p.element_size() for p in params)
    built = time.time() - start
    after_weights = _status("VmRSS")

    unet.enable_gradient_checkpointing()
    unet.train()
    optimizer = build_optimizer("AdaFactor", [{"params": params}], LR, dict(ADAFACTOR_ARGS))
    hooks = None if unfused else attach_fused_backward(optimizer, max_grad_norm=1.0)
    before = [p.detach()[:1].clone() for p in params[:3]]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, latent, latent, generator=g).to(torch.bfloat16)
    context = torch.randn(batch, 77, 2048, generator=g).to(torch.bfloat16)
    cond = {"text_embeds": torch.randn(batch, 1280, generator=g).to(torch.bfloat16),
            "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * batch).to(torch.bfloat16)}  # fmt: skip
    noise = torch.randn(x.shape, generator=g)
    start = time.time()
    pred = unet(x, torch.tensor([500] * batch), encoder_hidden_states=context, added_cond_kwargs=cond).sample
    loss = F.mse_loss(pred.float(), noise)
    if hooks is None:  # the plain step: every gradient exists at once
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    else:
        hooks.backward(loss)
    step = time.time() - start
    peak = _status("VmHWM")
    changed = sum(not torch.equal(b, p.detach()[:1]) for b, p in zip(before, params[:3]))
    assert all(p.grad is None for p in params), "gradients left behind"
    assert changed > 0, "the step did not change the weights"

    est_total = weights + sum(estimate.parts.values())
    growth = peak - baseline
    print(f"full-size SDXL UNet: {sum(p.numel() for p in params) / 1e9:.3f} B parameters, bf16, gradient checkpointing, "
          f"{'plain (unfused)' if unfused else 'fused-backward'} Adafactor, batch {batch}, latent {latent}x{latent} ({latent * 8} px)")  # fmt: skip
    print(f"  built and initialised in {built:.0f} s; one forward+backward+step in {step:.0f} s; loss {loss.item():.4f}")
    print(f"  glibc mmap threshold fixed at 4 MiB (sdxl_train.py's CPU setting): {heap_limited}")
    print(f"  bf16 weight bytes            {weights / GiB:7.2f} GiB")
    print(f"  RSS after imports (baseline) {baseline / GiB:7.2f} GiB")
    print(f"  RSS with weights             {after_weights / GiB:7.2f} GiB")
    print(f"  peak RSS (VmHWM)             {peak / GiB:7.2f} GiB")
    print(f"  peak RSS / weight bytes: {peak / weights:.3f}  (goal <= 1.3; without the baseline {growth / weights:.3f})")
    parts = ", ".join(f"{k} {v / GiB:.3f}" for k, v in estimate.parts.items())
    print(f"  --estimate_memory for this step: weights {weights / GiB:.3f}, {parts} -> {est_total / GiB:.2f} GiB")
    print(f"  estimate vs measured growth over the baseline ({growth / GiB:.2f} GiB): "
          f"{(est_total - growth) / growth * 100:+.1f}%  (goal within 20%)")  # fmt: skip


def full_size(latent: int, batch: int, glibc_default: bool, unfused: bool = False) -> None:
    child = [sys.executable, __file__, "--full_size_child", "--latent", str(latent), "--batch", str(batch)]
    child += ["--glibc_default"] if glibc_default else []
    child += ["--unfused"] if unfused else []
    result = subprocess.run(child, cwd=REPO)
    if result.returncode:
        raise SystemExit(f"full-size child failed with exit status {result.returncode}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="steps per run (each side runs three times)")
    parser.add_argument("--latent", type=int, default=32, help="full-size step: latent side (32 = 256 px)")
    parser.add_argument("--batch", type=int, default=1, help="full-size step: batch size")
    parser.add_argument("--glibc_default", action="store_true",
                        help="full-size step: keep glibc's growing mmap threshold (see limit_cpu_heap_growth)")
    parser.add_argument("--compare_unfused", action="store_true",
                        help="full-size step: also run the plain (unfused) step, to see the gradient copy it saves")
    parser.add_argument("--unfused", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--skip_step_time", action="store_true")
    parser.add_argument("--skip_full_size", action="store_true")
    parser.add_argument("--full_size_child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.full_size_child:
        full_size_child(args.latent, args.batch, args.glibc_default, args.unfused)
        return
    if not args.skip_step_time:
        step_time(args.steps)
    if not args.skip_full_size:
        full_size(args.latent, args.batch, args.glibc_default)
        if args.compare_unfused:
            full_size(args.latent, args.batch, args.glibc_default, unfused=True)


if __name__ == "__main__":
    main()
