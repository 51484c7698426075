"""What ``sdxl_train.py`` does between steps: save models and states, prune old ones, sample images.

Only the main process writes model files and sample images; every process takes part in a state save
(accelerate writes one RNG file per process). Every write is atomic: a state is assembled in a
temporary folder and renamed into place, a model file is written aside and renamed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from library.checkpointing import (
    TRAIN_STATE_FILE,
    TrainState,
    model_name,
    prune_epoch_saves,
    prune_step_saves,
    save_model,
    state_name,
)
from library.fileio import atomic_write_text

log = logging.getLogger("sdxl_train")


def prefixed(cfg, logs: dict) -> dict:
    prefix = cfg.log_prefix or ""
    return {f"{prefix}{key}": value for key, value in logs.items()}


def _every(value: int | None, count: int) -> bool:
    return bool(value) and count > 0 and count % value == 0


def unwrapped(models, accelerator):
    """The same SDXLModels with the prepared (DDP-wrapped) modules unwrapped."""
    from dataclasses import replace

    return replace(
        models,
        unet=accelerator.unwrap_model(models.unet),
        text_encoder1=accelerator.unwrap_model(models.text_encoder1),
        text_encoder2=accelerator.unwrap_model(models.text_encoder2),
    )


@dataclass
class Run:
    """What the events need from the running recipe."""

    cfg: object
    accelerator: object
    models: object
    data: object  # library.train_setup.TrainData
    noise_rng: object
    state: TrainState
    seen: set = field(default_factory=set)  # image keys this process trained on (for the rank report)
    validation: object = None  # library.validation.ValidationSet, when images are held out
    ema: object = None  # library.ema.EMA of the UNet, with --ema
    scorer: object = None  # library.evaluation.scoring.Scorer for --sample_score_*, made at first use
    encode_text: object = None  # captions -> TextConditioning (what the loop uses)
    signal_received: int | None = None  # set by the SIGINT/SIGTERM handler
    interrupted: bool = False  # the loop stopped early on a signal

    @property
    def resolution(self) -> tuple[int, int]:
        return tuple(self.data.resolution)


def ema_weights(run: Run):
    """A context in which the UNet holds its EMA weights (a no-op without --ema)."""
    if run.ema is None:
        return contextlib.nullcontext()
    return run.ema.applied(run.accelerator.unwrap_model(run.models.unet))


def save_model_file(run: Run, step=None, epoch=None) -> Path | None:
    """The model file (the EMA weights with --ema; the raw ones too with --save_raw_with_ema)."""
    path = None
    if run.ema is not None and run.cfg.save_raw_with_ema:
        _save_model_file(run, run.cfg.output_name + "-raw", step, epoch)
    with ema_weights(run):
        path = _save_model_file(run, run.cfg.output_name, step, epoch)
    return path


def _save_model_file(run: Run, output_name: str, step=None, epoch=None) -> Path | None:
    cfg, accelerator = run.cfg, run.accelerator
    accelerator.wait_for_everyone()
    path = None
    if accelerator.is_main_process:
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / model_name(output_name, cfg.save_model_as, step=step, epoch=epoch)
        meta = {"ss_training_step": str(step or ""), "ss_training_epoch": str(epoch or ""),
                "ss_ema": str(run.ema is not None and output_name == cfg.output_name),
                "ss_learning_rate": str(cfg.learning_rate), "ss_optimizer": str(cfg.optimizer_type)}  # fmt: skip
        save_model(unwrapped(run.models, accelerator), path, cfg.save_model_as, cfg.save_precision or "float",
                   title=cfg.output_name, resolution=int(max(run.resolution)), metadata=meta,
                   prediction_type="v_prediction" if cfg.v_parameterization else "epsilon")  # fmt: skip
        log.info("saved %s", path)
    accelerator.wait_for_everyone()
    return path


def save_state(run: Run, batches_done: int, tag=None, step=None, epoch=None, state: TrainState | None = None) -> Path:
    """All processes save accelerate's state into one temporary folder; rank 0 renames it into place."""
    cfg, accelerator = run.cfg, run.accelerator
    state = state or run.state
    out = Path(cfg.output_dir)
    name = state_name(cfg.output_name, step=step, epoch=epoch) if tag is None else f"{cfg.output_name}-{tag}-state"
    final = out / name
    tmp = out / f".{name}.tmp-{state.global_step:08d}"
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        snapshot = TrainState(
            global_step=state.global_step,
            epoch=state.epoch,
            sampler_state=run.data.sampler.state_dict(batches_done=batches_done, epoch=state.epoch),
            noise_rng_state=run.noise_rng.get_state().tolist(),
        )
        if run.ema is not None:
            run.ema.save(tmp)
        atomic_write_text(tmp / TRAIN_STATE_FILE, json.dumps(asdict(snapshot)))
        old = None
        if final.exists():
            old = out / f".{name}.old-{state.global_step:08d}"
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        log.info("saved state %s", final)
    accelerator.wait_for_everyone()
    return final


