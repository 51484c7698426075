"""Metadata tools: captions + tags merged into one kohya JSON, --in_json, --full_path, cleaning."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from finetune.clean_captions_and_tags import main as clean_main
from finetune.merge_captions_to_metadata import main as merge_captions_main
from finetune.merge_dd_tags_to_metadata import main as merge_tags_main
from library.caption_files import list_images
from library.cli import run_main
from library.tag_cleaning import clean_caption, clean_tags

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def folder(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    for name in ("a", "b", "c"):
        Image.new("RGB", (8, 8), (10, 20, 30)).save(root / f"{name}.png")
    (root / "a.caption").write_text("a red movie poster\n")
    (root / "b.caption").write_text("  a blue poster  \n")
    (root / "a.txt").write_text("1girl, red_theme\n")
    (root / "c.txt").write_text("no_humans, text\n")
    (root / "notes.md").write_text("not an image\n")
    return root


def _load(path):
    return json.loads(Path(path).read_text())


def test_captions_and_tags_merge_into_one_file(folder, tmp_path, capsys):
    meta = tmp_path / "meta.json"
    assert merge_captions_main([str(folder), str(meta)]) == 0
    assert _load(meta) == {"a": {"caption": "a red movie poster"}, "b": {"caption": "a blue poster"}}
    assert "1 images without a .caption file" in capsys.readouterr().out
    assert merge_tags_main([str(folder), str(meta), "--in_json", str(meta)]) == 0
    assert _load(meta) == {
        "a": {"caption": "a red movie poster", "tags": "1girl, red_theme"},
        "b": {"caption": "a blue poster"},
        "c": {"tags": "no_humans, text"},
    }
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # atomic writes leave nothing behind


def test_in_json_keeps_existing_entries_and_fields(folder, tmp_path):
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"z": {"caption": "kept", "image_size": [1, 2]},
                               "a": {"caption": "old a", "image_size": [3, 4]}}))
    out = tmp_path / "new.json"
    assert merge_captions_main([str(folder), str(out), "--in_json", str(old)]) == 0
    assert _load(out) == {
        "z": {"caption": "kept", "image_size": [1, 2]},
        "a": {"caption": "a red movie poster", "image_size": [3, 4]},
        "b": {"caption": "a blue poster"},
    }
    assert _load(old)["a"]["caption"] == "old a"  # the input is not touched


def test_in_json_accepts_jsonl(folder, tmp_path):
    old = tmp_path / "old.jsonl"
    old.write_text('{"file_name": "b", "image_size": [5, 6]}\n')
    out = tmp_path / "out.json"
    assert merge_tags_main([str(folder), str(out), "--in_json", str(old)]) == 0
    assert _load(out) == {"b": {"image_size": [5, 6]}, "a": {"tags": "1girl, red_theme"},
                          "c": {"tags": "no_humans, text"}}


def test_full_path_and_recursive_keys(folder, tmp_path):
    sub = folder / "sub"
    sub.mkdir()
    Image.new("RGB", (8, 8)).save(sub / "d.jpg")
    (sub / "d.caption").write_text("nested\n")
    out = tmp_path / "m.json"
    assert merge_captions_main([str(folder), str(out), "--full_path"]) == 0
    assert set(_load(out)) == {str(folder / "a.png"), str(folder / "b.png")}
    assert merge_captions_main([str(folder), str(out), "--full_path", "--recursive"]) == 0
    data = _load(out)
    assert data[str(sub / "d.jpg")] == {"caption": "nested"} and len(data) == 3


def test_same_stem_in_subfolders_needs_full_path(folder, tmp_path, capsys):
    sub = folder / "sub"
    sub.mkdir()
    Image.new("RGB", (8, 8)).save(sub / "a.png")
    out = tmp_path / "m.json"
    assert run_main(merge_captions_main, [str(folder), str(out), "--recursive"]) == 2
    err = capsys.readouterr().err
    assert "share the metadata key 'a'" in err and "--full_path" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_bad_in_json_is_one_line_error_and_nothing_written(folder, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"a": {"caption": "x"},}')
    out = tmp_path / "out.json"
    out.write_text('{"keep": {}}')
    assert run_main(merge_captions_main, [str(folder), str(out), "--in_json", str(bad)]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert out.read_text() == '{"keep": {}}'
    assert run_main(merge_captions_main, [str(tmp_path / "nope"), str(out)]) == 2
    assert "image folder not found" in capsys.readouterr().err


def test_clean_round_trip(tmp_path, capsys):
    src = tmp_path / "meta.json"
    src.write_text(json.dumps({
        "a": {"caption": "  a poster  poster of a  cat ,, on a table .", "tags": " 1girl ,, solo,1girl , long   hair,",
              "image_size": [64, 32]},
        "b": {"caption": "a clean caption", "tags": "tag"},
        "c": {"caption": " , ", "tags": ", ,"},
    }))
    out = tmp_path / "clean.json"
    assert clean_main([str(src), str(out)]) == 0
    assert _load(out) == {
        "a": {"caption": "a poster of a cat, on a table.", "tags": "1girl, solo, long hair", "image_size": [64, 32]},
        "b": {"caption": "a clean caption", "tags": "tag"},
        "c": {},
    }
    assert "2 captions and 2 tag lists changed, 1 entries with neither" in capsys.readouterr().out
    assert clean_main([str(out), str(out)]) == 0  # cleaning is idempotent and may write in place
    assert _load(out)["a"]["caption"] == "a poster of a cat, on a table."


def test_clean_functions():
    assert clean_caption("The the poster\twith\n text") == "The poster with text"
    assert clean_caption("bye, bye") == "bye, bye"  # only words directly repeated
    assert clean_caption("a catalog cat") == "a catalog cat"  # whole words only
    assert clean_tags("a,a , b,  ,A") == "a, b, A"


def test_list_images_skips_temp_and_other_files(folder):
    (folder / ".poster.png.tmp-abc").write_bytes(b"")
    (folder / "UPPER.JPG").write_bytes(b"")
    assert [p.name for p in list_images(folder)] == ["UPPER.JPG", "a.png", "b.png", "c.png"]


SCRIPTS = ["make_captions", "tag_images_by_wd14_tagger", "merge_captions_to_metadata", "merge_dd_tags_to_metadata",
           "clean_captions_and_tags"]


def test_help_is_instant_and_imports_no_torch():
    probe = (
        "import runpy, sys\n"
        f"for name in {SCRIPTS!r}:\n"
        "    sys.argv = [name, '--help']\n"
        "    try:\n"
        "        runpy.run_path(f'finetune/{name}.py', run_name='__main__')\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, (name, e.code)\n"
        "print('HEAVY', sorted(m for m in ('torch', 'transformers', 'onnxruntime') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stdout
    assert done.stdout.count("usage:") == len(SCRIPTS)
