"""Ctrl+C / SIGTERM during training: a resumable state is saved, and resuming from it reaches the
same weights as an uninterrupted run (a real process gets the signal)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_train_loop import base_args, poster_set, run_train  # noqa: F401  (poster_set is a fixture)

REPO = Path(__file__).resolve().parents[1]
TOTAL = 8


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_a_state_that_resumes_exactly(tiny_sdxl, poster_set, tmp_path, signum):
    out = tmp_path / "interrupted"
    extra = ("--max_data_loader_n_workers", "0", "--save_every_n_steps", "2")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "sdxl_train.py", *base_args(tiny_sdxl, poster_set, out, 200, *extra)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (out / "poster-step00000002.safetensors").exists():
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.time() < deadline, "training never reached step 2"
        time.sleep(0.2)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    states = sorted(p for p in out.iterdir() if p.name.endswith("-state"))
    assert states, "no state saved on the signal"
    state = states[-1]
    stopped_at = int(state.name.split("step")[1][:8])
    assert 2 <= stopped_at < 200
    assert not (out / "poster.safetensors").exists()  # no final model: the run did not finish
    assert f"--resume {state}" in stderr

    total = stopped_at + 2
    resumed, straight = tmp_path / "resumed", tmp_path / "straight"
    workers = ("--max_data_loader_n_workers", "0")
    assert run_train(base_args(tiny_sdxl, poster_set, resumed, total, "--resume", str(state), *workers)) == 0
    assert run_train(base_args(tiny_sdxl, poster_set, straight, total, *workers)) == 0
    a, b = load_file(str(resumed / "poster.safetensors")), load_file(str(straight / "poster.safetensors"))
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
