"""`finetune`: the command line. Thin: parse, load typed params, call one stage function.

Every command turns expected failures (bad params, missing data, failed gate...) into one
line on stderr and a non-zero exit; `--debug` (or FINETUNE_DEBUG=1) shows the traceback.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer

from tasks.io import setup_logging
from tasks.params import Params, load_params

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
    help="Run one pipeline stage (what dvc.yaml calls). Paths default to the layout in dvc.yaml.",
    no_args_is_help=True,
)
app.add_typer(stage_app, name="stage")
log = logging.getLogger("finetune")

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="Params file (YAML).")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override a param: dotted key=value, "
                                                     "e.g. --set train.batch_size=16 (repeatable).")]
DEBUG = os.environ.get("FINETUNE_DEBUG") == "1"


def friendly(fn: Callable) -> Callable:
    """Run a command; any exception becomes `error: <message>` and exit 1 (traceback with --debug)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        setup_logging()
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130)
        except Exception as exc:  # the one place errors become messages
            if DEBUG:
                raise
            message = str(exc).strip() or type(exc).__name__
            typer.echo(f"error: {message}", err=True)
            raise typer.Exit(1)

    return wrapper


@app.callback()
def main(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False) -> None:
    global DEBUG
    DEBUG = DEBUG or debug


def _params(path: Path, overrides: list[str] | None = None) -> Params:
    return load_params(path, overrides or [])


@app.command()
@friendly
def run(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    workdir: Annotated[Path, typer.Option(help="Project folder (a git + DVC repository).")] = Path("."),
) -> None:
    """Run the whole pipeline as a Prefect flow (each stage through DVC, so `dvc status` stays clean).

    Overrides given with --set are validated, then written into the params file (comments kept),
    as `dvc exp run --set-param` does: the params DVC records are the ones that produced the outputs.
    """
    _params(workdir / params, set_)  # validate before starting Prefect
    # Without a configured Prefect API, Prefect starts a temporary local server; on a busy
    # 2-core machine that can take longer than its 20 s default.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    from flows.pipeline import finetune_pipeline

    result = finetune_pipeline(params_file=str(params), overrides=list(set_ or []), workdir=str(workdir))
    typer.echo(result["summary"])


@app.command()
@friendly
def validate(
    path: Annotated[Path, typer.Argument(help="An image folder (root/<class>/...) or a CSV/Parquet manifest (path,label[,split]).")],
    params: ParamsOpt = Path("params.yaml"),
    out: Annotated[Path, typer.Option(help="Where the reports go.")] = Path("reports/validate-path"),
) -> None:
    """Validate any image folder or manifest with the Great Expectations suite; exit 1 on a blocking failure."""
    from tasks import validate as validate_mod

    cfg = _params(params).validate_ if params.exists() else Params().validate_
    outcome = validate_mod.validate_path(path, cfg, out)
    for line in outcome.warnings:
        typer.echo(f"warning: {line}", err=True)
    for line in outcome.failures:
        typer.echo(f"FAILED {line}", err=True)
    typer.echo(f"{'PASSED' if outcome.success else 'FAILED'}: {outcome.n_images} images; reports in {out}")
    raise typer.Exit(0 if outcome.success else 1)


# ---- stages (dvc.yaml calls these) -------------------------------------------------------


@stage_app.command("ingest")
@friendly
def stage_ingest(
    params: ParamsOpt = Path("params.yaml"),
    images: Path = Path("data/images"),
    manifest: Path = Path("data/manifest.csv"),
) -> None:
    """Materialise the data source as an image folder + split manifest."""
    from tasks import ingest

    p = _params(params)
    d = p.data
    ingest.run(d.source, d.path, d.task, d.defect_threshold, d.split.test, d.split.val, d.split.stratify_by, p.seed,
               d.workers, images, manifest, max_pixels=p.validate_.max_pixels)


