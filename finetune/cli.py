"""`finetune`: the command line, the top layer. It imports tasks, flows and deploy; nothing imports it.

Thin: parse, load typed params, call a stage's `main` or a flow. Every command turns expected
failures (bad params, missing data, failed gate...) into one line on stderr and a non-zero exit;
`--debug` (or FINETUNE_DEBUG=1) shows the traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from finetune.drift_cli import drift_cmd
from finetune.local_prefect import QUIET, use_project_server
from finetune.options import (
    Debug,
    ParamsOpt,
    RegistryOpt,
    SetOpt,
    WorkdirOpt,
    friendly,
    load,
    registry_root,
)
from finetune.prefect_cli import prefect_app
from finetune.registry_cli import promote_cmd, registry_app, rollback_cmd
from tasks.params import Params, ParamsError, render_defaults
from tasks.stages import STAGES, Stage
from tasks.stages import path as path_of

app = typer.Typer(
    help="Fine-tune a pretrained image classifier on a folder of labelled images and export a gated ONNX model.\n\n"
    "Quick start: `finetune run` runs the whole pipeline (ingest -> validate -> fetch_model -> label_issues -> "
    "train -> evaluate -> gate -> export -> promote) on the bundled ELPV solar-cell data. A model reaches the registry "
    "(`finetune registry list`) only when every gate passes; `finetune promote` and `finetune rollback` move "
    "the champion alias by hand.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
stage_app = typer.Typer(
    help="Run one pipeline stage: the same `python -m tasks.<stage>` that dvc.yaml calls (its options follow the "
    "stage name; `finetune stage train --help` lists them). Paths default to the layout in dvc.yaml.",
    no_args_is_help=True,
)
app.add_typer(stage_app, name="stage")
params_app = typer.Typer(help="The params file: its defaults, documented.", no_args_is_help=True)
app.add_typer(params_app, name="params")
log = logging.getLogger("finetune")

@app.callback()
def main(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False) -> None:
    Debug.on = Debug.on or debug


def _prepare_flow_run(workdir: Path, params: Path, set_: list[str] | None) -> None:
    """Validate the params and overrides (nothing is touched yet) and pick the Prefect API: PREFECT_API_URL,
    else this project's local server when it runs (`finetune prefect up`), else a temporary one."""
    if (workdir / params).resolve() != (workdir / "params.yaml").resolve():
        raise ParamsError(f"--params {params}: the stages read {workdir / 'params.yaml'} (dvc.yaml), so a run uses "
                          "that file; copy yours over it or give the changes with --set")
    load(workdir / params, set_)
    # Without a configured Prefect API, Prefect starts a temporary local server; on a busy
    # 2-core machine that can take longer than its 20 s default.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    for key, value in QUIET.items():
        os.environ.setdefault(key, value)
    use_project_server(workdir)


@app.command()
@friendly
def run(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None, workdir: WorkdirOpt = Path(".")) -> None:
    """Run the whole pipeline as a Prefect flow (each stage through DVC, so `dvc status` stays clean).

    Overrides given with --set are validated, then written into the params file (comments kept),
    as `dvc exp run --set-param` does: the params DVC records are the ones that produced the outputs.
    The run holds the project folder (a second run waits or is refused, naming this one); if it fails,
    its overrides are taken out of params.yaml again. Runs show in the dashboard of `finetune prefect up`.
    """
    _prepare_flow_run(workdir, params, set_)
    from flows.pipeline import finetune_pipeline

    result = finetune_pipeline(overrides=list(set_ or []), workdir=str(workdir))
    typer.echo(result["summary"])


@app.command()
@friendly
def retrain(
    force: Annotated[bool, typer.Option("--force", help="Retrain even if the data is what the champion was "
                                        "trained on.")] = False,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    workdir: WorkdirOpt = Path("."),
) -> None:
    """Retrain if the data changed since the champion was trained (or with --force); promote only a winner.

    "Changed": the DVC hash of data.path against the one recorded in the champion's lineage. The gates
    and promotion decide; one line says what happened (no change / promoted vN over vM / not promoted
    because ...: exit 1)."""
    _prepare_flow_run(workdir, params, set_)
    from flows.retrain import finetune_retrain

    typer.echo(finetune_retrain(force=force, overrides=list(set_ or []), workdir=str(workdir))["outcome"])


