"""kohya's TOML dataset schema: ``[general]`` -> ``[[datasets]]`` -> ``[[datasets.subsets]]``.

Values resolve subset -> dataset -> general -> command-line flag -> default. The result is a tree
of frozen dataclasses; nothing downstream reads the TOML or the argparse namespace again.

(Interface fixed by the lead; the parser/validator is being written.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class SubsetConfig:
    """One subset: a folder of images with caption files, or a kohya metadata file."""

    image_dir: Path | None = None
    metadata_file: Path | None = None
    num_repeats: int = 1
    shuffle_caption: bool = False
    caption_separator: str = ","
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    secondary_separator: str | None = None
    enable_wildcard: bool = False
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    token_warmup_min: int = 1
    token_warmup_step: float = 0.0
    color_aug: bool = False
    flip_aug: bool = False
    random_crop: bool = False
    face_crop_aug_range: tuple[float, float] | None = None
    resize_interpolation: str | None = None
    alpha_mask: bool = False
    caption_extension: str = ".caption"
    class_tokens: str | None = None
    is_reg: bool = False

    @property
    def is_metadata_subset(self) -> bool:
        return self.metadata_file is not None


@dataclass(frozen=True)
class DatasetConfig:
    """One dataset: shared geometry and batch size for its subsets."""

    subsets: tuple[SubsetConfig, ...]
    resolution: tuple[int, int] = (1024, 1024)  # (width, height)
    batch_size: int = 1
    enable_bucket: bool = True
    min_bucket_reso: int = 256
    max_bucket_reso: int = 2048
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    validation_split: float = 0.0
    validation_seed: int | None = None


@dataclass(frozen=True)
class DatasetsConfig:
    """Everything the data pipeline needs; ``source`` is the TOML file it came from, if any."""

    datasets: tuple[DatasetConfig, ...]
    source: Path | None = None
    extra: dict = field(default_factory=dict)
