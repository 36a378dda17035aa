"""Validate stage: the ingest manifest -> pass/fail, a validated manifest and human-readable reports.

Every check is a real Great Expectations (GX Core 1.x) expectation, run through an ephemeral
context over in-memory DataFrames, so the Data Docs show exactly what was checked. Checks
that are about groups rather than files (images per class and split, split fractions) run
over small derived tables built here; the leakage check runs over a derived per-file column
(how many splits hold the same bytes), so GX still names the offending files.

Each check has a stable short name (`CHECKS`) used in `params.yaml` (`validate.warn_only`)
and in the reports. Bad data never raises: the outcome says what failed and names the files,
and the caller decides the exit code.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from argparse import Namespace
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from tasks.entry import stage_main
from tasks.files import (
    UMASK,
    atomic_path,
    atomic_write,
    new_temp,
    read_json,
    write_json,
)
from tasks.images import DEFAULT_MAX_PIXELS
from tasks.manifest import SPLITS, read_manifest
from tasks.params import Params, ValidateParams

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("path", "label", "split", "width", "height", "mode", "sha256", "decodes_ok")
OFFENDING_CAP = 50  # offending items kept per check in results.json / summary.md (the count is always exact)
MESSAGE_CAP = 10  # offending items spelled out in one failure message

CHECKS: dict[str, str] = {
    "has_images": "the manifest has at least one image",
    "decodes": "every image decodes",
    "split_values": "split is one of train/val/test",
    "labels_in_set": "labels belong to the declared classes",
    "no_empty_class": "every declared class has at least one image",
    "min_per_class_split": "each class has at least validate.min_images_per_class images in each split",
    "split_fractions": "split fractions are within validate.split_tolerance of the configured ones",
    "no_leakage": "no image content (sha256) is shared across splits",
    "label_conflicts": "identical images (sha256) carry the same label",
    "duplicates_within_split": "no image content (sha256) repeats within a split",
    "size_bounds": "width/height within [min_side, max_side] and width*height <= max_pixels",
    "modes": "image mode is one of validate.allowed_modes",
}


@dataclass
class CheckResult:
    name: str
    description: str
    blocking: bool
    success: bool
    skipped: str = ""  # why the check did not apply (e.g. no declared classes)
    observed: dict[str, Any] = field(default_factory=dict)
    offending: list[dict[str, str]] = field(default_factory=list)  # [{item, detail}], all of them
    gx_expectations: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        if self.skipped:
            return "skipped"
        if self.success:
            return "passed"
        return "failed" if self.blocking else "warning"

    def message(self) -> str:
        shown = "; ".join(f"{o['item']} ({o['detail']})" if o["detail"] else o["item"] for o in self.offending[:MESSAGE_CAP])
        more = f"; ... and {len(self.offending) - MESSAGE_CAP} more" if len(self.offending) > MESSAGE_CAP else ""
        head = f"{self.name}: expected {self.description}"
        return f"{head}: {len(self.offending)} offending: {shown}{more}" if self.offending else head

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "blocking": self.blocking,
            "success": self.success,
            "status": self.status,
            "skipped": self.skipped or None,
            "observed": self.observed,
            "offending": self.offending[:OFFENDING_CAP],
            "offending_count": len(self.offending),
            "gx_expectations": self.gx_expectations,
        }


@dataclass
class ValidationOutcome:
    success: bool
    failures: list[str]
    warnings: list[str]
    checks: list[CheckResult]
    quarantined: list[dict[str, str]]
    n_images: int
    manifest: pd.DataFrame = field(repr=False)  # the input minus quarantined rows
    time_s: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)

    def check(self, name: str) -> CheckResult:
        return next(c for c in self.checks if c.name == name)

    def to_json(self) -> dict[str, Any]:
        return {
            "success": self.success,
            "n_images": self.n_images,
            "n_validated": len(self.manifest),
            "expectations": [c.to_json() for c in self.checks],
            "quarantined": self.quarantined,
            "quarantined_count": len(self.quarantined),
            "failures": self.failures,
            "warnings": self.warnings,
            "time_s": round(self.time_s, 3),
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
        }


# --------------------------------------------------------------------------- preparing the data


def _normalise(manifest: pd.DataFrame) -> pd.DataFrame:
    """Types as the checks expect them, whatever a CSV/Parquet round trip did to them."""
    df = manifest.reset_index(drop=True).copy()
    for col in ("path", "label", "split", "mode", "sha256", "error"):
        if col not in df.columns:
            df[col] = ""
        df[col] = df[col].astype(object).where(df[col].notna(), "").astype(str)
    for col in ("width", "height"):
        df[col] = pd.to_numeric(df[col], errors="coerce").fillna(0).astype("int64")
    df["decodes_ok"] = df["decodes_ok"].map(_truthy).astype(bool)
    return df


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value) if pd.notna(value) else False


def _quarantine(df: pd.DataFrame, policy: str) -> tuple[pd.DataFrame, list[dict[str, str]]]:
    """Under `quarantine`, drop undecodable rows and record them; under `fail`, keep everything."""
    if policy != "quarantine":
        return df, []
    bad = df[~df["decodes_ok"]]
    records = [
        {"path": r.path, "label": r.label, "split": r.split, "error": r.error or "does not decode"}
        for r in bad.itertuples(index=False)
    ]
    for r in records:
        log.warning("validate: quarantined %s (%s)", r["path"], r["error"])
    return df[df["decodes_ok"]], records


def _images_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per image, with unknown values as nulls so GX skips them instead of failing them twice.

    A file that does not decode is reported by `decodes` only: its sha256 does not count for
    leakage (every empty file has the same hash) and its mode/size count only if known.
    """
    ok = df["decodes_ok"]
    known_size = (df["width"] > 0) & (df["height"] > 0)
    sha = df["sha256"].where(ok & (df["sha256"] != ""))
    by_content = sha.to_frame().assign(split=df["split"], label=df["label"]).dropna().groupby("sha256")
    n_splits = sha.map(by_content["split"].nunique())
    n_labels = sha.map(by_content["label"].nunique())
    return pd.DataFrame(
        {
            "row": df.index.astype("int64"),
            "path": df["path"],
            "label": df["label"],
            "split": df["split"],
            "decodes_ok": ok,
            "mode": df["mode"].where(df["mode"] != ""),
            "width": df["width"].where(known_size),
            "height": df["height"].where(known_size),
            "pixels": (df["width"] * df["height"]).where(known_size),
            "sha256": sha,
            "splits_with_same_content": n_splits,
            "labels_with_same_content": n_labels,
        }
    )


