"""`finetune`: the command line, the top layer. It imports tasks, flows and deploy; nothing imports it.

Thin: parse, load typed params, call a stage's `main` or a flow. Every command turns expected
failures (bad params, missing data, failed gate...) into one line on stderr and a non-zero exit;
`--debug` (or FINETUNE_DEBUG=1) shows the traceback.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer

from finetune.local_prefect import QUIET, use_project_server
from tasks import entry
from tasks.params import Params, ParamsError, load_params, render_defaults
from tasks.registry import resolve_root
from tasks.stages import STAGES, Stage

app = typer.Typer(
    help="Fine-tune a pretrained image classifier on a folder of labelled images and export a gated ONNX model.\n\n"
    "Quick start: `finetune run` runs the whole pipeline (ingest -> validate -> fetch_model -> train -> "
    "evaluate -> gate -> export -> promote) on the bundled ELPV solar-cell data. A model reaches the registry "
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

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="Params file (YAML).")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override a param: dotted key=value, "
                                                     "e.g. --set train.batch_size=16 (repeatable).")]
DEBUG = os.environ.get("FINETUNE_DEBUG") == "1"


def friendly(fn: Callable) -> Callable:
    """Run a command; any exception becomes `error: <message>` and exit 1 (traceback with --debug)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            with entry.friendly(DEBUG, keep=(typer.Exit,)):
                return fn(*args, **kwargs)
        except SystemExit as exc:  # entry.friendly's exit codes, as typer expects them
            raise typer.Exit(exc.code if isinstance(exc.code, int) else 1) from None

    return wrapper


@app.callback()
def main(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False) -> None:
    global DEBUG
    DEBUG = DEBUG or debug


def _params(path: Path, overrides: list[str] | None = None) -> Params:
    return load_params(path, overrides or [])


WorkdirOpt = Annotated[Path, typer.Option(help="Project folder (a git + DVC repository).")]


def _prepare_flow_run(workdir: Path, params: Path, set_: list[str] | None) -> None:
    """Validate the params and overrides (nothing is touched yet) and pick the Prefect API: PREFECT_API_URL,
    else this project's local server when it runs (`finetune prefect up`), else a temporary one."""
    if (workdir / params).resolve() != (workdir / "params.yaml").resolve():
        raise ParamsError(f"--params {params}: the stages read {workdir / 'params.yaml'} (dvc.yaml), so a run uses "
                          "that file; copy yours over it or give the changes with --set")
    _params(workdir / params, set_)
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
) -> None:
    """Validate any image folder or manifest with the Great Expectations suite; exit 1 on a blocking failure.

    With Dask (--dask-workers/--dask-address), the images are probed by the `probe-images` flow, chunk by
    chunk, with the same result."""
    from contextlib import nullcontext

    from finetune.local_prefect import prefect_api
    from finetune.validate_any import validate_path

    p = _params(params) if params.exists() else Params()
    workers, address = _dask(p, dask_workers, dask_address)
    dask = workers > 0 or bool(address)
    with prefect_api(Path(".")) if dask else nullcontext():
        outcome = validate_path(path, p.validate_, out, max_pixels=p.data.max_pixels,
                                probe=_dask_probe(workers, address) if dask else None)
    for line in outcome.warnings:
        typer.echo(f"warning: {line}", err=True)
    for line in outcome.failures:
        typer.echo(f"FAILED {line}", err=True)
    typer.echo(f"{'PASSED' if outcome.success else 'FAILED'}: {outcome.n_images} images; reports in {out}")
    raise typer.Exit(0 if outcome.success else 1)


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


# ---- model registry -------------------------------------------------------------------------

RegistryOpt = Annotated[Optional[Path], typer.Option(
    "--registry", "-r", help="Registry folder; default: registry.root from the params file (relative to its folder).")]


def _registry_root(params: Path, p: Params | None = None, override: Path | None = None) -> Path:
    if override is not None:
        return override
    if p is None:
        p = _params(params) if params.exists() else Params()
    return resolve_root(params, p.registry.root)


