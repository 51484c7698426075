"""``OUTPUT/report.html``: summary table, score plots, and the same prompts side by side across models.

Plots are PNGs in ``OUTPUT/plots/`` (matplotlib, Agg backend). Images are linked by paths relative to
``OUTPUT`` so the output folder and the images root can be zipped together and opened anywhere.
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from urllib.parse import quote

from library.evaluation.stats import SUMMARY_COLUMNS, read_summary
from library.fileio import atomic_path, atomic_write_text

PLOTS = (("LAIONScore", "LAION aesthetic score", "laion_scores.png"), ("ClipScore", "CLIP score", "clip_scores.png"))


def read_per_image(output_dir: Path, models: list[str]) -> dict:
    """``{model: per-image DataFrame}`` for the models whose ``per_image/<model>.csv`` exists."""
    import pandas as pd

    tables = {}
    for model in models:
        path = output_dir / "per_image" / f"{model}.csv"
        if path.is_file():
            tables[model] = pd.read_csv(path, keep_default_na=True)
    return tables


def plot_scores(tables: dict, column: str, title: str, path: Path) -> Path:
    """A violin (where the data has spread) with a box plot over it, one per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(tables)
    data = [tables[m][column].dropna().to_numpy(dtype=float) for m in models]
    figure, axes = plt.subplots(figsize=(max(4.0, 1.3 * len(models) + 2), 4))
    try:
        spread = [i for i, values in enumerate(data) if len(values) > 1 and values.std() > 0]
        if spread:
            axes.violinplot([data[i] for i in spread], positions=[i + 1 for i in spread], showextrema=False)
        axes.boxplot([values if len(values) else [float("nan")] for values in data], widths=0.15)
        axes.set_xticks(range(1, len(models) + 1), models, rotation=30, ha="right")
        axes.set_ylabel(title)
        axes.set_title(f"{title} per model")
        figure.tight_layout()
        with atomic_path(path, suffix=".png") as tmp:
            figure.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(figure)
    return path


def _link(target: Path, output_dir: Path) -> str:
    return quote(Path(os.path.relpath(target.resolve(), output_dir.resolve())).as_posix())


def _grid_key(file_name: str) -> str:
    """What pairs images across models: the name after the model field (``<prompt>-<image>``)."""
    stem = Path(file_name).stem
    return stem.split("-", 1)[1] if "-" in stem else stem


def _grid_html(tables: dict, images_root: Path, output_dir: Path, max_rows: int) -> str:
    models = list(tables)
    cells: dict[str, dict[str, dict]] = {}
    prompts: dict[str, str] = {}
    for model, table in tables.items():
        for row in table.to_dict("records"):
            key = _grid_key(str(row["File"]))
            cells.setdefault(key, {})[model] = row
            prompts.setdefault(key, str(row.get("Prompt", "")))
    keys = sorted(cells, key=lambda k: [int(p) if p.isdigit() else p for p in k.split("-")])[:max_rows]
    head = "".join(f"<th>{html.escape(m)}</th>" for m in models)
    lines = [f"<table class='grid'><tr><th>prompt</th>{head}</tr>"]
    for key in keys:
        row_html = [f"<td class='prompt'><b>{html.escape(key)}</b><br>{html.escape(prompts[key])}</td>"]
        for model in models:
            row = cells[key].get(model)
            if row is None:
                row_html.append("<td>-</td>")
                continue
            src = _link(images_root / model / str(row["File"]), output_dir)
            row_html.append(
                f"<td><a href='{src}'><img src='{src}' loading='lazy'></a><br>"
                f"CLIP {row['ClipScore']:.4f} · LAION {row['LAIONScore']:.3f}</td>")
        lines.append("<tr>" + "".join(row_html) + "</tr>")
    lines.append("</table>")
    if len(cells) > len(keys):
        lines.append(f"<p>{len(cells) - len(keys)} more rows not shown (raise --max_grid_rows).</p>")
    return "\n".join(lines)


_STYLE = """body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:4px;vertical-align:top;font-size:13px}
.grid img{max-width:220px;max-height:220px}.prompt{max-width:260px}"""


def write_report(output_dir: Path, images_root: Path, max_grid_rows: int = 60) -> Path:
    """Write ``report.html`` and the plot PNGs from ``summary.csv`` and ``per_image/*.csv``."""
    output_dir = Path(output_dir)
    summary = read_summary(output_dir / "summary.csv")
    tables = read_per_image(output_dir, list(summary["Model"]))
    plots_html = []
    if tables:
        for column, title, name in PLOTS:
            plot = plot_scores(tables, column, title, output_dir / "plots" / name)
            plots_html.append(f"<img src='{_link(plot, output_dir)}' alt='{html.escape(title)}'>")
    shown = summary.reindex(columns=[c for c in SUMMARY_COLUMNS if c in summary.columns])
    table_html = shown.to_html(index=False, float_format=lambda v: f"{v:.4f}", na_rep="", escape=True)
    body = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>Model evaluation</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>Model evaluation</h1>",
        f"<p>{len(summary)} model(s). LAION: aesthetic predictor on the CLIP image embedding; "
        "CLIP: image-text cosine similarity.</p>",
        "<h2>Summary</h2>", table_html,
        "<h2>Score distributions</h2>", "\n".join(plots_html) or "<p>no per-image scores found</p>",
        "<h2>Same prompts across models</h2>", _grid_html(tables, Path(images_root), output_dir, max_grid_rows),
        "</body></html>",
    ]
    path = output_dir / "report.html"
    atomic_write_text(path, "\n".join(body))
    return path
