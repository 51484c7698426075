"""sdxl_train.py end to end on the tiny SDXL: exact resume, saving, retention, sampling, VAE swap."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from library.demo_data import make_demo_dataset

STEPS = 4


@pytest.fixture(scope="module")
def poster_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("posters")
    meta = make_demo_dataset(root, count=6, seed=3)
    toml = root / "dataset.toml"
    toml.write_text(
        "[general]\nshuffle_caption = true\nkeep_tokens = 1\n\n"
        "[[datasets]]\nresolution = 64\nbatch_size = 2\nenable_bucket = true\nmin_bucket_reso = 32\nmax_bucket_reso = 128\n"
        "bucket_reso_steps = 32\n\n"
        f"  [[datasets.subsets]]\n  image_dir = \"{(root / 'images').as_posix()}\"\n"
        f"  metadata_file = \"{meta.as_posix()}\"\n",
        encoding="utf-8",
    )
    return toml


def run_train(args: list[str]) -> int:
    """Run the recipe in this process (accelerate's singleton state reset between runs)."""
    from accelerate.state import AcceleratorState

    import sdxl_train

    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        return sdxl_train.main(args)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def base_args(tiny_sdxl, dataset_toml, out: Path, steps: int, *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(tiny_sdxl["single_file"]),
        "--tokenizer_cache_dir", str(tiny_sdxl["tokenizers"]),
        "--dataset_config", str(dataset_toml),
        "--output_dir", str(out), "--output_name", "poster",
        "--cache_latents_to_disk",
        "--optimizer_type", "AdaFactor",
        "--optimizer_args", "scale_parameter=False", "relative_step=False", "warmup_init=False", "clip_threshold=1.0",
        "--learning_rate", "1e-3", "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "1",
        "--max_train_steps", str(steps), "--noise_offset", "0.05", "--seed", "7",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def straight_run(tiny_sdxl, poster_set, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    assert run_train(base_args(tiny_sdxl, poster_set, out, STEPS, "--save_every_n_steps", "1",
                               "--save_last_n_steps", "2", "--save_state")) == 0
    return out


def test_final_and_step_files_with_retention(straight_run):
    names = sorted(p.name for p in straight_run.iterdir() if not p.name.startswith("."))
    assert "poster.safetensors" in names
    steps = [n for n in names if n.startswith("poster-step") and n.endswith(".safetensors")]
    states = [n for n in names if n.startswith("poster-step") and n.endswith("-state")]
    # --save_last_n_steps 2 at step 4 keeps the saves of steps 3 and 4
    assert steps == ["poster-step00000003.safetensors", "poster-step00000004.safetensors"]
    assert states == ["poster-step00000003-state", "poster-step00000004-state"]
    assert "poster-state" in names  # --save_state also saves the final state


def test_training_changed_the_unet_but_not_the_vae(straight_run, tiny_sdxl):
    before = load_file(str(tiny_sdxl["single_file"]))
    after = load_file(str(straight_run / "poster.safetensors"))
    assert before.keys() == after.keys()
    unet_keys = [k for k in before if k.startswith("model.diffusion_model.")]
    changed = sum(not torch.equal(before[k], after[k]) for k in unet_keys)
    assert changed > len(unet_keys) // 2
    for key in (k for k in before if k.startswith(("first_stage_model.", "conditioner."))):
        assert torch.equal(before[key], after[key]), key


def test_single_file_saved_mid_run_loads_through_load_target_model(straight_run, tiny_sdxl):
    from library.sdxl_train_util import load_target_model

    models = load_target_model(str(straight_run / "poster-step00000003.safetensors"),
                               tokenizer_cache_dir=str(tiny_sdxl["tokenizers"]))
    saved = load_file(str(straight_run / "poster-step00000003.safetensors"))
    weight = models.unet.state_dict()["conv_out.weight"]
    assert torch.equal(weight, saved["model.diffusion_model.out.2.weight"])


def test_resume_continues_exactly(straight_run, tiny_sdxl, poster_set, tmp_path):
    """A run of 2 steps resumed for 2 more gives bit-identical weights to a straight 4-step run."""
    first = tmp_path / "first"
    assert run_train(base_args(tiny_sdxl, poster_set, first, 2, "--save_state")) == 0
    state = first / "poster-state"
    assert json.loads((state / "train_state.json").read_text())["global_step"] == 2
    second = tmp_path / "second"
    assert run_train(base_args(tiny_sdxl, poster_set, second, STEPS, "--resume", str(state))) == 0
    straight = load_file(str(straight_run / "poster.safetensors"))
    resumed = load_file(str(second / "poster.safetensors"))
    assert straight.keys() == resumed.keys()
    different = [k for k in straight if not torch.equal(straight[k], resumed[k])]
    assert different == []


def test_vae_flag_trains_on_the_swapped_vae_latents(tiny_sdxl, poster_set, tmp_path):
    from library.fingerprint import module_fingerprint
    from library.latent_cache import read_entry_metadata
    from library.sdxl_train_util import load_vae

    out = tmp_path / "vae"
    assert run_train(base_args(tiny_sdxl, poster_set, out, 1, "--vae", str(tiny_sdxl["vae_fix"]))) == 0
    entries = list((poster_set.parent / "images").glob("*.sdxl-latents.safetensors"))
    assert entries
    fixed_id = module_fingerprint(load_vae(str(tiny_sdxl["vae_fix"])))
    ids = {read_entry_metadata(path)["vae"] for path in entries}
    assert fixed_id in ids
    saved = load_file(str(out / "poster.safetensors"))
    fixed = load_file(str(tiny_sdxl["vae_fix"]))
    assert all(torch.equal(saved[f"first_stage_model.{k}"], v) for k, v in fixed.items())


def test_samples_are_written_during_training(tiny_sdxl, poster_set, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a movie poster --np basic --d 3 --s 2 --w 64 --h 64\n", encoding="utf-8")
    out = tmp_path / "samples"
    assert run_train(base_args(tiny_sdxl, poster_set, out, 2, "--sample_every_n_steps", "2",
                               "--sample_prompts", str(prompts), "--sample_at_first")) == 0
    images = sorted(p.name for p in (out / "sample").glob("*.png"))
    assert len(images) == 2 and images[0].startswith("poster_") and "000002" in images[1]
