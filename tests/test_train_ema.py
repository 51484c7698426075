"""--ema: the saved weights are the moving average of the raw weights, and resume continues it."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from test_train_loop import base_args, poster_set, run_train  # noqa: F401  (poster_set is a fixture)

FAST = ("--max_data_loader_n_workers", "0")
DECAY = 0.5


def test_ema_weights_are_the_average_of_the_raw_steps(tiny_sdxl, poster_set, tmp_path):
    out = tmp_path / "ema"
    assert run_train(base_args(tiny_sdxl, poster_set, out, 2, "--ema", "--ema_decay", str(DECAY),
                               "--save_raw_with_ema", "--save_every_n_steps", "1", *FAST)) == 0
    w0 = load_file(str(tiny_sdxl["single_file"]))
    w1 = load_file(str(out / "poster-raw-step00000001.safetensors"))
    w2 = load_file(str(out / "poster-raw-step00000002.safetensors"))
    ema = load_file(str(out / "poster.safetensors"))
    ema1 = load_file(str(out / "poster-step00000001.safetensors"))
    key = "model.diffusion_model.out.2.weight"
    assert not torch.equal(w1[key], w2[key])
    for name in (k for k in w0 if k.startswith("model.diffusion_model.")):
        expected1 = DECAY * w0[name] + (1 - DECAY) * w1[name]
        expected2 = DECAY * expected1 + (1 - DECAY) * w2[name]
        torch.testing.assert_close(ema1[name], expected1, rtol=0, atol=1e-6)
        torch.testing.assert_close(ema[name], expected2, rtol=0, atol=1e-6)
    assert torch.equal(ema["first_stage_model.encoder.conv_in.weight"], w0["first_stage_model.encoder.conv_in.weight"])


def test_ema_resumes_exactly(tiny_sdxl, poster_set, tmp_path):
    ema = ("--ema", "--ema_decay", str(DECAY), *FAST)
    first, second, straight = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert run_train(base_args(tiny_sdxl, poster_set, first, 2, "--save_state", *ema)) == 0
    assert (first / "poster-state" / "ema.safetensors").is_file()
    assert run_train(base_args(tiny_sdxl, poster_set, second, 4, "--resume", str(first / "poster-state"), *ema)) == 0
    assert run_train(base_args(tiny_sdxl, poster_set, straight, 4, *ema)) == 0
    a, b = load_file(str(second / "poster.safetensors")), load_file(str(straight / "poster.safetensors"))
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
