"""Two processes on the CPU (DDP over gloo through accelerate): ranks end with identical weights,
each having trained on different images, and only rank 0 writes the model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from test_train_loop import base_args, poster_set  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[1]


def test_two_cpu_processes_stay_in_sync_on_different_images(tiny_sdxl, poster_set, tmp_path):
    out, report = tmp_path / "ddp", tmp_path / "report"
    env = dict(os.environ, HF_HUB_OFFLINE="1", ACCELERATE_USE_CPU="1", SDXL_POSTER_RANK_REPORT=str(report),
               OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
               "sdxl_train.py", *base_args(tiny_sdxl, poster_set, out, 3, "--max_data_loader_n_workers", "0")]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((report / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 3
    assert ranks[0]["unet"] == ranks[1]["unet"]
    assert ranks[0]["images"] and ranks[1]["images"]
    assert ranks[0]["images"] != ranks[1]["images"]
    assert (out / "poster.safetensors").is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