DaskWorkersOpt = Annotated[Optional[int], typer.Option(
    help="Run the per-image work on a local Dask cluster of N worker processes (0: threads in this process); "
    "default: orchestration.dask_workers.")]
DaskAddressOpt = Annotated[Optional[str], typer.Option(
    help="Use a running Dask scheduler (tcp://host:8786) instead; default: orchestration.dask_address.")]


def _dask(p: Params, workers: int | None, address: str | None) -> tuple[int, str | None]:
    o = p.orchestration
    return (o.dask_workers if workers is None else workers), (address or o.dask_address)


def _dask_probe(workers: int, address: str | None):
    """ingest's probe (sources, threads, max_pixels) -> rows, computed by the probe-images flow on Dask."""
    def probe(sources: list[str], _threads: int, max_pixels: int):
        import pandas as pd

        from flows.scale import probe_all

        return pd.DataFrame(probe_all(sources, max_pixels, workers, address))

    return probe


@app.command()
@friendly
def validate(
    path: Annotated[Path, typer.Argument(help="An image folder (root/<class>/..., or root/<split>/<class>/... with "
                                              "train, val or valid, test) or a CSV/Parquet manifest "
                                              "(path,label[,split]).")],
    params: ParamsOpt = Path("params.yaml"),
    out: Annotated[Path, typer.Option(help="Where the reports go.")] = Path("reports/validate-path"),
    dask_workers: DaskWorkersOpt = None,
    dask_address: DaskAddressOpt = None,
    label_issues: Annotated[bool, typer.Option(
        "--label-issues/--no-label-issues", help="After the checks pass, also look for likely label errors, "
        "near-duplicates across splits and outliers on the pretrained backbone's features (model.* and label_issues.* "
        "in the params; 20-70 ms per image on 2 CPU cores the first time, cached by content after that): reports in "
        "OUT/label_issues/. With label_issues.mode block, flagged files not in --reviewed fail the command.")] = True,
    reviewed: Annotated[Path, typer.Option(help="The review list: files you accepted as labelled (CSV path,note; "
                                                "paths as in the data folder); they are not flagged again.")]
    = Path(path_of("label_reviewed")),
) -> None:
    """Validate any image folder or manifest with the Great Expectations suite, then look for likely label errors
    (confident learning on frozen pretrained features); exit 1 on a blocking failure.

    With Dask (--dask-workers/--dask-address), the images are probed by the `probe-images` flow, chunk by
    chunk, with the same result."""
    from contextlib import nullcontext

    from finetune.local_prefect import prefect_api
    from finetune.validate_any import validate_path

    p = load(params) if params.exists() else Params()
    workers, address = _dask(p, dask_workers, dask_address)
    dask = workers > 0 or bool(address)
    with prefect_api(Path(".")) if dask else nullcontext():
        outcome = validate_path(path, p.validate_, out, max_pixels=p.data.max_pixels,
                                probe=_dask_probe(workers, address) if dask else None, split=p.data.split, seed=p.seed)
    for line in outcome.warnings:
        typer.echo(f"warning: {line}", err=True)
    for line in outcome.failures:
        typer.echo(f"FAILED {line}", err=True)
    blocked = False
    if label_issues and outcome.success and p.label_issues.mode != "off":
        blocked = _label_issues(path, outcome, p, out / "label_issues", reviewed)
    elif label_issues and p.label_issues.mode != "off":
        typer.echo("label issues: not checked (the data failed validation)", err=True)
    ok = outcome.success and not blocked
    typer.echo(f"{'PASSED' if ok else 'FAILED'}: {outcome.n_images} images; reports in {out}")
    raise typer.Exit(0 if ok else 1)


def _label_issues(path: Path, outcome, p: Params, out: Path, reviewed: Path) -> bool:
    """`finetune validate`'s label-issue step: prints the summary and the worst files; True when it blocks."""
    from finetune.validate_any import check_labels
    from tasks.backbones import WeightsError
    from tasks.label_issues import blocked_message

    try:
        data = check_labels(path, outcome, p, out, reviewed)
    except WeightsError as exc:  # the data is checked; the extra step needs weights this machine lacks
        typer.echo(f"warning: label issues not checked: {exc}", err=True)
        return False
    c = data["counts"]
    typer.echo(f"label issues: {c['label_issues']} likely label errors, {c['near_duplicates']} near-duplicate pairs "
               f"across splits, {c['outliers']} outliers, {c['reviewed_not_flagged']} reviewed"
               + (f" ({data['note']})" if data["note"] else "") + f"; report {out / 'label_issues.md'}")
    for r in data["label_issues"][:10]:
        typer.echo(f"  {r['path']} ({r['split']}): labelled {r['given']}, looks like {r['suggested']} "
                   f"(label quality {r['label_quality']:.3f})")
    if data["status"] == "blocked":
        typer.echo(f"FAILED {blocked_message(data, reviewed, out / 'label_issues.md')}", err=True)
        return True
    return False


