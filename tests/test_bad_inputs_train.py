"""Bad-input corpus for ``sdxl_train.py``: bad flags, TOML files, models, output folders and data.

Each case runs the real script as a subprocess. Most stop while the options are parsed (well under a
second); the model cases stop while the checkpoint is read; one case trains a single step on a
folder mixing broken and odd images, which must be skipped (named and counted) or used.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

import bad_inputs as B

TRAIN = "sdxl_train.py"


def base(tiny_sdxl, out: Path, model: Path | None = None) -> list:
    return ["--pretrained_model_name_or_path", model or tiny_sdxl["single_file"],
            "--tokenizer_cache_dir", tiny_sdxl["tokenizers"], "--output_dir", out, "--output_name", "poster",
            "--max_train_steps", "1", "--learning_rate", "1e-4"]  # fmt: skip


def dataset_toml(path: Path, image_dir: Path, extra_dataset: str = "", extra_subset: str = "") -> Path:
    path.write_text(
        "[[datasets]]\nresolution = 64\nbatch_size = 1\nenable_bucket = true\nmin_bucket_reso = 32\n"
        f"max_bucket_reso = 128\nbucket_reso_steps = 32\n{extra_dataset}\n"
        f"  [[datasets.subsets]]\n  image_dir = \"{image_dir.as_posix()}\"\n  caption_extension = \".caption\"\n"
        f"{extra_subset}\n",
        encoding="utf-8",
    )
    return path


@pytest.fixture(scope="module")
def posters(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("posters")
    images = root / "images"
    images.mkdir()
    for i in range(2):
        B.good_png(images / f"p{i}.png", seed=i)
        (images / f"p{i}.caption").write_text(f"a movie poster number {i}", encoding="utf-8")
    return dataset_toml(root / "dataset.toml", images)


# --- options: --config_file and flags (fail while parsing) ----------------------------------------

CONFIG_CASES = {  # id -> (config file text, words the error line must hold besides the file name)
    "toml-syntax": ("learning_rate = 1e-4\n[model_arguments\n", ["line 2"]),
    "unknown-key": ("[training_arguments]\nlearning_rat = 1e-4\n", ["learning_rat", "learning_rate"]),
    "wrong-type": ("train_batch_size = \"two\"\n", ["train_batch_size", "integer"]),
    "zero-steps": ("pretrained_model_name_or_path = \"m.safetensors\"\noutput_dir = \"out\"\nmax_train_steps = 0\n",
                   ["max_train_steps", ">= 1"]),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_config_file_errors(case, tmp_path):
    text, words = CONFIG_CASES[case]
    config = tmp_path / "train.toml"
    config.write_text(text, encoding="utf-8")
    result = B.run_cli(TRAIN, ["--config_file", config], inputs=[config])
    B.assert_user_error(result, str(config), *words)


FLAG_CASES = {  # id -> (flags, words the error line must hold)
    "negative-learning-rate": (["--learning_rate", "-1"], ["--learning_rate", ">= 0"]),
    "zero-batch": (["--train_batch_size", "0"], ["--train_batch_size", ">= 1"]),
    "zero-accumulation": (["--gradient_accumulation_steps", "0"], ["--gradient_accumulation_steps"]),
    "negative-save-every": (["--save_every_n_steps", "-3"], ["--save_every_n_steps"]),
    "zero-resolution": (["--resolution", "0"], ["--resolution"]),
    "zero-min-snr-gamma": (["--min_snr_gamma", "0"], ["--min_snr_gamma", "> 0"]),
}


@pytest.mark.parametrize("case", sorted(FLAG_CASES))
def test_flag_errors(case, tiny_sdxl, posters, tmp_path):
    flags, words = FLAG_CASES[case]
    args = [*base(tiny_sdxl, tmp_path / "out"), "--dataset_config", posters, *flags]
    result = B.run_cli(TRAIN, args, inputs=[posters.parent, tiny_sdxl["single_file"]])
    B.assert_user_error(result, *words)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["is-a-file", "under-a-file"])
def test_output_dir_blocked_by_a_file(where, tiny_sdxl, posters, tmp_path):
    """As root a read-only folder is still writable, so the blocked case is a file in the way."""
    blocker = tmp_path / "taken"
    blocker.write_text("not a folder", encoding="utf-8")
    out = blocker if where == "is-a-file" else blocker / "run1"
    result = B.run_cli(TRAIN, [*base(tiny_sdxl, out), "--dataset_config", posters],
                       inputs=[posters.parent, blocker])  # fmt: skip
    B.assert_user_error(result, "--output_dir", str(blocker), "not a folder")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root writes into read-only folders, so the check cannot be provoked as root")
def test_output_dir_read_only(tiny_sdxl, posters, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        result = B.run_cli(TRAIN, [*base(tiny_sdxl, locked / "run1"), "--dataset_config", posters],
                           inputs=[posters.parent])  # fmt: skip
    finally:
        locked.chmod(0o755)
    B.assert_user_error(result, "--output_dir", str(locked), "not writable")


def test_prompt_file_with_bad_inline_option(tiny_sdxl, posters, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a movie poster --w 64 --h 64\na cat poster --w 64 --q 5\n", encoding="utf-8")
    args = [*base(tiny_sdxl, tmp_path / "out"), "--dataset_config", posters, "--sample_prompts", prompts,
            "--sample_every_n_steps", "1"]  # fmt: skip
    result = B.run_cli(TRAIN, args, inputs=[posters.parent, prompts])
    B.assert_user_error(result, f"{prompts}:2", "--q")


# --- models (fail while the checkpoint is read) ---------------------------------------------------


def test_sd1_checkpoint_given_as_sdxl(tiny_sdxl, posters, tmp_path):
    model = B.sd1_checkpoint(tmp_path / "sd15.safetensors")
    result = B.run_cli(TRAIN, [*base(tiny_sdxl, tmp_path / "out", model), "--dataset_config", posters],
                       inputs=[model, posters.parent])  # fmt: skip
    B.assert_user_error(result, str(model), "1.x", "not SDXL")


def test_truncated_safetensors(tiny_sdxl, posters, tmp_path):
    model = B.truncated_safetensors(tiny_sdxl["single_file"], tmp_path / "cut.safetensors")
    result = B.run_cli(TRAIN, [*base(tiny_sdxl, tmp_path / "out", model), "--dataset_config", posters],
                       inputs=[model, posters.parent])  # fmt: skip
    B.assert_user_error(result, str(model), "truncated")


def test_vae_of_the_wrong_shape(tiny_sdxl, posters, tmp_path):
    vae = B.wrong_shape_vae(tmp_path / "other_vae.safetensors")
    args = [*base(tiny_sdxl, tmp_path / "out"), "--dataset_config", posters, "--vae", vae]
    result = B.run_cli(TRAIN, args, inputs=[vae, posters.parent, tiny_sdxl["single_file"]])
    B.assert_user_error(result, str(vae), "VAE shape")


# --- the dataset TOML (checked after the models are loaded: see the report) ------------------------


def test_dataset_toml_zero_repeats(tiny_sdxl, posters, tmp_path):
    toml = dataset_toml(tmp_path / "dataset.toml", posters.parent / "images", extra_subset="  num_repeats = 0\n")
    result = B.run_cli(TRAIN, [*base(tiny_sdxl, tmp_path / "out"), "--dataset_config", toml],
                       inputs=[toml, posters.parent])  # fmt: skip
    B.assert_user_error(result, str(toml), "datasets[0].subsets[0]", "num_repeats")


# --- one step on a folder of broken, odd and uncaptioned images ------------------------------------


@pytest.fixture(scope="module")
def mixed_run(tiny_sdxl, tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed_train")
    images = root / "images"
    images.mkdir()
    B.good_png(images / "good.png")
    (images / "good.caption").write_text("a movie poster", encoding="utf-8")
    B.cmyk_jpeg(images / "cmyk.jpg")
    (images / "cmyk.caption").write_text("", encoding="utf-8")  # empty caption
    B.png16(images / "deep16.png")  # no caption file at all
    B.palette_transparent_png(images / "palette.png")
    B.exif_rotated_jpeg(images / "rotated.jpg")
    for name in ("palette", "rotated"):
        (images / f"{name}.caption").write_text(f"a {name} poster", encoding="utf-8")
    B.zero_byte(images / "zero.jpg")
    B.truncated(images / "cut.jpg", "JPEG")
    B.text_as_image(images / "html.jpg")
    B.bomb_header_png(images / "bomb.png")
    toml = dataset_toml(root / "dataset.toml", images)
    out = root / "out"
    args = [*base(tiny_sdxl, out), "--dataset_config", toml, "--cache_latents_to_disk"]
    result = B.run_cli(TRAIN, args, inputs=[images, toml, tiny_sdxl["single_file"]])
    return images, out, B.assert_handled(result)


def test_training_skips_broken_images_and_names_them(mixed_run):
    images, out, output = mixed_run
    assert (out / "poster.safetensors").is_file()
    for name in ("zero.jpg", "cut.jpg", "html.jpg", "bomb.png"):
        assert re.search(rf"skipped \S*{re.escape(name)}: ", output), (name, output)
    assert "skipped 3 unreadable" in output  # zero, html, bomb at the header scan; cut.jpg when cached


def test_training_warns_about_missing_and_empty_captions(mixed_run):
    _, _, output = mixed_run
    # cmyk (empty), deep16 (no file) and cut.jpg (no file; found truncated only when its latents are cached)
    assert "subsets[0]: 3 of 6 images have no caption" in output


@pytest.mark.parametrize("name", ["cmyk.jpg", "deep16.png", "palette.png", "rotated.jpg"])
def test_training_caches_odd_but_usable_images(mixed_run, name):
    images, _, _ = mixed_run
    assert list(images.glob(f"{name}.*x*.sdxl-latents.safetensors")), sorted(p.name for p in images.iterdir())


def test_training_uses_exif_rotated_photo_upright(mixed_run):
    images, _, _ = mixed_run
    (entry,) = images.glob("rotated.jpg.*x*.sdxl-latents.safetensors")
    width, height = map(int, re.search(r"\.(\d+)x(\d+)\.sdxl-latents", entry.name).groups())
    assert height > width


def test_strict_stops_at_the_first_unreadable_image(mixed_run, tiny_sdxl, tmp_path):
    images, _, _ = mixed_run
    toml = dataset_toml(tmp_path / "dataset.toml", images)
    args = [*base(tiny_sdxl, tmp_path / "out"), "--dataset_config", toml, "--cache_latents_to_disk", "--strict"]
    line = B.assert_user_error(B.run_cli(TRAIN, args, [images]), "cannot read image")
    assert any(name in line for name in ("zero.jpg", "html.jpg", "bomb.png", "cut.jpg")), line
    assert not (tmp_path / "out" / "poster.safetensors").exists()


def test_image_that_breaks_after_start_up_stops_with_a_state_that_resumes(tiny_sdxl, tmp_path):
    """Without cached latents images are decoded while training: a body truncated after the header
    (start-up reads headers only) stops every process at that batch with one line naming the file and
    a saved state; after the file is fixed, --resume finishes the run."""
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        B.good_png(images / f"p{i}.png", seed=i)
        (images / f"p{i}.caption").write_text(f"a movie poster number {i}", encoding="utf-8")
    broken = images / "p1.png"
    data = broken.read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    toml = dataset_toml(tmp_path / "dataset.toml", images)
    out = tmp_path / "out"
    args = [*base(tiny_sdxl, out), "--dataset_config", toml, "--max_train_steps", "4",
            "--max_data_loader_n_workers", "2"]  # fmt: skip
    line = B.assert_user_error(B.run_cli(TRAIN, args, [images], timeout=300), str(broken), "truncated",
                               "the last good state was saved")  # fmt: skip
    assert "-unreadable-state" in line
    state = out / "poster-unreadable-state"
    assert (state / "train_state.json").is_file()
    B.good_png(broken, seed=1)
    result = B.run_cli(TRAIN, [*args, "--resume", state], [images], timeout=300)
    assert result.code == 0, result.stderr[-2000:]
    assert (out / "poster.safetensors").is_file()
