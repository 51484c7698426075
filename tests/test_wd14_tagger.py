"""WD14 tagger: a tiny ONNX model whose probabilities are known functions of the mean colour.

The fixture model maps a batch of NHWC BGR images (0-255) to ``mean_colour @ W + b`` where the mean is
per channel in 0-1, so for flat-coloured images every probability is known exactly. The images are
sized so that padding to a square and the 2x area resize keep those means exact.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image

from finetune.tag_images_by_wd14_tagger import main as tagger_main
from library.cli import run_main
from library.wd14 import TagOptions, TagTable, preprocess_image, select_tags

REPO = "SmilingWolf/wd-v1-4-convnext-tagger-v2"
SIZE = 16
# name, category, (weight on R, G, B means), bias
TAGS = [
    ("general", 9, (0, 0, 0), 0.5),
    ("sensitive", 9, (0.6, 0, 0), 0.0),
    ("questionable", 9, (0, 0, 0), 0.1),
    ("explicit", 9, (0, 0, 0), 0.0),
    ("red_theme", 0, (1, 0, 0), -0.5),
    ("blue_theme", 0, (0, 0, 1), -0.5),
    ("half_green", 0, (0, 0.8, 0), 0.0),
    ("^_^", 0, (0, 0, 0), 0.9),
    ("text", 0, (0, 0, 0), 0.34),
    ("no_humans", 0, (0, 0, 0), 0.36),
    ("hatsune_miku", 4, (0, 0, 0), 0.8),
    ("other_char", 4, (0.4, 0, 0), 0.0),
]
# red.png (32x16 red, padded with white): R=1, G=0.5, B=0.5 -> red_theme .5, half_green .4, other_char .4,
# sensitive .6 beats general .5. blue.png (32x32, top half transparent black, bottom blue): R=.5, G=.5, B=1
# -> blue_theme .5, half_green .4, other_char .2, general .5 beats sensitive .3.


def _export_model(path):
    import torch

    weights = torch.zeros(3, len(TAGS))
    bias = torch.tensor([t[3] for t in TAGS], dtype=torch.float32)
    for j, (_, _, (r, g, b), _) in enumerate(TAGS):
        weights[0, j], weights[1, j], weights[2, j] = b, g, r  # the model sees BGR

    class MeanColourTagger(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("w", weights)
            self.register_buffer("b", bias)

        def forward(self, x):
            return x.mean(dim=(1, 2)) / 255.0 @ self.w + self.b

    with warnings.catch_warnings():  # the legacy exporter's deprecation notices
        warnings.simplefilter("ignore", DeprecationWarning)
        _legacy_export(MeanColourTagger(), path)


def _legacy_export(module, path):
    import torch

    torch.onnx.export(
        module, (torch.zeros(1, SIZE, SIZE, 3),), str(path), input_names=["input_1:0"],
        output_names=["predictions_sigmoid"], dynamic_axes={"input_1:0": {0: "n"}, "predictions_sigmoid": {0: "n"}},
        dynamo=False,
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("wd14")
    folder = root / REPO.replace("/", "_")
    folder.mkdir()
    _export_model(folder / "model.onnx")
    rows = ["tag_id,name,category,count"] + [f"{i},{n},{c},{1000 - i}" for i, (n, c, _, _) in enumerate(TAGS)]
    (folder / "selected_tags.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture()
def images(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (32, 16), (255, 0, 0)).save(folder / "red.png")
    blue = np.zeros((32, 32, 4), np.uint8)  # transparent black on top: must become white, not black
    blue[16:] = (0, 0, 255, 255)
    Image.fromarray(blue, "RGBA").save(folder / "blue.png")
    return folder


def _tags(folder, name, ext=".txt"):
    return (folder / f"{name}{ext}").read_text().strip()


def _run(folder, model_dir, *flags):
    return tagger_main([str(folder), "--model_dir", str(model_dir), *flags])


def test_default_thresholds_model_order(images, model_dir, capsys):
    assert _run(images, model_dir) == 0
    assert _tags(images, "red") == "red_theme, half_green, ^_^, no_humans, hatsune_miku, other_char"
    assert _tags(images, "blue") == "blue_theme, half_green, ^_^, no_humans, hatsune_miku"
    assert "tagged 2 of 2 images, failed 0" in capsys.readouterr().out


def test_thresholds_are_inclusive_rating_last_and_batches(images, model_dir):
    assert _run(images, model_dir, "--thresh", "0.5", "--use_rating_tags_as_last_tag", "--batch_size", "2") == 0
    assert _tags(images, "red") == "red_theme, ^_^, hatsune_miku, sensitive"
    assert _tags(images, "blue") == "blue_theme, ^_^, hatsune_miku, general"


def test_rating_first_character_first_undesired_underscores(images, model_dir):
    flags = [
        "--character_threshold", "0.5", "--use_rating_tags", "--character_tags_first", "--remove_underscore",
        "--undesired_tags", "no_humans, ^_^", "--always_first_tags", "half_green", "--caption_extension", "tags",
    ]
    assert _run(images, model_dir, *flags) == 0
    assert _tags(images, "red", ".tags") == "half green, sensitive, hatsune miku, red theme"
    assert _tags(images, "blue", ".tags") == "half green, general, hatsune miku, blue theme"
    assert not (images / "red.txt").exists()


def test_general_threshold_separator_and_short_tags_keep_underscores(images, model_dir):
    flags = ["--general_threshold", "0.45", "--character_threshold", "0.1", "--remove_underscore",
             "--caption_separator", " | "]
    assert _run(images, model_dir, *flags) == 0
    assert _tags(images, "red") == "red theme | ^_^ | hatsune miku | other char"


def test_append_tags_keeps_existing(images, model_dir):
    (images / "red.txt").write_text("poster, red_theme\n")
    assert _run(images, model_dir, "--thresh", "0.5", "--append_tags") == 0
    assert _tags(images, "red") == "poster, red_theme, ^_^, hatsune_miku"


def test_unreadable_image_is_listed_not_fatal(images, model_dir, capsys):
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    assert _run(images, model_dir, "--batch_size", "3") == 0
    captured = capsys.readouterr()
    assert "tagged 2 of 3 images, failed 1" in captured.out
    assert "broken.png" in captured.err
    assert not (images / "broken.txt").exists() and (images / "red.txt").exists()


def test_recursive(images, model_dir):
    sub = images / "sub"
    sub.mkdir()
    Image.new("RGB", (32, 16), (255, 0, 0)).save(sub / "nested.png")
    assert _run(images, model_dir) == 0
    assert not (sub / "nested.txt").exists()
    assert _run(images, model_dir, "--recursive") == 0
    assert _tags(sub, "nested") == _tags(images, "red")


def test_missing_tag_list_is_one_line_error(images, model_dir, tmp_path, capsys):
    broken = tmp_path / "models" / "me_tagger"
    broken.mkdir(parents=True)
    (broken / "model.onnx").write_bytes((model_dir / REPO.replace("/", "_") / "model.onnx").read_bytes())
    code = run_main(tagger_main, [str(images), "--model_dir", str(tmp_path / "models"), "--repo_id", "me/tagger"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert f"{broken}: selected_tags.csv not found" in err
    assert not (images / "red.txt").exists()


def test_missing_model_offline_says_where_to_put_it(images, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = run_main(tagger_main, [str(images), "--model_dir", str(tmp_path / "none")])
    err = capsys.readouterr().err
    assert code == 2
    assert "model.onnx and selected_tags.csv not found" in err
    assert f"https://huggingface.co/{REPO}" in err and "SmilingWolf_wd-v1-4-convnext-tagger-v2" in err


def test_tag_count_mismatch_is_model_error(images, model_dir, tmp_path, capsys):
    folder = tmp_path / "m" / "a_b"
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes((model_dir / REPO.replace("/", "_") / "model.onnx").read_bytes())
    (folder / "selected_tags.csv").write_text("tag_id,name,category,count\n0,only,0,1\n")
    assert run_main(tagger_main, [str(images), "--model_dir", str(tmp_path / "m"), "--repo_id", "a/b"]) == 2
    assert "12 outputs but selected_tags.csv lists 1 tags" in capsys.readouterr().err


def test_preprocess_pads_white_and_swaps_to_bgr():
    img = Image.new("RGB", (4, 2), (255, 0, 0))
    arr = preprocess_image(img, 4)
    assert arr.shape == (4, 4, 3) and arr.dtype == np.float32
    assert arr[1:3, :, 2].min() == 255 and arr[1:3, :, 0].max() == 0  # red lands in the last (R) channel
    assert (arr[0] == 255).all() and (arr[3] == 255).all()  # padding rows are white


def test_select_tags_rating_argmax_and_dedupe():
    table = TagTable(("general", "explicit", "ab_c", "ab c"), (9, 9, 0, 0))
    options = TagOptions(use_rating_tags=True, remove_underscore=True)
    assert select_tags(np.array([0.2, 0.7, 0.9, 0.9]), table, options) == ["explicit", "ab c"]
