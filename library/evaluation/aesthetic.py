"""The LAION "improved aesthetic predictor" MLP (``sac+logos+ava1-l14-linearMSE.pth``).

Published layout, no activations between the layers::

    layers.0  Linear(D, 1024)   layers.1 Dropout(0.2)
    layers.2  Linear(1024, 128) layers.3 Dropout(0.2)
    layers.4  Linear(128, 64)   layers.5 Dropout(0.1)
    layers.6  Linear(64, 16)
    layers.7  Linear(16, 1)

``D`` is the CLIP image embedding size (768 for ViT-L/14); it is read from the weights, so the same
code scores with any CLIP whose projection size matches. The input is the L2-normalised embedding.
Weights load from the published ``.pth`` (``torch.load(weights_only=True)``, no pickled code runs) or
from the same tensors saved as ``.safetensors``.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import nn

from library.errors import ModelError

# (key prefix, output size); the input size of each layer is the output size of the one before.
_LINEAR_LAYERS = (("layers.0", 1024), ("layers.2", 128), ("layers.4", 64), ("layers.6", 16), ("layers.7", 1))


class AestheticMLP(nn.Module):
    """The LAION MLP; ``forward`` takes ``(N, D)`` normalised embeddings and returns ``(N, 1)`` scores."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings)


def expected_shapes(input_size: int) -> dict[str, tuple[int, ...]]:
    """The published key -> shape table for an MLP taking ``input_size``-d embeddings."""
    shapes: dict[str, tuple[int, ...]] = {}
    previous = input_size
    for prefix, size in _LINEAR_LAYERS:
        shapes[f"{prefix}.weight"] = (size, previous)
        shapes[f"{prefix}.bias"] = (size,)
        previous = size
    return shapes


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ModelError("aesthetic model file not found", where=str(path),
                         hint="pass --aesthetic_model with the LAION sac+logos+ava1-l14-linearMSE.pth")
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ModelError("not a plain torch state dict (or it holds pickled code, which is never run)",
                         where=str(path), hint="expected the LAION .pth state dict or a .safetensors file") from None
    except Exception as err:  # corrupt or truncated file, wrong format: all the user's to fix
        first = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise ModelError(f"cannot read aesthetic model ({first})", where=str(path),
                         hint="expected a state dict saved by torch.save or safetensors") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a Lightning checkpoint of the same MLP
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError("aesthetic model file holds no state dict of tensors", where=str(path))
    return state


def check_state_dict(state: dict[str, torch.Tensor], where: str) -> int:
    """Validate the published key layout; return the input (embedding) size."""
    first = state.get("layers.0.weight")
    if first is None or first.dim() != 2:
        raise ModelError("not a LAION aesthetic MLP: no 2-d 'layers.0.weight'", where=where,
                         hint="expected keys layers.0/2/4/6/7.weight and .bias")
    input_size = int(first.shape[1])
    expected = expected_shapes(input_size)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ModelError(f"aesthetic MLP keys do not match (missing {missing[:5]}, unexpected {unexpected[:5]})",
                         where=where, hint="expected keys layers.0/2/4/6/7.weight and .bias")
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise ModelError(f"aesthetic MLP '{key}' has shape {tuple(state[key].shape)}, expected {shape}",
                             where=where, hint="the file is not the LAION improved aesthetic predictor")
    return input_size


def load_aesthetic_model(path: str | Path, device: str = "cpu") -> AestheticMLP:
    """Load the MLP from ``.pth``/``.pt``/``.safetensors``; wrong keys or shapes are a :class:`ModelError`."""
    path = Path(path).expanduser()
    state = _read_state_dict(path)
    input_size = check_state_dict(state, str(path))
    model = AestheticMLP(input_size)
    model.load_state_dict({key: value.float() for key, value in state.items()})
    return model.to(device).eval()
