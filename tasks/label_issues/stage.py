"""Label-issues stage: the validated manifest + the pretrained weights -> likely label errors, near-duplicates
across splits and outliers, before a training run is spent on them.

Features are the frozen pretrained backbone's pooled outputs (no fine-tuning), cached by image content and weights
(`tasks.features`), so a rerun with unchanged images costs seconds. Out-of-fold probabilities from a K-fold
logistic regression on them feed confident learning (cleanlab); the same features give near-duplicates across
splits and outliers (`tasks.label_issues.scan`). Writes the results JSON, a Markdown report and a thumbnail grid
into the report folder, and the flagged rows as a manifest. `label_issues.mode` says what a flagged file does:
report, warn, or block (exit 1 naming the files, so training never starts). Files listed in the review list
(path,note) are accepted and not flagged again.
"""

from __future__ import annotations

import logging
from argparse import Namespace
from pathlib import Path

import pandas as pd

from tasks.entry import stage_main
from tasks.features import Backbone, cache_root, cached_features, load_backbone
from tasks.images import DEFAULT_MAX_PIXELS
from tasks.label_issues.report import summary, write_all
from tasks.label_issues.scan import Findings, scan
from tasks.manifest import read_manifest
from tasks.params import LabelIssuesParams, Params
from tasks.reviewed import read_reviewed

log = logging.getLogger(__name__)
WARN_LINES = 20  # files named one by one in the log in warn mode


class LabelIssuesBlocked(RuntimeError):
    """label_issues.mode is block and some flagged files are not reviewed; the message names them."""


def inspect(net: Backbone, manifest: pd.DataFrame, images_dir: Path, params: LabelIssuesParams, seed: int,
            reviewed: set[str], cache_dir: Path | None, workers: int = 4,
            max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Findings, dict]:
    """Features of every manifest row (cached), then every check; also what the report says about the backbone."""
    rows = manifest.reset_index(drop=True)
    hashes = rows["sha256"].fillna("").astype(str).tolist() if "sha256" in rows.columns else [""] * len(rows)
    feats, stats = cached_features(net, [Path(images_dir) / p for p in rows["path"]], hashes, cache_dir, workers,
                                   max_pixels)
    found = scan(feats, rows, params, reviewed, seed)
    found.timings = {"features_s": stats.seconds, **found.timings}
    context = {"backbone": {"source": net.meta.get("source"), "arch": net.meta.get("arch"),
                            "sha256": net.meta.get("sha256"), "size": net.pre.size, "cached": stats.cached,
                            "computed": stats.computed, "cache_file": stats.cache_file}}
    return found, context


def verdict(found: Findings, params: LabelIssuesParams) -> tuple[str, list[str]]:
    """(status, the files that block): status is clean (nothing flagged), flagged, or blocked (mode block and
    flagged files of the `block_on` kinds)."""
    acting = found.flagged(params.block_on)
    if params.mode == "block" and acting:
        return "blocked", acting
    return ("flagged" if found.flagged(("label", "near_duplicate", "outlier")) else "clean"), []


def run(manifest_path: Path, images_dir: Path, base_dir: Path, reviewed_path: Path | None, out_dir: Path,
        flagged_csv: Path | None, params: LabelIssuesParams, seed: int, workers: int = 4,
        max_pixels: int = DEFAULT_MAX_PIXELS, cache_dir: Path | None | str = "auto") -> dict:
    """The stage: check every row of the manifest, write the reports; returns the results JSON's content.
    `cache_dir` "auto": `tasks.features.cache_root` near the images; None: no feature cache."""
    manifest = read_manifest(manifest_path)
    reviewed = set(read_reviewed(reviewed_path))
    reviewed_name = str(reviewed_path) if reviewed_path is not None else "a review list"
    if params.mode == "off":
        found, context = scan_nothing(manifest), {"note": "label_issues.mode is off: nothing was checked"}
    else:
        net = load_backbone(base_dir, params.image_size)
        cache = cache_root(images_dir) if cache_dir == "auto" else cache_dir
        found, context = inspect(net, manifest, images_dir, params, seed, reviewed, cache, workers, max_pixels)
    status, blocking = verdict(found, params)
    data = summary(found, params.mode, "off" if params.mode == "off" else status, blocking, context)
    write_all(data, found, images_dir, out_dir, flagged_csv, reviewed_name, max_pixels)
    log_findings(data, params.mode)
    return data


def scan_nothing(manifest: pd.DataFrame) -> Findings:
    """The findings of a check that did not run (mode off): nothing flagged."""
    table = manifest[["path", "split", "label"]].astype(str).reset_index(drop=True)
    empty = table.iloc[:0]
    return Findings(table, sorted(table["label"].unique()), empty.assign(suggested="", quality=0.0),
                    pd.DataFrame(columns=["path", "split", "label", "other_path", "other_split", "other_label",
                                          "similarity"]), empty.assign(distance=0.0), [], note="mode off")


def log_findings(data: dict, mode: str) -> None:
    c = data["counts"]
    log.info("label_issues: %d images: %d likely label errors, %d near-duplicate pairs across splits, %d outliers, "
             "%d reviewed (%s)", data["n_images"], c["label_issues"], c["near_duplicates"], c["outliers"],
             c["reviewed_not_flagged"], ", ".join(f"{k}={v}" for k, v in data["timings"].items()))
    if mode == "warn":
        for r in data["label_issues"][:WARN_LINES]:
            log.warning("label_issues: %s (%s): labelled %s, looks like %s (label quality %.3f)", r["path"], r["split"],
                        r["given"], r["suggested"], r["label_quality"])
        for r in data["near_duplicates"][:WARN_LINES]:
            log.warning("label_issues: %s (%s) and %s (%s) are near-duplicates (cosine %.3f)", r["path"], r["split"],
                        r["other_path"], r["other_split"], r["similarity"])


def blocked_message(data: dict, reviewed: Path | str, report: Path | str) -> str:
    """One line naming the blocking files."""
    files = data["blocking"]
    shown = ", ".join(files[:8]) + (f" and {len(files) - 8} more" if len(files) > 8 else "")
    return (f"label issues: {len(files)} flagged file(s) not reviewed (label_issues.mode is block): {shown}; fix "
            f"their labels, or accept them by listing them in {reviewed} (path,note); details: {report}")


def main(argv: list[str] | None = None) -> None:
    stage_main("label_issues", __doc__, argv, _from_params)


def _from_params(p: Params, args: Namespace) -> None:
    data = run(args.manifest, args.images, args.base, args.reviewed, args.out_dir, args.flagged, p.label_issues,
               p.seed, p.data.workers, p.data.max_pixels)
    if data["status"] == "blocked":
        raise LabelIssuesBlocked(blocked_message(data, args.reviewed, Path(args.out_dir) / "label_issues.md"))
