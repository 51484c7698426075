"""kohya's dataset TOML schema: resolution order, normalisation, every error case, flags, examples."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from library.config_util import (
    DatasetsConfig,
    config_from_flags,
    dump_dataset_config,
    load_dataset_config,
)
from library.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A tmp folder as the current directory, with an image folder and a metadata file in it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "imgs").mkdir()
    (tmp_path / "more").mkdir()
    (tmp_path / "meta.json").write_text('{"a.png": {"caption": "x"}}', encoding="utf-8")
    return tmp_path


def load(text: str, defaults=None, name: str = "my.toml") -> DatasetsConfig:
    Path(name).write_text(text, encoding="utf-8")
    return load_dataset_config(name, defaults)


def error(text: str, defaults=None, name: str = "my.toml") -> str:
    with pytest.raises(ConfigError) as info:
        load(text, defaults, name)
    return str(info.value)


FOLDER = '[[datasets]]\n  [[datasets.subsets]]\n  image_dir = "imgs"\n'


def dataset_with(*lines: str) -> str:
    """One dataset with the given lines and one folder subset."""
    return "[[datasets]]\n" + "".join(f"{line}\n" for line in lines) + FOLDER.split("\n", 1)[1]


def test_unknown_key_names_file_table_and_suggestion(work):
    text = FOLDER + '  [[datasets.subsets]]\n  image_dir = "more"\n  caption_seperator = ";"\n'
    assert error(text) == (
        "my.toml: datasets[0].subsets[1]: unknown key 'caption_seperator' (did you mean 'caption_separator'?)"
    )
    assert error("[general]\nzzqq = 1\n" + FOLDER) == (
        "my.toml: general: unknown key 'zzqq' (see the examples in dataset_configs/ for the valid keys)"
    )


def test_wrong_types_name_the_expected_type(work):
    msg = error('[[datasets]]\nbatch_size = "4"\n  [[datasets.subsets]]\n  image_dir = "imgs"\n')
    assert msg == (
        "my.toml: datasets[0]: 'batch_size' must be an integer, got a string (\"4\") "
        "(write batch_size = 4 without quotes)"
    )
    msg = error(FOLDER + "  keep_tokens = true\n")  # bools are not ints
    assert msg == (
        "my.toml: datasets[0].subsets[0]: 'keep_tokens' must be an integer, got a boolean (true) "
        "(booleans are not numbers in a dataset config)"
    )
    assert error(FOLDER + '  num_repeats = "four"\n').endswith("got a string (\"four\")")  # no bogus hint
    msg = error(FOLDER + "  num_repeats = 1.5\n")
    assert msg == "my.toml: datasets[0].subsets[0]: 'num_repeats' must be an integer, got a number (1.5)"
    msg = error(FOLDER + '  shuffle_caption = "yes"\n')
    assert "'shuffle_caption' must be true or false, got a string" in msg
    msg = error('[general]\nresolution = "1024,1024"\n' + FOLDER)
    assert msg.startswith("my.toml: general: 'resolution' must be an integer or [width, height]")
    assert "'resolution' must be an integer or [width, height], got an array" in error(
        "[general]\nresolution = [1, 2, 3]\n" + FOLDER
    )
    # ints are fine where numbers are expected
    cfg = load(FOLDER + "  caption_dropout_rate = 1\n  token_warmup_step = 100\n")
    sub = cfg.datasets[0].subsets[0]
    assert sub.caption_dropout_rate == 1.0 and isinstance(sub.caption_dropout_rate, float)
    assert sub.token_warmup_step == 100.0


def test_missing_image_dir_or_metadata_and_mixed_kinds(work):
    msg = error("[[datasets]]\n  [[datasets.subsets]]\n  num_repeats = 2\n")
    assert msg.startswith("my.toml: datasets[0].subsets[0]: a subset needs 'image_dir'")
    assert "'metadata_file'" in msg and "(add one of them" in msg
    msg = error(FOLDER + '  [[datasets.subsets]]\n  metadata_file = "meta.json"\n')
    assert msg == (
        "my.toml: datasets[0]: folder subsets (image_dir only) and metadata subsets (metadata_file) "
        "cannot be mixed in one dataset (subsets[0] and subsets[1]) (split them into two [[datasets]] tables)"
    )
    assert error("[[datasets]]\nbatch_size = 1\n") == (
        "my.toml: datasets[0]: dataset has no subsets (add a [[datasets.subsets]] table)"
    )
    assert error("[general]\nbatch_size = 1\n").startswith("my.toml: no datasets")


def test_toml_syntax_error_has_line_and_column(work):
    msg = error('[general]\nbatch_size = 2\nshuffle_caption = = true\n')
    assert msg.startswith("my.toml: line 3, column 19: invalid TOML: ")
    assert error('[general\n').startswith("my.toml: line 1, column 9: invalid TOML")


def test_paths_must_exist_and_are_read_from_the_current_directory(work, monkeypatch):
    msg = error('[[datasets]]\n  [[datasets.subsets]]\n  image_dir = "nope"\n')
    assert msg.startswith("my.toml: datasets[0].subsets[0]: image_dir 'nope' does not exist (relative paths")
    assert str(work) in msg
    msg = error('[[datasets]]\n  [[datasets.subsets]]\n  metadata_file = "imgs"\n')
    assert msg == "my.toml: datasets[0].subsets[0]: metadata_file 'imgs' is not a file"
    # the same TOML run from another directory: the hint says the path exists next to the config
    (work / "sub").mkdir()
    (work / "cfg.toml").write_text(FOLDER, encoding="utf-8")
    monkeypatch.chdir(work / "sub")
    with pytest.raises(ConfigError) as info:
        load_dataset_config("../cfg.toml")
    assert "image_dir 'imgs' does not exist (it exists next to the config file" in str(info.value)
    monkeypatch.chdir(work)
    cfg = load_dataset_config("cfg.toml")
    assert cfg.datasets[0].subsets[0].image_dir == work / "imgs"
    assert cfg.source == work / "cfg.toml"
    with pytest.raises(ConfigError, match="nothere.toml: dataset config not found"):
        load_dataset_config("nothere.toml")


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("batch_size = 0", "'batch_size' must be a positive integer, got 0"),
        ("num_repeats = -1", "'num_repeats' must be a positive integer, got -1"),
        ("keep_tokens = -2", "'keep_tokens' must not be negative, got -2"),
        ("resolution = 0", "'resolution' must be positive, got [0, 0]"),
        ("bucket_reso_steps = 0", "'bucket_reso_steps' must be a positive integer, got 0"),
        ("caption_dropout_rate = 1.5", "'caption_dropout_rate' must be between 0 and 1, got 1.5"),
        ("validation_split = 1", "'validation_split' must be at least 0 and below 1, got 1.0"),
        ('caption_separator = ""', "'caption_separator' must not be empty"),
        ('resize_interpolation = "lanczoss"', "unknown resize_interpolation 'lanczoss' (did you mean 'lanczos'?)"),
        (
            "face_crop_aug_range = [3.0, 2.0]",
            "'face_crop_aug_range' must be [low, high] with 0 < low <= high, got [3.0, 2.0]",
        ),
    ],
)
def test_out_of_range_values(work, line, expected):
    assert error(dataset_with(line)) == "my.toml: datasets[0]: " + expected


def test_bucket_limits_are_checked_against_resolution(work):
    msg = error(dataset_with("min_bucket_reso = 1024", "max_bucket_reso = 512"))
    assert msg == "my.toml: datasets[0]: min_bucket_reso (1024) is larger than max_bucket_reso (512)"
    msg = error(dataset_with("resolution = 1024", "max_bucket_reso = 768"))
    assert msg.startswith("my.toml: datasets[0]: resolution 1024x1024 does not fit between min_bucket_reso (256)")
    load(dataset_with("resolution = 1024", "max_bucket_reso = 768", "enable_bucket = false"))  # no buckets


def test_keys_at_the_wrong_level(work):
    assert error(FOLDER + "  batch_size = 2\n") == (
        "my.toml: datasets[0].subsets[0]: 'batch_size' is a dataset setting and cannot go in a subset "
        "(move it to its [[datasets]] table or to [general])"
    )
    assert error('[general]\nimage_dir = "imgs"\n' + FOLDER) == (
        "my.toml: general: 'image_dir' belongs in a subset, not in [general] (put it under [[datasets.subsets]])"
    )
    assert error("[[datasets]]\nis_reg = true\n  [[datasets.subsets]]\n  image_dir = \"imgs\"\n").startswith(
        "my.toml: datasets[0]: 'is_reg' belongs in a subset, not in a dataset"
    )
    # kohya refuses caption-file keys in fine-tuning datasets
    msg = error('[[datasets]]\n  [[datasets.subsets]]\n  metadata_file = "meta.json"\n  class_tokens = "x"\n')
    assert msg.startswith("my.toml: datasets[0].subsets[0]: 'class_tokens' only applies to folder subsets")
    # ...but subset keys are fine at every level, and [general] may hold caption-file keys for all
    cfg = load('[general]\ncaption_extension = "txt"\nflip_aug = true\n[[datasets]]\nkeep_tokens = 2\n'
               '  [[datasets.subsets]]\n  metadata_file = "meta.json"\n  image_dir = "imgs"\n')
    sub = cfg.datasets[0].subsets[0]
    assert sub.flip_aug and sub.keep_tokens == 2 and sub.is_metadata_subset
    assert sub.metadata_file == work / "meta.json" and sub.image_dir == work / "imgs"
    assert sub.caption_extension == ".caption" and sub.class_tokens is None  # not a folder subset


def test_unknown_sections_and_stray_keys(work):
    assert error('[dataset]\nbatch_size = 1\n' + FOLDER) == (
        "my.toml: unknown section 'dataset' (did you mean 'datasets'?)"
    )
    assert error('resolution = 1024\n' + FOLDER) == (
        "my.toml: 'resolution' is outside any table (put it under [general], [[datasets]] or [[datasets.subsets]])"
    )
    assert error('[datasets]\nbatch_size = 1\n').startswith("my.toml: 'datasets' must be an array of tables")


def test_resolution_order_subset_dataset_general_flags_default(work):
    text = (
        "[general]\nkeep_tokens = 1\nflip_aug = true\ncaption_prefix = \"g\"\nbatch_size = 3\n"
        "[[datasets]]\nkeep_tokens = 2\ncaption_prefix = \"d\"\nresolution = [768, 1024]\n"
        "  [[datasets.subsets]]\n  image_dir = \"imgs\"\n  keep_tokens = 3\n"
        "  [[datasets.subsets]]\n  image_dir = \"more\"\n  caption_suffix = \"\"\n"
        "[[datasets]]\n  [[datasets.subsets]]\n  image_dir = \"imgs\"\n"
    )
    flags = {"keep_tokens": 9, "caption_suffix": "f", "resolution": "512,640", "shuffle_caption": None,
             "train_batch_size": 7, "dataset_repeats": 4, "learning_rate": 1e-5, "image_dir": "ignored"}
    cfg = load(text, flags)
    (d0, d1) = cfg.datasets
    s00, s01 = d0.subsets
    (s10,) = d1.subsets
    assert (s00.keep_tokens, s01.keep_tokens, s10.keep_tokens) == (3, 2, 1)  # subset > dataset > general
    assert (s00.caption_prefix, s10.caption_prefix) == ("d", "g")
    assert s00.caption_suffix == s10.caption_suffix == "f"  # flags below the file
    assert s01.caption_suffix is None  # "" in the subset clears the flag's value
    assert s00.shuffle_caption is False  # None flags do not count: the default
    assert s00.flip_aug and s10.flip_aug
    assert s00.num_repeats == 4  # --dataset_repeats
    assert (d0.batch_size, d1.batch_size) == (3, 3)  # general beats --train_batch_size
    assert d0.resolution == (768, 1024) and d1.resolution == (512, 640)  # (width, height)
    assert d1.min_bucket_reso == 256 and d1.validation_seed is None  # dataclass defaults
    assert load(FOLDER, {"train_batch_size": 7, "resolution": 896}).datasets[0].batch_size == 7
    assert load(FOLDER, {"resolution": 896}).datasets[0].resolution == (896, 896)
    with pytest.raises(ConfigError, match=r"^command line: --train_batch_size: 'batch_size' must be a positive"):
        load(FOLDER, {"train_batch_size": 0})


def test_normalisations_and_ignored_kohya_keys(work):
    cfg = load(
        "[general]\nnetwork_multiplier = 1.0\n[[datasets]]\n  [[datasets.subsets]]\n  image_dir = \"imgs\"\n"
        '  caption_extension = "txt"\n  secondary_separator = ""\n  face_crop_aug_range = [2, 4]\n'
        "  custom_attributes = {a = 1}\n"
    )
    sub = cfg.datasets[0].subsets[0]
    assert sub.caption_extension == ".txt" and sub.secondary_separator is None
    assert sub.face_crop_aug_range == (2.0, 4.0)
    assert cfg.extra["ignored_keys"] == ("general.network_multiplier", "datasets[0].subsets[0].custom_attributes")


def test_json_config_as_kohya_reads_it(work):
    data = {"general": {"shuffle_caption": True}, "datasets": [{"subsets": [{"image_dir": "imgs"}]}]}
    Path("c.json").write_text(json.dumps(data), encoding="utf-8")
    assert load_dataset_config("c.json").datasets[0].subsets[0].shuffle_caption
    Path("bad.json").write_text('{"general": {,}}', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"^bad.json: line 1, column 14: invalid JSON"):
        load_dataset_config("bad.json")


def test_utf8_bom_is_accepted(work):
    Path("bom.toml").write_bytes(b"\xef\xbb\xbf" + FOLDER.encode())
    assert load_dataset_config("bom.toml").datasets[0].subsets[0].image_dir == work / "imgs"


def test_dump_loads_back_equal(work):
    cfg = load(
        '[general]\ncaption_prefix = "poster, \\"quoted\\" \u00e9"\nface_crop_aug_range = [1.5, 3]\n'
        "[[datasets]]\nresolution = [832, 1216]\nvalidation_seed = 5\nvalidation_split = 0.1\n"
        '  [[datasets.subsets]]\n  image_dir = "imgs"\n  class_tokens = "a\\tb"\n  keep_tokens_separator = "|||"\n'
        '[[datasets]]\n  [[datasets.subsets]]\n  metadata_file = "meta.json"\n  token_warmup_step = 0.25\n'
    )
    text = dump_dataset_config(cfg)
    Path("dumped.toml").write_text(text, encoding="utf-8")
    again = load_dataset_config("dumped.toml")
    assert again.datasets == cfg.datasets
    assert again.datasets[0].subsets[0].caption_prefix == 'poster, "quoted" \u00e9'


def test_flags_in_json_make_a_metadata_subset(work):
    cfg = config_from_flags(train_data_dir="imgs", in_json="meta.json", defaults={"dataset_repeats": 2})
    (sub,) = cfg.datasets[0].subsets
    assert sub.metadata_file == work / "meta.json" and sub.image_dir == work / "imgs" and sub.num_repeats == 2
    assert cfg.source is None
    with pytest.raises(ConfigError, match=r"^command line: --in_json: file 'nope.json' does not exist"):
        config_from_flags(train_data_dir="imgs", in_json="nope.json")
    with pytest.raises(ConfigError, match=r"^no training data given"):
        config_from_flags()


def test_flags_train_data_dir_uses_kohyas_folder_layout(work):
    root = work / "train"
    for name in ("10_sks poster", "2_a_b", "3", "plain", "0_zero"):
        (root / name).mkdir(parents=True)
    (root / "stray.png").write_bytes(b"")  # ignored: there are N_ subfolders
    cfg = config_from_flags(train_data_dir="train")
    subs = cfg.datasets[0].subsets
    assert [(s.image_dir.name, s.num_repeats, s.class_tokens) for s in subs] == [
        ("10_sks poster", 10, "sks poster"),
        ("2_a_b", 2, "a_b"),
        ("3", 3, None),
    ]
    assert not any(s.is_reg for s in subs)
    assert cfg.extra["skipped_folders"] == (str(root / "0_zero"), str(root / "plain"))
    # reg folders get is_reg
    (work / "reg" / "1_poster").mkdir(parents=True)
    cfg = config_from_flags(train_data_dir="train", reg_data_dir="reg")
    assert [s.is_reg for s in cfg.datasets[0].subsets] == [False, False, False, True]


def test_flags_plain_folder_of_images_is_one_subset(work):
    (work / "flat").mkdir()
    (work / "flat" / "a.JPG").write_bytes(b"")
    cfg = config_from_flags(train_data_dir="flat", defaults={"dataset_repeats": 3, "caption_extension": ".txt"})
    (sub,) = cfg.datasets[0].subsets
    assert sub.image_dir == work / "flat" and sub.num_repeats == 3 and sub.caption_extension == ".txt"
    (work / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"^command line: --train_data_dir: no 'N_name' subfolders and no images"):
        config_from_flags(train_data_dir="empty")


@pytest.mark.parametrize("example", sorted((REPO / "dataset_configs").glob("*.toml")), ids=lambda p: p.name)
def test_examples_load(example, tmp_path, monkeypatch):
    """Each example loads once the folders/files it names exist (relative to the current directory)."""
    monkeypatch.chdir(tmp_path)
    raw = tomllib.loads(example.read_text(encoding="utf-8"))
    for ds in raw["datasets"]:
        for sub in ds["subsets"]:
            if "metadata_file" in sub:
                Path(sub["metadata_file"]).parent.mkdir(parents=True, exist_ok=True)
                Path(sub["metadata_file"]).write_text("{}", encoding="utf-8")
            if "image_dir" in sub:
                Path(sub["image_dir"]).mkdir(parents=True, exist_ok=True)
    cfg = load_dataset_config(example)
    assert cfg.datasets and all(ds.subsets for ds in cfg.datasets)
    assert cfg.source == example
    again = tmp_path / "again.toml"
    again.write_text(dump_dataset_config(cfg), encoding="utf-8")
    assert load_dataset_config(again).datasets == cfg.datasets
