"""Atomic file writes: a temp file in the same folder, fsync, then rename.

A crash at any point leaves either the old file or the new one under the final name, never a
half-written file. Temp files are named ``.<name>.tmp-<random>`` so they are easy to spot and
are never mistaken for images, checkpoints or cache entries.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``final``; on success it is fsynced and renamed over it.

    ``suffix`` keeps an extension on the temp name for writers that look at it (e.g.
    ``safetensors`` does not, PIL's ``save`` does). On an exception the temp file is removed and
    ``final`` is untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.tmp-", suffix=suffix, dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def atomic_write_bytes(final: str | os.PathLike, data: bytes) -> None:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(final: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    atomic_write_bytes(final, text.encode(encoding))


def is_temp_name(name: str) -> bool:
    """True for the names :func:`atomic_path` uses for its temp files."""
    return name.startswith(".") and ".tmp-" in name
