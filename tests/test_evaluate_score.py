"""tools/evaluate.py score/report with a tiny random CLIP and a random LAION MLP (library/evaluation)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from scipy import stats

from library.cli import run_main
from library.errors import DataError, ModelError
from library.evaluation.aesthetic import load_aesthetic_model
from library.evaluation.score_folders import ScoreOptions, run_score
from library.evaluation.scoring import Scorer
from library.evaluation.stats import SUMMARY_COLUMNS
from library.evaluation.tiny_clip import make_random_aesthetic, make_tiny_clip, random_aesthetic_state
from tools.evaluate import main as evaluate_main

LONG_PROMPT = " ".join(["poster of a white cat in the bag"] * 30)  # far beyond 77 tokens
PROMPTS = ["a cat in the bag", "movie poster", LONG_PROMPT]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_models")
    clip = make_tiny_clip(root / "clip", seed=0, projection_dim=16)
    return {"clip": clip, "aesthetic": make_random_aesthetic(root / "aesthetic.pth", input_size=16, seed=1)}


def write_images(folder: Path, model: str, count_per_prompt: int, seed: int) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for prompt_index in range(len(PROMPTS)):
        for image_index in range(count_per_prompt):
            size = (int(rng.integers(24, 60)), int(rng.integers(24, 60)))
            pixels = (rng.random((size[1], size[0], 3)) * 255).astype("uint8")
            path = folder / f"{model}-{prompt_index}-{image_index}.png"
            Image.fromarray(pixels).save(path)
            paths.append(path)
    return paths


@pytest.fixture()
def images_root(tmp_path):
    root = tmp_path / "images"
    write_images(root / "base", "base", 2, seed=0)
    write_images(root / "poster", "poster", 3, seed=1)
    prompts = tmp_path / "prompts.csv"
    pd.DataFrame({"Prompts": PROMPTS}).to_csv(prompts, index=False)
    return root, prompts


def options_for(root, prompts, out, models, **extra) -> ScoreOptions:
    return ScoreOptions(images_root=root, output_dir=out, prompts=prompts, clip_model=str(models["clip"]),
                        aesthetic_model=str(models["aesthetic"]), batch_size=4, device="cpu", progress=False,
                        **extra)


def direct_scores(clip_dir: Path, state: dict, image_path: Path, prompt: str) -> tuple[float, float]:
    """The seed's one-image computation, written independently: CLIPModel.forward and the MLP by hand."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(str(clip_dir)).eval()
    processor = CLIPProcessor.from_pretrained(str(clip_dir))
    inputs = processor(text=[prompt], images=[Image.open(image_path).convert("RGB")], return_tensors="pt",
                       truncation=True, max_length=77, padding=True)
    with torch.no_grad():
        out = model(**inputs)
        cosine = float(out.logits_per_image[0, 0] / model.logit_scale.exp())
        x = out.image_embeds  # already L2-normalised by CLIPModel.forward
        for layer in ("layers.0", "layers.2", "layers.4", "layers.6", "layers.7"):
            x = x @ state[f"{layer}.weight"].T + state[f"{layer}.bias"]
    return cosine, float(x[0, 0])


def test_per_image_scores_equal_a_direct_computation(images_root, models, tmp_path):
    root, prompts = images_root
    outcome = run_score(options_for(root, prompts, tmp_path / "out", models))
    assert outcome.scored == ["base", "poster"] and not outcome.failed
    table = pd.read_csv(tmp_path / "out" / "per_image" / "poster.csv")
    assert list(table.columns) == ["ClipScore", "LAIONScore", "ImageIndex", "File", "Prompt"]
    assert list(table["ImageIndex"]) == list(range(1, 10))
    assert list(table["File"])[:4] == ["poster-0-0.png", "poster-0-1.png", "poster-0-2.png", "poster-1-0.png"]
    state = random_aesthetic_state(16, seed=1)
    for row in table.itertuples():
        prompt = PROMPTS[int(row.File.split("-")[1])]
        assert row.Prompt == prompt
        clip, laion = direct_scores(models["clip"], state, root / "poster" / row.File, prompt)
        assert row.ClipScore == pytest.approx(clip, abs=1e-5)
        assert row.LAIONScore == pytest.approx(laion, abs=1e-5)
    assert table["ClipScore"].std() > 0 and table["LAIONScore"].std() > 0  # not a constant


