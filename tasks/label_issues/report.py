"""What the label-issue checks leave for people: the results JSON, the Markdown report, a thumbnail grid of the
worst-ranked files (PNG), and the flagged rows as a manifest (`path,label,split,...`) to fix labels from.

Every file is written atomically; each is written even when nothing is flagged (DVC expects every output).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.files import atomic_path, atomic_write, write_json
from tasks.images import DEFAULT_MAX_PIXELS, load_for_model
from tasks.label_issues.scan import Findings

log = logging.getLogger(__name__)

TABLE_ROWS = 50  # rows per table in the Markdown report (the JSON and CSV hold all)
THUMBNAILS = 16  # files in the thumbnail grid
FLAGGED_COLUMNS = ["path", "label", "split", "suggested_label", "label_quality", "issues", "detail"]


def issue_rows(found: Findings) -> list[dict]:
    """The likely label errors, worst first, as the JSON, the CSV and the Prefect artifact list them."""
    return [{"rank": i + 1, "path": r.path, "split": r.split, "given": r.label, "suggested": r.suggested,
             "label_quality": round(float(r.quality), 4)} for i, r in enumerate(found.label_issues.itertuples())]


def summary(found: Findings, mode: str, status: str, blocking: list[str], context: dict) -> dict:
    """The results JSON: counts, settings, timings and every flagged file."""
    return {
        "status": status, "mode": mode, "n_images": len(found.table), "classes": found.classes,
        "counts": {"label_issues": len(found.label_issues), "near_duplicates": len(found.near_duplicates),
                   "outliers": len(found.outliers), "reviewed_not_flagged": len(found.reviewed_hits),
                   "blocking": len(blocking)},
        "label_issue_fraction": round(len(found.label_issues) / max(1, len(found.table)), 4),
        "folds": found.folds, "note": found.note,
        "outlier_threshold": None if found.outlier_threshold is None else round(found.outlier_threshold, 4),
        **context, "timings": found.timings,
        "label_issues": issue_rows(found),
        "near_duplicates": found.near_duplicates.to_dict(orient="records"),
        "outliers": found.outliers.to_dict(orient="records"),
        "reviewed_not_flagged": found.reviewed_hits,
        "blocking": blocking,
    }


def flagged_manifest(found: Findings) -> pd.DataFrame:
    """One row per flagged file, in the manifest's `path,label,split` form: the given label, what the features
    suggest, and which checks flagged it."""
    rows: dict[str, dict] = {}

    def add(path: str, split: str, label: str, kind: str, detail: str = "", suggested: str = "", quality=None):
        row = rows.setdefault(path, {"path": path, "label": label, "split": split, "suggested_label": "",
                                     "label_quality": "", "issues": [], "detail": []})
        row["issues"].append(kind)
        row["detail"] += [detail] if detail else []
        if suggested:
            row["suggested_label"], row["label_quality"] = suggested, round(float(quality), 4)

    for r in found.label_issues.itertuples():
        add(r.path, r.split, r.label, "label", suggested=r.suggested, quality=r.quality)
    for r in found.near_duplicates.itertuples():
        add(r.path, r.split, r.label, "near_duplicate", f"like {r.other_path} ({r.other_split}, {r.similarity:.3f})")
        add(r.other_path, r.other_split, r.other_label, "near_duplicate", f"like {r.path} ({r.split}, "
            f"{r.similarity:.3f})")
    for r in found.outliers.itertuples():
        add(r.path, r.split, r.label, "outlier", f"distance {r.distance:.3f}")
    out = pd.DataFrame(list(rows.values()), columns=FLAGGED_COLUMNS)
    out["issues"] = out["issues"].map(";".join)
    out["detail"] = out["detail"].map("; ".join)
    return out


def markdown(data: dict, png_name: str, reviewed_name: str, flagged_name: str) -> str:
    c = data["counts"]
    lines = [f"# Label issues: {data['status'].upper()}", "",
             f"{data['n_images']} images, classes {', '.join(map(str, data['classes']))}; mode `{data['mode']}`."]
    if data.get("backbone"):
        b = data["backbone"]
        lines.append(f"Features: {b['arch']} ({b['source']}) at {b['size']} px; {b['cached']} from the cache, "
                     f"{b['computed']} computed; out-of-fold probabilities from {data['folds']}-fold logistic "
                     "regression.")
    lines += ["", f"- **{c['label_issues']} likely label errors** (confident learning)" +
              (f" - not checked: {data['note']}" if data["note"] else ""),
              f"- {c['near_duplicates']} near-duplicate pairs across splits",
              f"- {c['outliers']} outliers (far from every training image)",
              f"- {c['reviewed_not_flagged']} reviewed files not flagged again ({reviewed_name})"]
    if data["blocking"]:
        lines += ["", f"**Blocking ({len(data['blocking'])} files, mode block):** fix their labels or accept them in "
                  f"{reviewed_name}."]
    if data["label_issues"]:
        lines += ["", "## Likely label errors (lowest label quality first)", "", f"![worst-ranked files]({png_name})",
                  "", "| # | path | split | given | suggested | label quality |", "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['rank']} | `{r['path']}` | {r['split']} | {r['given']} | {r['suggested']} | "
                  f"{r['label_quality']:.3f} |" for r in data["label_issues"][:TABLE_ROWS]]
        lines += _more(len(data["label_issues"]))
    if data["near_duplicates"]:
        lines += ["", "## Near-duplicates across splits", "", "| path | split | near-duplicate | split | cosine |",
                  "| --- | --- | --- | --- | --- |"]
        lines += [f"| `{r['path']}` | {r['split']} | `{r['other_path']}` | {r['other_split']} | {r['similarity']:.3f} |"
                  for r in data["near_duplicates"][:TABLE_ROWS]]
        lines += _more(len(data["near_duplicates"]))
    if data["outliers"]:
        lines += ["", "## Outliers (farthest first)", "", "| path | split | label | distance |", "| --- | --- | --- | --- |"]
        lines += [f"| `{r['path']}` | {r['split']} | {r['label']} | {r['distance']:.3f} |"
                  for r in data["outliers"][:TABLE_ROWS]]
        lines += _more(len(data["outliers"]))
    lines += ["", "## What to do", "",
              "- A wrong label: fix it at the source (move the file to its class folder, or edit the manifest's "
              f"label column) and rerun; {flagged_name} lists the flagged files as a manifest (`path,label,split`, "
              "the suggested label, the checks that flagged them).",
              f"- A right label (or a duplicate you keep on purpose): add a line `path,note` to {reviewed_name}; "
              "the next run does not flag it again."]
    return "\n".join(lines) + "\n"


def _more(n: int) -> list[str]:
    return ["", f"... and {n - TABLE_ROWS} more (see the JSON)"] if n > TABLE_ROWS else []


def thumbnail_grid(found: Findings, images_dir: Path, out: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """A PNG grid of the worst-ranked likely label errors: each thumbnail titled given -> suggested (score)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = found.label_issues.head(THUMBNAILS)
    cols = max(1, min(4, len(top)))
    rows = max(1, -(-len(top) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    if top.empty:
        axes[0, 0].text(0.5, 0.5, "no likely label errors", ha="center", va="center")
    for ax, r in zip(axes.flat, top.itertuples()):
        try:
            ax.imshow(np.transpose(load_for_model(Path(images_dir) / r.path, 128, max_pixels), (1, 2, 0)))
        except Exception as exc:  # an unreadable file still gets its cell, with the reason
            ax.text(0.5, 0.5, f"unreadable: {exc}"[:60], ha="center", va="center", fontsize=6, wrap=True)
        ax.set_title(f"{_short(r.path)}\n{r.label} -> {r.suggested} ({r.quality:.2f})", fontsize=7)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)


def _short(path: str, width: int = 30) -> str:
    return path if len(path) <= width else "..." + path[-(width - 3):]


def write_all(data: dict, found: Findings, images_dir: Path, out_dir: Path, flagged_csv: Path | None,
              reviewed_name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """label_issues.json, label_issues.md and label_issues.png in `out_dir`; the flagged rows at `flagged_csv`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "label_issues.json", data)
    atomic_write(out_dir / "label_issues.md", markdown(data, "label_issues.png", reviewed_name,
                                                       str(flagged_csv) if flagged_csv else "the JSON"))
    thumbnail_grid(found, images_dir, out_dir / "label_issues.png", max_pixels)
    if flagged_csv is not None:
        with atomic_path(flagged_csv) as tmp:
            flagged_manifest(found).to_csv(tmp, index=False)