def sample_images(run: Run, step: int, epoch: int | None) -> list[Path]:
    """Sample images with the current weights; the training RNG is left exactly as it was."""
    cfg, accelerator = run.cfg, run.accelerator
    paths: list[Path] = []
    if cfg.sample_prompts and accelerator.is_main_process:
        from library.sample_prompts import load_prompts
        from library.sampling import generate_samples

        prompts = load_prompts(cfg.sample_prompts)
        use_ema = contextlib.nullcontext() if cfg.no_sample_with_ema else ema_weights(run)
        with use_ema:
            paths = generate_samples(
            unwrapped(run.models, accelerator), prompts, Path(cfg.output_dir), step=step, epoch=epoch,
                output_name=cfg.output_name, default_size=run.resolution, sampler_name=cfg.sample_sampler,
                seed=cfg.seed, device=accelerator.device,
                prediction_type="v_prediction" if cfg.v_parameterization else None,
                zero_terminal_snr=cfg.zero_terminal_snr,
            )  # fmt: skip
        for path in paths:
            log.info("sample %s", path)
        log_sample_images(accelerator, paths, step)
        if cfg.sample_score_clip_model:
            score_samples(run, paths, [p.prompt for p in prompts], step)
    accelerator.wait_for_everyone()
    return paths


def score_samples(run: Run, paths: list[Path], prompts: list[str], step: int) -> dict[str, float]:
    """CLIP and aesthetic scores of this step's samples (the evaluation tool's scorer): appended to
    ``OUT/sample/scores.csv`` and logged as ``samples/clip_score`` / ``samples/aesthetic_score``."""
    import csv
    import io
    import math

    from PIL import Image

    from library.evaluation.scoring import Scorer

    cfg = run.cfg
    if run.scorer is None:
        run.scorer = Scorer(cfg.sample_score_clip_model, cfg.sample_score_aesthetic_model,
                            device=str(run.accelerator.device))  # fmt: skip
    images = []
    for path in paths:
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    clip, aesthetic = run.scorer.score(images, prompts[: len(images)])
    table = Path(cfg.output_dir) / "sample" / "scores.csv"
    old = table.read_text(encoding="utf-8") if table.is_file() else "step,file,prompt,clip_score,aesthetic_score\n"
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    for path, prompt, c, a in zip(paths, prompts, clip, aesthetic):
        writer.writerow([step, path.name, prompt, f"{c:.6f}", f"{a:.6f}"])
    atomic_write_text(table, old + buffer.getvalue())
    logs = {"samples/clip_score": sum(clip) / len(clip)}
    if not any(math.isnan(a) for a in aesthetic):
        logs["samples/aesthetic_score"] = sum(aesthetic) / len(aesthetic)
    run.accelerator.log(prefixed(cfg, logs), step=step)
    log.info("step %d sample scores: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in logs.items()))
    return logs


def log_sample_images(accelerator, paths: list[Path], step: int) -> None:
    """Send sample images to the trackers that take images (TensorBoard, W&B)."""
    if not paths or not getattr(accelerator, "trackers", None):
        return
    import numpy as np
    from PIL import Image

    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            writer = tracker.writer
            for index, path in enumerate(paths):
                with Image.open(path) as image:
                    writer.add_image(f"samples/{index:02d}", np.asarray(image.convert("RGB")), step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"samples": [wandb.Image(str(p)) for p in paths]}, step=step)


def validate(run: Run) -> dict[str, float]:
    """The deterministic validation loss, logged as ``loss/validation`` and per timestep."""
    from library.noise import NoiseSchedule
    from library.validation import validation_loss

    cfg, accelerator = run.cfg, run.accelerator
    timesteps = tuple(int(t) for t in str(cfg.validation_timesteps).split(",") if t.strip())
    logs = validation_loss(
        accelerator.unwrap_model(run.models.unet), run.encode_text, NoiseSchedule.from_config(cfg), run.validation,
        timesteps=timesteps, v_prediction=cfg.v_parameterization, seed=cfg.seed, device=accelerator.device,
    )  # fmt: skip
    accelerator.log(prefixed(cfg, logs), step=run.state.global_step)
    if accelerator.is_main_process:
        log.info("step %d: validation loss %.5f", run.state.global_step, logs["loss/validation"])
    return logs


def after_step(run: Run, batches_done: int) -> None:
    cfg, step = run.cfg, run.state.global_step
    if run.validation is not None and _every(cfg.validate_every_n_steps, step):
        validate(run)
    if _every(cfg.sample_every_n_steps, step):
        sample_images(run, step=step, epoch=run.state.epoch)
    if _every(cfg.save_every_n_steps, step):
        save_model_file(run, step=step)
        if cfg.save_state:
            save_state(run, batches_done, step=step)
        if run.accelerator.is_main_process:
            out = Path(cfg.output_dir)
            prune_step_saves(out, cfg.output_name, step, cfg.save_last_n_steps)
            prune_step_saves(out, cfg.output_name + "-raw", step, cfg.save_last_n_steps)
            prune_step_saves(out, cfg.output_name, step, cfg.save_last_n_steps_state or cfg.save_last_n_steps, state=True)