@stage_app.command("validate")
@friendly
def stage_validate(
    params: ParamsOpt = Path("params.yaml"),
    manifest: Path = Path("data/manifest.csv"),
    images: Path = Path("data/images"),
    out_manifest: Path = Path("data/validated.csv"),
    out_dir: Path = Path("reports/validation"),
) -> None:
    """Run the Great Expectations suite; write the validated manifest and reports; exit 1 on failure."""
    from tasks import validate as validate_mod

    p = _params(params)
    split = p.data.split
    outcome = validate_mod.run(manifest, images, p.validate_, out_manifest, out_dir / "validation.json",
                               out_dir / "validation.md", out_dir / "docs",
                               expected_fractions={"train": 1 - split.test - split.val, "val": split.val, "test": split.test})
    if not outcome.success:
        raise RuntimeError("data validation failed: " + " | ".join(outcome.failures) + f" (details: {out_dir}/validation.md)")


@stage_app.command("fetch-model")
@friendly
def stage_fetch_model(params: ParamsOpt = Path("params.yaml"), out_dir: Path = Path("models/base")) -> None:
    """Resolve and verify the pretrained weights named in `model.*`."""
    from tasks import fetch_model

    m = _params(params).model
    fetch_model.run(m.source, m.arch, m.weights, m.sha256, out_dir)


@stage_app.command("train")
@friendly
def stage_train(
    params: ParamsOpt = Path("params.yaml"),
    manifest: Path = Path("data/validated.csv"),
    images: Path = Path("data/images"),
    base: Path = Path("models/base"),
    checkpoint: Path = Path("models/model.pt"),
    metrics: Path = Path("reports/train/summary.json"),
    history: Path = Path("reports/train/history.csv"),
    state: Annotated[Path, typer.Option(help="Training state saved after every epoch (removed when training "
                                        "completes); what --resume continues from.")] = Path("models/train_state.pt"),
    resume: Annotated[bool, typer.Option("--resume/--no-resume", help="Continue from --state when it is from a run "
                                         "with the same data, weights and params (e.g. after a kill).")] = True,
) -> None:
    """Staged fine-tuning (frozen, then unfrozen); writes the best checkpoint by validation score.

    Multi-GPU / multi-node: start it under torchrun (`torchrun --nproc_per_node 4 -m tasks.cli stage train`).
    """
    from tasks import train

    p = _params(params)
    train.run(manifest, images, base, p.train, p.seed, checkpoint, metrics, history, workers=p.data.workers,
              state_path=state, resume=resume)


@stage_app.command("evaluate")
@friendly
def stage_evaluate(
    params: ParamsOpt = Path("params.yaml"),
    checkpoint: Path = Path("models/model.pt"),
    manifest: Path = Path("data/validated.csv"),
    images: Path = Path("data/images"),
    out_dir: Path = Path("reports/eval"),
) -> None:
    """Score the checkpoint on the held-out test split (metrics JSON, predictions, confusion matrix)."""
    from tasks import evaluate

    p = _params(params)
    evaluate.run(checkpoint, manifest, images, out_dir / "metrics.json", out_dir / "predictions.csv",
                 out_dir / "confusion.png", batch_size=p.train.batch_size, workers=p.data.workers,
                 positive_class=p.gates.positive_class)


@stage_app.command("gate")
@friendly
def stage_gate(
    params: ParamsOpt = Path("params.yaml"),
    metrics: Path = Path("reports/eval/metrics.json"),
    predictions: Path = Path("reports/eval/predictions.csv"),
    checkpoint: Path = Path("models/model.pt"),
    manifest: Path = Path("data/validated.csv"),
    images: Path = Path("data/images"),
    out_dir: Path = Path("reports/gate"),
) -> None:
    """Judge the candidate: absolute gates (`gates.*`) and the registry's champion scored on the same test
    images; always writes the verdict (JSON + Markdown); exit 1 when a gate fails."""
    from tasks import gate

    p = _params(params)
    gate.run(metrics, p.gates, out_dir / "verdict.json", out_dir / "verdict.md", predictions_path=predictions,
             checkpoint_path=checkpoint, manifest_path=manifest, images_dir=images,
             registry_root=_registry_root(params, p), workers=p.data.workers)


