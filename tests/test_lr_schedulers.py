"""library/lr_schedulers.py: each schedule against hand-computed learning rates, and resume."""

from __future__ import annotations

import math

import pytest
import torch

from library.errors import ConfigError
from library.lr_schedulers import build_scheduler, warmup_to_steps
from library.optimizers import build_optimizer

BASE = 0.1


def _optimizer(lr: float = BASE):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=lr)


def _lr_after(scheduler, steps: int) -> float:
    for _ in range(steps):
        scheduler.optimizer.step()
        scheduler.step()
    return scheduler.get_last_lr()[0]


CASES = [
    # name, build kwargs, {step: expected lr}
    ("constant", {}, {0: BASE, 50: BASE}),
    ("constant_with_warmup", {"warmup_steps": 10}, {0: 0.0, 5: BASE * 0.5, 10: BASE, 80: BASE}),
    ("linear", {"warmup_steps": 10}, {5: BASE * 0.5, 10: BASE, 55: BASE * 0.5, 100: 0.0}),
    ("cosine", {"warmup_steps": 10, "num_training_steps": 110}, {10: BASE, 60: BASE * 0.5, 110: 0.0}),
    ("cosine_with_restarts", {"num_cycles": 2}, {25: BASE * 0.5, 49: BASE * 0.5 * (1 + math.cos(math.pi * 0.98)),
                                                 50: BASE, 75: BASE * 0.5}),
    ("polynomial", {"power": 2.0}, {0: BASE, 50: (BASE - 1e-7) * 0.25 + 1e-7, 100: 1e-7}),
]  # fmt: skip


@pytest.mark.parametrize("name, kwargs, expected", CASES, ids=[c[0] for c in CASES])
def test_named_schedules_give_hand_computed_rates(name, kwargs, expected):
    options = {"num_training_steps": 100, **kwargs}
    scheduler = build_scheduler(name, _optimizer(), **options)
    done = 0
    for step, lr in sorted(expected.items()):
        got = _lr_after(scheduler, step - done)
        done = step
        assert got == pytest.approx(lr, abs=1e-9), f"{name} at step {step}"
        assert scheduler.optimizer.param_groups[0]["lr"] == pytest.approx(lr, abs=1e-9)


@pytest.mark.parametrize("name", ["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                                  "polynomial", "steplr"])  # fmt: skip
def test_state_round_trips_for_resume(name):
    def make():
        if name == "steplr":
            return build_scheduler("constant", _optimizer(), 100, scheduler_type="StepLR",
                                   scheduler_args=["step_size=3", "gamma=0.5"])  # fmt: skip
        return build_scheduler(name, _optimizer(), 100, warmup_steps=0 if name == "constant" else 10, num_cycles=3)

    straight, resumed = make(), make()
    _lr_after(straight, 17)
    resumed.optimizer.load_state_dict(straight.optimizer.state_dict())  # a resume restores both (chainable StepLR)
    resumed.load_state_dict(straight.state_dict())
    assert resumed.get_last_lr() == straight.get_last_lr()
    for _ in range(5):
        assert _lr_after(resumed, 1) == _lr_after(straight, 1)
    assert resumed.last_epoch == straight.last_epoch == 22


def test_torch_scheduler_types_and_args():
    step = build_scheduler("constant", _optimizer(), 100, scheduler_type="steplr", scheduler_args=["step_size=2", "gamma=0.5"])
    assert type(step).__name__ == "StepLR" and _lr_after(step, 4) == pytest.approx(BASE * 0.25)
    dotted = build_scheduler(None, _optimizer(), 100, scheduler_type="torch.optim.lr_scheduler.ExponentialLR",
                             scheduler_args={"gamma": 0.5})  # fmt: skip
    assert _lr_after(dotted, 3) == pytest.approx(BASE / 8)
    with pytest.raises(ConfigError, match="did you mean 'StepLR'"):
        build_scheduler("constant", _optimizer(), 100, scheduler_type="StepLRR")
    with pytest.raises(ConfigError, match="takes no warm-up"):
        build_scheduler("constant", _optimizer(), 100, warmup_steps=5, scheduler_type="StepLR", scheduler_args=["step_size=1"])
    with pytest.raises(ConfigError, match="lr_scheduler_args"):
        build_scheduler("constant", _optimizer(), 100, scheduler_type="StepLR", scheduler_args=["step_sise=1"])


def test_warmup_ratio_and_errors():
    assert warmup_to_steps(0.1, 250) == 25 and warmup_to_steps(30, 250) == 30 and warmup_to_steps(None, 10) == 0
    scheduler = build_scheduler("constant_with_warmup", _optimizer(), 200, warmup_steps=0.05)  # 10 steps
    assert _lr_after(scheduler, 5) == pytest.approx(BASE * 0.5)
    with pytest.raises(ConfigError, match="constant_with_warmup"):
        build_scheduler("constant", _optimizer(), 100, warmup_steps=10)
    with pytest.raises(ConfigError, match="did you mean 'cosine'"):
        build_scheduler("cosin", _optimizer(), 100)
    with pytest.raises(ConfigError, match="only with --optimizer_type AdaFactor"):
        build_scheduler("adafactor", _optimizer(), 100)


def test_adafactor_schedule_reports_adafactors_own_rate():
    weight = torch.nn.Parameter(torch.full((4, 4), 0.5))
    optimizer = build_optimizer("AdaFactor", [{"params": [weight], "lr": 1e-5}], 1e-5, {})  # relative_step by default
    scheduler = build_scheduler("constant_with_warmup", optimizer, 100, warmup_steps=0)  # forced to adafactor
    assert type(scheduler).__name__ == "AdafactorSchedule"
    assert scheduler.get_last_lr() == [1e-5]  # the initial lr before any step
    weight.grad = torch.ones_like(weight)
    optimizer.step()
    scheduler.step()
    # step 1, no warmup_init: min(1e-2, 1/sqrt(1)) = 1e-2, times RMS(weight before the step) = 0.5
    assert scheduler.get_last_lr()[0] == pytest.approx(1e-2 * 0.5)
    state = scheduler.state_dict()
    again = build_scheduler("adafactor", optimizer, 100)
    again.load_state_dict(state)
    assert again.last_epoch == scheduler.last_epoch == 1