@app.command("promote")
@friendly
def promote_cmd(
    version: Annotated[Optional[str], typer.Argument(help="Version to make champion (3, v3, v0003); default: the newest.")] = None,
    params: ParamsOpt = Path("params.yaml"),
    registry_: RegistryOpt = None,
) -> None:
    """Make a registered version the champion (the alias moves atomically; the old champion goes onto the
    history, so `finetune rollback` can bring it back). By hand: no gate is consulted."""
    from tasks import registry

    root = _registry_root(params, override=registry_)
    alias, changed = registry.promote(root, version, reason="promoted by hand (finetune promote)", by_hand=True)
    previous = alias["history"][-1] if alias["history"] else "none"
    typer.echo(f"champion: {alias['version']}" + (f" (was {previous})" if changed else " (already the champion)")
               + f"  [{root}]")


@app.command("rollback")
@friendly
def rollback_cmd(params: ParamsOpt = Path("params.yaml"), registry_: RegistryOpt = None) -> None:
    """Move the champion alias back to the previous champion."""
    from tasks import registry

    root = _registry_root(params, override=registry_)
    before = registry.read_champion(root)
    alias = registry.rollback(root, reason="finetune rollback")
    typer.echo(f"champion: {alias['version']} (rolled back from {before['version'] if before else '?'})  [{root}]")


registry_app = typer.Typer(help="The model registry: numbered versions and the champion alias (see README).",
                           no_args_is_help=True)
app.add_typer(registry_app, name="registry")


@registry_app.command("list")
@friendly
def registry_list(params: ParamsOpt = Path("params.yaml"), registry_: RegistryOpt = None) -> None:
    """Versions, oldest first, with their test metrics; `*` marks the champion."""
    from tasks import registry

    root = _registry_root(params, override=registry_)
    versions = registry.list_versions(root)
    if not versions:
        typer.echo(f"registry {root}: no versions yet")
        return
    alias = registry.read_champion(root)
    champ = alias["version"] if alias else None
    typer.echo("   version  created                    accuracy  macro_f1  source    onnx sha256")
    for v in versions:
        meta = registry.read_metadata(root, v)
        m = meta.get("metrics") or {}
        fmt = lambda x: f"{x:.4f}" if isinstance(x, (int, float)) else "n/a"  # noqa: E731
        typer.echo(f"{'*' if v == champ else ' '}  {v:7}  {str(meta.get('created_at', '?')):25}  "
                   f"{fmt(m.get('accuracy')):8}  {fmt(m.get('macro_f1')):8}  {str(meta.get('source', '?')):8}  "
                   f"{str(meta.get('onnx_sha256', ''))[:12]}")
    typer.echo(f"champion: {champ or 'none'}" + (f" (history: {', '.join(alias['history'])})"
                                                 if alias and alias["history"] else "") + f"  [{root}]")


@registry_app.command("add")
@friendly
def registry_add(
    onnx_path: Annotated[Path, typer.Argument(help="An ONNX model exported by this pipeline (its metadata is read).")],
    model_card: Annotated[Optional[Path], typer.Option(help="Its model card (Markdown).")] = None,
    note: Annotated[str, typer.Option(help="Why it is registered by hand.")] = "",
    params: ParamsOpt = Path("params.yaml"),
    registry_: RegistryOpt = None,
) -> None:
    """Register an ONNX model by hand (e.g. the first champion when gates.first_run is 'block');
    `finetune promote VERSION` then makes it champion."""
    from tasks import promote

    root = _registry_root(params, override=registry_)
    version, created = promote.register_file(onnx_path, root, model_card=model_card, note=note)
    typer.echo(f"{'registered as' if created else 'already registered as'} {version}  [{root}]")


# ---- serving (deploy/) --------------------------------------------------------------------------