def after_epoch(run: Run) -> None:
    """At the end of ``run.state.epoch`` (the sampler has already moved on to the next one)."""
    cfg, epoch = run.cfg, run.state.epoch
    if _every(cfg.sample_every_n_epochs, epoch):
        sample_images(run, step=run.state.global_step, epoch=epoch)
    if _every(cfg.save_every_n_epochs, epoch):
        save_model_file(run, epoch=epoch)
        if cfg.save_state:
            # a resume from here starts the next epoch from its beginning
            nxt = TrainState(global_step=run.state.global_step, epoch=epoch + 1)
            save_state(run, 0, epoch=epoch, state=nxt)
        if run.accelerator.is_main_process:
            out = Path(cfg.output_dir)
            prune_epoch_saves(out, cfg.output_name, cfg.save_last_n_epochs)
            prune_epoch_saves(out, cfg.output_name + "-raw", cfg.save_last_n_epochs)
            prune_epoch_saves(out, cfg.output_name, cfg.save_last_n_epochs_state or cfg.save_last_n_epochs, state=True)


def write_rank_report(run: Run) -> None:
    """With ``SDXL_POSTER_RANK_REPORT=DIR`` set, each process writes ``DIR/rank<N>.json``: a fingerprint
    of its final UNet and the image keys it trained on. A debugging aid for multi-process runs (and
    what the 2-process test checks: identical weights, different images)."""
    import os

    folder = os.environ.get("SDXL_POSTER_RANK_REPORT")
    if not folder:
        return
    from library.fingerprint import module_fingerprint

    accelerator = run.accelerator
    report = {
        "rank": accelerator.process_index,
        "world_size": accelerator.num_processes,
        "unet": module_fingerprint(accelerator.unwrap_model(run.models.unet)),
        "images": sorted(run.seen),
        "global_step": run.state.global_step,
    }
    atomic_write_text(Path(folder) / f"rank{accelerator.process_index}.json", json.dumps(report))


def finish(run: Run, batches_done: int) -> Path | None:
    """The final model (``NAME.safetensors``) and, with --save_state[_on_train_end], ``NAME-state``."""
    cfg = run.cfg
    write_rank_report(run)
    if cfg.save_state or cfg.save_state_on_train_end:
        save_state(run, batches_done)
    path = save_model_file(run)
    run.accelerator.end_training()
    return path


@contextlib.contextmanager
def stop_on_signals(run: Run):
    """While training, Ctrl+C (SIGINT) and SIGTERM ask the loop to stop after the current step; the
    loop then saves a resumable state (unless --no_save_state_on_interrupt) and exits with 130.
    A second signal stops at once."""
    import signal

    def handler(signum, frame):
        if run.signal_received is not None:
            raise KeyboardInterrupt
        run.signal_received = signum
        log.warning("signal %d: stopping after this step%s", signum,
                    "" if run.cfg.no_save_state_on_interrupt else " and saving a resumable state")  # fmt: skip

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def loss_is_finite(run: Run, loss) -> bool:
    """False on every process as soon as the loss is NaN/inf on any of them."""
    import torch

    finite = torch.isfinite(loss.detach()).all().float().reshape(1)
    if run.accelerator.num_processes > 1:
        finite = run.accelerator.reduce(finite, reduction="sum") / run.accelerator.num_processes
    return bool(finite.item() == 1.0)


def batch_is_readable(run: Run, batch: dict) -> bool:
    """False on every process when any process's batch holds an image (or latent cache entry) that
    failed to load: it broke after start-up checked it."""
    import torch

    readable = torch.tensor([0.0 if "unreadable" in batch else 1.0])
    if run.accelerator.num_processes > 1:
        readable = run.accelerator.reduce(readable.to(run.accelerator.device), reduction="sum")
        readable = readable / run.accelerator.num_processes
    return bool(readable.item() == 1.0)


def stop_requested(run: Run) -> bool:
    """True on every process once any process got a signal (so all stop at the same step)."""
    wanted = run.signal_received is not None
    if run.accelerator.num_processes > 1:
        import torch

        flag = torch.tensor([1.0 if wanted else 0.0], device=run.accelerator.device)
        wanted = bool(run.accelerator.reduce(flag, reduction="sum").item() > 0)
    return wanted


def save_interrupted(run: Run, batches_done: int) -> Path | None:
    """Save ``NAME-stepNNNNNNNN-state`` at the step where the signal stopped the loop."""
    run.interrupted = True
    if run.cfg.no_save_state_on_interrupt:
        log.warning("interrupted at step %d; no state saved (--no_save_state_on_interrupt)", run.state.global_step)
        return None
    path = save_state(run, batches_done, step=run.state.global_step)
    log.warning("interrupted at step %d; resume with --resume %s", run.state.global_step, path)
    return path
