"""library/train_args.py: kohya's command line and TOML config into one frozen TrainConfig."""

from __future__ import annotations

import dataclasses
import shlex

import pytest

from library.errors import ConfigError
from library.train_args import build_parser, parse_args

KOHYA_COMMAND = """
--pretrained_model_name_or_path sd_xl_base_1.0.safetensors --vae sdxl_vae_fp16_fix.safetensors
--in_json meta_lat.json --train_data_dir train_data --output_dir out --output_name poster
--resolution 1024,1024 --train_batch_size 4 --enable_bucket --min_bucket_reso 512 --max_bucket_reso 2048
--bucket_reso_steps 64 --bucket_no_upscale --caption_extension .txt --shuffle_caption --keep_tokens 1
--max_token_length 225 --cache_latents --cache_latents_to_disk --vae_batch_size 4
--max_data_loader_n_workers 2 --persistent_data_loader_workers --seed 42
--mixed_precision bf16 --full_bf16 --save_precision fp16 --no_half_vae --gradient_checkpointing
--gradient_accumulation_steps 2 --max_grad_norm 0 --sdpa
--train_text_encoder --learning_rate 4e-7 --learning_rate_te1 1e-6 --learning_rate_te2 0
--optimizer_type AdaFactor --optimizer_args scale_parameter=False relative_step=False warmup_init=False clip_threshold=1.0
--lr_scheduler constant_with_warmup --lr_warmup_steps 100 --max_train_steps 2000
--noise_offset 0.0357 --min_snr_gamma 5 --loss_type huber --huber_schedule exponential --huber_c 0.2
--sample_every_n_steps 200 --sample_prompts prompts.txt --sample_sampler euler_a
--save_every_n_steps 500 --save_last_n_steps 1500 --save_model_as safetensors --save_state
--logging_dir logs --log_with tensorboard --log_prefix poster
"""


def _parse(text: str, *more: str):
    return parse_args(shlex.split(text) + list(more))


def test_kohya_command_line_parses_to_the_expected_values():
    cfg = _parse(KOHYA_COMMAND)
    assert cfg.pretrained_model_name_or_path == "sd_xl_base_1.0.safetensors" and cfg.vae == "sdxl_vae_fp16_fix.safetensors"
    assert (cfg.resolution, cfg.train_batch_size, cfg.enable_bucket, cfg.min_bucket_reso, cfg.max_bucket_reso) == (
        "1024,1024", 4, True, 512, 2048)  # fmt: skip
    assert (cfg.caption_extension, cfg.shuffle_caption, cfg.keep_tokens, cfg.max_token_length) == (".txt", True, 1, 225)
    assert (cfg.cache_latents, cfg.cache_latents_to_disk, cfg.vae_batch_size, cfg.seed) == (True, True, 4, 42)
    assert (cfg.mixed_precision, cfg.full_bf16, cfg.save_precision, cfg.gradient_accumulation_steps) == ("bf16", True, "fp16", 2)
    assert (cfg.learning_rate, cfg.learning_rate_te1, cfg.learning_rate_te2) == (4e-7, 1e-6, 0.0)
    assert cfg.optimizer_type == "AdaFactor"
    assert cfg.optimizer_args == ("scale_parameter=False", "relative_step=False", "warmup_init=False", "clip_threshold=1.0")
    assert (cfg.lr_scheduler, cfg.lr_warmup_steps, cfg.max_train_steps, cfg.max_grad_norm) == (
        "constant_with_warmup", 100, 2000, 0.0)  # fmt: skip
    assert (cfg.noise_offset, cfg.min_snr_gamma, cfg.loss_type, cfg.huber_schedule, cfg.huber_c) == (
        0.0357, 5.0, "huber", "exponential", 0.2)  # fmt: skip
    assert (cfg.save_every_n_steps, cfg.save_last_n_steps, cfg.save_state, cfg.output_name) == (500, 1500, True, "poster")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.learning_rate = 1.0