@stage_app.command("export")
@friendly
def stage_export(
    params: ParamsOpt = Path("params.yaml"),
    checkpoint: Path = Path("models/model.pt"),
    manifest: Path = Path("data/validated.csv"),
    images: Path = Path("data/images"),
    verdict: Path = Path("reports/gate/verdict.json"),
    metrics: Path = Path("reports/eval/metrics.json"),
    onnx_path: Path = Path("models/model.onnx"),
    int8_dir: Path = Path("models/int8"),
    model_card: Path = Path("models/model_card.md"),
    report: Path = Path("reports/export.json"),
) -> None:
    """Export to ONNX (uint8 input, normalisation folded in), verify it against PyTorch, optionally
    quantize to INT8 (kept only within `export.int8_max_accuracy_drop`), write the model card."""
    from tasks import export

    p = _params(params)
    e, d = p.export, p.data
    source = f"{d.source}" + (f" ({d.path})" if d.path else "") + (f", task {d.task}" if d.source == "elpv" else "")
    export.run(checkpoint, manifest, images, verdict, metrics, params, onnx_path, report, e.opset, e.max_abs_diff,
               e.min_top1_agreement, workers=d.workers, int8=e.int8, int8_max_accuracy_drop=e.int8_max_accuracy_drop,
               int8_calibration_images=e.int8_calibration_images, int8_dir=int8_dir, model_card_path=model_card,
               data_description=source)


@stage_app.command("promote")
@friendly
def stage_promote(
    params: ParamsOpt = Path("params.yaml"),
    onnx_path: Path = Path("models/model.onnx"),
    int8_dir: Path = Path("models/int8"),
    model_card: Path = Path("models/model_card.md"),
    verdict: Path = Path("reports/gate/verdict.json"),
    metrics: Path = Path("reports/eval/metrics.json"),
    predictions: Path = Path("reports/eval/predictions.csv"),
    report: Path = Path("reports/promote.json"),
) -> None:
    """Register the exported model in the registry (once per ONNX file) and make it the champion."""
    from tasks import promote

    p = _params(params)
    promote.run(onnx_path, int8_dir, model_card, verdict, metrics, predictions, _registry_root(params, p), report)


# ---- model registry -------------------------------------------------------------------------

RegistryOpt = Annotated[Optional[Path], typer.Option(
    "--registry", "-r", help="Registry folder; default: registry.root from the params file (relative to its folder).")]


def _registry_root(params: Path, p: Params | None = None, override: Path | None = None) -> Path:
    if override is not None:
        return override
    if p is None:
        p = _params(params) if params.exists() else Params()
    root = Path(p.registry.root)
    return root if root.is_absolute() else params.parent / root


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
    alias, changed = registry.promote(root, version, reason="promoted by hand (finetune promote)")
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


@app.command("models")
@friendly
def list_models(
    all_: Annotated[bool, typer.Option("--all", help="Also list torchvision weights that need a download.")] = False,
) -> None:
    """List the pretrained weights usable here (model.source / model.arch / model.weights), marking
    which are available offline (bundled, or already in the torch hub / Hugging Face cache)."""
    from tasks import models

    rows = models.catalog(all_weights=all_)
    width = {key: max(len(key), *(len(str(r[key])) for r in rows)) for key in ("source", "arch", "weights")}
    typer.echo(f"{'source':{width['source']}}  {'arch':{width['arch']}}  {'weights':{width['weights']}}  offline  file")
    for r in rows:
        typer.echo(f"{r['source']:{width['source']}}  {r['arch']:{width['arch']}}  {r['weights']:{width['weights']}}  "
                   f"{'yes' if r['offline'] else 'no':7}  {r['file']}")
    hidden = "" if all_ else " (--all lists those needing a download)"
    typer.echo(f"\ntorchvision cache: {models.hub_dir() / 'checkpoints'}{hidden}\n"
               f"Hugging Face cache (timm): {models.hf_cache_dir()}\n"
               "Also: any timm architecture or torchvision model with model.weights=<path or URL> and model.sha256 "
               "(source timm/checkpoint or torchvision). Offline: FINETUNE_OFFLINE=1.")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