def test_summary_statistics_equal_pandas_and_scipy(images_root, models, tmp_path):
    root, prompts = images_root
    out = tmp_path / "out"
    run_score(options_for(root, prompts, out, models))
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary.columns) == SUMMARY_COLUMNS
    assert list(summary["Model"]) == ["base", "poster"]
    for row in summary.to_dict("records"):
        table = pd.read_csv(out / "per_image" / f"{row['Model']}.csv")
        laion, clip = table["LAIONScore"], table["ClipScore"]
        described = laion.describe()
        for name in ("count", "mean", "std", "min", "25%", "50%", "75%", "max"):
            assert row[f"{name}_LAIONScore"] == pytest.approx(described[name], rel=1e-9)
        assert row["count_LAIONScore"] == len(table) == (6 if row["Model"] == "base" else 9)
        assert row["skew_LAIONScore"] == pytest.approx(stats.skew(laion, bias=True), rel=1e-9)
        assert row["kurtosis_LAIONScore"] == pytest.approx(stats.kurtosis(laion, fisher=True, bias=True), rel=1e-9)
        assert row["Clipscore_mean"] == pytest.approx(np.mean(clip), rel=1e-9)
        assert row["Clipscore_std"] == pytest.approx(np.std(clip), rel=1e-9)  # population std, as the seed


def test_resume_skips_done_models_and_rescore_redoes_them(images_root, models, tmp_path):
    root, prompts = images_root
    out = tmp_path / "out"
    run_score(options_for(root, prompts, out, models))
    summary = pd.read_csv(out / "summary.csv")
    true_mean = summary.loc[summary["Model"] == "base", "mean_LAIONScore"].item()
    summary.loc[summary["Model"] == "base", "mean_LAIONScore"] = 999.0
    summary.to_csv(out / "summary.csv")  # with the index column, as the seed writes it
    write_images(root / "third", "third", 1, seed=2)

    outcome = run_score(options_for(root, prompts, out, models))
    assert outcome.scored == ["third"] and outcome.skipped == ["base", "poster"]
    again = pd.read_csv(out / "summary.csv")
    assert list(again.columns) == SUMMARY_COLUMNS
    assert list(again["Model"]) == ["base", "poster", "third"]
    assert again.loc[again["Model"] == "base", "mean_LAIONScore"].item() == 999.0  # not recomputed

    messages = []
    assert run_score(options_for(root, prompts, out, models), warn=messages.append).scored == []
    assert "no models to analyze" in messages[0]

    outcome = run_score(options_for(root, prompts, out, models, rescore=True))
    assert outcome.scored == ["base", "poster", "third"]
    final = pd.read_csv(out / "summary.csv")
    assert list(final["Model"]) == ["base", "poster", "third"]
    assert final.loc[final["Model"] == "base", "mean_LAIONScore"].item() == pytest.approx(true_mean, rel=1e-9)


def test_empty_or_unreadable_model_folder_is_a_clear_message(images_root, models, tmp_path, capsys):
    root, prompts = images_root
    (root / "empty").mkdir()
    (root / "poster" / "poster-0-0.png").write_bytes(b"not a png")
    messages = []
    outcome = run_score(options_for(root, prompts, tmp_path / "out", models), warn=messages.append)
    assert outcome.scored == ["base", "poster"] and outcome.failed == ["empty"]
    assert outcome.unreadable_images == 1
    assert any("model 'empty': no images in" in m for m in messages)
    assert any("poster-0-0.png" in m and "cannot read image" in m for m in messages)
    assert len(pd.read_csv(tmp_path / "out" / "per_image" / "poster.csv")) == 8

    only_empty = tmp_path / "only_empty"
    (only_empty / "nothing").mkdir(parents=True)
    argv = ["score", "--images_root", str(only_empty), "--output_dir", str(tmp_path / "o2"), "--prompts",
            str(prompts), "--clip_model", str(models["clip"]), "--aesthetic_model", str(models["aesthetic"])]
    assert run_main(evaluate_main, argv) == 2
    err = capsys.readouterr().err
    assert "no images in" in err and "no model could be scored" in err and "Traceback" not in err


