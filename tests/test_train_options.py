"""sdxl_train.py options beyond the default path: text encoders, --block_lr, NaN stop, logging,
diffusers output, fused backward."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from library.errors import UserError
from test_train_loop import base_args, poster_set, run_train  # noqa: F401  (poster_set is a fixture)

FAST = ("--max_data_loader_n_workers", "0")


def _changed(before: dict, after: dict, prefix: str) -> tuple[int, int]:
    keys = [k for k in before if k.startswith(prefix)]
    return sum(not torch.equal(before[k], after[k]) for k in keys), len(keys)


def test_train_text_encoder_with_te1_frozen_by_zero_rate(tiny_sdxl, poster_set, tmp_path):
    out = tmp_path / "te"
    args = base_args(tiny_sdxl, poster_set, out, 2, "--train_text_encoder", "--learning_rate_te1", "0",
                     "--learning_rate_te2", "1e-3", *FAST)
    assert run_train(args) == 0
    before, after = load_file(str(tiny_sdxl["single_file"])), load_file(str(out / "poster.safetensors"))
    assert _changed(before, after, "conditioner.embedders.0.")[0] == 0
    changed, total = _changed(before, after, "conditioner.embedders.1.model.transformer.")
    assert changed > total // 2


def test_block_lr_zero_freezes_those_blocks(tiny_sdxl, poster_set, tmp_path):
    out = tmp_path / "blocks"
    rates = ["1e-3"] * 23
    for frozen in (0, 1, 10, 22):  # embeddings, input_blocks.0 (conv_in), middle_block.0, out
        rates[frozen] = "0"
    assert run_train(base_args(tiny_sdxl, poster_set, out, 2, "--block_lr", ",".join(rates), *FAST)) == 0
    before, after = load_file(str(tiny_sdxl["single_file"])), load_file(str(out / "poster.safetensors"))
    unet = "model.diffusion_model."
    for prefix in ("time_embed.", "label_emb.", "input_blocks.0.", "middle_block.0.", "out."):
        assert _changed(before, after, unet + prefix)[0] == 0, prefix
    for prefix in ("input_blocks.4.", "middle_block.1.", "output_blocks.8."):
        assert _changed(before, after, unet + prefix)[0] > 0, prefix


def test_nan_loss_stops_with_a_clear_message_and_a_saved_state(tiny_sdxl, poster_set, tmp_path):
    out = tmp_path / "nan"
    args = base_args(tiny_sdxl, poster_set, out, 5, *FAST)
    args[args.index("--optimizer_type") + 1] = "SGDNesterov"
    index = args.index("--optimizer_args")
    del args[index:index + 5]
    args[args.index("--learning_rate") + 1] = "1e30"
    with pytest.raises(UserError, match="loss became"):
        run_train(args)
    assert (out / "poster-nan-state" / "train_state.json").is_file()
    assert not (out / "poster.safetensors").exists()


def test_tensorboard_logs_are_written(tiny_sdxl, poster_set, tmp_path):
    out = tmp_path / "logged"
    logs = tmp_path / "logs"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a poster --d 1 --s 2 --w 64 --h 64\n", encoding="utf-8")
    assert run_train(base_args(tiny_sdxl, poster_set, out, 2, "--logging_dir", str(logs), "--log_with",
                               "tensorboard", "--sample_prompts", str(prompts), "--sample_every_n_steps", "2",
                               *FAST)) == 0
    events = list(logs.rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [1, 2]
    assert acc.Images("samples/00")[0].step == 2


def test_diffusers_output_and_fp16_precision(tiny_sdxl, poster_set, tmp_path):
    out = tmp_path / "diffusers_out"
    assert run_train(base_args(tiny_sdxl, poster_set, out, 1, "--save_model_as", "diffusers",
                               "--save_precision", "fp16", *FAST)) == 0
    unet = load_file(str(out / "poster" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert {t.dtype for t in unet.values()} == {torch.float16}
    assert (out / "poster" / "tokenizer_2").is_dir()


def test_fused_backward_matches_the_plain_step(tiny_sdxl, poster_set, tmp_path):
    """Without clipping the fused step is the same update (with --max_grad_norm it clips each tensor
    on its own, as kohya's fused pass does, so it is not compared there)."""
    plain, fused = tmp_path / "plain", tmp_path / "fused"
    no_clip = ("--max_grad_norm", "0", *FAST)
    assert run_train(base_args(tiny_sdxl, poster_set, plain, 2, *no_clip)) == 0
    assert run_train(base_args(tiny_sdxl, poster_set, fused, 2, "--fused_backward_pass", *no_clip)) == 0
    a, b = load_file(str(plain / "poster.safetensors")), load_file(str(fused / "poster.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(a[k], load_file(str(tiny_sdxl["single_file"]))[k]) for k in a)


def test_fused_backward_with_global_clipping_matches_the_clipped_plain_step(tiny_sdxl, poster_set, tmp_path):
    """--fused_backward_clip global: two backward passes (the first only measures the norm), the same
    weights as clip_grad_norm_ + step; with gradient checkpointing, whose recomputation runs twice."""
    plain, fused = tmp_path / "plain", tmp_path / "fused"
    clip = ("--max_grad_norm", "0.01", "--gradient_checkpointing", *FAST)
    assert run_train(base_args(tiny_sdxl, poster_set, plain, 2, *clip)) == 0
    assert run_train(base_args(tiny_sdxl, poster_set, fused, 2, "--fused_backward_pass",
                               "--fused_backward_clip", "global", *clip)) == 0  # fmt: skip
    a, b = load_file(str(plain / "poster.safetensors")), load_file(str(fused / "poster.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    groups = tmp_path / "groups"  # kohya's --fused_optimizer_groups: the same update, stepped per group
    assert run_train(base_args(tiny_sdxl, poster_set, groups, 2, "--fused_optimizer_groups", "3",
                               "--fused_backward_clip", "global", *clip)) == 0  # fmt: skip
    g = load_file(str(groups / "poster.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], g[key], rtol=1e-5, atol=1e-6)
    per_tensor = tmp_path / "per_tensor"
    assert run_train(base_args(tiny_sdxl, poster_set, per_tensor, 2, "--fused_backward_pass", *clip)) == 0
    c = load_file(str(per_tensor / "poster.safetensors"))
    assert any(not torch.allclose(a[k], c[k], rtol=1e-5, atol=1e-6) for k in a)  # the clipping really differs


@pytest.mark.parametrize("cache", [True, False])
def test_alpha_mask_fully_transparent_images_teach_nothing(tiny_sdxl, tmp_path, cache):
    """With alpha_mask, a fully transparent image contributes zero loss: Adafactor (no weight decay)
    leaves every weight bit-identical; without alpha_mask the same images train."""
    import numpy as np
    from PIL import Image

    images = tmp_path / "cutouts"
    images.mkdir()
    for i in range(2):
        rgba = np.zeros((64, 64, 4), dtype=np.uint8)
        rgba[..., :3] = np.random.default_rng(i).integers(0, 256, (64, 64, 3))  # alpha 0 everywhere
        Image.fromarray(rgba, "RGBA").save(images / f"c{i}.png")
        (images / f"c{i}.caption").write_text("a product cutout", encoding="utf-8")
    base = load_file(str(tiny_sdxl["single_file"]))
    results = {}
    for masked in (True, False):
        toml = tmp_path / f"d{masked}.toml"
        toml.write_text("[[datasets]]\nresolution = 64\nbatch_size = 2\n\n  [[datasets.subsets]]\n"
                        f"  image_dir = \"{images.as_posix()}\"\n  caption_extension = \".caption\"\n"
                        f"  alpha_mask = {str(masked).lower()}\n", encoding="utf-8")  # fmt: skip
        out = tmp_path / f"out{masked}"
        args = base_args(tiny_sdxl, toml, out, 2, *FAST)
        if not cache:
            args.remove("--cache_latents_to_disk")
        assert run_train(args) == 0
        results[masked] = load_file(str(out / "poster.safetensors"))
    unet = [k for k in base if k.startswith("model.diffusion_model.")]
    assert all(torch.equal(results[True][k], base[k]) for k in unet)
    assert any(not torch.equal(results[False][k], base[k]) for k in unet)


def test_validation_loss_is_deterministic_and_held_out_images_are_not_trained(tiny_sdxl, poster_set, tmp_path):
    import json

    from library.config_util import load_dataset_config

    toml = tmp_path / "val.toml"
    text = poster_set.read_text(encoding="utf-8").replace("enable_bucket = true\n",
                                                          "enable_bucket = true\nvalidation_split = 0.34\nvalidation_seed = 5\n")
    toml.write_text(text, encoding="utf-8")
    assert load_dataset_config(toml).datasets[0].validation_split == 0.34
    report = tmp_path / "report"
    logs = tmp_path / "logs"
    import os

    os.environ["SDXL_POSTER_RANK_REPORT"] = str(report)
    try:
        assert run_train(base_args(tiny_sdxl, toml, tmp_path / "v", 4, "--validate_every_n_steps", "2",
                                   "--logging_dir", str(logs), "--learning_rate", "0", *FAST)) == 0
    finally:
        del os.environ["SDXL_POSTER_RANK_REPORT"]
    seen = set(json.loads((report / "rank0.json").read_text())["images"])
    assert len(seen) == 4  # 6 posters, 2 held out
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(next(logs.rglob("events.out.tfevents.*")).parent))
    acc.Reload()
    values = [e.value for e in acc.Scalars("loss/validation")]
    assert [e.step for e in acc.Scalars("loss/validation")] == [2, 4]
    assert values[0] == values[1] > 0  # learning rate 0: same weights, same number
    assert "loss/validation_t500" in acc.Tags()["scalars"]


def test_validation_does_not_disturb_training(tiny_sdxl, poster_set, tmp_path):
    toml = tmp_path / "val.toml"
    toml.write_text(poster_set.read_text(encoding="utf-8").replace(
        "enable_bucket = true\n", "enable_bucket = true\nvalidation_split = 0.34\n"), encoding="utf-8")
    with_val, without = tmp_path / "with", tmp_path / "without"
    assert run_train(base_args(tiny_sdxl, toml, with_val, 3, "--validate_every_n_steps", "1", *FAST)) == 0
    assert run_train(base_args(tiny_sdxl, toml, without, 3, *FAST)) == 0
    a, b = load_file(str(with_val / "poster.safetensors")), load_file(str(without / "poster.safetensors"))
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_samples_are_scored_with_the_evaluation_scorer(tiny_sdxl, poster_set, tmp_path):
    import csv

    from PIL import Image

    from library.evaluation.scoring import Scorer
    from library.evaluation.tiny_clip import make_random_aesthetic, make_tiny_clip

    clip_dir = make_tiny_clip(tmp_path / "clip")
    aesthetic = make_random_aesthetic(tmp_path / "aesthetic.safetensors", input_size=16)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red poster --d 1 --s 2 --w 64 --h 64\na blue poster --d 2 --s 2 --w 64 --h 64\n")
    out = tmp_path / "scored"
    assert run_train(base_args(tiny_sdxl, poster_set, out, 2, "--sample_prompts", str(prompts),
                               "--sample_every_n_steps", "1", "--sample_score_clip_model", str(clip_dir),
                               "--sample_score_aesthetic_model", str(aesthetic), *FAST)) == 0
    rows = list(csv.DictReader((out / "sample" / "scores.csv").open(encoding="utf-8")))
    assert [r["step"] for r in rows] == ["1", "1", "2", "2"]
    scorer = Scorer(str(clip_dir), str(aesthetic), device="cpu")
    last = rows[-1]
    image = Image.open(out / "sample" / last["file"]).convert("RGB")
    clip, score = scorer.score([image], [last["prompt"]])
    assert abs(float(last["clip_score"]) - clip[0]) < 1e-5
    assert abs(float(last["aesthetic_score"]) - score[0]) < 1e-5
