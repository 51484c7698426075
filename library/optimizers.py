"""Optimizers by kohya's ``--optimizer_type`` names, with ``--optimizer_args`` parsed as kohya does.

``build_optimizer("AdaFactor", groups, 4e-7, {"relative_step": False, ...})`` returns a ready
``torch.optim.Optimizer``. Names are case-insensitive:

- ``AdamW`` (default), ``SGDNesterov`` (SGD, nesterov, momentum 0.9 unless given): torch.
- ``AdamW8bit``, ``PagedAdamW8bit``, ``PagedAdamW``, ``PagedAdamW32bit``, ``Lion8bit``,
  ``PagedLion8bit``, ``SGDNesterov8bit``: bitsandbytes (runs on CPU too; paged ones fall back).
- ``Lion``: lion_pytorch's Lion when installed (as kohya), else bitsandbytes' 32-bit Lion.
- ``AdaFactor``: transformers' Adafactor with kohya's rules (see :func:`adafactor_kwargs`).
- ``Prodigy``, ``DAdaptAdam`` and the other D-Adaptation names, ``CAME``: when their package is
  installed (else a ConfigError naming it).
- any ``torch.optim`` class name (``RAdam``, ``adagrad``, ...), or a dotted path ``module.Class``.

Heavy packages (bitsandbytes, transformers, optional optimizers) are imported only when used.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import inspect
import logging
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from library.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KnownOptimizer:
    name: str  # kohya's spelling
    module: str
    attr: str
    package: str | None = None  # pip package to suggest when the module is missing
    extra: tuple[tuple[str, Any], ...] = ()  # fixed keyword arguments (e.g. nesterov=True)


_BNB = "bitsandbytes"
KNOWN_OPTIMIZERS: dict[str, KnownOptimizer] = {
    k.name.lower(): k
    for k in (
        KnownOptimizer("AdamW", "torch.optim", "AdamW"),
        KnownOptimizer("SGDNesterov", "torch.optim", "SGD", extra=(("nesterov", True),)),
        KnownOptimizer("AdamW8bit", "bitsandbytes.optim", "AdamW8bit", _BNB),
        KnownOptimizer("PagedAdamW8bit", "bitsandbytes.optim", "PagedAdamW8bit", _BNB),
        KnownOptimizer("PagedAdamW", "bitsandbytes.optim", "PagedAdamW", _BNB),
        KnownOptimizer("PagedAdamW32bit", "bitsandbytes.optim", "PagedAdamW32bit", _BNB),
        KnownOptimizer("Lion8bit", "bitsandbytes.optim", "Lion8bit", _BNB),
        KnownOptimizer("PagedLion8bit", "bitsandbytes.optim", "PagedLion8bit", _BNB),
        KnownOptimizer("SGDNesterov8bit", "bitsandbytes.optim", "SGD8bit", _BNB, extra=(("nesterov", True),)),
        KnownOptimizer("Lion", "lion_pytorch", "Lion", "lion-pytorch"),
        KnownOptimizer("AdaFactor", "transformers.optimization", "Adafactor", "transformers"),
        KnownOptimizer("Prodigy", "prodigyopt", "Prodigy", "prodigyopt"),
        KnownOptimizer("DAdaptation", "dadaptation.experimental", "DAdaptAdamPreprint", "dadaptation"),
        KnownOptimizer("DAdaptAdamPreprint", "dadaptation.experimental", "DAdaptAdamPreprint", "dadaptation"),
        KnownOptimizer("DAdaptAdam", "dadaptation", "DAdaptAdam", "dadaptation"),
        KnownOptimizer("DAdaptAdaGrad", "dadaptation", "DAdaptAdaGrad", "dadaptation"),
        KnownOptimizer("DAdaptAdan", "dadaptation", "DAdaptAdan", "dadaptation"),
        KnownOptimizer("DAdaptAdanIP", "dadaptation.experimental", "DAdaptAdanIP", "dadaptation"),
        KnownOptimizer("DAdaptLion", "dadaptation", "DAdaptLion", "dadaptation"),
        KnownOptimizer("DAdaptSGD", "dadaptation", "DAdaptSGD", "dadaptation"),
        KnownOptimizer("CAME", "came_pytorch", "CAME", "came-pytorch"),
    )
}
ADAPTIVE_LR = ("prodigy", "dadaptation", "dadaptadampreprint", "dadaptadam", "dadaptadagrad", "dadaptadan",
               "dadaptadanip", "dadaptlion", "dadaptsgd")  # fmt: skip
_SEVERAL_PAIRS = re.compile(r"\s[A-Za-z_]\w*\s*=")


# --------------------------------------------------------------------------------- key=value args


def literal_value(raw: str, key: str, flag: str = "--optimizer_args") -> Any:
    """A value as kohya reads it: a Python literal (``ast.literal_eval``, never ``eval``):
    ``False`` -> bool, ``1e-2`` -> float, ``0.9,0.999`` -> tuple. Also ``true``/``false``/``none``
    in any case; anything else stays a plain string (``decouple=True``, ``mode=fast``)."""
    text = raw.strip()
    if not text:
        raise ConfigError(f"'{key}=' has no value", where=flag, hint=f"write e.g. {key}=0.01")
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        pass
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    if _SEVERAL_PAIRS.search(text):
        raise ConfigError(
            f"'{key}={text}' holds several key=value pairs in one word",
            where=flag,
            hint=f"give each pair as its own word: {flag} a=1 b=2 (in TOML a list: [\"a=1\", \"b=2\"])",
        )
    return text


def parse_key_values(items: Iterable[str] | None, flag: str = "--optimizer_args") -> dict[str, Any]:
    """``["weight_decay=0.01", "betas=0.9,0.999"]`` -> ``{"weight_decay": 0.01, "betas": (0.9, 0.999)}``."""
    out: dict[str, Any] = {}
    for item in items or ():
        if not isinstance(item, str):
            raise ConfigError(f"{item!r} is not a key=value string", where=flag)
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ConfigError(f"'{item}' is not key=value", where=flag, hint="write e.g. weight_decay=0.01 betas=0.9,0.999")
        out[key] = literal_value(raw, key, flag)
    return out


def parse_optimizer_args(items: Iterable[str] | None) -> dict[str, Any]:
    """kohya's ``--optimizer_args`` list as keyword arguments."""
    return parse_key_values(items, "--optimizer_args")


