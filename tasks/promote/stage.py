"""Promote stage: a gated, exported model -> a registry version, made champion.

Runs after export, so only a model whose every gate passed gets here; it refuses anything else,
before it registers anything: a failed verdict; a verdict about another candidate (the exported
model's checkpoint and the predictions must be the ones the gate judged); a champion that changed
since the gate compared against it (unless it is the same checkpoint, exported again); a candidate
whose checkpoint a person rolled back (it stays rolled back until someone promotes it by hand).
Registering is idempotent (the same ONNX file, by sha256, is never a second version).

Before anything is registered, the infra check (`tasks.promote.serving_check`) serves the candidate with the
real server in a subprocess and requires the evaluation's labels for real test images: a candidate
that cannot be served is refused, nothing is registered and the champion stays.
"""

from __future__ import annotations

import json
import logging
from argparse import Namespace
from pathlib import Path

import tasks.promote.serving_check as serving_check
from tasks import drift, registry
from tasks.entry import Option, stage_main
from tasks.files import read_json, sha256_file, write_json
from tasks.inference import read_metadata
from tasks.params import Params

log = logging.getLogger("tasks.promote")
HEADLINE = ("accuracy", "balanced_accuracy", "macro_recall", "macro_f1", "roc_auc", "pr_auc", "ece", "n")
INT8_FILE = registry.INT8_FILE


class PromotionRefused(RuntimeError):
    """The candidate may not be promoted; the message says why."""


def onnx_metadata(onnx_path: Path) -> dict:
    """Lineage the export wrote into the ONNX file (classes, data version, params hash, git commit...)."""
    meta = read_metadata(onnx_path)
    return {
        "classes": json.loads(meta.get("classes", "null")),
        "arch": meta.get("arch"),
        "data_version": meta.get("data_version"),
        "params_sha256": meta.get("params_sha256"),
        "git_commit": meta.get("git_commit"),
        "input_contract": meta.get("input_contract"),
        "preprocessing": json.loads(meta.get("preprocessing", "null")),
        "metrics": json.loads(meta.get("metrics", "{}")),
        "candidate": json.loads(meta.get("candidate", "{}")),
    }


def version_files(onnx_path: Path, int8_dir: Path | None, model_card: Path | None,
                  predictions: Path | None) -> dict[str, Path]:
    files = {"model.onnx": Path(onnx_path)}
    int8 = Path(int8_dir) / INT8_FILE if int8_dir else None
    optional = {INT8_FILE: int8, "model_card.md": model_card, "predictions.csv": predictions,
                drift.REFERENCE_FILE: drift_reference(onnx_path),
                drift.INT8_REFERENCE_FILE: drift_reference(int8) if int8 is not None and int8.is_file() else None}
    files.update({name: Path(p) for name, p in optional.items() if p is not None and Path(p).is_file()})
    return files


def drift_reference(onnx_path: Path) -> Path | None:
    """The drift reference the model's metadata names (beside it, with the sha256 recorded), which goes into the
    version with the model under the same name; None (logged) for a model exported without one or whose reference is
    not its own."""
    metadata = read_metadata(onnx_path)
    try:
        drift.reference_of(onnx_path, metadata)
    except drift.DriftError as exc:
        log.warning("promote: no drift reference is registered with %s: %s", Path(onnx_path).name, exc)
        return None
    return Path(onnx_path).parent / json.loads(metadata[drift.METADATA_KEY])["file"]


def check_candidate(verdict: dict, verdict_path: Path, onnx_meta: dict, predictions_path: Path,
                    registry_root: Path) -> str | object:
    """Refuse a stale or foreign verdict; return the champion the alias may move from (`registry.ANY`: any)."""
    if not verdict.get("passed"):
        raise PromotionRefused(f"{verdict_path}: the gate did not pass ({verdict.get('reason')}); nothing is promoted")
    judged = verdict.get("candidate") or {}
    exported = onnx_meta.get("candidate") or {}
    if not judged.get("checkpoint_sha256") or judged.get("checkpoint_sha256") != exported.get("checkpoint_sha256"):
        raise PromotionRefused(f"{verdict_path} judged checkpoint {str(judged.get('checkpoint_sha256'))[:12]}..., the "
                               f"exported model is of {str(exported.get('checkpoint_sha256'))[:12]}...: a stale verdict; "
                               "nothing is promoted (run dvc repro to judge and export the same candidate)")
    if judged.get("predictions_sha256") != sha256_file(predictions_path):
        raise PromotionRefused(f"{predictions_path} changed since the gate judged it: a stale verdict; nothing is "
                               "promoted (run dvc repro)")
    rolled_back = registry.rolled_back_checkpoints(registry_root)
    if judged["checkpoint_sha256"] in rolled_back:
        raise PromotionRefused(f"this candidate's checkpoint was rolled back ({rolled_back[judged['checkpoint_sha256']]}): "
                               "it stays out until a person promotes it (finetune promote VERSION)")
    champion_block = verdict.get("champion") or {}
    if champion_block.get("status") not in ("none", "same", "compared"):
        return registry.ANY
    expected = champion_block.get("version")
    current = registry.read_champion(registry_root)
    now = current["version"] if current else None
    if now != expected and not (now and registry.read_metadata(registry_root, now).get("checkpoint_sha256")
                                == judged["checkpoint_sha256"]):
        raise PromotionRefused(f"the champion changed since the gate judged this candidate: it compared against "
                               f"{expected or 'no champion'}, the champion is now {now or 'none'}; judge again "
                               "(dvc repro -f -s gate, then dvc repro); nothing is promoted")
    return now


