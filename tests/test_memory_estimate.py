"""--estimate_memory: each part equals what the real objects hold, and the CLI stops before loading."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from library.memory_estimate import activation_bytes, optimizer_state_bytes
from test_train_loop import poster_set  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def unet():
    from library.tiny_sdxl import TINY_UNET
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**TINY_UNET).train()


def _real_state_bytes(optimizer) -> int:
    return sum(v.numel() * v.element_size() for state in optimizer.state.values()
               for v in state.values() if torch.is_tensor(v) and v.dim() > 0)  # fmt: skip


@pytest.mark.parametrize("name,args", [("AdamW", {}), ("AdaFactor", {"relative_step": False, "scale_parameter": False,
                                                                     "warmup_init": False, "lr": 1e-3})])
def test_optimizer_state_estimate_equals_the_real_state(unet, name, args):
    from library.optimizers import build_optimizer

    params = list(unet.parameters())
    optimizer = build_optimizer(name, [{"params": params}], 1e-3, {k: v for k, v in args.items() if k != "lr"})
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    estimate, note = optimizer_state_bytes(name, params, {})
    assert note is None
    assert estimate == _real_state_bytes(optimizer)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_meta_activation_count_equals_the_real_forward(unet, checkpointing):
    if checkpointing:
        unet.enable_gradient_checkpointing()
    real = activation_bytes(unet, 2, (8, 8), 77, torch.float32, device="cpu")
    meta_unet = unet.to("meta")
    estimate = activation_bytes(meta_unet, 2, (8, 8), 77, torch.float32)
    # on meta, attention saves what PyTorch's math kernel saves; the CPU's fused kernel saves less,
    # so the estimate may only err high, and by little here
    assert real > 0 and real <= estimate <= 1.1 * real


def test_cli_prints_the_breakdown_without_loading_weights(tiny_sdxl, poster_set, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    command = [sys.executable, "sdxl_train.py", "--pretrained_model_name_or_path", str(tiny_sdxl["single_file"]),
               "--dataset_config", str(poster_set), "--output_dir", str(tmp_path / "o"), "--estimate_memory",
               "--optimizer_type", "AdaFactor", "--gradient_checkpointing"]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for part in ("weights", "gradients", "optimizer state", "activations", "total"):
        assert part in proc.stdout
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset the peak RSS")
@pytest.mark.parametrize("optimizer,checkpointing", [("AdamW", "0"), ("AdaFactor", "1")])
def test_estimate_matches_the_measured_peak_rss_of_a_real_step(optimizer, checkpointing):
    """A real step of the tiny UNet (batch 8, 64x64 latent: activations of 0.2-0.8 GB) in a fresh
    process: the peak RSS growth over the weights is within 20% of the estimate's parts."""
    import json

    command = [sys.executable, str(REPO / "tests" / "memory_probe.py"), optimizer, "8", "64", checkpointing]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    estimate, measured = sum(result["estimate"].values()), result["measured"]
    assert set(result["estimate"]) == {"gradients", "optimizer state", "activations"}
    assert measured > 100 * 2**20  # a step big enough to measure
    assert abs(estimate - measured) <= 0.2 * measured, (estimate, measured, result["estimate"])