def _counts_table(df: pd.DataFrame, classes: list[str] | None = None) -> pd.DataFrame:
    """Images per (label, split), including the zero cells a plain groupby would leave out (and the declared
    classes that have no image at all)."""
    counts = df.groupby(["label", "split"]).size()
    rows = [
        {"group": f"label={label} split={split}", "label": label, "split": split, "n": int(counts.get((label, split), 0))}
        for label in sorted(set(df["label"]) | set(classes or []))
        for split in SPLITS
    ]
    return pd.DataFrame(rows, columns=["group", "label", "split", "n"])


def _fractions_table(df: pd.DataFrame, expected: dict[str, float], tolerance: float) -> pd.DataFrame:
    total = max(len(df), 1)
    rows = []
    for split, want in expected.items():
        frac = float((df["split"] == split).sum()) / total
        rows.append({"group": f"split={split}", "split": split, "fraction": round(frac, 4), "expected": want,
                     "tolerance": tolerance, "deviation": round(abs(frac - want), 6)})
    return pd.DataFrame(rows, columns=["group", "split", "fraction", "expected", "tolerance", "deviation"])


# --------------------------------------------------------------------------- the expectations


@dataclass
class _Spec:
    """One GX expectation, the table it runs on and the check (short name) it belongs to."""

    check: str
    table: str
    expectation: Any
    index: str = "path"  # column that names an offending row in the GX result
    detail: Callable[[dict], str] | None = None  # offending GX row -> why it offends


