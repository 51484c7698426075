"""Sampling during training: prompt files (.txt/.toml/.json), sampler names, sample files, seeds, RNG and
train/eval mode left as they were, batched generation for tools/evaluate.py. Tiny SDXL, 64x64, 2 steps."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

import library.sampling as sampling
from library.errors import ConfigError
from library.presets import negative_preset
from library.sample_prompts import SamplePrompt, load_prompts, parse_prompt_text
from library.samplers import ALIASES, SAMPLER_NAMES, SAMPLERS, build_scheduler, check_sampler
from library.sampling import (
    build_pipeline,
    derive_seed,
    generate_images,
    generate_samples,
    plan_batches,
    resolve_settings,
    sample_file_name,
)


@pytest.fixture(scope="module")
def models(tiny_sdxl):
    from library.sdxl_train_util import load_target_model

    return load_target_model(str(tiny_sdxl["diffusers"]))


def pixels(image_or_path) -> np.ndarray:
    image = Image.open(image_or_path) if not isinstance(image_or_path, Image.Image) else image_or_path
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --- prompt files ---------------------------------------------------------------------------------


def test_txt_prompts_with_every_inline_option(tmp_path):
    path = write(tmp_path, "prompts.txt", (
        "# comment line\n"
        "\n"
        "a movie poster, blue gradient --n blurry, text --w 832 --h 1216 --d 42 --s 20 --l 6.5 --ss k_euler\n"
        "  a cat  --np basic+non_adult --n ugly\n"
        "poster --W 512 --SS DPMSolver++ --n {preset:non_adult}, dark\n"
        "plain #hashtag prompt, a--b\n"
    ))  # fmt: skip
    first, second, third, fourth = load_prompts(path)
    assert first == SamplePrompt(prompt="a movie poster, blue gradient", negative_prompt="blurry, text", width=832,
                                 height=1216, seed=42, steps=20, scale=6.5, sampler="euler", source=f"{path}:3")
    assert (second.prompt, second.negative_prompt, second.negative_preset) == ("a cat", "ugly", "basic+non_adult")
    assert second.negative() == "ugly, " + negative_preset("basic+non_adult").replace("ugly, ", "")  # no repeat
    assert (third.width, third.sampler, third.negative_prompt) == (512, "dpmsolver++", "nsfw, nude, censored, dark")
    assert fourth == SamplePrompt(prompt="plain #hashtag prompt, a--b", source=f"{path}:6")
    # the run's default preset applies only to prompts naming neither --n nor --np
    assert fourth.negative("non_adult") == "nsfw, nude, censored" and fourth.negative() == ""
    assert first.negative("non_adult") == "blurry, text"


@pytest.mark.parametrize("line, message", [
    ("a cat --q 1", "unknown option --q"),
    ("a cat --ww 512", "unknown option --ww (did you mean --w?)"),
    ("a cat --w abc", "--w must be a whole number, got 'abc'"),
    ("a cat --h 4", "--h must be between 8 and 8192"),
    ("a cat --d -1", "--d must be between 0"),
    ("a cat --s 0", "--s must be between 1 and 1000"),
    ("a cat --l high", "--l must be a number"),
    ("a cat --ss eular_a", "unknown sampler 'eular_a' (did you mean euler_a?)"),
    ("a cat --np basik", "unknown negative preset 'basik'"),
    ("a cat --n {preset:nope}", "unknown negative preset 'nope'"),
    ("a cat --n", "option --n has no value"),
    ("a cat --w 64 --w 128", "option --w is given twice"),
    ("--n blurry --d 1", "no prompt text before the options"),
])  # fmt: skip
def test_txt_errors_name_file_and_line(tmp_path, line, message):
    path = write(tmp_path, "prompts.txt", f"# samples\nfine prompt --d 1\n{line}\n")
    with pytest.raises(ConfigError) as caught:
        load_prompts(path)
    assert str(caught.value).startswith(f"{path}:3: ")
    assert message in str(caught.value)


def test_toml_and_json_formats_give_the_same_prompts(tmp_path):
    expected = [
        SamplePrompt(prompt="a poster", negative_prompt="blurry", width=832, height=1216, seed=1, steps=20,
                     scale=6.0, sampler="dpmsolver++", negative_preset="non_adult"),
        SamplePrompt(prompt="a cat", seed=2, steps=20, scale=7),
    ]  # fmt: skip
    toml_list = write(tmp_path, "p.toml", (
        '[[prompt]]\nprompt = "a poster"\nnegative_prompt = "blurry"\nwidth = 832\nheight = 1216\nseed = 1\n'
        'sample_steps = 20\nscale = 6\nsample_sampler = "dpmsolver++"\nnegative_preset = "non_adult"\n'
        '[[prompt]]\nprompt = "a cat"\nseed = 2\nsample_steps = 20\nscale = 7\n'
    ))  # fmt: skip
    kohya_toml = write(tmp_path, "k.toml", (  # kohya's layout: [prompt] defaults + [[prompt.subset]]
        '[prompt]\nsample_steps = 20\nscale = 7\n'
        '[[prompt.subset]]\nprompt = "a poster"\nnegative_prompt = "blurry"\nwidth = 832\nheight = 1216\n'
        'seed = 1\nscale = 6.0\nsample_sampler = "DPMSOLVER++"\nnegative_preset = "non_adult"\n'
        '[[prompt.subset]]\nprompt = "a cat"\nseed = 2\n'
    ))  # fmt: skip
    as_json = write(tmp_path, "p.json", json.dumps([
        {"prompt": "a poster", "negative_prompt": "blurry", "width": 832, "height": 1216, "seed": 1,
         "sample_steps": 20, "scale": 6.0, "sample_sampler": "dpmsolver++", "negative_preset": "non_adult"},
        {"prompt": "a cat", "seed": 2, "sample_steps": 20, "scale": 7},
    ]))  # fmt: skip
    for path in (toml_list, kohya_toml, as_json):
        got = [SamplePrompt(**{**p.__dict__, "source": ""}) for p in load_prompts(path)]
        assert got == expected, path.name
    assert load_prompts(toml_list)[1].source == f"{toml_list}: prompt[1]"


@pytest.mark.parametrize("name, text, message", [
    ("p.toml", '[[prompt]]\nprompt = "x"\nwidht = 512\n',
     "p.toml: prompt[0].widht: unknown key widht (did you mean width?)"),
    ("p.toml", '[[prompt]]\nprompt = "x"\nwidth = "512px"\n',
     "prompt[0].width: width must be a whole number, got '512px'"),
    ("p.toml", '[[prompt]]\nprompt = "x"\nseed = true\n', "prompt[0].seed: seed must be a whole number"),
    ("p.toml", '[[prompt]]\nnegative_prompt = "x"\n', "prompt[0]: has no prompt"),
    ("p.toml", '[[prompts]]\nprompt = "x"\n', "unknown top-level key 'prompts'"),
    ("p.toml", '[[prompt]\n', "invalid TOML"),
    ("p.json", '[{"prompt": "x", "sample_sampler": "nope"}]', "p.json: [0].sample_sampler: unknown sampler 'nope'"),
    ("p.json", '{"prompt": "x"}', "expected a JSON list"),
    ("p.json", '[{"prompt": "x",}]', "p.json:1: invalid JSON"),
    ("p.txt", "# only a comment\n\n", "holds no prompts"),
])  # fmt: skip
def test_structured_file_errors(tmp_path, name, text, message):
    with pytest.raises(ConfigError) as caught:
        load_prompts(write(tmp_path, name, text))
    assert message in str(caught.value)
    with pytest.raises(ConfigError, match="sample prompt file not found"):
        load_prompts(tmp_path / "missing.txt")


# --- samplers ---------------------------------------------------------------------------------------


def test_every_sampler_name_builds_and_samples(models):
    expected = {"ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "lms": "LMSDiscreteScheduler",
                "euler": "EulerDiscreteScheduler", "euler_a": "EulerAncestralDiscreteScheduler",
                "heun": "HeunDiscreteScheduler", "dpm_2": "KDPM2DiscreteScheduler",
                "dpm_2_a": "KDPM2AncestralDiscreteScheduler", "dpmsolver": "DPMSolverMultistepScheduler",
                "dpmsolver++": "DPMSolverMultistepScheduler", "dpmsingle": "DPMSolverSinglestepScheduler"}
    kohya_names = list(expected) + ["k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a"]
    assert set(kohya_names) <= set(SAMPLER_NAMES)
    pipe = build_pipeline(models, "euler_a")
    assert pipe.unet is models.unet and pipe.vae is models.vae and pipe.text_encoder_2 is models.text_encoder2
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"  # from the model's own scheduler config
    for name in kohya_names:
        scheduler = build_scheduler(name, models.scheduler_config)
        assert type(scheduler).__name__ == expected[ALIASES.get(name, name)], name
    assert build_scheduler("dpmsolver", models.scheduler_config).config.algorithm_type == "dpmsolver"
    assert build_scheduler("euler", models.scheduler_config, "v_prediction").config.prediction_type == "v_prediction"
    for name in SAMPLERS:  # each one really samples (aliases share these classes)
        pipe.scheduler = build_scheduler(name, models.scheduler_config)
        image = generate_images(pipe, ["a cat"], seeds=[1], sizes=(64, 64), steps=2)[0]
        assert image.size == (64, 64) and pixels(image).std() > 0, name
    assert check_sampler("K_Euler_A") == "euler_a" and check_sampler(None) == "euler_a"
    with pytest.raises(ConfigError, match=r"--sample_sampler: unknown sampler 'dpmsolver\+' \(did you mean dpmsolver"):
        check_sampler("dpmsolver+")


def test_zero_terminal_snr_runs_sample_from_pure_noise(models, caplog):
    plain = build_scheduler("euler", models.scheduler_config, "v_prediction")
    zero = build_scheduler("euler", models.scheduler_config, "v_prediction", zero_terminal_snr=True)
    assert plain.alphas_cumprod[-1] > 1e-3  # SDXL's schedule keeps signal at t=999
    assert zero.alphas_cumprod[-1] < 1e-6 and zero.config.rescale_betas_zero_snr
    zero.set_timesteps(4)
    assert int(zero.timesteps[0]) == 999  # "trailing": the first step is the last training timestep
    for name in ("ddim", "dpmsolver++", "euler_a"):
        assert build_scheduler(name, models.scheduler_config, zero_terminal_snr=True).config.rescale_betas_zero_snr
    with caplog.at_level("WARNING", logger="library.samplers"):
        build_scheduler("heun", models.scheduler_config, zero_terminal_snr=True)
    assert "heun cannot sample with the zero-terminal-SNR schedule" in caplog.text


# --- settings, names, seeds --------------------------------------------------------------------------


def test_resolve_settings_defaults_rounding_and_derived_seeds():
    prompts = parse_prompt_text("a --w 100 --h 70 --d 5\nb --l 0 --s 3 --ss ddim\nc --np non_adult\n", "p.txt")
    first, second, third = resolve_settings(prompts, step=200, default_size=(832, 1216), default_steps=30,
                                            default_scale=7.5, sampler_name="k_euler", seed=42)
    assert (first.width, first.height, first.seed, first.steps, first.scale) == (96, 64, 5, 30, 7.5)
    assert (second.width, second.height, second.scale, second.steps, second.sampler) == (832, 1216, 0.0, 3, "ddim")
    assert (first.sampler, third.negative_prompt) == ("euler", "nsfw, nude, censored")
    assert second.seed == derive_seed(42, 200, 1) and third.seed == derive_seed(42, 200, 2)
    assert derive_seed(42, 200, 1) == derive_seed(42, 200, 1) != derive_seed(42, 300, 1) != derive_seed(43, 200, 1)
    assert 0 <= derive_seed(None, 0, 0) < 2**32
    assert sample_file_name("poster", 100, None, 3, 7) == "poster_000100_03_7.png"
    assert sample_file_name("poster", 100, 2, 0, 7) == "poster_e000002_000100_00_7.png"
    assert sample_file_name(None, 5, None, 0, 1) == "000005_00_1.png"
    with pytest.raises(ConfigError, match="unknown negative preset"):
        resolve_settings(prompts, step=0, default_size=(64, 64), negative_preset_default="nope")


def test_generate_samples_writes_named_pngs_with_settings_and_repeats_exactly(models, tmp_path):
    prompts = parse_prompt_text(
        "a white cat --d 1 --np non_adult\na white cat --d 2 --l 5\nmovie poster --w 72 --h 100\n", "p.txt")
    kwargs = dict(step=100, epoch=None, output_name="poster", default_size=(64, 64), default_steps=2, seed=9,
                  negative_preset_default="basic")
    paths = generate_samples(models, prompts, tmp_path / "run1", **kwargs)
    derived = derive_seed(9, 100, 2)
    assert [p.name for p in paths] == ["poster_000100_00_1.png", "poster_000100_01_2.png",
                                       f"poster_000100_02_{derived}.png"]
    assert all(p.parent == tmp_path / "run1" / "sample" for p in paths)
    assert sorted(p.name for p in (tmp_path / "run1" / "sample").iterdir()) == sorted(p.name for p in paths)
    with Image.open(paths[0]) as image:
        assert image.size == (64, 64)
        settings = json.loads(image.text["sample_settings"])
        assert image.text["parameters"].startswith("a white cat\nNegative prompt: nsfw, nude, censored\nSteps: 2,")
    assert settings["seed"] == 1 and settings["training_step"] == 100 and settings["sampler"] == "euler_a"
    with Image.open(paths[1]) as image:
        assert json.loads(image.text["sample_settings"])["negative_prompt"] == negative_preset("basic")
    with Image.open(paths[2]) as image:  # 72x100 -> 72x96: a 9x12 latent the UNet pads itself
        assert image.size == (72, 96)

    again = generate_samples(models, prompts, tmp_path / "run2", **kwargs)
    for one, two in zip(paths, again):
        assert np.array_equal(pixels(one), pixels(two))  # same seed, same pixels
    assert np.abs(pixels(paths[0]) - pixels(paths[1])).mean() > 1.0  # other seed, other image
    epoch_paths = generate_samples(models, prompts[:1], tmp_path / "run1", **{**kwargs, "epoch": 3})
    assert epoch_paths[0].name == "poster_e000003_000100_00_1.png"


def test_sampling_leaves_rng_and_training_modes_exactly_as_they_were(models, tmp_path, monkeypatch):
    models.unet.train()
    models.text_encoder1.eval()
    models.text_encoder2.train()
    models.text_encoder2.text_model.encoder.layers[0].eval()  # a mixed module keeps its mixture
    models.vae.eval()
    modes_before = {(n, name): sub.training for n in ("unet", "text_encoder1", "text_encoder2", "vae")
                    for name, sub in getattr(models, n).named_modules()}
    seen = {}
    original = sampling.generate_images

    def consuming(pipe, *args, **kwargs):  # a sampler that draws from every global RNG
        seen["unet_training"] = pipe.unet.training
        seen["te2_training"] = pipe.text_encoder_2.text_model.encoder.layers[1].training
        torch.rand(3), random.random(), np.random.rand(2)
        return original(pipe, *args, **kwargs)

    monkeypatch.setattr(sampling, "generate_images", consuming)
    torch.manual_seed(123), random.seed(123), np.random.seed(123)
    torch.rand(1), random.random(), np.random.rand(1)
    torch_state, python_state, numpy_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    prompts = parse_prompt_text("a cat --s 2\n", "p.txt")
    generate_samples(models, prompts, tmp_path, step=1, output_name="x", default_size=(64, 64))
    assert seen == {"unet_training": False, "te2_training": False}
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == python_state
    after = np.random.get_state()
    assert after[0] == numpy_state[0] and np.array_equal(after[1], numpy_state[1]) and after[2:] == numpy_state[2:]
    modes_after = {(n, name): sub.training for n in ("unet", "text_encoder1", "text_encoder2", "vae")
                   for name, sub in getattr(models, n).named_modules()}
    assert modes_after == modes_before
    assert models.unet.training and not models.text_encoder2.text_model.encoder.layers[0].training


# --- batched generation (tools/evaluate.py generate) ---------------------------------------------------


def test_plan_batches_groups_by_size_and_negative_kind():
    sizes = [(64, 64), (64, 64), (72, 64), (64, 64), (64, 64)]
    negatives = ["", "ugly", "", "", "bad"]
    assert plan_batches(sizes, negatives, 2) == [[0, 3], [1, 4], [2]]
    assert plan_batches(sizes, negatives, 1) == [[0], [3], [1], [4], [2]]


def test_generate_images_batches_without_changing_images(models):
    pipe = build_pipeline(models, "euler_a")
    prompts, seeds, negatives = ["a cat", "movie poster", "a cat"], [1, 2, 1], ["", "ugly", ""]
    calls = []
    batched = generate_images(pipe, prompts, seeds=seeds, negatives=negatives, sizes=(64, 64), batch_size=3,
                              steps=2, guidance=5.0, on_batch=lambda idx, imgs: calls.append((idx, len(imgs))))
    assert calls == [([0, 2], 2), ([1], 1)]
    single = [generate_images(pipe, [p], seeds=[s], negatives=n, sizes=[(64, 64)], steps=2, guidance=5.0)[0]
              for p, s, n in zip(prompts, seeds, negatives)]
    for one, two in zip(batched, single):
        assert np.abs(pixels(one) - pixels(two)).max() <= 2  # float rounding of batched convolutions only
    assert np.array_equal(pixels(batched[0]), pixels(batched[2]))  # same prompt and seed in one batch
    # our own VAE decode gives diffusers' own pipeline output
    ours = generate_images(pipe, ["a cat"], seeds=[4], sizes=(64, 64), steps=2)[0]
    theirs = pipe("a cat", generator=torch.Generator().manual_seed(4), num_inference_steps=2, width=64, height=64,
                  guidance_scale=7.5).images[0]
    assert np.array_equal(pixels(ours), pixels(theirs))


def test_mixed_precision_modules_sample_without_casting_weights(tiny_sdxl, tmp_path):
    from library.sdxl_train_util import load_target_model

    mixed = load_target_model(str(tiny_sdxl["diffusers"]))
    mixed.text_encoder1.to(torch.bfloat16), mixed.text_encoder2.to(torch.bfloat16)
    first_weight = next(mixed.unet.parameters())
    paths = generate_samples(mixed, parse_prompt_text("a cat --d 3 --s 2\n", "p.txt"), tmp_path, step=0,
                             output_name="m", default_size=(64, 64))
    assert pixels(paths[0]).std() > 0
    assert next(mixed.unet.parameters()) is first_weight and first_weight.dtype == torch.float32
    assert next(mixed.text_encoder2.parameters()).dtype == torch.bfloat16


def test_long_prompts_are_encoded_in_chunks_not_cut_at_77_tokens(models, caplog):
    """The poster workflow's negative presets are longer than one CLIP window: they are encoded in
    75-token chunks as training encodes captions, so words after token 75 still steer the image."""
    import math

    pipe = build_pipeline(models, "euler_a")
    assert sampling.long_text_embeds(pipe, ["a cat"], ["ugly"]) is None  # short: the pipeline's own path
    long_negative = negative_preset("basic")
    tokens = len(pipe.tokenizer(long_negative).input_ids) - 2
    assert 75 < tokens <= 220
    with torch.no_grad():
        text = sampling.long_text_embeds(pipe, ["a cat"], [long_negative])
        _, cut, _, cut_pooled = pipe.encode_prompt("a cat", negative_prompt=long_negative, device="cpu",
                                                   do_classifier_free_guidance=True)  # fmt: skip
    length = 75 * math.ceil(tokens / 75) + 2
    assert text["prompt_embeds"].shape[1] == text["negative_prompt_embeds"].shape[1] == length
    # the first window is exactly what the pipeline itself encodes (it stops there)
    torch.testing.assert_close(text["negative_prompt_embeds"][:, :76], cut[:, :76])
    torch.testing.assert_close(text["negative_pooled_prompt_embeds"], cut_pooled)

    def image(negative):
        return pixels(generate_images(pipe, ["a cat"], seeds=[1], negatives=[negative], sizes=(64, 64), steps=2,
                                      guidance=5.0)[0])  # fmt: skip

    assert not np.array_equal(image(long_negative + ", red"), image(long_negative + ", blue"))
    with caplog.at_level("WARNING", logger="library.sampling"), torch.no_grad():
        sampling.long_text_embeds(pipe, ["a cat"], [long_negative * 2])
    assert "longer than 225 tokens are cut" in caplog.text
