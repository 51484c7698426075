"""Merge kohya-format LoRA files into an SDXL model's weights.

A kohya LoRA file holds, per adapted module, ``<lora_name>.lora_down.weight`` (rank x in [x k x k]),
``<lora_name>.lora_up.weight`` (out x rank [x 1 x 1]) and optionally ``<lora_name>.alpha`` (a scalar;
missing means alpha = rank). ``lora_name`` is ``lora_unet_`` / ``lora_te1_`` / ``lora_te2_`` followed by
the module path with ``.`` replaced by ``_``. For the UNet, kohya's SDXL LoRAs use the SGM (original)
module path and diffusers-layout trainers the diffusers path; both are accepted.

Merging adds ``ratio * alpha / rank * (up @ down)`` to the module's weight, computed in float32 (or
the chosen merge dtype) and cast back to the weight's dtype. For a k x k conv LoRA the product is the
composition of the two convolutions: ``delta[o, i] = sum_r up[o, r] * down[r, i]`` per kernel tap.

torch is imported inside the functions so that argument errors are reported without loading it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from library.errors import ConfigError, ModelError

LORA_PREFIXES = {"lora_unet_": "unet", "lora_te1_": "te1", "lora_te2_": "te2"}
COMPONENT_ATTRS = {"unet": "unet", "te1": "text_encoder1", "te2": "text_encoder2"}
MERGE_DTYPES = ("float", "fp16", "bf16")
MERGED_LORAS_METADATA_KEY = "sdxl_poster.merged_loras"
_PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
_SHOWN_NAMES = 10


# --- arguments ----------------------------------------------------------------------------------


def parse_lora_arg(text: str) -> tuple[Path, float]:
    """``"path[:ratio]"`` -> ``(path, ratio)``; the ratio follows the last colon and defaults to 1.0.

    A colon inside the path (``C:\\loras\\a.safetensors``, ``/data/run:2/a.safetensors``) is not
    mistaken for a ratio: a ratio never contains a path separator.
    """
    head, sep, tail = text.rpartition(":")
    if not sep or "/" in tail or "\\" in tail:
        path, ratio_text = text, None
    else:
        path, ratio_text = head, tail.strip()
    if not path:
        raise ConfigError("no LoRA file given", where=f"--lora {text!r}", hint="use --lora FILE[:RATIO]")
    if ratio_text is None:
        return Path(path), 1.0
    try:
        ratio = float(ratio_text)
    except ValueError:
        ratio = math.nan
    if not math.isfinite(ratio):
        raise ConfigError(
            f"ratio '{ratio_text}' is not a number",
            where=f"--lora {text!r}",
            hint="use --lora FILE:RATIO, e.g. --lora style.safetensors:0.7",
        )
    return Path(path), ratio


def torch_dtype(name: str):
    import torch

    if name not in MERGE_DTYPES:
        raise ConfigError(f"unknown dtype '{name}'", hint=f"use one of {', '.join(MERGE_DTYPES)}")
    return {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


# --- reading ------------------------------------------------------------------------------------


def read_lora_file(path: str | Path) -> dict[str, Any]:
    """All tensors of a LoRA ``.safetensors`` file, with one-line errors for missing or bad files."""
    path = Path(path)
    if not path.is_file():
        raise ModelError("LoRA file not found", where=str(path))
    if path.suffix.lower() != ".safetensors":
        raise ModelError("LoRA files must be .safetensors", where=str(path),
                         hint="convert .ckpt/.pt LoRAs to safetensors first")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelError(f"not a readable safetensors file ({str(err).splitlines()[0]})", where=str(path),
                         hint="the file may be truncated or corrupt: download it again") from None


@dataclass
class LoraModule:
    """The tensors of one adapted module; ``extra`` names parts we cannot merge (lora_mid, dora_scale)."""

    down: Any = None
    up: Any = None
    alpha: Any = None
    extra: list = field(default_factory=list)

    @property
    def mergeable(self) -> bool:
        return self.down is not None and self.up is not None and not self.extra


def group_lora_state(state: Mapping[str, Any]) -> tuple[dict[str, LoraModule], list[str]]:
    """Split a LoRA state dict into ``{lora_name: LoraModule}`` for kohya-style names and a list of
    the other keys (other LoRA kinds, other prefixes)."""
    modules: dict[str, LoraModule] = {}
    other: list[str] = []
    for key, tensor in state.items():
        if not key.startswith(tuple(LORA_PREFIXES)) or "." not in key:
            other.append(key)
            continue
        name, part = key.split(".", 1)
        module = modules.setdefault(name, LoraModule())
        if part in _PARTS:
            setattr(module, _PARTS[part], tensor)
        else:
            module.extra.append(part)
    return modules, other


# --- targets ------------------------------------------------------------------------------------


def lora_targets(models) -> dict[str, tuple[str, Any]]:
    """``{lora_name: (component, module)}`` for every Linear/Conv2d of the UNet and both text encoders.

    UNet modules are listed under their diffusers and their SGM path; text-encoder modules under their
    transformers path with the ``text_model.`` prefix kohya uses.
    """
    import torch

    from library.sdxl_keys import unet_key_to_sgm

    kinds = (torch.nn.Linear, torch.nn.Conv2d)
    targets: dict[str, tuple[str, Any]] = {}

    def add(name: str, component: str, module) -> None:
        key = next(p for p, c in LORA_PREFIXES.items() if c == component) + name.replace(".", "_")
        if key in targets and targets[key][1] is not module:
            raise RuntimeError(f"two modules share the LoRA name {key}")
        targets[key] = (component, module)

    for name, module in models.unet.named_modules():
        if isinstance(module, kinds):
            add(name, "unet", module)
            add(unet_key_to_sgm(name + ".weight", models.unet.config)[: -len(".weight")], "unet", module)
    for component in ("te1", "te2"):
        for name, module in getattr(models, COMPONENT_ATTRS[component]).named_modules():
            if isinstance(module, kinds):
                add(name if name.startswith("text_model.") else "text_model." + name, component, module)
    return targets


# --- the merge ----------------------------------------------------------------------------------


def lora_delta(down, up, scale: float, dtype=None):
    """``scale * up @ down`` shaped like the target weight's natural form.

    ``down`` is (rank, in) or (rank, in, kh, kw); ``up`` is (out, rank) or (out, rank, 1, 1). A 1x1
    ``down`` gives a 2D delta (the caller reshapes it onto a 1x1 conv); a kh x kw one gives
    (out, in, kh, kw): the weight of the conv equal to the down conv followed by the 1x1 up conv.
    """
    import torch

    dtype = dtype or torch.float32
    up2 = up.to(dtype).reshape(up.shape[0], -1)
    down = down.to(dtype)
    if down.ndim == 4 and tuple(down.shape[2:]) != (1, 1):
        delta = torch.einsum("or,rikl->oikl", up2, down)
    else:
        delta = up2 @ down.reshape(down.shape[0], -1)
    return delta * scale


def _check_shapes(module: LoraModule, weight_shape: tuple, file: str, name: str) -> None:
    down, up = tuple(module.down.shape), tuple(module.up.shape)
    rank = down[0]
    problem = None
    if len(down) not in (2, 4) or len(up) not in (2, 4) or any(d != 1 for d in up[2:]):
        problem = f"unsupported shapes down {list(down)} / up {list(up)}"
    elif up[1] != rank:
        problem = f"lora_up rank {up[1]} differs from lora_down rank {rank}"
    elif module.alpha is not None and module.alpha.numel() != 1:
        problem = f"alpha must be a scalar, got shape {list(module.alpha.shape)}"
    else:
        kernel = down[2:] if len(down) == 4 else (1, 1)
        in_ch = down[1]
        if kernel == (1, 1):
            ok = tuple(weight_shape[:2]) == (up[0], in_ch) and all(d == 1 for d in weight_shape[2:])
        else:
            ok = tuple(weight_shape) == (up[0], in_ch, *kernel)
        if not ok:
            update = "x".join(map(str, (up[0], in_ch, *kernel)))
            problem = f"LoRA gives a {update} update for a weight of shape {list(weight_shape)}"
    if problem:
        raise ModelError(problem, where=f"{file}: {name}", hint="is this LoRA made for a different model?")


@dataclass
class MergeReport:
    """What one LoRA file did: merged module counts per component and the entries left out."""

    file: str
    ratio: float
    merged: dict = field(default_factory=lambda: {"unet": 0, "te1": 0, "te2": 0})
    skipped: list = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.merged.values())

    def summary(self) -> str:
        counts = ", ".join(f"{c} {n}" for c, n in self.merged.items())
        return f"merged {self.file} (ratio {self.ratio:g}): {self.total} modules ({counts})"

    def skipped_warning(self) -> str:
        shown = ", ".join(self.skipped[:_SHOWN_NAMES]) + (", ..." if len(self.skipped) > _SHOWN_NAMES else "")
        return (f"{self.file}: {len(self.skipped)} LoRA entries not merged "
                f"(no matching module, or a kind other than kohya LoRA): {shown}")


def merge_lora_into(models, lora_state: Mapping[str, Any], ratio: float, where: str, merge_dtype: str = "float",
                    strict: bool = False, targets: Mapping | None = None) -> MergeReport:
    """Add one LoRA (a kohya state dict) times ``ratio`` into ``models`` in place; return a report.

    Every shape is checked before any weight changes. ``where`` names the file in errors. Entries that
    match no module or are another kind (LoCon ``lora_mid``, DoRA ``dora_scale``, LoHa, LoKr) are listed
    in ``report.skipped``; with ``strict`` they are an error. A file with nothing mergeable is an error.
    """
    import torch

    targets = targets if targets is not None else lora_targets(models)
    dtype = torch_dtype(merge_dtype)
    modules, other = group_lora_state(lora_state)
    report = MergeReport(file=Path(where).name, ratio=ratio)
    plan = []
    for name, module in modules.items():
        if name in targets and module.mergeable:
            plan.append((name, module, *targets[name]))
        else:
            report.skipped.append(name)
    report.skipped.extend(other)
    if not plan:
        example = f"; found e.g. {', '.join(report.skipped[:3])}" if report.skipped else "; the file is empty"
        raise ModelError("no kohya-style lora_unet_/lora_te1_/lora_te2_ keys that match this SDXL model" + example,
                         where=where, hint="SD 1.x, LyCORIS (LoHa/LoKr) and PEFT/diffusers LoRAs are not supported")
    if strict and report.skipped:
        raise ModelError(report.skipped_warning().split(": ", 1)[1], where=where,
                         hint="drop --strict to merge the rest and ignore these")
    for name, module, _, target in plan:
        _check_shapes(module, tuple(target.weight.shape), where, name)
    with torch.no_grad():
        for name, module, component, target in plan:
            rank = module.down.shape[0]
            alpha = float(module.alpha) if module.alpha is not None else float(rank)
            delta = lora_delta(module.down, module.up, ratio * alpha / rank, dtype)
            weight = target.weight
            weight.data = (weight.to(dtype) + delta.reshape(weight.shape)).to(weight.dtype)
            report.merged[component] += 1
    return report
