"""tools/evaluate.py generate with the tiny SDXL: file names, manifest, paired seeds, resume, name checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from library.cli import run_main
from library.errors import ConfigError
from library.evaluation.generate import GenerateOptions, parse_model_specs, plan_jobs, run_generate
from library.evaluation.prompts import MANIFEST_COLUMNS
from library.evaluation.score_folders import ScoreOptions, run_score
from library.evaluation.tiny_clip import make_random_aesthetic, make_tiny_clip
from library.presets import negative_preset
from tools.evaluate import main as evaluate_main

PROMPTS = ["a white cat in the bag", "movie poster"]


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_model_names_are_checked_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("a.safetensors").write_bytes(b"")
    assert parse_model_specs(["base=a.safetensors", "poster_v2=stabilityai/sdxl"]) == (
        ("base", "a.safetensors"), ("poster_v2", "stabilityai/sdxl"))
    for specs, message in ((["my-model=a.safetensors"], "no '-'"), (["base"], "not NAME=PATH"),
                           (["a=a.safetensors", "a=a.safetensors"], "given twice"), (["a/b=x"], "must use only"),
                           (["base=missing.safetensors"], "does not exist")):
        with pytest.raises(ConfigError, match=message):
            parse_model_specs(specs)
    prompts = tmp_path / "p.txt"
    prompts.write_text("x\n", encoding="utf-8")
    argv = ["generate", "--model", "sdxl-base=missing.safetensors", "--prompts", str(prompts),
            "--output_dir", str(tmp_path / "out")]
    assert run_main(evaluate_main, argv) == 2
    err = capsys.readouterr().err
    assert "sdxl-base" in err and "no '-'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_seeds_are_paired_across_models():
    options = GenerateOptions(models=(("a", "x"), ("b", "y")), prompts=None, output_dir=None,
                              images_per_prompt=3, seed=100)
    jobs = plan_jobs(options, prompt_count=2)
    seeds = {(job.model, job.prompt_index, job.image_index): job.seed for job in jobs}
    assert len(jobs) == 12
    assert seeds[("a", 1, 2)] == seeds[("b", 1, 2)] == 105
    assert len({s for (m, _, _), s in seeds.items() if m == "a"}) == 6  # distinct within a model
    assert {job.file for job in jobs if job.model == "b"} >= {"b/b-0-0.png", "b/b-1-2.png"}


def test_generate_writes_seed_names_manifest_and_resumes(tiny_sdxl, tmp_path):
    prompts = tmp_path / "prompts.csv"
    pd.DataFrame({"Prompts": PROMPTS}).to_csv(prompts, index=False)
    out = tmp_path / "images"
    options = GenerateOptions(
        models=(("single", str(tiny_sdxl["single_file"])), ("folder", str(tiny_sdxl["diffusers"]))),
        prompts=prompts, output_dir=out, images_per_prompt=2, seed=7, steps=2, guidance_scale=5.0,
        width=64, height=64, negative_prompt=negative_preset("non_adult"), batch_size=2,
        tokenizer_cache_dir=str(tiny_sdxl["tokenizers"]), device="cpu", progress=False)
    line = run_generate(options)
    assert line.startswith("generated 8 image(s), kept 0 existing")
    for model in ("single", "folder"):
        names = sorted(p.name for p in (out / model).iterdir())
        assert names == [f"{model}-{i}-{j}.png" for i in range(2) for j in range(2)]
        with Image.open(out / model / f"{model}-0-0.png") as image:
            assert image.size == (64, 64)

    manifest = pd.read_csv(out / "manifest.csv", keep_default_na=False)
    assert list(manifest.columns) == MANIFEST_COLUMNS and len(manifest) == 8
    row = manifest.set_index("file").loc["folder/folder-1-1.png"]
    assert (row["model"], row["prompt_index"], row["prompt"]) == ("folder", 1, PROMPTS[1])
    assert (row["seed"], row["steps"], row["guidance"]) == (7 + 1 * 2 + 1, 2, 5.0)
    assert row["negative"] == "nsfw, nude, censored"
    by_model = manifest.groupby("model")["seed"].apply(list)
    assert by_model["single"] == by_model["folder"]  # paired

    # The same weights (single file vs diffusers folder) with the same seeds give the same images;
    # different seeds give different images.
    same = np.abs(pixels(out / "single" / "single-1-0.png") - pixels(out / "folder" / "folder-1-0.png")).mean()
    other = np.abs(pixels(out / "single" / "single-1-0.png") - pixels(out / "single" / "single-1-1.png")).mean()
    assert same < 1.0 < other

    # Resume: existing images are kept; a missing one is made again, identically, even with another batch size.
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    removed = out / "single" / "single-1-0.png"
    old_pixels = pixels(removed)
    removed.unlink()
    again = GenerateOptions(**{**options.__dict__, "batch_size": 1})
    assert run_generate(again).startswith("generated 1 image(s), kept 7 existing")
    assert np.array_equal(pixels(removed), old_pixels)
    for path, mtime in before.items():
        if path != removed:
            assert path.stat().st_mtime_ns == mtime
    assert len(pd.read_csv(out / "manifest.csv")) == 8

    # score reads the prompts from the manifest (no --prompts needed)
    clip = make_tiny_clip(tmp_path / "clip")
    aesthetic = make_random_aesthetic(tmp_path / "aesthetic.pth", input_size=16)
    outcome = run_score(ScoreOptions(images_root=out, output_dir=tmp_path / "scores", clip_model=str(clip),
                                     aesthetic_model=str(aesthetic), device="cpu", progress=False))
    assert outcome.scored == ["folder", "single"]
    table = pd.read_csv(tmp_path / "scores" / "per_image" / "single.csv")
    assert list(table["Prompt"]) == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2
