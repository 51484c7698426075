"""Per-model statistics and the ``summary.csv`` file, exactly as the seed's notebook expects them.

LAION score: pandas ``describe()`` (count, mean, sample std, min, quartiles, max) plus scipy's biased
skew and biased Fisher kurtosis; CLIP score: numpy mean and population std (``np.std``), as the seed.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from library.errors import DataError
from library.fileio import atomic_path

PER_IMAGE_COLUMNS = ["ClipScore", "LAIONScore", "ImageIndex", "File", "Prompt"]
SUMMARY_COLUMNS = [
    "Model", "count_LAIONScore", "mean_LAIONScore", "std_LAIONScore", "min_LAIONScore", "25%_LAIONScore",
    "50%_LAIONScore", "75%_LAIONScore", "max_LAIONScore", "skew_LAIONScore", "kurtosis_LAIONScore",
    "Clipscore_mean", "Clipscore_std",
]


def summarize_model(model: str, per_image: pd.DataFrame) -> dict:
    """One summary row (a dict keyed by :data:`SUMMARY_COLUMNS`) from a per-image table."""
    from scipy import stats

    laion = per_image["LAIONScore"].astype(float)
    clip = per_image["ClipScore"].astype(float)
    row: dict = {"Model": str(model)}
    for name, value in laion.describe().items():
        row[f"{name}_LAIONScore"] = float(value)
    with warnings.catch_warnings():  # one image or equal scores: NaN, as scipy says, without the noise
        warnings.simplefilter("ignore", RuntimeWarning)
        row["skew_LAIONScore"] = float(stats.skew(laion, axis=0, bias=True, nan_policy="propagate"))
        row["kurtosis_LAIONScore"] = float(
            stats.kurtosis(laion, axis=0, fisher=True, bias=True, nan_policy="propagate"))
    row["Clipscore_mean"] = float(np.mean(clip))
    row["Clipscore_std"] = float(np.std(clip))
    return {column: row.get(column, float("nan")) for column in SUMMARY_COLUMNS}


def read_summary(path: Path) -> pd.DataFrame:
    """Read ``summary.csv`` (also the seed's files, which carry an unnamed index column)."""
    if not path.is_file():
        return pd.DataFrame(columns=SUMMARY_COLUMNS)
    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read summary ({str(err).splitlines()[0][:120]})", where=str(path),
                        hint="fix or move the file; use --rescore to rebuild it") from None
    if "Model" not in frame.columns:
        raise DataError("summary has no 'Model' column", where=str(path), hint="move the file away to rebuild it")
    frame = frame.drop(columns=[c for c in frame.columns if str(c).startswith("Unnamed:")])
    frame["Model"] = frame["Model"].astype(str)
    return frame


def merge_summary(existing: pd.DataFrame, rows: list[dict]) -> pd.DataFrame:
    """Existing rows keep their order; a row for a model already present replaces it; new ones append."""
    new = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
    if existing.empty:
        return new.reset_index(drop=True)
    replaced = {row["Model"]: row for row in rows}
    kept = [replaced.pop(model, None) or record
            for model, record in zip(existing["Model"], existing.to_dict("records"))]
    merged = pd.DataFrame(kept + list(replaced.values()))
    columns = SUMMARY_COLUMNS + [c for c in merged.columns if c not in SUMMARY_COLUMNS]
    return merged.reindex(columns=columns).reset_index(drop=True)


def write_csv(frame: pd.DataFrame, path: Path) -> None:
    """Write a table atomically, without the index column."""
    with atomic_path(path, suffix=".csv") as tmp:
        frame.to_csv(tmp, index=False)