def run(onnx_path: Path, int8_dir: Path, model_card: Path, verdict_path: Path, metrics_path: Path,
        predictions_path: Path, registry_root: Path, report_path: Path, *, images_dir: Path,
        infra_images: int = 8, infra_timeout_s: float = 180.0) -> dict:
    verdict = read_json(verdict_path)
    onnx_meta = onnx_metadata(onnx_path)
    expected = check_candidate(verdict, verdict_path, onnx_meta, predictions_path, registry_root)
    infra = infra_check(onnx_path, predictions_path, images_dir, registry_root, report_path, infra_images,
                        infra_timeout_s)
    metrics = read_json(metrics_path)
    champion_block = verdict.get("champion") or {}
    metadata = {
        "source": "pipeline",
        "checkpoint_sha256": verdict["candidate"]["checkpoint_sha256"],
        **onnx_meta,
        "metrics": {k: metrics.get(k) for k in HEADLINE if k in metrics},
        "ci": metrics.get("ci", {}),
        "verdict": {"passed": True, "reason": verdict.get("reason"), "compared_with": champion_block.get("version")},
    }
    files = version_files(onnx_path, int8_dir, model_card, predictions_path)
    version, created = registry.register(registry_root, files, metadata)
    alias, changed = registry.promote(registry_root, version, reason=f"pipeline: {verdict.get('reason')}",
                                     expected=expected)
    report = {"version": version, "registered": created, "promoted": changed, "champion": alias["version"],
              "previous_champion": alias["history"][-1] if alias["history"] else None,
              "registry": str(registry_root), "onnx_sha256": registry.read_metadata(registry_root, version)["onnx_sha256"],
              "infra_check": infra}
    write_json(report_path, report)
    log.info("promote: %s %s; champion is now %s (registry %s)", version,
             "registered" if created else "already registered", alias["version"], registry_root)
    return report


def infra_check(onnx_path: Path, predictions_path: Path, images_dir: Path, registry_root: Path, report_path: Path,
                n_images: int, timeout_s: float) -> dict:
    """Serve the candidate for real before it may be registered; refuse it (report written) if it cannot be."""
    warmup = serving_check.pick_warmup(predictions_path, images_dir, n_images)
    log.info("promote: infra check: serving %s with the real server, %d test images", onnx_path, len(warmup))
    infra = serving_check.check_candidate(onnx_path, warmup, timeout_s)
    if infra["passed"]:
        log.info("promote: infra check passed: %s", infra["reason"])
        return infra
    champion = registry.read_champion(registry_root) if Path(registry_root).exists() else None
    write_json(report_path, {"version": None, "registered": False, "promoted": False,
                             "champion": champion["version"] if champion else None, "registry": str(registry_root),
                             "infra_check": infra})
    raise PromotionRefused(f"{onnx_path} cannot be served ({infra['reason']}); nothing is registered and the champion "
                           f"stays {champion['version'] if champion else 'none'} (infra check in {report_path})")


def register_file(onnx_path: Path, registry_root: Path, model_card: Path | None = None,
                  predictions: Path | None = None, note: str = "") -> tuple[str, bool]:
    """Register any exported ONNX file by hand (`finetune registry add`): its lineage comes from its metadata."""
    if not Path(onnx_path).is_file():
        raise registry.RegistryError(f"{onnx_path}: no such ONNX file")
    try:
        meta = onnx_metadata(onnx_path)
    except Exception as exc:
        raise registry.RegistryError(f"{onnx_path}: not a readable ONNX model ({exc})") from None
    metadata = {"source": "manual", "note": note, "checkpoint_sha256": None, **meta}
    return registry.register(registry_root, version_files(onnx_path, None, model_card, predictions), metadata)


def main(argv: list[str] | None = None) -> None:
    stage_main("promote", __doc__, argv, _from_params,
               Option(("--infra-images",), {"type": int, "default": 8, "help": "test images the infra check sends"}),
               Option(("--infra-timeout",), {"type": float, "default": 180.0,
                                             "help": "seconds the candidate's server may take to become ready"}))


def _from_params(p: Params, args: Namespace) -> None:
    run(args.onnx_path, args.int8_dir, args.model_card, args.verdict, args.metrics, args.predictions,
        registry.resolve_root(args.params, p.registry.root), args.report, images_dir=args.images,
        infra_images=args.infra_images, infra_timeout_s=args.infra_timeout)

