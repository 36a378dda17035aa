"""What a flow run shows on its page: one artifact per stage output worth reading there.

Each function reads the files a stage wrote (their paths in `tasks.stages`, which dvc.yaml uses) and publishes them; a stage
that wrote nothing (it failed before its outputs) publishes nothing. Keys are stable, so the
Artifacts page keeps one history per key across runs.
"""

from __future__ import annotations

import base64
import csv
import json
from pathlib import Path

from prefect.artifacts import (
    create_image_artifact,
    create_link_artifact,
    create_markdown_artifact,
    create_table_artifact,
)

from tasks import stages

IMAGE_INLINE_MAX = 1_000_000  # bytes; Prefect drops the event of an artifact over ~1.5 MB


def validation(root: Path) -> None:
    summary = root / stages.path("validation_md")
    if not summary.exists():
        return
    docs = root / stages.path("data_docs") / "index.html"
    where = f"\n\nGreat Expectations Data Docs: [{docs}]({docs.resolve().as_uri()})" if docs.exists() else ""
    create_markdown_artifact(key="validation", markdown=summary.read_text() + where,
                             description="Data validation (Great Expectations)")


def label_issues(root: Path, failed: bool) -> None:
    """The likely label errors (worst first), the same table as the stage's Markdown report, plus its summary and
    thumbnail grid."""
    path = root / stages.path("label_issues_json")
    if not path.exists():
        return
    data = json.loads(path.read_text())
    rows = [{k: r[k] for k in ("rank", "path", "split", "given", "suggested", "label_quality")}
            for r in data.get("label_issues", [])[:200]]
    c = data.get("counts", {})
    what = (f"{c.get('label_issues', 0)} likely label errors, {c.get('near_duplicates', 0)} near-duplicate pairs "
            f"across splits, {c.get('outliers', 0)} outliers ({data.get('status')}{', failed' if failed else ''})")
    if rows:
        create_table_artifact(key="label-issues", table=rows, description=f"Label issues: {what}")
    report = root / stages.path("label_issues_md")
    if report.exists():
        create_markdown_artifact(key="label-issues-report", markdown=report.read_text(),
                                 description=f"Label issues: {what}")
    png = root / stages.path("label_issues_png")
    if rows and png.exists() and png.stat().st_size <= IMAGE_INLINE_MAX:
        uri = "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()
        create_image_artifact(image_url=uri, key="label-issues-thumbnails", description=f"Worst-ranked files ({png})")


def training(root: Path) -> None:
    """Per-epoch training metrics (what `dvc plots show` draws), one row per epoch."""
    path = root / stages.path("history")
    if not path.exists():
        return
    keep = ("stage", "epoch", "train_loss", "val_loss", "val_accuracy", "val_macro_f1", "lr", "seconds")
    with path.open() as f:
        rows = [{k: (r[k] if k == "stage" else round(float(r[k]), 6)) for k in keep if k in r} for r in csv.DictReader(f)]
    create_table_artifact(key="training-history", table=rows, description="Training: one row per epoch")


def metrics(root: Path) -> dict | None:
    path = root / stages.path("metrics")
    if not path.exists():
        return None
    m = json.loads(path.read_text())
    create_table_artifact(
        key="test-metrics",
        table=[{"metric": k, "value": round(m[k], 4)} for k in ("accuracy", "macro_recall", "macro_f1") if k in m],
        description=f"Test split ({m.get('n')} images)",
    )
    png = root / stages.path("confusion")
    if png.exists() and png.stat().st_size <= IMAGE_INLINE_MAX:
        uri = "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()
        create_image_artifact(image_url=uri, key="confusion-matrix", description=f"Confusion matrix ({png})")
    elif png.exists():
        create_link_artifact(key="confusion-matrix", link=png.resolve().as_uri(), link_text=str(png))
    return m


def verdict(root: Path, failed: bool) -> None:
    path = root / stages.path("verdict_md")
    if path.exists():
        create_markdown_artifact(key="gate-verdict", markdown=path.read_text(),
                                 description="Gate verdict" + (" (failed)" if failed else ""))


def model_card(root: Path) -> None:
    path = root / stages.path("model_card")
    if path.exists():
        create_markdown_artifact(key="model-card", markdown=path.read_text(), description=f"Model card ({path})")


def registry_version(folder: Path, promotion: dict, line: str) -> None:
    """A link-style pointer to the registered version's folder, and the promotion line."""
    create_link_artifact(key="registry-version", link=folder.resolve().as_uri(),
                         link_text=f"{promotion['version']} (champion: {promotion['champion']})",
                         description="Model registry version")
    create_markdown_artifact(key="promotion", markdown=line, description="Model registry")


def lineage(entry: dict) -> None:
    flat = {
        "version": entry.get("version"),
        "data": entry["data"]["path"],
        "data version (DVC hash)": entry["data"]["dvc_hash"],
        "validated manifest sha256": entry["data"].get("manifest_sha256"),
        "params sha256": entry["params_sha256"],
        "git commit": entry["git_commit"],
        "flow run": entry["flow_run"].get("id"),
        "flow run URL": entry["flow_run"].get("url"),
        "deployment": entry["flow_run"].get("deployment"),
    }
    if entry.get("trigger"):
        flat["trigger"] = json.dumps(entry["trigger"], sort_keys=True)
    create_table_artifact(key="lineage", table=[{"what": k, "value": str(v)} for k, v in flat.items()],
                          description="Lineage of this run's model (also in the registry's lineage/ folder)")


def run_params(changes: list[str], params_sha256: str) -> None:
    text = ("\n".join(f"- `{c}`" for c in changes) if changes else "none: params.yaml as it was") + \
        f"\n\nparams.yaml sha256 `{params_sha256}`"
    create_markdown_artifact(key="run-params", markdown="Overrides written into params.yaml:\n\n" + text,
                             description="What this run set (DVC records the file)")


def trigger(cause: dict, line: str) -> None:
    """Why a retraining run ran when the model server started it (a drift alarm): the line and the whole record."""
    create_markdown_artifact(key="trigger", markdown=f"{line}\n\n```json\n{json.dumps(cause, indent=2)}\n```",
                             description="Why this run ran: the model server's drift alarm")


def outcome(line: str) -> None:
    create_markdown_artifact(key="outcome", markdown=line, description="What this run did")
