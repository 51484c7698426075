"""Builders for the bad-input corpus (tests/test_bad_inputs*.py) and a runner for the real CLIs.

Every builder writes one small file and returns its path. :func:`run_cli` runs a script of the
repository as a subprocess (offline, one thread) and hashes the input tree before and after, so a
test can assert that nothing a user made was changed.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


# --- images ---------------------------------------------------------------------------------------


def _rgb(width: int, height: int, seed: int = 0):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def good_png(path: Path, width: int = 96, height: int = 64, seed: int = 0) -> Path:
    _rgb(width, height, seed).save(path, format="PNG")
    return path


def good_jpeg(path: Path, width: int = 96, height: int = 64, seed: int = 0) -> Path:
    _rgb(width, height, seed).save(path, format="JPEG", quality=95)
    return path


def zero_byte(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def truncated(path: Path, fmt: str, width: int = 96, height: int = 64) -> Path:
    """A JPEG or PNG cut to 60% of its bytes (an interrupted download)."""
    buffer = io.BytesIO()
    _rgb(width, height, 5).save(buffer, format=fmt)
    data = buffer.getvalue()
    path.write_bytes(data[: int(len(data) * 0.6)])
    return path


def text_as_image(path: Path) -> Path:
    path.write_text("<html><body>404 Not Found</body></html>\n", encoding="utf-8")
    return path


def cmyk_jpeg(path: Path, width: int = 96, height: int = 64) -> Path:
    _rgb(width, height, 6).convert("CMYK").save(path, format="JPEG", quality=95)
    return path


def png16(path: Path, width: int = 96, height: int = 64) -> Path:
    import numpy as np
    from PIL import Image

    ramp = np.linspace(0, 65535, width * height, dtype=np.uint16).reshape(height, width)
    Image.fromarray(ramp).save(path, format="PNG")
    assert Image.open(path).mode.startswith("I")
    return path


def palette_transparent_png(path: Path, width: int = 96, height: int = 64) -> Path:
    img = _rgb(width, height, 7).convert("P", palette=1, colors=16)  # 1 = Image.Palette.ADAPTIVE
    img.info["transparency"] = 0
    img.save(path, format="PNG", transparency=0)
    return path


def exif_rotated_jpeg(path: Path, stored_width: int = 128, stored_height: int = 64) -> Path:
    """Stored landscape ``stored_width x stored_height`` with EXIF orientation 6: upright it is portrait."""
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6
    _rgb(stored_width, stored_height, 8).save(path, format="JPEG", quality=95, exif=exif.tobytes())
    return path


def tiny_png(path: Path) -> Path:
    return good_png(path, 1, 1)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_header_png(path: Path, side: int = 20000) -> Path:
    """A few hundred bytes whose PNG header claims ``side x side`` pixels (a decompression bomb)."""
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    data = zlib.compress(b"\x00" * (1 + 3 * 16))  # one short row: the header is what matters
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b""))
    return path


# --- models ---------------------------------------------------------------------------------------


def sd1_checkpoint(path: Path) -> Path:
    """A few tensors with SD 1.x key names (CLIP ViT-L under cond_stage_model.transformer.)."""
    import torch
    from safetensors.torch import save_file

    save_file({
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
        "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.zeros(1, 77),
        "first_stage_model.encoder.conv_in.weight": torch.zeros(4, 3, 3, 3),
    }, str(path))  # fmt: skip
    return path


def truncated_safetensors(src: Path, path: Path) -> Path:
    data = Path(src).read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def wrong_shape_vae(path: Path) -> Path:
    """A VAE single file whose block widths are not the tiny SDXL's (16, 16 instead of 32..64)."""
    from diffusers import AutoencoderKL

    from library.sdxl_model_util import save_vae_checkpoint

    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 16), layers_per_block=1, latent_channels=4, norm_num_groups=8,
    )  # fmt: skip
    save_vae_checkpoint(path, vae)
    return path


class _Boom:
    """Unpickling this runs ``os.system``-like code: here it writes a marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


def pickle_bomb(path: Path, marker: Path) -> Path:
    """A ``.ckpt``/``.pth`` whose unpickling would write ``marker`` (a stand-in for running any code)."""
    import torch

    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _Boom(str(marker))}, str(path))
    return path


# --- running --------------------------------------------------------------------------------------


def tree_hashes(*roots: Path) -> dict[str, str]:
    """sha256 of every file under ``roots`` (a single file may be given too), keyed by path."""
    hashes = {}
    for root in roots:
        root = Path(root)
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            hashes[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str
    changed: list[str]  # input files that were modified or removed

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if "error" in line.lower()]


def run_cli(script: str, args: list, inputs: list, timeout: float = 120, env: dict | None = None) -> Result:
    """Run ``python <script> <args>`` from the repository root; ``inputs`` are hashed before and after."""
    before = tree_hashes(*inputs)
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore", **(env or {})}  # fmt: skip
    proc = subprocess.run(
        [PYTHON, str(REPO_ROOT / script), *map(str, args)],
        cwd=REPO_ROOT, env=full_env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    after = tree_hashes(*inputs)
    changed = sorted(k for k in before if before[k] != after.get(k))
    return Result(proc.returncode, proc.stdout, proc.stderr, changed)


def assert_user_error(result: Result, *names: str) -> str:
    """Exit 2, exactly one stderr line with "error" that names every one of ``names``, no traceback,
    no input changed. Returns the error line."""
    detail = f"exit {result.code}\nstdout:\n{result.stdout[-2000:]}\nstderr:\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr, detail
    assert result.code == 2, detail
    lines = result.error_lines
    assert len(lines) == 1, detail
    for name in names:
        assert name in lines[0], f"{name!r} not named in: {lines[0]}"
    assert result.changed == [], result.changed
    return lines[0]


def assert_handled(result: Result) -> str:
    """Exit 0, no traceback, no input changed; returns stdout + stderr for the count/warning checks."""
    detail = f"exit {result.code}\nstdout:\n{result.stdout[-2000:]}\nstderr:\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr, detail
    assert result.code == 0, detail
    assert result.changed == [], result.changed
    return result.stdout + result.stderr


def write_json(path: Path, value) -> Path:
    path.write_text(json.dumps(value), encoding="utf-8")
    return path