# ---- stages (dvc.yaml calls `python -m tasks.<stage>`; these run the same `main`) ------------

PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


def _stage_command(spec: Stage) -> None:
    def command(ctx: typer.Context) -> None:
        import importlib

        importlib.import_module(spec.module).main(list(ctx.args))

    command.__doc__ = spec.summary + f" (`python -m {spec.command} --help` for its options)"
    stage_app.command(spec.cli_name, context_settings=PASS_THROUGH, add_help_option=False)(command)


for _spec in STAGES:
    _stage_command(_spec)


@params_app.command("defaults")
def params_defaults() -> None:
    """Print the default params.yaml (every knob, its default and its documentation)."""
    typer.echo(render_defaults(), nl=False)


# ---- serving (deploy/) --------------------------------------------------------------------------


app.command("promote")(promote_cmd)
app.command("drift")(drift_cmd)
app.command("rollback")(rollback_cmd)
app.add_typer(registry_app, name="registry")


@app.command("serve", context_settings=PASS_THROUGH, add_help_option=False)
def serve_cmd(ctx: typer.Context) -> None:
    """Serve a model on the KServe v2 protocol (+ upload endpoint, web page, /metrics), following the registry's
    champion (hot swap on promote/rollback). Options: `finetune serve --help` (the same as `python -m deploy.server`);
    --registry defaults to registry.root from params.yaml."""
    from deploy.server import main as server_main

    args = list(ctx.args)
    wants_help = any(a in ("-h", "--help") for a in args)
    if not wants_help and not any(a in ("--registry", "-r") or a.startswith("--registry=") for a in args):
        args = ["--registry", str(registry_root(Path("params.yaml")))] + args
    raise typer.Exit(server_main(args, prog="finetune serve"))


@app.command("predict")
@friendly
def predict_cmd(
    model: Annotated[str, typer.Argument(help="An ONNX file exported by this pipeline, a registry version (3, v3, "
                                              "v0003) or 'champion'.")],
    paths: Annotated[list[Path], typer.Argument(help="Image files, folders (walked recursively) and manifests "
                                                     "(.csv/.parquet with a 'path' column).")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write predictions here: .csv, .json or .jsonl "
                                                "(atomically). Default: CSV on stdout.")] = None,
    root: Annotated[Optional[Path], typer.Option(help="Folder that manifest paths are relative to (default: the "
                                                 "manifest's folder; data/images for the pipeline's manifests).")] = None,
    workers: Annotated[int, typer.Option(min=1, help="Threads decoding images.")] = 4,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per model call.")] = 32,
    progress: Annotated[bool, typer.Option(help="Show a progress bar (on a terminal).")] = True,
    params: ParamsOpt = Path("params.yaml"),
    registry_: RegistryOpt = None,
    dask_workers: DaskWorkersOpt = None,
    dask_address: DaskAddressOpt = None,
) -> None:
    """Predict labels for many images with an exported model: streaming (memory stays flat), the server's decode
    path and model, so the same labels as `finetune serve`. Exit 1 if some files could not be read (their rows
    carry the error).

    With --dask-workers/--dask-address (or orchestration.dask_* in params.yaml) one folder is split into chunks
    and predicted by the `batch-predict` flow on a Dask cluster, writing a CSV."""
    p = load(params) if params.exists() else Params()
    workers_dask, address = _dask(p, dask_workers, dask_address)
    if workers_dask > 0 or address:
        _predict_on_dask(model, paths, out, registry_root(params, p, registry_), workers_dask, address)
        return
    from deploy.predict import predict

    summary = predict(model, list(paths), out, registry_root(params, p, registry_), root=root,
                      workers=workers, batch_size=batch_size, progress=progress)
    where = f" to {summary.out}" if summary.out != "-" else ""
    typer.echo(f"{summary.images} predictions{where} (model {summary.version or summary.model})", err=True)
    _fail_on_unreadable(summary.errors, summary.images)


