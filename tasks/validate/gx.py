"""The Great Expectations (GX Core 1.x) adapter: import, an in-memory context, running expectations over
DataFrames, and pairing GX's results with what asked for them.

GX is imported on first use (~3 s, most of the stage's cost), so `finetune --help` and the other stages do not
pay for it. There is no maintained Prefect integration for GX 1.x; this module is the only place that calls it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import pandas as pd


def load_gx():
    """The `great_expectations` module, imported on first use, its INFO chatter kept out of our logs."""
    gx_log = logging.getLogger("great_expectations")
    if gx_log.level == logging.NOTSET:  # the app did not choose a level: GX logs at WARNING only
        gx_log.setLevel(logging.WARNING)
    import great_expectations
    import great_expectations.expectations  # noqa: F401

    return great_expectations


def gx_context(docs_dir: Path | None):
    """An in-memory GX context (~ms to create): no files, no analytics, no progress bars.

    With `docs_dir`, it also has a filesystem Data Docs site rooted there; the validation
    results live in memory until `build_data_docs` renders them.
    """
    gx = load_gx()
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


def run_gx(context, tables: dict[str, pd.DataFrame], specs: Sequence[Any]) -> dict[int, dict]:
    """Run every spec's expectation (`spec.expectation`) over its table (`spec.table`, a key of `tables`);
    return {id(spec): GX result dict}."""
    gx = load_gx()
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


def _match(results, specs: Sequence[Any]) -> list[dict]:
    """GX returns results in its own order; pair them with specs through the expectation id."""
    by_id = {}
    for r in results:
        d = r.to_json_dict()
        by_id[d["expectation_config"]["id"]] = d
    missing = {"success": False, "result": {}, "exception_info": {"raised_exception": True, "exception_message": "no result"}}
    return [by_id.get(s.expectation.id, missing) for s in specs]


def gx_error(res: dict) -> str | None:
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
