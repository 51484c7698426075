"""Learning-rate schedules by kohya's ``--lr_scheduler`` names, or any torch scheduler.

``build_scheduler("cosine", optimizer, num_training_steps=1000, warmup_steps=0.05)`` returns a
``torch.optim.lr_scheduler.LRScheduler`` to step once per optimizer step; its ``state_dict()``
round-trips for resume. Names:

- ``constant``, ``linear``, ``cosine`` (half a cosine to 0), ``cosine_with_restarts``
  (``--lr_scheduler_num_cycles`` hard restarts), ``polynomial`` (``--lr_scheduler_power``, down to
  1e-7), ``constant_with_warmup``: diffusers' schedule functions, all with linear warm-up from 0
  over ``warmup_steps`` (an int, or a ratio < 1 of the training steps as kohya's float form).
- ``adafactor``: transformers' AdafactorSchedule, which reports the lr Adafactor computes itself.
  An Adafactor with ``relative_step=True`` always gets it (kohya's rule), with a warning.
- ``--lr_scheduler_type``: a ``torch.optim.lr_scheduler`` class name (any case) or a dotted path
  ``module.Class``, built as ``Class(optimizer, **lr_scheduler_args)``.

``constant`` and ``--lr_scheduler_type`` take no warm-up (kohya's rule): asking for one is an error.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import logging
from typing import Any, Iterable, Mapping

from library.errors import ConfigError
from library.optimizers import is_relative_step_adafactor, parse_key_values

log = logging.getLogger(__name__)

SCHEDULERS = ("constant", "linear", "cosine", "cosine_with_restarts", "polynomial", "constant_with_warmup", "adafactor")


def warmup_to_steps(warmup: int | float | None, num_training_steps: int) -> int:
    """``--lr_warmup_steps`` as steps: an int is steps; a float below 1 is a ratio of the run
    (``0.05`` of 1000 steps -> 50, rounded down as kohya)."""
    if warmup is None:
        return 0
    if isinstance(warmup, bool) or warmup < 0:
        raise ConfigError(f"--lr_warmup_steps must be >= 0 (got {warmup})")
    if isinstance(warmup, float) and warmup < 1:
        return int(warmup * num_training_steps)
    if isinstance(warmup, float) and not warmup.is_integer():
        raise ConfigError(f"--lr_warmup_steps {warmup}: use whole steps, or a ratio below 1 (e.g. 0.05)")
    return int(warmup)


def _scheduler_kwargs(scheduler_args: Iterable[str] | Mapping[str, Any] | None) -> dict[str, Any]:
    if isinstance(scheduler_args, Mapping):
        return dict(scheduler_args)
    return parse_key_values(scheduler_args, "--lr_scheduler_args")


def build_scheduler(
    name: str | None,
    optimizer,
    num_training_steps: int,
    warmup_steps: int | float | None = 0,
    num_cycles: int | None = 1,
    power: float | None = 1.0,
    scheduler_type: str | None = None,
    scheduler_args: Iterable[str] | Mapping[str, Any] | None = None,
):
    """The schedule for ``optimizer`` over ``num_training_steps`` optimizer steps (pass the count
    of ``scheduler.step()`` calls: an accelerate-prepared scheduler on N processes steps N times
    per optimizer step)."""
    kwargs = _scheduler_kwargs(scheduler_args)
    warmup = warmup_to_steps(warmup_steps, num_training_steps)
    name = (name or "constant").strip().lower()
    if is_relative_step_adafactor(optimizer) and not scheduler_type:
        if name != "adafactor":
            log.warning("Adafactor with relative_step=True sets its own lr: using the 'adafactor' schedule, not '%s'", name)
        name = "adafactor"
    if scheduler_type:
        _no_warmup(warmup, f"--lr_scheduler_type {scheduler_type}")
        return _construct(_custom_class(scheduler_type), scheduler_type, optimizer, kwargs)
    if name == "adafactor":
        _no_warmup(warmup, "--lr_scheduler adafactor")
        return _adafactor_schedule(optimizer)
    if name not in SCHEDULERS:
        close = difflib.get_close_matches(name, SCHEDULERS, n=1)
        hint = f"did you mean '{close[0]}'?" if close else "choose one of " + ", ".join(SCHEDULERS)
        raise ConfigError(f"unknown --lr_scheduler '{name}'", hint=hint)
    return _diffusers_schedule(name, optimizer, num_training_steps, warmup, num_cycles, power, kwargs)


def _no_warmup(warmup: int, what: str) -> None:
    if warmup:
        raise ConfigError(
            f"{what} takes no warm-up, but --lr_warmup_steps gives {warmup} steps",
            hint="set --lr_warmup_steps 0, or use --lr_scheduler constant_with_warmup",
        )


def _diffusers_schedule(name, optimizer, num_training_steps, warmup, num_cycles, power, kwargs):
    from diffusers import optimization as opt

    if name == "constant":
        _no_warmup(warmup, "--lr_scheduler constant")
        return _construct(opt.get_constant_schedule, name, optimizer, kwargs)
    if name == "constant_with_warmup":
        return _construct(opt.get_constant_schedule_with_warmup, name, optimizer, {"num_warmup_steps": warmup, **kwargs})
    if num_training_steps is None or num_training_steps < 1:
        raise ConfigError(f"--lr_scheduler {name} needs the number of training steps (got {num_training_steps})")
    common = {"num_warmup_steps": warmup, "num_training_steps": num_training_steps}
    if name == "linear":
        return _construct(opt.get_linear_schedule_with_warmup, name, optimizer, {**common, **kwargs})
    if name == "cosine":
        return _construct(opt.get_cosine_schedule_with_warmup, name, optimizer, {**common, **kwargs})
    if name == "cosine_with_restarts":
        func = opt.get_cosine_with_hard_restarts_schedule_with_warmup
        return _construct(func, name, optimizer, {**common, "num_cycles": int(num_cycles or 1), **kwargs})
    func = opt.get_polynomial_decay_schedule_with_warmup
    return _construct(func, name, optimizer, {**common, "power": float(1.0 if power is None else power), **kwargs})


def _adafactor_schedule(optimizer):
    if type(optimizer).__name__ != "Adafactor":
        raise ConfigError(
            "--lr_scheduler adafactor works only with --optimizer_type AdaFactor",
            hint=f"the optimizer is {type(optimizer).__name__}; choose another --lr_scheduler",
        )
    from transformers.optimization import AdafactorSchedule

    initial_lr = optimizer.param_groups[0].get("lr") or 0.0
    return AdafactorSchedule(optimizer, initial_lr)


def _custom_class(scheduler_type: str):
    """A ``torch.optim.lr_scheduler`` class (any case) or a dotted path ``module.Class``."""
    if "." in scheduler_type:
        module, _, attr = scheduler_type.rpartition(".")
        try:
            return getattr(importlib.import_module(module), attr)
        except ModuleNotFoundError as err:
            raise ConfigError(f"--lr_scheduler_type {scheduler_type}: module '{err.name}' is not installed") from None
        except AttributeError:
            raise ConfigError(f"--lr_scheduler_type {scheduler_type}: '{module}' has no '{attr}'") from None
    import torch

    classes = {
        n.lower(): n
        for n in dir(torch.optim.lr_scheduler)
        if inspect.isclass(getattr(torch.optim.lr_scheduler, n)) and n[0].isupper() and n.endswith("LR")
    }
    classes.update({"reducelronplateau": "ReduceLROnPlateau"})
    found = classes.get(scheduler_type.lower())
    if found is None:
        close = difflib.get_close_matches(scheduler_type.lower(), list(classes), n=1)
        hint = f"did you mean '{classes[close[0]]}'?" if close else "use a torch.optim.lr_scheduler class or module.Class"
        raise ConfigError(f"unknown --lr_scheduler_type '{scheduler_type}'", hint=hint)
    return getattr(torch.optim.lr_scheduler, found)


def _construct(factory, name: str, optimizer, kwargs: dict):
    try:
        return factory(optimizer, **kwargs)
    except TypeError as err:
        raise ConfigError(f"scheduler {name}: {err}", where="--lr_scheduler_args") from None
    except ValueError as err:
        raise ConfigError(f"scheduler {name}: {err}", where="--lr_scheduler_args") from None