@app.command("serve", context_settings=PASS_THROUGH, add_help_option=False)
def serve_cmd(ctx: typer.Context) -> None:
    """Serve a model on the KServe v2 protocol (+ upload endpoint, web page, /metrics), following the registry's
    champion (hot swap on promote/rollback). Options: `finetune serve --help` (the same as `python -m deploy.server`);
    --registry defaults to registry.root from params.yaml."""
    from deploy.server import main as server_main

    args = list(ctx.args)
    wants_help = any(a in ("-h", "--help") for a in args)
    if not wants_help and not any(a in ("--registry", "-r") or a.startswith("--registry=") for a in args):
        args = ["--registry", str(_registry_root(Path("params.yaml")))] + args
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
    p = _params(params) if params.exists() else Params()
    workers_dask, address = _dask(p, dask_workers, dask_address)
    if workers_dask > 0 or address:
        _predict_on_dask(model, paths, out, _registry_root(params, p, registry_), workers_dask, address)
        return
    from deploy.predict import predict

    summary = predict(model, list(paths), out, _registry_root(params, p, registry_), root=root,
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

    done = export(model, out, _registry_root(params, override=registry_), name=name, max_batch_size=max_batch_size,
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


# ---- Prefect: a local server and worker, the deployments of prefect.yaml --------------------

prefect_app = typer.Typer(help="A local Prefect server (the dashboard) and process worker for this project, in the "
                          "background, and the deployments of prefect.yaml (docs/orchestration.md).",
                          no_args_is_help=True)
app.add_typer(prefect_app, name="prefect")
PortOpt = Annotated[Optional[int], typer.Option(help="Server port; default: the one last used here, else 4200.")]


@prefect_app.command("up")
@friendly
def prefect_up(
    port: PortOpt = None,
    pool: Annotated[str, typer.Option(help="The process work pool the worker serves (prefect.yaml names it).")] = "finetune",
    query_seconds: Annotated[float, typer.Option(help="How often the worker polls for runs.")] = 10.0,
    workdir: WorkdirOpt = Path("."),
) -> None:
    """Start the server (loopback) and a process worker in the background.

    What already runs is left alone. Logs, PIDs and the server's database are in .prefect-local/."""
    from finetune import local_prefect as lp

    local = lp.Local.of(workdir, port)
    server, worker = lp.start_server(local), lp.start_worker(local, pool, query_seconds)
    typer.echo(f"Prefect server (pid {server}) and worker (pid {worker}, pool '{pool}') are up; logs in {local.state}\n"
               f"dashboard: {local.ui_url}\nfor prefect commands: export PREFECT_API_URL={local.api_url}")


@prefect_app.command("deploy")
@friendly
def prefect_deploy(port: PortOpt = None, workdir: WorkdirOpt = Path(".")) -> None:
    """Register the deployments of prefect.yaml on the local server, and the notifications.

    The manual run (the dashboard form) and the scheduled retraining; notifications from
    orchestration.webhook (off when null)."""
    from finetune import local_prefect as lp

    local = lp.Local.of(workdir, port)
    if not lp.healthy(local):
        raise lp.LocalPrefectError(f"no Prefect server answers at {local.api_url}: run `finetune prefect up` first")
    typer.echo(lp.deploy(local).strip())
    with lp.prefect_api(workdir):
        from flows import notify

        typer.echo(notify.configure(_params(workdir / "params.yaml").orchestration.webhook))


@prefect_app.command("down")
@friendly
def prefect_down(workdir: WorkdirOpt = Path(".")) -> None:
    """Stop the worker, then the server (SIGTERM, then SIGKILL after a grace period)."""
    from finetune import local_prefect as lp

    for line in lp.stop(lp.Local.of(workdir)):
        typer.echo(line)


@prefect_app.command("status")
@friendly
def prefect_status(workdir: WorkdirOpt = Path(".")) -> None:
    """Whether the local server and worker run, and where."""
    from finetune import local_prefect as lp

    for key, value in lp.status(lp.Local.of(workdir)).items():
        typer.echo(f"{key}: {value}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
