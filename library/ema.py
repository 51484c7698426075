"""Exponential moving average of the trained weights (``--ema``).

``shadow = decay * shadow + (1 - decay) * weight`` every ``--ema_update_every`` optimizer steps, in
float32, kept on the CPU (``--ema_device cpu``, costs no GPU memory) or next to the weights
(``--ema_device same``). Samples use the EMA weights (unless ``--no_sample_with_ema``) and saved models
are the EMA weights (``--save_raw_with_ema`` also writes the raw ones as ``NAME-raw...``). The EMA is
part of the training state (``ema.safetensors`` in the state folder), so ``--resume`` continues it
exactly.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

from library.errors import ConfigError


class EMA:
    def __init__(self, module, decay: float = 0.9999, update_every: int = 1, device: str = "cpu"):
        import torch

        if not 0.0 < decay < 1.0:
            raise ConfigError(f"--ema_decay must be between 0 and 1 (got {decay})")
        if update_every < 1:
            raise ConfigError(f"--ema_update_every must be at least 1 (got {update_every})")
        if device not in ("cpu", "same"):
            raise ConfigError(f"--ema_device must be cpu or same (got {device})")
        self.decay, self.update_every, self.device = decay, update_every, device
        self.names = [name for name, p in module.named_parameters() if p.requires_grad]
        params = dict(module.named_parameters())
        self.shadow = {
            name: params[name].detach().to("cpu" if device == "cpu" else params[name].device, torch.float32, copy=True)
            for name in self.names
        }
        self.updates = 0

    def update(self, module, step: int) -> bool:
        """Fold the current weights in at every ``update_every``-th step; True if it did."""
        import torch

        if step % self.update_every:
            return False
        params = dict(module.named_parameters())
        with torch.no_grad():
            for name in self.names:
                shadow = self.shadow[name]
                current = params[name].detach().to(shadow.device, torch.float32)
                shadow.mul_(self.decay).add_(current, alpha=1.0 - self.decay)
        self.updates += 1
        return True

    @contextlib.contextmanager
    def applied(self, module) -> Iterator[None]:
        """Temporarily give ``module`` the EMA weights (cast to its dtype and device)."""
        params = dict(module.named_parameters())
        originals = {}
        try:
            for name in self.names:
                param = params[name]
                originals[name] = param.data
                param.data = self.shadow[name].to(param.device, param.dtype)
            yield
        finally:
            for name, data in originals.items():
                params[name].data = data

    def state_dict(self) -> dict:
        import torch

        return {**{f"shadow.{n}": t for n, t in self.shadow.items()}, "updates": torch.tensor(self.updates)}

    def load_state_dict(self, state: dict) -> None:
        missing = [n for n in self.names if f"shadow.{n}" not in state]
        if missing:
            raise ConfigError(f"the resumed state's EMA lacks {len(missing)} weights ({missing[0]}, ...)",
                              hint="resume with the same model and trained parts")  # fmt: skip
        for name in self.names:
            self.shadow[name].copy_(state[f"shadow.{name}"])
        self.updates = int(state["updates"])

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(Path(folder) / "ema.safetensors"))

    def load(self, folder: Path) -> None:
        from safetensors.torch import load_file

        path = Path(folder) / "ema.safetensors"
        if not path.is_file():
            raise ConfigError("the state has no ema.safetensors: it was saved without --ema", where=str(folder))
        self.load_state_dict(load_file(str(path)))