def _specs(df: pd.DataFrame, params: ValidateParams, classes: list[str] | None,
           expected_fractions: dict[str, float] | None, max_pixels: int) -> list[_Spec]:
    gxe = _gx().expectations

    rows = df.to_dict("index")
    rows_by_path = {r["path"]: r["label"] for r in rows.values()}
    by_sha: dict[str, list[tuple[str, str]]] = {}
    for r in rows.values():
        if r["decodes_ok"] and r["sha256"]:
            by_sha.setdefault(r["sha256"], []).append((r["path"], r["split"]))

    def decode_detail(u: dict) -> str:
        return rows[u["row"]]["error"] or "does not decode"

    def leak_detail(u: dict) -> str:
        r = rows[u["row"]]
        others = [f"{p} [{s}]" for p, s in by_sha[r["sha256"]] if p != r["path"]]
        return f"in {r['split']}; same content (sha256 {r['sha256'][:12]}) as " + ", ".join(others)

    def conflict_detail(u: dict) -> str:
        r = rows[u["row"]]
        others = [f"{p} [{rows_by_path[p]}]" for p, _ in by_sha[r["sha256"]] if rows_by_path[p] != r["label"]]
        return f"labelled '{r['label']}'; same content (sha256 {r['sha256'][:12]}) as " + ", ".join(others)

    def dup_detail(u: dict) -> str:
        r = rows[u["row"]]
        others = [p for p, s in by_sha[r["sha256"]] if s == r["split"] and p != r["path"]]
        return f"same content as {', '.join(others)} in {r['split']}"

    def size_detail(u: dict) -> str:
        r = rows[u["row"]]
        w, h = r["width"], r["height"]
        why = []
        if min(w, h) < params.min_side:
            why.append(f"side < min_side {params.min_side}")
        if max(w, h) > params.max_side:
            why.append(f"side > max_side {params.max_side}")
        if w * h > max_pixels:
            why.append(f"{w * h} pixels > data.max_pixels {max_pixels}")
        return f"{w}x{h}: " + ", ".join(why)

    def split_detail(split: str) -> str:
        fraction = float((df["split"] == split).mean()) if len(df) else 0.0
        want = (expected_fractions or {})[split]
        return f"fraction {fraction:.3f}, expected {want:.3f} +/- {params.split_tolerance}"

    specs = [
        _Spec("has_images", "images", gxe.ExpectTableRowCountToBeBetween(min_value=1)),
        _Spec("decodes", "images", gxe.ExpectColumnValuesToBeInSet(column="decodes_ok", value_set=[True]), detail=decode_detail),
        _Spec("split_values", "images", gxe.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS)),
              detail=lambda u: f"split '{u['split']}'"),
        _Spec("no_leakage", "images", gxe.ExpectColumnValuesToBeBetween(column="splits_with_same_content", max_value=1),
              detail=leak_detail),
        _Spec("label_conflicts", "images",
              gxe.ExpectColumnValuesToBeBetween(column="labels_with_same_content", max_value=1), detail=conflict_detail),
        _Spec("duplicates_within_split", "images",
              gxe.ExpectCompoundColumnsToBeUnique(column_list=["sha256", "split"], ignore_row_if="any_value_is_missing"),
              detail=dup_detail),
        *(
            _Spec("size_bounds", "images", gxe.ExpectColumnValuesToBeBetween(column=col, min_value=lo, max_value=hi),
                  detail=size_detail)
            for col, lo, hi in (("width", params.min_side, params.max_side), ("height", params.min_side, params.max_side),
                                ("pixels", None, max_pixels))
        ),
        _Spec("modes", "images", gxe.ExpectColumnValuesToBeInSet(column="mode", value_set=list(params.allowed_modes)),
              detail=lambda u: f"mode '{u['mode']}' not in {list(params.allowed_modes)}"),
        _Spec("min_per_class_split", "class_split_counts",
              gxe.ExpectColumnValuesToBeBetween(column="n", min_value=params.min_images_per_class), index="group",
              detail=lambda u: f"{u['n']} image(s), need >= {params.min_images_per_class}"),
    ]
    if classes is not None:
        specs += [
            _Spec("labels_in_set", "images", gxe.ExpectColumnValuesToBeInSet(column="label", value_set=list(classes)),
                  detail=lambda u: f"label '{u['label']}' not in {list(classes)}"),
            _Spec("no_empty_class", "images",
                  gxe.ExpectColumnDistinctValuesToContainSet(column="label", value_set=list(classes))),
        ]
    if expected_fractions is not None:
        specs.append(
            _Spec("split_fractions", "split_fractions",
                  gxe.ExpectColumnValuesToBeBetween(column="deviation", max_value=params.split_tolerance), index="group",
                  detail=lambda u: split_detail(u["group"].removeprefix("split=")))
        )
    for spec in specs:
        spec.expectation.meta = {"check": spec.check}  # shown in the Data Docs next to the expectation
    return specs