# ------------------------------------------------------------------------------------ optimizers


def build_optimizer(
    name: str | None,
    param_groups: Any,
    lr: float,
    args: Mapping[str, Any] | None = None,
    *,
    lr_scheduler: str | None = None,
    max_grad_norm: float | None = None,
):
    """The optimizer ``name`` over ``param_groups`` (a list of dicts with "params" and an optional
    "lr", or plain parameters). ``lr_scheduler``/``max_grad_norm`` only feed kohya's advice warnings
    for Adafactor. The groups passed in are not modified."""
    kwargs = dict(args or {})
    groups = _copy_groups(param_groups)
    key = (name or "AdamW").strip()
    known = KNOWN_OPTIMIZERS.get(key.lower())
    if known is None:
        cls = _resolve_other(key)
        return _construct(cls, key, groups, lr, kwargs)
    if known.name == "AdaFactor":
        return _build_adafactor(groups, lr, kwargs, lr_scheduler, max_grad_norm)
    if known.name == "SGDNesterov" and "momentum" not in kwargs:
        log.info("SGDNesterov: momentum=0.9 (Nesterov needs momentum; set momentum=... in --optimizer_args)")
        kwargs["momentum"] = 0.9
    if known.name == "SGDNesterov8bit" and "momentum" not in kwargs:
        kwargs["momentum"] = 0.9
    if key.lower() in ADAPTIVE_LR and lr <= 0.1:
        log.warning("%s adapts the step size itself: --learning_rate %g is very low, kohya suggests ~1.0", known.name, lr)
    kwargs.update(dict(known.extra))
    cls = _load_lion() if known.name == "Lion" else _import_class(known.module, known.attr, known.name, known.package)
    return _construct(cls, known.name, groups, lr, kwargs)


def _copy_groups(param_groups: Any) -> list:
    groups = list(param_groups)
    return [dict(g) if isinstance(g, Mapping) else g for g in groups]


