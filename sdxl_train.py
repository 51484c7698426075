#!/usr/bin/env python
"""Full fine-tuning of Stable Diffusion XL, kohya-style.

    accelerate launch sdxl_train.py --config_file train.toml
    accelerate launch sdxl_train.py --pretrained_model_name_or_path sdxl.safetensors \\
        --dataset_config dataset_configs/poster_metadata.toml --output_dir out --output_name poster \\
        --optimizer_type AdaFactor --optimizer_args scale_parameter=False relative_step=False \\
        warmup_init=False clip_threshold=1.0 --learning_rate 4e-7 --max_train_steps 2000 \\
        --mixed_precision bf16 --cache_latents --gradient_checkpointing --save_every_n_steps 500

The recipe, top to bottom: parse flags -> load the models -> build the data -> cache latents ->
optimizer and schedule -> (resume) -> the training loop -> save. Each part is a small component in
``library/`` with its own tests; this file only wires them. ``python sdxl_train.py --help`` lists
every flag (kohya's names).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from library.cli import run_main  # noqa: E402
from library.errors import DataError, UserError  # noqa: E402

log = logging.getLogger("sdxl_train")


class TrainingError(UserError):
    """The run cannot go on (e.g. the loss became NaN); the last good state was saved."""


def main(argv=None) -> int:
    from library.train_args import parse_args

    cfg = parse_args(argv)
    if cfg is None:  # --output_config wrote the effective config and stops there
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import torch
    from accelerate.utils import set_seed

    from library import train_events as events
    from library import train_setup as setup
    from library.checkpointing import TrainState
    from library.train_events import Run

    setup.check_sample_prompts(cfg)
    dataset_cfg = setup.dataset_config(cfg)
    if cfg.estimate_memory:
        from library.memory_estimate import estimate_memory

        print("estimated peak memory:\n" + "\n".join(estimate_memory(cfg, dataset_cfg).lines()))
        return 0
    accelerator = setup.make_accelerator(cfg)
    setup.check_fused_backward(cfg, accelerator)
    if accelerator.device.type == "cpu":  # freed optimizer temporaries go back to the system at once
        setup.limit_cpu_heap_growth()
    set_seed(cfg.seed)
    models = setup.load_models(cfg, accelerator)
    setup.prepare_models(cfg, models, accelerator)
    data = setup.build_data(cfg, dataset_cfg, accelerator, models)
    text = setup.make_text_encoder(cfg, models, data, accelerator)
    params = setup.trainable_parameters(cfg, models)
    optimizer = setup.make_optimizer(cfg, params)
    fused = None
    if cfg.fused_backward_pass:  # the optimizer steps inside backward: no separate step, no gradients kept
        from library.optimizers import attach_fused_backward

        fused = attach_fused_backward(optimizer, cfg.max_grad_norm, cfg.fused_backward_clip,
                                      groups=cfg.fused_optimizer_groups or None)
    max_steps = setup.total_steps(cfg, data, accelerator)
    scheduler = setup.make_scheduler(cfg, optimizer, max_steps, accelerator.num_processes)
    models.unet, optimizer, scheduler = accelerator.prepare(models.unet, optimizer, scheduler)
    if cfg.train_text_encoder:
        models.text_encoder1, models.text_encoder2 = accelerator.prepare(models.text_encoder1, models.text_encoder2)

    run = Run(cfg, accelerator, models, data, noise_rng=torch.Generator().manual_seed(cfg.seed), state=TrainState())
    run.encode_text = text
    run.validation = setup.build_validation(cfg, data, models, accelerator)
    if cfg.ema:
        from library.ema import EMA

        run.ema = EMA(accelerator.unwrap_model(models.unet), cfg.ema_decay, cfg.ema_update_every, cfg.ema_device)
    if cfg.resume:
        run.state = setup.resume(cfg, accelerator, data.sampler, run.noise_rng)
        if run.ema is not None:
            run.ema.load(cfg.resume)
    setup.print_summary(cfg, accelerator, models, data, optimizer, max_steps, run.state)
    with events.stop_on_signals(run):
        train(run, text, optimizer, scheduler, params, max_steps, fused)
    return 130 if run.interrupted else 0


def train(run, text, optimizer, scheduler, params, max_steps: int, fused=None) -> None:
    """The training loop. Everything a step touches is visible here."""
    import torch
    from tqdm import tqdm

    from library import noise as N
    from library import train_events as events
    from library.train_setup import batch_latents

    cfg, accelerator, data, state, noise_rng = run.cfg, run.accelerator, run.data, run.state, run.noise_rng
    unet = run.models.unet
    schedule = N.NoiseSchedule.from_config(cfg)
    bar = tqdm(total=max_steps, initial=state.global_step, desc="steps", disable=not accelerator.is_main_process)
    if cfg.sample_at_first and state.global_step == 0:
        events.sample_images(run, step=0, epoch=0)
    batches_done = 0
    while state.global_step < max_steps:
        data.sampler.set_epoch(max(state.epoch, 1))
        state.epoch = data.sampler.epoch
        batches_done = data.sampler.position
        for batch in data.loader:
            batches_done += 1
            if not events.batch_is_readable(run, batch):  # checked on every process, so all stop together
                events.save_state(run, batches_done - 1, tag="unreadable")
                bad = "; ".join(f"{path} ({why})" for path, why in batch.get("unreadable", []))
                raise DataError(
                    f"an image (or its cached latents) cannot be read any more at step {state.global_step + 1} "
                    "(on some process): "
                    f"{bad or 'see the other process'}; the last good state was saved",
                    hint="re-save or remove it and --resume from the -unreadable-state folder; tools/filter_images.py "
                    "lists every unreadable image, and --cache_latents checks them all before training",
                )  # fmt: skip
            run.seen.update(batch["image_keys"])
            with accelerator.accumulate(unet):
                # 1. latents (cached, or encoded now by the frozen VAE) and text conditioning
                latents = batch_latents(batch, run.models, accelerator)
                cond = text(batch["captions"])
                time_ids = batch["size_cond"].to(accelerator.device, dtype=cond.context.dtype)
                # 2. noise and timesteps from our own generator (saved in the state: exact resume)
                noise = N.make_noise(latents, noise_rng, schedule.options)
                timesteps = N.sample_timesteps(latents.shape[0], schedule.options, noise_rng).to(latents.device)
                noisy = N.add_noise(schedule, latents, N.perturb_noise(noise, schedule.options, noise_rng), timesteps)
                # 3. predict and compare
                with accelerator.autocast():
                    pred = unet(noisy, timesteps, encoder_hidden_states=cond.context,
                                added_cond_kwargs={"text_embeds": cond.pooled, "time_ids": time_ids}).sample
                target = N.v_target(schedule, latents, noise, timesteps) if cfg.v_parameterization else noise
                mask = batch.get("alpha_mask")  # alpha_mask subsets: transparent areas are not learned
                loss = N.compute_loss(pred.float(), target.float(), timesteps, schedule,
                                      None if mask is None else mask.to(accelerator.device))  # fmt: skip
                if not events.loss_is_finite(run, loss):  # checked on every process, so all stop together
                    events.save_state(run, batches_done - 1, tag="nan")
                    raise TrainingError(
                        f"loss became {loss.item()} at step {state.global_step + 1} (on some process); "
                        "the last good state was saved",
                        hint="lower the learning rate, use --no_half_vae or --vae with the fp16-fix VAE, or bf16",
                    )
                # 4. backward and step (with --fused_backward_pass the step happened inside backward)
                if fused is not None:
                    fused.backward(loss, accelerator.backward)  # steps each parameter as its gradient is ready
                else:
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and cfg.max_grad_norm:
                        accelerator.clip_grad_norm_([p for g in params for p in g["params"]], cfg.max_grad_norm)
                    optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            state.global_step += 1
            if run.ema is not None:
                run.ema.update(accelerator.unwrap_model(unet), state.global_step)
            bar.update(1)
            logs = {"loss": loss.detach().item(), "lr": scheduler.get_last_lr()[0]}
            bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}")
            accelerator.log(events.prefixed(cfg, logs), step=state.global_step)
            events.after_step(run, batches_done)
            if events.stop_requested(run):
                events.save_interrupted(run, batches_done)
                break
            if state.global_step >= max_steps:
                break
        else:  # the epoch ran out: epoch-end samples and saves, then the next epoch
            events.after_epoch(run)
            state.epoch += 1
            batches_done = 0
            continue
        break
    bar.close()
    if not run.interrupted:
        events.finish(run, batches_done)


if __name__ == "__main__":
    sys.exit(run_main(main))