def _predict_on_dask(model: str, paths: list[Path], out: Path | None, registry_root: Path, workers: int,
                     address: str | None) -> None:
    from deploy.service import Source
    from finetune.local_prefect import prefect_api
    from flows.scale import predict

    if len(paths) != 1 or not paths[0].is_dir():
        raise ValueError("on Dask, predict takes one image folder (got: " + ", ".join(map(str, paths)) + ")")
    if out is None or out.suffix.lower() != ".csv":
        raise ValueError("on Dask, predict writes a CSV: give --out FILE.csv")
    onnx, _version, _card = Source.parse(model, registry_root).locate()
    with prefect_api(Path(".")):
        summary = predict(str(onnx), str(paths[0]), str(out), workers, address)
    typer.echo(f"{summary['images']} images predicted with {onnx} ({summary['failed']} unreadable): {out}", err=True)
    _fail_on_unreadable(summary["failed"], summary["images"])


def _fail_on_unreadable(errors: int, images: int) -> None:
    """Exit 1 when some files could not be read (their rows are written, with the error)."""
    if errors:
        raise RuntimeError(f"{errors} of {images} files could not be read (see the error column)")


@app.command("export-triton")
@friendly
def export_triton_cmd(
    model: Annotated[str, typer.Argument(help="An ONNX file exported by this pipeline, a registry version or "
                                              "'champion'.")] = "champion",
    out: Annotated[Path, typer.Option("--out", "-o", help="The Triton model repository folder.")] = Path("triton"),
    name: Annotated[str, typer.Option(help="Model name (its folder in the repository; the /v2/models/NAME in URLs).")]
    = "classifier",
    max_batch_size: Annotated[int, typer.Option(min=0, help="Triton's max_batch_size (0: no batching).")] = 32,
    queue_delay_us: Annotated[int, typer.Option(min=0, help="Dynamic batching: max queue delay (microseconds).")]
    = 100,
    instances: Annotated[int, typer.Option(min=1, help="CPU model instances.")] = 1,
    force: Annotated[bool, typer.Option(help="Replace an existing model folder.")] = False,
    params: ParamsOpt = Path("params.yaml"),
    registry_: RegistryOpt = None,
) -> None:
    """Write a Triton Inference Server model repository (config.pbtxt with platform onnxruntime_onnx and dynamic
    batching, labels.txt, VERSION/model.onnx); KServe's ONNX runtime serves the same folder."""
    from deploy.triton import export

    done = export(model, out, registry_root(params, override=registry_), name=name, max_batch_size=max_batch_size,
                  queue_delay_us=queue_delay_us, instances=instances, force=force)
    typer.echo(f"wrote {done.model_dir} (version {done.version}): tritonserver --model-repository {out}")


@app.command("models")
@friendly
def list_models(
    all_: Annotated[bool, typer.Option("--all", help="Also list torchvision weights that need a download.")] = False,
) -> None:
    """List the pretrained weights usable here (model.source / model.arch / model.weights), marking
    which are available offline (bundled, or already in the torch hub / Hugging Face cache)."""
    from tasks.backbones.catalog import catalog, hf_cache_dir, hub_dir

    rows = catalog(all_weights=all_)
    width = {key: max(len(key), *(len(str(r[key])) for r in rows)) for key in ("source", "arch", "weights")}
    typer.echo(f"{'source':{width['source']}}  {'arch':{width['arch']}}  {'weights':{width['weights']}}  offline  file")
    for r in rows:
        typer.echo(f"{r['source']:{width['source']}}  {r['arch']:{width['arch']}}  {r['weights']:{width['weights']}}  "
                   f"{'yes' if r['offline'] else 'no':7}  {r['file']}")
    hidden = "" if all_ else " (--all lists those needing a download)"
    typer.echo(f"\ntorchvision cache: {hub_dir() / 'checkpoints'}{hidden}\n"
               f"Hugging Face cache (timm): {hf_cache_dir()}\n"
               "Also: any timm architecture or torchvision model with model.weights=<path or URL> and model.sha256 "
               "(source timm/checkpoint or torchvision). Offline: FINETUNE_OFFLINE=1.")


app.add_typer(prefect_app, name="prefect")

if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