# --------------------------------------------------------------------------- running GX


def _gx():
    """Import GX on first use (~3 s, most of the stage's cost), keeping its INFO chatter out of our logs.

    The import is deferred so `finetune --help` and the other stages do not pay for it.
    """
    gx_log = logging.getLogger("great_expectations")
    if gx_log.level == logging.NOTSET:  # the app did not choose a level: GX logs at WARNING only
        gx_log.setLevel(logging.WARNING)
    import great_expectations
    import great_expectations.expectations  # noqa: F401

    return great_expectations


def _gx_context(docs_dir: Path | None):
    """An in-memory GX context (~ms to create): no files, no analytics, no progress bars.

    With `docs_dir`, it also has a filesystem Data Docs site rooted there; the validation
    results live in memory until `build_data_docs` renders them.
    """
    gx = _gx()
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    sites = {}
    if docs_dir is not None:
        sites["local_site"] = {
            "class_name": "SiteBuilder",
            "show_how_to_buttons": False,
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(Path(docs_dir).resolve())},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        }
    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
        data_docs_sites=sites,
    )
    return gx.get_context(mode="ephemeral", project_config=config)


def _run_gx(context, tables: dict[str, pd.DataFrame], specs: list[_Spec]) -> dict[int, dict]:
    """Run every spec's expectation over its table; return {id(spec): GX result dict}."""
    gx = _gx()
    source = context.data_sources.add_pandas("manifest")
    results: dict[int, dict] = {}
    for table, frame in tables.items():
        table_specs = [s for s in specs if s.table == table]
        if not table_specs:
            continue
        batch_definition = source.add_dataframe_asset(table).add_batch_definition_whole_dataframe("all")
        suite = context.suites.add(gx.ExpectationSuite(name=f"manifest_{table}"))
        for spec in table_specs:
            suite.add_expectation(spec.expectation)
        index_columns = ["row", "path"] if table == "images" else ["group"]
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=f"validate_{table}", data=batch_definition, suite=suite)
        )
        run = definition.run(
            batch_parameters={"dataframe": frame},
            result_format={"result_format": "COMPLETE", "unexpected_index_column_names": index_columns,
                           "partial_unexpected_count": 20},
        )
        for spec, res in zip(table_specs, _match(run.results, table_specs)):
            results[id(spec)] = res
    return results


def _match(results, specs: list[_Spec]) -> list[dict]:
    """GX returns results in its own order; pair them with specs through the expectation id."""
    by_id = {}
    for r in results:
        d = r.to_json_dict()
        by_id[d["expectation_config"]["id"]] = d
    missing = {"success": False, "result": {}, "exception_info": {"raised_exception": True, "exception_message": "no result"}}
    return [by_id.get(s.expectation.id, missing) for s in specs]


# --------------------------------------------------------------------------- results -> checks


def _gx_error(res: dict) -> str | None:
    """GX's error message for an expectation that could not be evaluated, if any.

    GX 1.x keys `exception_info` by metric (`{metric_id: {raised_exception, ...}}`); older
    code paths put the fields at the top level. Accept both.
    """
    info = res.get("exception_info") or {}
    candidates = [info, *(v for v in info.values() if isinstance(v, dict))]
    for c in candidates:
        if c.get("raised_exception"):
            return str(c.get("exception_message") or "unknown GX error").splitlines()[0]
    return None


def _offending(spec: _Spec, res: dict) -> list[dict[str, str]]:
    error = _gx_error(res)
    if error is not None:
        return [{"item": f"(GX could not evaluate {spec.expectation.expectation_type})", "detail": error, "_order": -1}]
    items = []
    for position, u in enumerate(res.get("result", {}).get("unexpected_index_list") or []):
        order = u.get("row", position)  # manifest order for files, table order for groups
        items.append({"item": str(u[spec.index]), "detail": spec.detail(u) if spec.detail else "", "_order": order})
    return items