def test_defaults_are_kohyas():
    cfg = parse_args(["--pretrained_model_name_or_path", "m", "--output_dir", "o"])
    assert (cfg.learning_rate, cfg.max_train_steps, cfg.train_batch_size, cfg.optimizer_type, cfg.lr_scheduler) == (
        2e-6, 1600, 1, "AdamW", "constant")  # fmt: skip
    assert (cfg.min_bucket_reso, cfg.max_bucket_reso, cfg.bucket_reso_steps, cfg.caption_extension) == (256, 1024, 64, ".caption")
    assert (cfg.mixed_precision, cfg.max_grad_norm, cfg.lr_warmup_steps, cfg.lr_scheduler_num_cycles) == ("no", 1.0, 0, 1)
    assert (cfg.loss_type, cfg.huber_c, cfg.huber_schedule, cfg.multires_noise_discount) == ("l2", 0.1, "snr", 0.3)
    assert cfg.seed == 42  # fixed, so every process of a multi-process run agrees
    assert parse_args(["--pretrained_model_name_or_path", "m", "--output_dir", "o", "--use_8bit_adam"]).optimizer_type == "AdamW8bit"
    assert "--optimizer_args" in build_parser().format_help()


def test_warmup_as_steps_ratio_or_percent():
    base = "--pretrained_model_name_or_path m --output_dir o --lr_scheduler cosine --lr_warmup_steps "
    assert _parse(base + "0.05").lr_warmup_steps == 0.05
    assert _parse(base + "5%").lr_warmup_steps == 0.05
    assert _parse(base + "50").lr_warmup_steps == 50 and isinstance(_parse(base + "50.0").lr_warmup_steps, int)
    with pytest.raises(ConfigError, match="whole steps"):
        _parse(base + "2.5")


