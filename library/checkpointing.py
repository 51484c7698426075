"""Saving models and training state with kohya's names, retention, and exact resume.

Names (``NAME`` is ``--output_name``, default ``last``):
  ``NAME-step00000100.safetensors`` every N steps, ``NAME-000002.safetensors`` every N epochs,
  ``NAME.safetensors`` at the end; state folders ``NAME-step00000100-state``, ``NAME-000002-state``,
  ``NAME-state``. With ``--save_model_as diffusers`` the model is a folder without the extension.

A state folder holds what ``accelerate`` saves (model, optimizer, scheduler, scaler, every RNG) plus
``train_state.json`` (global step, epoch, position inside the epoch, our noise generator). It is
written to a temporary folder and renamed into place, so a crash mid-save leaves the previous state
intact; a state folder without ``train_state.json`` is never accepted for resume.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from library.errors import ConfigError
from library.fileio import atomic_write_text

TRAIN_STATE_FILE = "train_state.json"
MODEL_EXTENSIONS = {"safetensors": ".safetensors", "ckpt": ".safetensors", "diffusers": "", "diffusers_safetensors": ""}


def model_name(output_name: str, save_model_as: str, step: int | None = None, epoch: int | None = None) -> str:
    """kohya's file name for a model saved at ``step``, at ``epoch``, or at the end (neither)."""
    if save_model_as not in MODEL_EXTENSIONS:
        raise ConfigError(f"unknown --save_model_as '{save_model_as}'", hint="use safetensors, diffusers or diffusers_safetensors")
    ext = MODEL_EXTENSIONS[save_model_as]
    if step is not None:
        return f"{output_name}-step{step:08d}{ext}"
    if epoch is not None:
        return f"{output_name}-{epoch:06d}{ext}"
    return f"{output_name}{ext}"


def state_name(output_name: str, step: int | None = None, epoch: int | None = None) -> str:
    if step is not None:
        return f"{output_name}-step{step:08d}-state"
    if epoch is not None:
        return f"{output_name}-{epoch:06d}-state"
    return f"{output_name}-state"


def _saved(output_dir: Path, output_name: str, kind: str, state: bool) -> list[tuple[int, Path]]:
    """Existing step (``kind="step"``) or epoch saves, as (number, path), oldest first."""
    esc = re.escape(output_name)
    number = r"step(\d{8})" if kind == "step" else r"(\d{6})"
    tail = r"-state" if state else r"(\.safetensors)?"
    pattern = re.compile(rf"{esc}-{number}{tail}$")
    found = []
    for path in output_dir.iterdir() if output_dir.is_dir() else []:
        if m := pattern.match(path.name):
            found.append((int(m.group(1)), path))
    return sorted(found)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def prune_step_saves(output_dir: Path, output_name: str, current_step: int, keep_last_n_steps: int | None, state: bool = False) -> list[Path]:
    """kohya's ``--save_last_n_steps``: keep the saves made within the last N steps, remove older."""
    if not keep_last_n_steps:
        return []
    removed = []
    for step, path in _saved(output_dir, output_name, "step", state):
        if step <= current_step - keep_last_n_steps:
            _remove(path)
            removed.append(path)
    return removed


def prune_epoch_saves(output_dir: Path, output_name: str, keep_last_n_epochs: int | None, state: bool = False) -> list[Path]:
    """``--save_last_n_epochs``: keep only the N most recent epoch saves."""
    if not keep_last_n_epochs:
        return []
    saves = _saved(output_dir, output_name, "epoch", state)
    doomed = saves[: max(len(saves) - keep_last_n_epochs, 0)]
    for _, path in doomed:
        _remove(path)
    return [p for _, p in doomed]


def save_model(models, path: Path, save_model_as: str, save_precision: str, title: str, resolution: int,
               prediction_type: str = "epsilon", metadata: dict | None = None) -> Path:
    """Write the model (UNet/TE weights as trained, the VAE as loaded or swapped) atomically."""
    from library.sdxl_model_util import save_sdxl_checkpoint
    from library.sdxl_train_util import save_diffusers

    if save_model_as in ("safetensors", "ckpt"):
        return save_sdxl_checkpoint(path, models, save_precision=save_precision, title=title,
                                    resolution=resolution, prediction_type=prediction_type, extra_metadata=metadata)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        save_diffusers(tmp, models, save_precision=save_precision, safe=True)
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move ``tmp`` to ``final``; an older ``final`` is moved aside first and removed after."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{tmp.name[-8:]}")
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        _remove(old)


@dataclass
class TrainState:
    """Where training is: enough, with accelerate's state, to continue exactly."""

    global_step: int = 0
    epoch: int = 0
    sampler_state: dict = field(default_factory=dict)
    noise_rng_state: list[int] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def save_training_state(accelerator, folder: Path, state: TrainState) -> Path:
    """``accelerator.save_state`` + ``train_state.json``, written aside and renamed into place."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        accelerator.save_state(str(tmp), safe_serialization=True)
        atomic_write_text(tmp / TRAIN_STATE_FILE, json.dumps(asdict(state)))
        _replace_dir(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def load_training_state(accelerator, folder: Path) -> TrainState:
    """Restore accelerate's state from ``folder`` and return our :class:`TrainState`."""
    folder = Path(folder)
    marker = folder / TRAIN_STATE_FILE
    if not folder.is_dir():
        raise ConfigError("resume state folder not found", where=str(folder))
    if not marker.is_file():
        raise ConfigError(
            f"not a complete training state (no {TRAIN_STATE_FILE})",
            where=str(folder),
            hint="pass a NAME-...-state folder written by --save_state",
        )
    accelerator.load_state(str(folder))
    data = json.loads(marker.read_text(encoding="utf-8"))
    return TrainState(**data)