def test_report_references_every_model_and_its_images(images_root, models, tmp_path):
    root, prompts = images_root
    out = tmp_path / "out"
    run_score(options_for(root, prompts, out, models))
    (out / "report.html").unlink()
    assert run_main(evaluate_main, ["report", "--output_dir", str(out), "--images_root", str(root)]) == 0
    text = (out / "report.html").read_text(encoding="utf-8")
    for model in ("base", "poster"):
        assert f"<th>{model}</th>" in text
        for image in (root / model).iterdir():
            link = f"../images/{model}/{image.name}"
            assert f"src='{link}'" in text
            assert (out / link).resolve() == image.resolve()
    for plot in ("laion_scores.png", "clip_scores.png"):
        assert f"src='plots/{plot}'" in text
        with Image.open(out / "plots" / plot) as image:
            assert image.format == "PNG" and image.width > 100


def test_aesthetic_file_with_wrong_shapes_is_a_clear_error(models, tmp_path, images_root, capsys):
    state = random_aesthetic_state(16, seed=3)
    state["layers.2.weight"] = torch.zeros(64, 1024)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ModelError, match=r"layers\.2\.weight.*\(64, 1024\).*expected \(128, 1024\)"):
        load_aesthetic_model(tmp_path / "bad.pth")
    del state["layers.2.weight"]
    torch.save(state, tmp_path / "missing.pth")
    with pytest.raises(ModelError, match="missing.*layers.2.weight"):
        load_aesthetic_model(tmp_path / "missing.pth")
    # the CLI: one line, exit 2
    root, prompts = images_root
    argv = ["score", "--images_root", str(root), "--output_dir", str(tmp_path / "out"), "--prompts", str(prompts),
            "--clip_model", str(models["clip"]), "--aesthetic_model", str(tmp_path / "bad.pth")]
    assert run_main(evaluate_main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert "bad.pth" in err and "layers.2.weight" in err and "Traceback" not in err
    assert err.splitlines()[-1].startswith("evaluate.py: error:") or "error:" in err.splitlines()[-1]
    # a real 768-d LAION file with a 16-d CLIP: named mismatch
    make_random_aesthetic(tmp_path / "l14.safetensors", input_size=768)
    with pytest.raises(ModelError, match="768-d embeddings but the CLIP model gives 16-d"):
        Scorer(str(models["clip"]), str(tmp_path / "l14.safetensors"), "cpu", 4)


def test_scorer_api_batches_scales_and_reads_safetensors(models, tmp_path):
    make_random_aesthetic(tmp_path / "same.safetensors", input_size=16, seed=1)  # same weights as the .pth
    rng = np.random.default_rng(5)
    images = [Image.fromarray((rng.random((40, 30 + i, 3)) * 255).astype("uint8")) for i in range(7)]
    prompts = [PROMPTS[i % 3] for i in range(7)]
    one = Scorer(str(models["clip"]), str(models["aesthetic"]), "cpu", batch_size=1).score(images, prompts)
    scaled = Scorer(str(models["clip"]), str(tmp_path / "same.safetensors"), "cpu", batch_size=4,
                    clip_score_scale=100)
    batched = scaled.score(images, prompts)
    assert len(one[0]) == len(batched[1]) == 7
    assert np.allclose(one[1], batched[1], atol=1e-5)
    assert np.allclose(batched[0], 100 * np.maximum(np.array(one[0]), 0), atol=1e-3)
    for image in images[:3] + [Image.new("RGB", (70, 20), "red"), images[0].resize((20, 90))]:
        # the scorer's early resize gives bit-identical pixels to the processor's own path
        expected = scaled.processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
        assert torch.equal(scaled.preprocess([image]), expected)
    unit = torch.nn.functional.normalize(torch.ones(2, 16), dim=-1)
    clip, _ = scaled.scores_from_embeddings(unit, torch.stack([unit[0], -unit[1]]))
    assert clip == pytest.approx([100.0, 0.0])  # 100 * max(cos, 0)


def test_prompt_lookup_errors_and_manifest(images_root, models, tmp_path):
    root, _ = images_root
    short = tmp_path / "short.txt"
    short.write_text("only one prompt\n", encoding="utf-8")
    with pytest.raises(DataError, match="prompt index 1 but the prompt file has 1 prompts"):
        run_score(options_for(root, short, tmp_path / "out", models))
    manifest = [{"file": p.relative_to(root).as_posix(), "prompt": f"manifest prompt {p.stem}"}
                for p in sorted((root).glob("*/*.png"))]
    pd.DataFrame(manifest).to_csv(root / "manifest.csv", index=False)
    run_score(options_for(root, None, tmp_path / "out", models))
    table = pd.read_csv(tmp_path / "out" / "per_image" / "base.csv")
    assert list(table["Prompt"])[:2] == ["manifest prompt base-0-0", "manifest prompt base-0-1"]
