"""Shared pytest set-up: repository root on sys.path, offline hub, small thread count.

Area-specific fixtures live next to their tests (``tests/fixtures_*.py`` or inside the test file).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    """The tiny SDXL written once per test session by ``tools/make_tiny_sdxl.py``'s code.

    Returns a dict: ``single_file``, ``diffusers``, ``tokenizers``, ``vae_fix`` (paths). Treat it as
    read-only; copy before modifying.
    """
    from library.tiny_sdxl import make_tiny_sdxl

    return make_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl"), seed=0)
