"""Write a ``.safetensors`` file one tensor at a time.

``safetensors.torch.save_file`` needs every tensor, already cast, in memory at once: saving a 6.9 GB
SDXL in fp16 from fp32 weights would hold a second ~3.5 GB copy. This writer lays out the header
from shapes and the target dtype first, then casts and writes each tensor in turn, so the extra
memory is one tensor. The output is a standard safetensors file (8-byte little-endian header length,
JSON header padded with spaces to 8 bytes, raw little-endian data); the tests read it back with the
official reader. The file is written atomically.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Callable, Mapping

from library.fileio import atomic_path

_DTYPE_NAMES = {
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "float64": "F64",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}

TensorSource = Callable[[], "object"]


def _dtype_name(dtype) -> str:
    name = str(dtype).replace("torch.", "")
    if name not in _DTYPE_NAMES:
        raise ValueError(f"dtype {dtype} cannot be stored in safetensors by this writer")
    return _DTYPE_NAMES[name]


def save_file_streaming(
    tensors: Mapping[str, object],
    path: str | Path,
    metadata: Mapping[str, str] | None = None,
    cast: Callable[[object], object] | None = None,
) -> None:
    """Write ``tensors`` (name -> tensor, or name -> zero-argument callable making it) to ``path``.

    ``cast(tensor) -> tensor`` is applied to each tensor just before it is written (e.g. a float32
    -> float16 cast for floating tensors); its output dtype must not depend on the values.
    """
    import torch

    cast = cast or (lambda t: t)
    names = sorted(tensors)
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name in names:
        source = tensors[name]
        probe = source() if callable(source) else source
        target = cast(torch.empty(0, dtype=probe.dtype)).dtype
        size = probe.numel() * torch.empty(0, dtype=target).element_size()
        header[name] = {"dtype": _dtype_name(target), "shape": list(probe.shape), "data_offsets": [offset, offset + size]}
        offset += size
        del probe
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)
    with atomic_path(path) as tmp, open(tmp, "wb") as out:
        out.write(struct.pack("<Q", len(header_bytes)))
        out.write(header_bytes)
        for name in names:
            source = tensors[name]
            tensor = source() if callable(source) else source
            tensor = cast(tensor.detach()).to("cpu").contiguous()
            if tensor.dtype == torch.bfloat16:
                data = tensor.view(torch.int16).numpy().tobytes()
            else:
                data = tensor.numpy().tobytes()
            expected = header[name]["data_offsets"]  # type: ignore[index]
            if len(data) != expected[1] - expected[0]:
                raise RuntimeError(f"tensor '{name}' changed size while being written")
            out.write(data)
            del tensor, data
        out.flush()
