#!/usr/bin/env python
"""Show what a .safetensors file is without loading its weights.

    python tools/show_metadata.py model.safetensors [--json]

Prints the model kind detected from the key names (SDXL, SD 1.x/2.x, VAE, ...), the tensor count and
parameter count per dtype, and the header metadata (SAI modelspec fields, training settings that
trainers store, our own configs). Only the file header is read.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.cli import run_main  # noqa: E402
from library.errors import ModelError  # noqa: E402


def read_header(path: Path) -> dict:
    """The JSON header of a safetensors file (8-byte length + JSON), with clear errors."""
    if not path.is_file():
        raise ModelError("file not found", where=str(path))
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise ModelError("too short to be a safetensors file", where=str(path))
        (length,) = struct.unpack("<Q", head)
        if length > 100_000_000 or length > path.stat().st_size - 8:
            raise ModelError("header length is impossible: not a safetensors file or truncated", where=str(path))
        try:
            header = json.loads(handle.read(length).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ModelError("header is not valid JSON: corrupt file", where=str(path)) from None
    _check_complete(header, path, path.stat().st_size - 8 - length)
    return header


def _check_complete(header: dict, path: Path, data_bytes: int) -> None:
    """The tensors the header lists must all be in the file: a cut-off download is not a model."""
    ends = [info["data_offsets"][1] for name, info in header.items()
            if name != "__metadata__" and isinstance(info, dict) and len(info.get("data_offsets") or ()) == 2]
    needed = max(ends, default=0)
    if needed > data_bytes:
        raise ModelError(f"truncated: the header lists {needed:,} bytes of tensors but the file holds {data_bytes:,}",
                         where=str(path), hint="download or copy the file again")  # fmt: skip


def summarize(header: dict) -> dict:
    from library.sdxl_model_util import detect_model_kind

    metadata = header.pop("__metadata__", {}) or {}
    dtypes: Counter = Counter()
    params: Counter = Counter()
    for info in header.values():
        count = 1
        for dim in info["shape"]:
            count *= dim
        dtypes[info["dtype"]] += 1
        params[info["dtype"]] += count
    return {
        "kind": detect_model_kind(header),
        "tensors": len(header),
        "dtypes": {d: {"tensors": dtypes[d], "parameters": params[d]} for d in sorted(dtypes)},
        "metadata": metadata,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", help="a .safetensors file")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)
    info = summarize(read_header(Path(args.file)))
    if args.json:
        print(json.dumps(info, indent=2, ensure_ascii=False))
        return 0
    print(f"file:    {args.file}")
    print(f"kind:    {info['kind']}")
    print(f"tensors: {info['tensors']}")
    for dtype, counts in info["dtypes"].items():
        print(f"  {dtype:5s} {counts['tensors']:6d} tensors {counts['parameters']:>14,d} parameters")
    print("metadata:" if info["metadata"] else "metadata: (none)")
    for key in sorted(info["metadata"]):
        value = info["metadata"][key]
        shown = value if len(value) <= 200 else value[:200] + f"... ({len(value)} chars)"
        print(f"  {key} = {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
