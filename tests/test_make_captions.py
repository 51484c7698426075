"""BLIP captioning with a tiny random BLIP, its processor and a WordPiece tokenizer built offline."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from finetune.make_captions import main as captions_main
from library.cli import run_main

WORDS = "a the poster of red blue green movie with title big small cat dog on in and".split()


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory):
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    folder = tmp_path_factory.mktemp("tiny_blip")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", *WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer(vocab=str(folder / "vocab.txt"), bos_token="[DEC]", model_max_length=64)
    BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer).save_pretrained(folder)
    text = dict(
        vocab_size=len(vocab), hidden_size=32, encoder_hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=64, bos_token_id=5, sep_token_id=3, eos_token_id=3,
        pad_token_id=0, initializer_range=0.5,  # large random weights: different images get different captions
    )
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8, initializer_range=0.5)
    torch.manual_seed(0)
    config = BlipConfig(text_config=text, vision_config=vision, projection_dim=16, image_text_hidden_size=16)
    BlipForConditionalGeneration(config).save_pretrained(folder)
    return folder


@pytest.fixture()
def images(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    return folder


def _run(folder, blip_dir, *flags):
    return captions_main([str(folder), "--model_name_or_path", str(blip_dir), "--max_length", "12", *flags])


def _captions(folder, ext=".caption"):
    return {p.stem: p.read_text() for p in sorted(folder.glob(f"*{ext}"))}


def test_one_caption_per_image_and_batches_match(images, blip_dir, tmp_path, capsys):
    assert _run(images, blip_dir, "--beam_search", "--num_beams", "3") == 0
    single = _captions(images)
    assert sorted(single) == ["a", "b", "c"]
    assert all(text.endswith("\n") and text.count("\n") == 1 for text in single.values())
    words = [text.split() for text in single.values()]
    assert all(len(w) >= 1 and set(w) <= set(WORDS) for w in words)
    assert len(set(single.values())) > 1  # the captions depend on the image
    assert "captioned 3 of 3 images, skipped 0" in capsys.readouterr().out

    assert _run(images, blip_dir, "--beam_search", "--num_beams", "3", "--batch_size", "2", "--overwrite") == 0
    assert _captions(images) == single


def test_skip_existing_then_overwrite(images, blip_dir, capsys):
    (images / "a.caption").write_text("my own caption\n")
    assert _run(images, blip_dir, "--beam_search") == 0
    assert (images / "a.caption").read_text() == "my own caption\n"
    assert (images / "b.caption").exists() and (images / "c.caption").exists()
    assert "captioned 2 of 3 images, skipped 1" in capsys.readouterr().out

    b_before = (images / "b.caption").read_text()
    assert _run(images, blip_dir, "--beam_search") == 0  # nothing to do: the model is not even loaded
    assert "captioned 0 of 3 images, skipped 3" in capsys.readouterr().out

    assert _run(images, blip_dir, "--beam_search", "--overwrite") == 0
    assert (images / "a.caption").read_text() != "my own caption\n"
    assert (images / "b.caption").read_text() == b_before


def test_sampling_is_seeded_and_extension_recursive(images, blip_dir):
    sub = images / "sub"
    sub.mkdir()
    Image.new("RGB", (20, 20), (10, 200, 30)).save(sub / "d.jpg")
    assert _run(images, blip_dir, "--recursive", "--caption_extension", "txt", "--seed", "3", "--top_p", "0.5") == 0
    first = {**_captions(images, ".txt"), **_captions(sub, ".txt")}
    assert sorted(first) == ["a", "b", "c", "d"] and not list(images.glob("*.caption"))
    assert _run(images, blip_dir, "--recursive", "--caption_extension", ".txt", "--seed", "3", "--top_p", "0.5",
                "--overwrite") == 0
    assert {**_captions(images, ".txt"), **_captions(sub, ".txt")} == first


def test_unreadable_image_is_listed_not_fatal(images, blip_dir, capsys):
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    assert _run(images, blip_dir, "--beam_search", "--batch_size", "4") == 0
    captured = capsys.readouterr()
    assert "captioned 3 of 4 images, skipped 0 (caption file exists), failed 1" in captured.out
    assert "broken.jpg" in captured.err and not (images / "broken.caption").exists()


def test_missing_model_is_one_line_error(images, tmp_path, capsys):
    code = run_main(captions_main, [str(images), "--model_name_or_path", str(tmp_path / "no_such_model")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "cannot load the BLIP model" in err
    assert not list(images.glob("*.caption"))


def test_bad_flags_are_config_errors(images, capsys):
    assert run_main(captions_main, [str(images), "--min_length", "9", "--max_length", "5"]) == 2
    assert "--min_length 9 is larger than --max_length 5" in capsys.readouterr().err
