"""SIGKILL at any moment leaves only whole files under final names: every model file loads, every
state folder is complete and resumable, and a re-run after a kill during latent caching completes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from safetensors import safe_open

from test_train_loop import base_args, poster_set, run_train  # noqa: F401  (poster_set is a fixture)

REPO = Path(__file__).resolve().parents[1]


def _start(args, out_dir: Path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.Popen([sys.executable, "sdxl_train.py", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, proc, seconds=240):
    deadline = time.time() + seconds
    while not predicate():
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.time() < deadline
        time.sleep(0.05)


def _assert_only_whole_files(out: Path) -> list[Path]:
    states = []
    for path in out.iterdir():
        if path.name.startswith("."):
            continue  # temporary names: never read by the toolkit
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as handle:
                assert len(list(handle.keys())) > 100, path
        if path.name.endswith("-state"):
            assert (path / "train_state.json").is_file(), path
            assert (path / "model.safetensors").is_file(), path
            states.append(path)
    return states


def test_sigkill_during_saves_leaves_loadable_files_and_states(tiny_sdxl, poster_set, tmp_path):
    out = tmp_path / "killed"
    args = base_args(tiny_sdxl, poster_set, out, 500, "--save_every_n_steps", "1", "--save_state",
                     "--save_last_n_steps", "3", "--max_data_loader_n_workers", "0")
    proc = _start(args, out)
    # kill while saves are in flight: right after a temporary state folder or model file appears
    _wait_for(lambda: out.is_dir() and len([p for p in out.iterdir() if p.name.endswith("-state")]) >= 2, proc)
    _wait_for(lambda: any(p.name.startswith(".") for p in out.iterdir()), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    states = _assert_only_whole_files(out)
    assert states
    latest = max(states, key=lambda p: p.name)
    step = int(latest.name.split("step")[1][:8])
    resumed = tmp_path / "resumed"
    assert run_train(base_args(tiny_sdxl, poster_set, resumed, step + 1, "--resume", str(latest),
                               "--max_data_loader_n_workers", "0")) == 0
    assert (resumed / "poster.safetensors").is_file()


def test_sigkill_during_latent_caching_then_rerun_completes(tiny_sdxl, tmp_path):
    from library.demo_data import make_demo_dataset
    from library.latent_cache import read_entry_metadata

    root = tmp_path / "data"
    meta = make_demo_dataset(root, count=40, seed=9)
    toml = tmp_path / "d.toml"
    toml.write_text(f"[[datasets]]\nresolution = 64\nbatch_size = 2\n\n  [[datasets.subsets]]\n"
                    f"  image_dir = \"{(root / 'images').as_posix()}\"\n  metadata_file = \"{meta.as_posix()}\"\n")
    out = tmp_path / "out"
    args = base_args(tiny_sdxl, toml, out, 1, "--vae_batch_size", "1", "--max_data_loader_n_workers", "0")
    proc = _start(args, out)
    images = root / "images"
    _wait_for(lambda: len(list(images.glob("*.sdxl-latents.safetensors"))) >= 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    entries = list(images.glob("*.sdxl-latents.safetensors"))
    assert 3 <= len(entries) < 40 or len(entries) == 40
    assert all(read_entry_metadata(p) is not None for p in entries)  # no partial entry under a final name
    assert run_train(args) == 0
    assert len(list(images.glob("*.sdxl-latents.safetensors"))) == 40