def _load_lion():
    """kohya's Lion is lion_pytorch's; bitsandbytes' 32-bit Lion is the same algorithm."""
    if importlib.util.find_spec("lion_pytorch") is not None:
        return _import_class("lion_pytorch", "Lion", "Lion", "lion-pytorch")
    return _import_class("bitsandbytes.optim", "Lion", "Lion", _BNB)


def _import_class(module: str, attr: str, name: str, package: str | None):
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as err:
        pip = package or module.split(".")[0]
        raise ConfigError(
            f"--optimizer_type {name} needs the '{pip}' package, which is not installed ({err.name} missing)",
            hint=f"pip install {pip}, or choose another --optimizer_type",
        ) from None
    try:
        return getattr(mod, attr)
    except AttributeError:
        raise ConfigError(
            f"--optimizer_type {name}: module '{module}' has no '{attr}'", hint="check the name or the package version"
        ) from None


def torch_optimizer_names() -> dict[str, str]:
    """Lower-case name -> class name of every optimizer class in ``torch.optim``."""
    import torch

    names = {}
    for attr in dir(torch.optim):
        obj = getattr(torch.optim, attr)
        if inspect.isclass(obj) and issubclass(obj, torch.optim.Optimizer) and obj is not torch.optim.Optimizer:
            names[attr.lower()] = attr
    return names


def _resolve_other(name: str):
    """A ``torch.optim`` name (any case) or a dotted path ``package.module.Class``."""
    if "." in name:
        module, _, attr = name.rpartition(".")
        return _import_class(module, attr, name, None)
    torch_names = torch_optimizer_names()
    if name.lower() in torch_names:
        import torch

        return getattr(torch.optim, torch_names[name.lower()])
    choices = [k.name for k in KNOWN_OPTIMIZERS.values()] + sorted(torch_names.values())
    close = difflib.get_close_matches(name.lower(), [c.lower() for c in choices], n=1, cutoff=0.6)
    spelled = {c.lower(): c for c in reversed(choices)}  # kohya's spelling first (AdaFactor, not Adafactor)
    hint = f"did you mean '{spelled[close[0]]}'?" if close else "use a kohya name, a torch.optim class or module.Class"
    raise ConfigError(f"unknown --optimizer_type '{name}'", hint=hint)


def _construct(cls, name: str, groups: list, lr: float | None, kwargs: dict):
    import torch

    try:
        optimizer = cls(groups, lr=lr, **kwargs)
    except TypeError as err:
        raise ConfigError(f"--optimizer_type {name}: {err}", where="--optimizer_args", hint=_accepted(cls, kwargs)) from None
    except ValueError as err:
        raise ConfigError(f"--optimizer_type {name}: {err}", where="--optimizer_args") from None
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(f"--optimizer_type {name} did not build a torch.optim.Optimizer")
    return optimizer


def _accepted(cls, kwargs: Mapping[str, Any]) -> str:
    try:
        params = [p for p in inspect.signature(cls).parameters if p not in ("self", "params", "lr")]
    except (TypeError, ValueError):
        return "check --optimizer_args"
    for key in kwargs:
        if key not in params:
            close = difflib.get_close_matches(key, params, n=1)
            if close:
                return f"'{key}' is not an option; did you mean '{close[0]}'?"
    return "accepted options: " + ", ".join(params)


# ------------------------------------------------------------------------------------- Adafactor


def adafactor_kwargs(lr: float, args: Mapping[str, Any]) -> tuple[float | None, dict[str, Any]]:
    """kohya's rules for transformers' Adafactor, as (lr to pass, keyword arguments).

    - ``relative_step`` defaults to True when not given (as Adafactor itself);
    - ``warmup_init=True`` forces ``relative_step=True``;
    - with ``relative_step=True`` Adafactor computes its own step size: ``--learning_rate`` is only
      the "initial lr" the ``adafactor`` scheduler reports before the first step, per-group
      learning rates are ignored, lr=None is passed, and the scheduler must be ``adafactor``.
    """
    kwargs = dict(args)
    kwargs.setdefault("relative_step", True)
    if kwargs.get("warmup_init") and not kwargs["relative_step"]:
        log.warning("Adafactor: warmup_init=True needs relative_step=True; setting relative_step=True")
        kwargs["relative_step"] = True
    return (None if kwargs["relative_step"] else lr), kwargs


