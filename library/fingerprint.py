"""Content fingerprints: what a cache entry depends on, as a short hex digest.

Caches (latents, text-encoder outputs) store the fingerprint of the inputs that made them and are
rebuilt when it differs, so a changed image, a swapped VAE or an edited caption never reuses a stale
entry.
"""

from __future__ import annotations

import hashlib


def module_fingerprint(module) -> str:
    """SHA-256 over a module's state dict (names, dtypes, shapes and bytes), 16 hex digits."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.view(torch.int16)
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()[:16]


def text_fingerprint(*parts: object) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(repr(part).encode("utf-8"))
        digest.update(b"\x00")
    return digest.hexdigest()[:32]