def _observed(name: str, df: pd.DataFrame, tables: dict[str, pd.DataFrame], classes: list[str] | None,
              gx_results: list[dict], n_offending: int) -> dict[str, Any]:
    """What was seen, in a form a person can read in results.json."""
    if name == "has_images":
        return {"n_images": len(df)}
    if name == "min_per_class_split":
        counts = tables["class_split_counts"]
        return {label: {r.split: int(r.n) for r in g.itertuples()} for label, g in counts.groupby("label")}
    if name == "split_fractions":
        return {r.split: {"fraction": r.fraction, "expected": r.expected} for r in tables["split_fractions"].itertuples()}
    if name == "no_empty_class":
        present = set(df["label"])
        return {"images_per_class": {c: int((df["label"] == c).sum()) for c in classes or []},
                "missing": sorted(set(classes or []) - present)}
    if name == "modes":
        return {"modes": {(k or "(unknown)"): int(v) for k, v in df["mode"].value_counts().items()}}
    if name == "labels_in_set":
        return {"labels": sorted(set(df["label"]))}
    # Rows with a null in the checked column (unknown size, undecodable hash) are skipped by GX.
    checked = max((int(r.get("result", {}).get("element_count") or 0) - int(r.get("result", {}).get("missing_count") or 0)
                   for r in gx_results), default=0)
    return {"rows_checked": checked, "rows_unexpected": n_offending}


def _build_checks(specs: list[_Spec], gx_results: dict[int, dict], df: pd.DataFrame, tables: dict[str, pd.DataFrame],
                  params: ValidateParams, classes: list[str] | None) -> list[CheckResult]:
    checks = []
    for name, description in CHECKS.items():
        mine = [s for s in specs if s.check == name]
        blocking = name not in params.warn_only
        if not mine:
            why = ("no classes declared" if name in ("labels_in_set", "no_empty_class") else
                   "no expected split fractions (the splits are the source's own, or none were configured)")
            checks.append(CheckResult(name, description, blocking, success=True, skipped=why))
            continue
        results = [gx_results[id(s)] for s in mine]
        offending: dict[str, dict] = {}
        for spec, res in zip(mine, results):
            for item in _offending(spec, res):
                offending.setdefault(item["item"], item)  # size_bounds: one entry per file, not per column
        if name == "no_empty_class":  # GX reports only the first few missing values; name them all
            offending = {f"label={c}": {"item": f"label={c}", "detail": "no images", "_order": i}
                         for i, c in enumerate(sorted(set(classes or []) - set(df["label"])))}
        ordered = sorted(offending.values(), key=lambda o: o.pop("_order"))
        checks.append(CheckResult(
            name, description, blocking,
            success=all(bool(r.get("success")) for r in results),
            observed=_observed(name, df, tables, classes, results, len(ordered)),
            offending=ordered,
            gx_expectations=[s.expectation.expectation_type for s in mine],
        ))
    return checks


# --------------------------------------------------------------------------- public API


def validate_manifest(manifest: pd.DataFrame, params: ValidateParams, classes: list[str] | None,
                      expected_fractions: dict[str, float] | None,
                      max_pixels: int = DEFAULT_MAX_PIXELS) -> ValidationOutcome:
    """Run every check over `manifest`; never raises for bad data (see `ValidationOutcome`)."""
    return validate_into(manifest, params, classes, expected_fractions, docs_dir=None, max_pixels=max_pixels)


def validate_into(manifest: pd.DataFrame, params: ValidateParams, classes: list[str] | None,
                  expected_fractions: dict[str, float] | None, docs_dir: Path | None,
                  max_pixels: int = DEFAULT_MAX_PIXELS) -> ValidationOutcome:
    start = time.perf_counter()
    unknown = sorted(set(params.warn_only) - set(CHECKS))
    if unknown:
        log.warning("validate.warn_only names unknown check(s) %s; known: %s", unknown, list(CHECKS))
    missing = [c for c in REQUIRED_COLUMNS if c not in manifest.columns]
    if missing:
        return _schema_failure(manifest, missing, start)
    classes = None if classes is None else [str(c) for c in classes]  # labels are compared as text

    timings: dict[str, float] = {}
    t = time.perf_counter()
    _gx()
    timings["gx_import_s"] = time.perf_counter() - t  # ~3 s in a fresh process, 0 afterwards

    df_all = _normalise(manifest)
    df, quarantined = _quarantine(df_all, params.on_corrupt)
    tables = {"images": _images_table(df), "class_split_counts": _counts_table(df, classes)}
    if expected_fractions is not None:
        tables["split_fractions"] = _fractions_table(df, expected_fractions, params.split_tolerance)
    specs = _specs(df, params, classes, expected_fractions, max_pixels)

    t = time.perf_counter()
    context = _gx_context(docs_dir)
    timings["gx_context_s"] = time.perf_counter() - t
    t = time.perf_counter()
    gx_results = _run_gx(context, tables, specs)
    timings["gx_validate_s"] = time.perf_counter() - t
    if docs_dir is not None:
        t = time.perf_counter()
        try:
            context.build_data_docs(site_names=["local_site"])
        except Exception as exc:  # the verdict stands without the HTML; _write_docs leaves a fallback page
            log.warning("validate: GX Data Docs could not be built (%s)", str(exc).splitlines()[0] if str(exc) else exc)
        timings["gx_docs_s"] = time.perf_counter() - t

    checks = _build_checks(specs, gx_results, df, tables, params, classes)
    outcome = ValidationOutcome(
        success=all(c.success for c in checks if c.blocking),
        failures=[c.message() for c in checks if c.status == "failed"],
        warnings=[c.message() for c in checks if c.status == "warning"],
        checks=checks,
        quarantined=quarantined,
        n_images=len(df_all),
        manifest=manifest.reset_index(drop=True).loc[df.index],
        timings=timings,
    )
    outcome.time_s = time.perf_counter() - start
    _log_outcome(outcome)
    return outcome