def _write(tmp_path, text: str, name: str = "train.toml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


TOML = """
[model_arguments]
pretrained_model_name_or_path = "sdxl.safetensors"

[optimizer_arguments]
optimizer_type = "AdaFactor"
optimizer_args = ["scale_parameter=False", "relative_step=False", "warmup_init=False", "clip_threshold=1.0"]
learning_rate = 4e-7
lr_warmup_steps = 0.1
lr_scheduler = "constant_with_warmup"

[training_arguments]
output_dir = "out"
max_train_steps = 300
resolution = [832, 1216]
block_lr = "1e-6,1e-6,1e-6,1e-6,1e-6,1e-6,1e-6,1e-6,1e-6,1e-6,1e-6,1e-6,0,1e-6,1e-6,1e-6,1e-6,1e-6,1e-6,1e-6,1e-6,1e-6,2e-6"
cache_latents = true
seed = 7
"""


def test_toml_sections_are_flattened_and_the_command_line_wins(tmp_path):
    path = _write(tmp_path, TOML)
    cfg = parse_args(["--config_file", path, "--learning_rate", "1e-6", "--seed", "8"])
    assert cfg.pretrained_model_name_or_path == "sdxl.safetensors" and cfg.optimizer_type == "AdaFactor"
    assert cfg.optimizer_args[-1] == "clip_threshold=1.0" and cfg.lr_warmup_steps == 0.1
    assert (cfg.learning_rate, cfg.seed, cfg.max_train_steps, cfg.resolution) == (1e-6, 8, 300, "832,1216")
    assert len(cfg.block_lr) == 23 and cfg.block_lr[12] == 0.0 and cfg.block_lr[22] == 2e-6
    assert cfg.cache_latents is True and cfg.config_file == path
    assert parse_args(["--config_file", path[:-5]]).learning_rate == 4e-7  # kohya adds .toml
    steps = _write(tmp_path, TOML.replace("lr_warmup_steps = 0.1", "lr_warmup_steps = 100.0"), "steps.toml")
    assert parse_args(["--config_file", steps]).lr_warmup_steps == 100
    assert isinstance(parse_args(["--config_file", steps]).lr_warmup_steps, int)


@pytest.mark.parametrize(
    "text, message",
    [
        ("[optimizer_arguments]\noptimizer_typ = 'AdamW'\n", "unknown key 'optimizer_typ' (did you mean 'optimizer_type'?)"),
        ("learning_rate = 'fast'\n", "'learning_rate' must be a number"),
        ("[a]\nmax_train_steps = 1.5\n", "'max_train_steps' must be an integer"),
        ("[a]\ncache_latents = 1\n", "'cache_latents' must be true or false"),
        ("[a]\noptimizer_args = 'a=1 b=2'\n", "'optimizer_args' must be a list of strings"),
        ("[a]\nmixed_precision = 'bf61'\n", "did you mean 'bf16'"),
        ("[a]\nseed = 1\n[b]\nseed = 2\n", "'seed' is set twice"),
        ("[a]\nseed = = 1\n", "line 2, column"),
    ],
)  # fmt: skip
def test_bad_toml_is_a_config_error_naming_file_and_key(tmp_path, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        parse_args(["--config_file", path, "--pretrained_model_name_or_path", "m", "--output_dir", "o"])
    assert message in str(err.value) and path in str(err.value)


def test_output_config_round_trip(tmp_path):
    out = tmp_path / "effective.toml"
    argv = shlex.split(KOHYA_COMMAND)
    assert parse_args(argv + ["--output_config", "--config_file", str(out)]) is None
    text = out.read_text(encoding="utf-8")
    assert "[optimizer_arguments]" in text and 'optimizer_type = "AdaFactor"' in text and "max_train_steps = 2000" in text
    assert "caption_extension" in text and "min_bucket_reso = 512" in text and "bucket_reso_steps" not in text  # defaults left out
    from_file = parse_args(["--config_file", str(out)])
    direct = parse_args(argv)
    assert dataclasses.replace(from_file, config_file=None) == direct
    with pytest.raises(ConfigError, match="already exists"):
        parse_args(argv + ["--output_config", "--config_file", str(out)])
    assert out.read_text(encoding="utf-8") == text
    assert not [p for p in tmp_path.iterdir() if p.name != "effective.toml"]  # no temp files left


BASE = "--pretrained_model_name_or_path m --output_dir o "


@pytest.mark.parametrize(
    "flags, message",
    [
        ("--full_fp16", "--full_fp16 needs --mixed_precision fp16"),
        ("--full_bf16 --mixed_precision fp16", "--full_bf16 needs --mixed_precision bf16"),
        ("--cache_text_encoder_outputs --shuffle_caption", "cannot go with --shuffle_caption"),
        ("--cache_text_encoder_outputs_to_disk --train_text_encoder", "cannot go with --train_text_encoder"),
        ("--cache_text_encoder_outputs --caption_dropout_rate 0.1", "--caption_dropout_rate"),
        ("--block_lr 1e-6,2e-6", "needs 23 values"),
        ("--train_batch_size 0", "--train_batch_size must be >= 1"),
        ("--learning_rate -1", "--learning_rate must be >= 0"),
        ("--min_snr_gamma 0", "--min_snr_gamma must be > 0"),
        ("--lr_warmup_steps 10", "takes no warm-up"),
        ("--min_timestep 500 --max_timestep 400", "timesteps [500, 400)"),
        ("--optimizer_args weight_decay", "is not key=value"),
        ("--optimizer_typ AdamW", "did you mean '--optimizer_type'"),
        ("--resolution 1024x768", "is not 1024 or width,height"),
        ("--fused_backward_pass --gradient_accumulation_steps 4", "cannot accumulate"),
        ("--fused_backward_clip global", "only applies with --fused_backward_pass"),
        ("--fused_backward_pass --mixed_precision fp16", "use --mixed_precision bf16"),
        ("--lr_scheduler adafactor", "works only with --optimizer_type AdaFactor"),
    ],
)  # fmt: skip
def test_bad_combinations_are_config_errors(flags, message):
    with pytest.raises(ConfigError) as err:
        _parse(BASE + flags)
    assert message in str(err.value)


def test_errors_from_the_toml_name_the_file(tmp_path):
    path = _write(tmp_path, "[a]\nfull_fp16 = true\n")
    with pytest.raises(ConfigError, match=f"{path}: full_fp16"):
        _parse(BASE + f"--config_file {path}")
    assert _parse(BASE + f"--config_file {path} --mixed_precision fp16").full_fp16 is True


def test_fused_backward_pass_is_refused_with_several_processes():
    from types import SimpleNamespace

    from library.train_setup import check_fused_backward

    cfg = _parse(BASE + "--fused_backward_pass")
    check_fused_backward(cfg, SimpleNamespace(num_processes=1))
    with pytest.raises(ConfigError, match="one process only, not 2"):
        check_fused_backward(cfg, SimpleNamespace(num_processes=2))
    check_fused_backward(_parse(BASE), SimpleNamespace(num_processes=2))


def test_kohya_fused_optimizer_groups_implies_the_fused_pass():
    cfg = _parse(BASE + "--fused_optimizer_groups 4")
    assert cfg.fused_backward_pass and cfg.fused_optimizer_groups == 4
    assert not _parse(BASE).fused_backward_pass
    with pytest.raises(ConfigError, match="--fused_optimizer_groups must be >= 0"):
        _parse(BASE + "--fused_optimizer_groups -1")