def _build_adafactor(groups: list, lr: float, args: dict, lr_scheduler: str | None, max_grad_norm: float | None):
    pass_lr, kwargs = adafactor_kwargs(lr, args)
    if kwargs["relative_step"]:
        if lr:
            log.warning("Adafactor relative_step=True: --learning_rate %g is only the initial lr shown before the first step", lr)
        group_rates = {g.get("lr") for g in groups if isinstance(g, dict)} - {None, lr}
        if group_rates:
            log.warning("Adafactor relative_step=True: per-group learning rates (text encoders, --block_lr) are ignored")
        for group in groups:
            if isinstance(group, dict):
                group.pop("lr", None)
        if lr_scheduler not in (None, "adafactor"):
            log.warning("Adafactor relative_step=True: using the 'adafactor' scheduler instead of '%s'", lr_scheduler)
    else:
        if max_grad_norm:
            log.warning("Adafactor: --max_grad_norm %g clips gradients on top of Adafactor's own update "
                        "clipping; kohya suggests --max_grad_norm 0", max_grad_norm)  # fmt: skip
        if lr_scheduler is not None and lr_scheduler != "constant_with_warmup":
            log.warning("Adafactor: --lr_scheduler constant_with_warmup is the usual choice (got '%s')", lr_scheduler)
        if kwargs.get("clip_threshold", 1.0) != 1.0:
            log.warning("Adafactor: clip_threshold=1.0 is the usual choice (got %s)", kwargs["clip_threshold"])
    cls = _import_class("transformers.optimization", "Adafactor", "AdaFactor", "transformers")
    optimizer = _construct(cls, "AdaFactor", groups, pass_lr, kwargs)
    if kwargs["relative_step"]:
        for group in optimizer.param_groups:  # only what the adafactor scheduler shows before step 1
            group["lr"] = lr
    return optimizer


def is_relative_step_adafactor(optimizer) -> bool:
    """True for a transformers Adafactor that computes its own step size (needs the adafactor schedule)."""
    return type(optimizer).__name__ == "Adafactor" and bool(optimizer.defaults.get("relative_step"))


# ------------------------------------------------------------------------- fused backward pass


def attach_fused_backward(optimizer, max_grad_norm: float | None = None, clip: str = "per_tensor",
                          groups: int | None = None):
    """``--fused_backward_pass``: step each parameter inside backward, as soon as its gradient is
    accumulated, and free that gradient, so a full set of gradients never exists at once.

    Run backward through the returned object's ``backward(loss, backward_fn)``; afterwards every
    parameter is updated and its ``.grad`` is None: do not call ``optimizer.step()`` or clip
    (``scheduler.step()`` as usual). Pass the bare optimizer (before ``accelerator.prepare``); one
    process only and no gradient accumulation (the gradient is not averaged across processes when
    the hook runs). D-Adaptation/Prodigy, whose update of one parameter depends on all the others,
    are refused.

    ``groups`` (kohya's ``--fused_optimizer_groups N``): the trained parameters are cut, in order,
    into N groups of about equal size, and a group steps once all of its gradients exist (at most one
    group's gradients are kept instead of one tensor's).

    ``max_grad_norm`` with ``clip="per_tensor"`` (``--fused_backward_clip per_tensor``, kohya's
    behaviour) clips each parameter's gradient on its own: the global norm is unknown until
    backward ends. ``clip="global"`` clips by the global norm like the unfused step, in two passes:
    a first backward (graph retained) only sums the squared gradients and frees each one, a second
    one scales every gradient by ``min(1, max_grad_norm / norm)`` and steps: the same update as
    ``clip_grad_norm_`` + ``step()``, for one more backward pass of compute and no more memory.
    """
    name = type(optimizer).__name__
    if name.startswith(("DAdapt", "Prodigy")):
        raise ConfigError(f"--fused_backward_pass cannot drive {name}: it needs all gradients at once",
                          hint="use AdaFactor or AdamW, or drop --fused_backward_pass")  # fmt: skip
    if clip not in ("per_tensor", "global"):
        raise ConfigError(f"unknown fused-backward clipping '{clip}'", hint="use per_tensor or global")
    return FusedBackward(optimizer, max_grad_norm, clip, groups)


