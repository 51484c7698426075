"""Checkpoint names, retention and atomic state save/load."""

from __future__ import annotations

import pytest
import torch

from library.checkpointing import (
    TrainState,
    load_training_state,
    model_name,
    prune_epoch_saves,
    prune_step_saves,
    save_training_state,
    state_name,
)
from library.errors import ConfigError


def test_kohya_names():
    assert model_name("poster", "safetensors", step=100) == "poster-step00000100.safetensors"
    assert model_name("poster", "safetensors", epoch=2) == "poster-000002.safetensors"
    assert model_name("poster", "safetensors") == "poster.safetensors"
    assert model_name("poster", "diffusers", step=5) == "poster-step00000005"
    assert state_name("poster", step=100) == "poster-step00000100-state"
    assert state_name("poster", epoch=3) == "poster-000003-state"
    assert state_name("poster") == "poster-state"
    with pytest.raises(ConfigError, match="save_model_as"):
        model_name("x", "pickle")


def _touch_steps(folder, name, steps):
    for step in steps:
        (folder / model_name(name, "safetensors", step=step)).write_bytes(b"x")


def test_step_retention_keeps_saves_within_the_last_n_steps(tmp_path):
    _touch_steps(tmp_path, "m", [10, 20, 30, 40, 50])
    (tmp_path / "m.safetensors").write_bytes(b"final")
    (tmp_path / "other-step00000010.safetensors").write_bytes(b"x")
    removed = prune_step_saves(tmp_path, "m", current_step=50, keep_last_n_steps=20)
    assert sorted(p.name for p in removed) == ["m-step00000010.safetensors", "m-step00000020.safetensors",
                                               "m-step00000030.safetensors"]
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["m-step00000040.safetensors", "m-step00000050.safetensors", "m.safetensors",
                    "other-step00000010.safetensors"]


def test_epoch_retention_keeps_exactly_the_last_n(tmp_path):
    for epoch in range(1, 6):
        (tmp_path / model_name("m", "safetensors", epoch=epoch)).write_bytes(b"x")
        (tmp_path / state_name("m", epoch=epoch)).mkdir()
    prune_epoch_saves(tmp_path, "m", keep_last_n_epochs=2)
    prune_epoch_saves(tmp_path, "m", keep_last_n_epochs=1, state=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "m-000004.safetensors", "m-000005-state", "m-000005.safetensors"]


def _accelerator_with_model():
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, model, optimizer


def test_state_round_trip_restores_weights_optimizer_and_rng(tmp_path):
    accelerator, model, optimizer = _accelerator_with_model()
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    state = TrainState(global_step=7, epoch=1, sampler_state={"position": 3}, noise_rng_state=[1, 2, 3])
    folder = save_training_state(accelerator, tmp_path / "m-step00000007-state", state)
    expected_weight = model.weight.detach().clone()
    expected_random = torch.rand(3)
    with torch.no_grad():
        model.weight.zero_()
    torch.rand(5)
    loaded = load_training_state(accelerator, folder)
    assert loaded == state
    assert torch.equal(model.weight.detach(), expected_weight)
    assert torch.equal(torch.rand(3), expected_random)
    assert optimizer.state_dict()["state"][0]["step"].item() == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_incomplete_state_folder_is_refused(tmp_path):
    accelerator, _, _ = _accelerator_with_model()
    (tmp_path / "half-state").mkdir()
    with pytest.raises(ConfigError, match="not a complete training state"):
        load_training_state(accelerator, tmp_path / "half-state")