def _schema_failure(manifest: pd.DataFrame, missing: list[str], start: float) -> ValidationOutcome:
    message = f"manifest is missing column(s) {missing}; expected {list(REQUIRED_COLUMNS)} (run the ingest stage)"
    return input_failure(message, start, manifest, offending=[{"item": c, "detail": "missing column"} for c in missing])


def input_failure(message: str, start: float, manifest: pd.DataFrame | None = None,
                   offending: list[dict[str, str]] | None = None) -> ValidationOutcome:
    """An outcome for input that could not be validated at all (no manifest, wrong columns)."""
    log.error("validate: %s", message)
    manifest = pd.DataFrame() if manifest is None else manifest
    check = CheckResult("input", "a readable manifest with the ingest columns", True, False, offending=offending or [])
    return ValidationOutcome(False, [message], [], [check], [], len(manifest), manifest.iloc[0:0],
                             time_s=time.perf_counter() - start)


def _log_outcome(outcome: ValidationOutcome) -> None:
    log.info("validate: %d images, %d quarantined, %s in %.2fs (%s)", outcome.n_images, len(outcome.quarantined),
             "PASSED" if outcome.success else "FAILED", outcome.time_s,
             ", ".join(f"{k}={v:.2f}" for k, v in outcome.timings.items()))
    for message in outcome.failures:
        log.error("validate: %s", message)
    for message in outcome.warnings:
        log.warning("validate: %s", message)


def summary_markdown(outcome: ValidationOutcome) -> str:
    """A short human summary: verdict, the checks table, then the offending items per failed check."""
    verdict = "PASSED" if outcome.success else "FAILED"
    lines = [
        f"# Data validation: {verdict}",
        "",
        f"{outcome.n_images} images, {len(outcome.quarantined)} quarantined, {len(outcome.manifest)} validated "
        f"in {outcome.time_s:.2f}s.",
        "",
        "| check | status | blocking | offending |",
        "|---|---|---|---|",
        *(f"| {c.name} | {c.status} | {'yes' if c.blocking else 'no'} | {len(c.offending)} |" for c in outcome.checks),
    ]
    for c in outcome.checks:
        if c.status not in ("failed", "warning"):
            continue
        lines += ["", f"## {c.status.upper()}: {c.name}", "", f"Expected {c.description}.", ""]
        lines += [f"- `{o['item']}`" + (f": {o['detail']}" if o["detail"] else "") for o in c.offending[:OFFENDING_CAP]]
        if len(c.offending) > OFFENDING_CAP:
            lines.append(f"- ... and {len(c.offending) - OFFENDING_CAP} more (see results JSON)")
    if outcome.quarantined:
        lines += ["", "## Quarantined (removed from the validated manifest)", ""]
        lines += [f"- `{q['path']}`: {q['error']}" for q in outcome.quarantined[:OFFENDING_CAP]]
        if len(outcome.quarantined) > OFFENDING_CAP:
            lines.append(f"- ... and {len(outcome.quarantined) - OFFENDING_CAP} more (see results JSON)")
    return "\n".join(lines) + "\n"