def split_in_groups(params: list, groups: int) -> list[list]:
    """``params`` cut, in order, into at most ``groups`` non-empty runs of about equal element count."""
    total = sum(p.numel() for p in params)
    out: list[list] = [[]]
    done = 0
    for param in params:
        if out[-1] and done >= total * len(out) / groups:
            out.append([])
        out[-1].append(param)
        done += param.numel()
    return out


class FusedBackward:
    """The hooks of ``attach_fused_backward``; calling the object removes them."""

    def __init__(self, optimizer, max_grad_norm: float | None, clip: str, groups: int | None = None):
        self.optimizer, self.max_grad_norm, self.clip = optimizer, max_grad_norm, clip
        self.measuring = False
        self.squares = None  # sum of squared gradient elements (first pass of global clipping)
        self.scale = None  # the global clip factor during the second pass
        self.last_norm: float | None = None
        self.handles = []
        trained = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        # a "unit" steps together: one parameter each, or kohya's groups
        units = split_in_groups(trained, groups) if groups else [[p] for p in trained]
        self.unit_of = {id(p): index for index, unit in enumerate(units) for p in unit}
        self.unit_params = units
        group_of = {id(p): gi for gi, g in enumerate(optimizer.param_groups) for p in g["params"]}
        self.unit_by_group = [  # per unit, its parameters in each param group (the optimizer's view)
            [[p for p in unit if group_of[id(p)] == gi] for gi in range(len(optimizer.param_groups))]
            for unit in units
        ]
        self.ready = [0] * len(units)
        for param in trained:
            self.handles.append(param.register_post_accumulate_grad_hook(self._on_gradient))

    def __call__(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    remove = __call__

    def backward(self, loss, backward=None) -> None:
        """``backward(loss, **kwargs)`` defaults to ``loss.backward``; pass ``accelerator.backward``."""
        import torch

        backward = backward or (lambda value, **kwargs: value.backward(**kwargs))
        if self.clip == "global" and self.max_grad_norm:
            self.measuring, self.squares = True, torch.zeros((), dtype=torch.float32, device=loss.device)
            try:
                backward(loss, retain_graph=True)
            finally:
                self.measuring = False
            norm = self.squares.sqrt()
            self.last_norm = float(norm)
            self.scale = torch.clamp(self.max_grad_norm / (norm + 1e-6), max=1.0)
        try:
            backward(loss)
            for index, count in enumerate(self.ready):  # groups with a parameter that got no gradient
                if count:
                    self._step_unit(index)
        finally:
            self.scale = None

    def _on_gradient(self, param) -> None:
        import torch

        if self.measuring:
            self.squares += param.grad.detach().float().pow(2).sum()
            param.grad = None
            return
        if self.scale is not None:
            param.grad.mul_(self.scale.to(param.grad.dtype))
        elif self.max_grad_norm and self.clip == "per_tensor":
            torch.nn.utils.clip_grad_norm_([param], self.max_grad_norm)
        index = self.unit_of[id(param)]
        self.ready[index] += 1
        if self.ready[index] == len(self.unit_params[index]):
            self._step_unit(index)

    def _step_unit(self, index: int) -> None:
        """Step the optimizer over one unit's parameters only, then free their gradients. The groups
        are looked up at each call: ``accelerator.prepare`` reloads the optimizer's state dict, which
        replaces the ``param_groups`` dicts."""
        optimizer = self.optimizer
        saved = [g["params"] for g in optimizer.param_groups]
        for g, mine in zip(optimizer.param_groups, self.unit_by_group[index]):  # this unit's parameters only
            g["params"] = mine
        try:
            optimizer.step()
        finally:
            for g, params in zip(optimizer.param_groups, saved):
                g["params"] = params
        for param in self.unit_params[index]:
            param.grad = None
        self.ready[index] = 0