def _missing_files(manifest: pd.DataFrame, images_dir: Path) -> pd.DataFrame:
    """Mark rows whose file is not under `images_dir` as undecodable: training could not read them."""
    if "path" not in manifest.columns or "decodes_ok" not in manifest.columns:
        return manifest
    exists = manifest["path"].astype(str).map(lambda p: (images_dir / p).is_file())
    if exists.all():
        return manifest
    out = manifest.copy()
    out["decodes_ok"] = out["decodes_ok"].map(_truthy) & exists
    if "error" not in out.columns:
        out["error"] = ""
    out["error"] = out["error"].astype(object).where(exists, f"file missing from {images_dir}")
    return out


def write_docs(build: Callable[[Path], ValidationOutcome], docs_dir: Path) -> ValidationOutcome:
    """Build Data Docs into a temp folder, then swap it in whole (temps live in the scratch folder: tasks/files.py)."""
    docs_dir = Path(docs_dir)
    docs_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = new_temp(docs_dir, directory=True)
    tmp.chmod(0o777 & ~UMASK)  # mkdtemp makes it private; the docs are meant to be browsed
    old = None
    try:
        outcome = build(tmp)
        if not (tmp / "index.html").exists():  # GX did not run or could not render: the summary as HTML
            atomic_write(tmp / "index.html", _fallback_html(outcome))
        if docs_dir.exists():
            old = new_temp(docs_dir, directory=True)
            os.replace(docs_dir, old)  # onto the empty temp folder: one rename
        os.replace(tmp, docs_dir)
        return outcome
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _fallback_html(outcome: ValidationOutcome) -> str:
    import html

    return f"<html><body><pre>{html.escape(summary_markdown(outcome))}</pre></body></html>\n"


def write_reports(outcome: ValidationOutcome, out_manifest: Path | None, results_json: Path, summary_md: Path) -> None:
    if out_manifest is not None:
        with atomic_path(out_manifest) as tmp:
            frame = outcome.manifest.drop(columns=["source"], errors="ignore")
            if Path(out_manifest).suffix.lower() == ".parquet":
                frame.to_parquet(tmp, index=False)
            else:
                frame.to_csv(tmp, index=False)
    write_json(results_json, outcome.to_json())
    atomic_write(summary_md, summary_markdown(outcome))


def run(manifest_path: Path, images_dir: Path, params: ValidateParams, out_manifest: Path, results_json: Path,
        summary_md: Path, docs_dir: Path, classes: list[str] | None = None,
        expected_fractions: dict[str, float] | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> ValidationOutcome:
    """The validate stage: manifest -> validated manifest, results JSON, summary and Data Docs."""
    start = time.perf_counter()
    manifest_path, images_dir = Path(manifest_path), Path(images_dir)
    try:
        manifest = read_manifest(manifest_path)
    except Exception as exc:  # missing or unreadable file: a message, not a traceback
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        outcome = input_failure(f"cannot read manifest {manifest_path}: {reason}", start)
    else:
        checked = _missing_files(manifest, images_dir)
        outcome = write_docs(lambda d: validate_into(checked, params, classes, expected_fractions, d, max_pixels),
                             docs_dir)
        outcome.manifest = manifest.loc[outcome.manifest.index]  # the rows as ingest wrote them
    outcome.time_s = time.perf_counter() - start
    write_reports(outcome, out_manifest, results_json, summary_md)
    return outcome


class ValidationFailed(RuntimeError):
    """A blocking check failed; the message names the checks and files."""


def main(argv: list[str] | None = None) -> None:
    stage_main("validate", __doc__, argv, _from_params)


def _from_params(p: Params, args: Namespace) -> None:
    split, out = p.data.split, args.out_dir
    declared = read_json(args.classes) if args.classes.exists() else {}
    # split fractions are checked when ingest drew the splits; the ones a source names itself (split folders, a
    # manifest's split column) are the user's to choose
    fractions = None if declared.get("given_splits") else {"train": 1 - split.test - split.val, "val": split.val,
                                                            "test": split.test}
    outcome = run(args.manifest, args.images, p.validate_, args.out_manifest, out / "validation.json",
                  out / "validation.md", out / "docs", classes=declared.get("classes"), expected_fractions=fractions,
                  max_pixels=p.data.max_pixels)
    if not outcome.success:
        raise ValidationFailed("data validation failed: " + " | ".join(outcome.failures)
                               + f" (details: {out}/validation.md)")


if __name__ == "__main__":
    main()
