"""Gate stage: is the candidate good enough in absolute terms *and* not worse than the champion?

Absolute gates (`gates.min`, `gates.max`, `gates.per_class_recall_floor`) compare test-split
metrics with bounds; each row carries its 95% bootstrap CI (and with `gates.conservative` the
pessimistic end of the CI must clear the bound). The champion gate scores the registry's champion
ONNX model on the *same* test images with ONNX Runtime and compares the two paired: the difference
of `gates.champion.metric` with a paired bootstrap CI, McNemar's test on the images only one model
gets right, a tolerance (`max_drop`, absolute or relative) and optionally a required significant
improvement. With no champion, `gates.first_run` decides (absolute_only: the absolute gates alone;
block: refuse until a person promotes a first model).

The registry is deliberately not a DVC dependency of this stage (after our own promotion that
would rerun the gate and compare the candidate with itself): the verdict records which champion it
compared against; `dvc repro -f -s gate` re-judges against a newer champion. When the champion's
checkpoint is the candidate's, the champion gate says so and passes.

A verdict (JSON + Markdown) is always written; a failing verdict raises GateFailed with the one-line
reason, so `dvc repro` stops before export and a Prefect flow run fails with it.
"""

from __future__ import annotations

import logging
from argparse import Namespace
from pathlib import Path

import numpy as np
import pandas as pd

from tasks import registry
from tasks.entry import stage_main
from tasks.files import atomic_write, read_json, sha256_file, write_json
from tasks.images import DEFAULT_MAX_PIXELS
from tasks.inference import OnnxClassifier
from tasks.manifest import read_manifest, read_table, require_labels
from tasks.metrics import DIRECTION, mcnemar, paired_bootstrap, resampled_metric
from tasks.params import ChampionGate, GateParams, Params

log = logging.getLogger(__name__)
EPS = 1e-12  # a value at its bound passes, whatever float rounding did


class GateFailed(RuntimeError):
    """At least one gate failed; the message is the one-line reason."""


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _ci_text(ci) -> str:
    return f" (95% CI {ci[0]:.4f}-{ci[1]:.4f})" if ci else ""


def bound_gate(name: str, metric: str, direction: str, value: float | None, bound: float | None,
               ci: list[float] | None = None, conservative: bool = False, undefined: str = "") -> dict:
    """One gate row: `value` against a lower (`direction` higher) or upper (lower) `bound`."""
    row = {"name": name, "metric": metric, "direction": direction, "value": value, "bound": bound, "ci": ci}
    if bound is None:
        return {**row, "passed": True, "reason": f"{name}: no bound set (gate off)"}
    if value is None:
        return {**row, "passed": False, "reason": f"{name}: {undefined or 'missing from the metrics'}"}
    higher = direction == "higher"
    judged, what = value, f"{name} {value:.4f}"
    if conservative and ci:
        judged = ci[0] if higher else ci[1]
        what = f"{name} 95% CI {'lower' if higher else 'upper'} end {judged:.4f} (estimate {value:.4f})"
    passed = judged >= bound - EPS if higher else judged <= bound + EPS
    op = (">=" if passed else "<") if higher else ("<=" if passed else ">")
    note = " (no CI: judged on the estimate)" if conservative and not ci else ""
    return {**row, "passed": passed,
            "reason": f"{what} {op} {bound:.4f}" + ("" if conservative else _ci_text(ci)) + note}


def absolute_gates(metrics: dict, cfg: GateParams) -> list[dict]:
    """Every absolute gate, off ones included (a verdict lists them all)."""
    ci = metrics.get("ci") or {}
    gates = []
    for section, direction in (("min", "higher"), ("max", "lower")):
        for metric, bound in getattr(cfg, section).model_dump().items():
            undefined = ("undefined on this test split (it needs test images of both kinds)"
                         if metric in metrics and metrics[metric] is None else "")
            gates.append(bound_gate(metric, metric, direction, metrics.get(metric), bound, ci.get(metric),
                                    cfg.conservative, undefined))
    floor = cfg.per_class_recall_floor
    per_class = metrics.get("per_class") or {}
    if floor is None:
        gates.append(bound_gate("per-class recall", "recall", "higher", None, None))
    elif not per_class:
        gates.append(bound_gate("per-class recall", "recall", "higher", None, floor))
    for cls, scores in per_class.items() if floor is not None else ():
        empty = not scores.get("support")
        gates.append(bound_gate(f"recall[{cls}]", "recall", "higher", None if empty else scores.get("recall"), floor,
                                (ci.get("per_class_recall") or {}).get(cls), cfg.conservative,
                                f"no test images of class '{cls}': its recall cannot be checked" if empty else ""))
    return gates


# ---- champion ------------------------------------------------------------------------------


def champion_off() -> dict:
    return {"status": "off", "version": None, "passed": True,
            "reason": "champion comparison off (gates.champion.metric: null)"}


def no_champion(policy: str, root: str | Path) -> dict:
    if policy == "block":
        return {"status": "none", "version": None, "passed": False,
                "reason": (f"no champion in registry {root} and gates.first_run is 'block': a person promotes a "
                           "first model (finetune registry add MODEL.onnx; finetune promote)")}
    return {"status": "none", "version": None, "passed": True,
            "reason": "no champion yet: the absolute gates decide (gates.first_run: absolute_only)"}


def same_as_champion(version: str) -> dict:
    return {"status": "same", "version": version, "passed": True,
            "reason": f"candidate is already the champion ({version}, same checkpoint)"}


def champion_unusable(version: str | None, why: str) -> dict:
    return {"status": "error", "version": version, "passed": False, "reason": f"champion comparison failed: {why}"}


def compare(cfg: ChampionGate, version: str, y: np.ndarray, cand_pred: np.ndarray, champ_pred: np.ndarray,
            k: int, cand_probs: np.ndarray | None = None, champ_probs: np.ndarray | None = None,
            seed: int = 0) -> dict:
    """The champion gate from paired predictions on the same images (pure).

    Worse by more than `max_drop` (absolute, or a fraction of the champion's value with `relative`;
    with a champion value of 0 the relative change is undefined and the absolute one is used) fails.
    With `require_significant`, the candidate must also be significantly better (`test` at `alpha`)."""
    metric, alpha = cfg.metric, cfg.alpha
    direction = DIRECTION[metric]
    full = np.arange(len(y))[None, :]
    cand = float(resampled_metric(metric, y, cand_pred, k, full, cand_probs)[0])
    champ = float(resampled_metric(metric, y, champ_pred, k, full, champ_probs)[0])
    boot = paired_bootstrap(metric, y, cand_pred, champ_pred, k, cand_probs, champ_probs, level=1 - alpha, seed=seed)
    mc = mcnemar(y, cand_pred, champ_pred)
    delta = cand - champ
    gain = delta if direction == "higher" else -delta  # > 0: the candidate is better
    scale, basis = 1.0, "absolute"
    if cfg.relative:
        if champ == 0:
            basis = "absolute (champion value is 0, so a relative change is undefined)"
        else:
            scale, basis = abs(champ), "relative to the champion's value"
    drop = -gain / scale
    not_worse = drop <= cfg.max_drop + EPS
    if cfg.test == "mcnemar":
        p, better = mc["p_mid"], mc["a_only"] > mc["b_only"]
    else:
        p, better = boot["p_value"], gain > EPS
    significant = bool(better and p < alpha)
    passed = not_worse and (significant or not cfg.require_significant)
    level = f"{100 * (1 - alpha):g}%"
    p_text = f"p < {1 / boot['resamples']:.2g}" if p == 0 and cfg.test == "bootstrap" else f"p = {p:.3g}"
    head = (f"{metric} {cand:.4f} vs champion {version} {champ:.4f} ({delta:+.4f}, {level} CI "
            f"{boot['ci'][0]:+.4f} to {boot['ci'][1]:+.4f}, {cfg.test} {p_text})")
    if not not_worse:
        unit = "" if scale == 1.0 else " of the champion's value"
        reason = f"{head}: worse by {drop:.4f}{unit} > allowed {cfg.max_drop:.4f}"
    elif cfg.require_significant and not significant:
        reason = f"{head}: not a significant improvement (needs p < {alpha:g}); champion kept"
    else:
        reason = head + (": significantly better" if significant else ": within the allowed drop")
    return {"status": "compared", "version": version, "metric": metric, "direction": direction,
            "candidate": cand, "champion": champ, "delta": delta, "ci": boot["ci"], "ci_level": 1 - alpha,
            "test": cfg.test, "p_value": p, "significant": significant, "max_drop": cfg.max_drop,
            "drop_basis": basis, "require_significant": cfg.require_significant, "alpha": alpha, "n": int(len(y)),
            "mcnemar": {"candidate_only_right": mc["a_only"], "champion_only_right": mc["b_only"],
                        "p_exact": mc["p_exact"], "p_mid": mc["p_mid"]},
            "bootstrap": {"resamples": boot["resamples"], "p_value": boot["p_value"]},
            "passed": bool(passed), "reason": reason}


# ---- verdict ------------------------------------------------------------------------------


def judge(metrics: dict, cfg: GateParams, champion: dict | None = None) -> dict:
    """Absolute gates plus the champion block (from `compare`, `no_champion`...) -> the verdict (pure)."""
    gates = absolute_gates(metrics, cfg)
    champion = champion if champion is not None else champion_off()
    failed = [g["reason"] for g in gates if not g["passed"]] + ([] if champion["passed"] else [champion["reason"]])
    active = sum(g["bound"] is not None for g in gates)
    if failed:
        reason = "gate failed: " + "; ".join(failed)
    else:
        reason = f"all gates passed ({active} absolute gate{'s' * (active != 1)}; {champion['reason']})"
    return {"passed": not failed, "reason": reason, "gates": gates, "champion": champion}


def report_markdown(verdict: dict) -> str:
    """What a person reads in ten seconds: the outcome and the reason first, then the table."""
    head = "PASSED" if verdict["passed"] else "FAILED"
    lines = [f"# Gate verdict: {head}", "", f"**{verdict['reason']}**", "",
             "| gate | value | bound | 95% CI | result |", "| --- | --- | --- | --- | --- |"]
    for g in verdict["gates"]:
        bound = "off" if g["bound"] is None else f"{'>=' if g['direction'] == 'higher' else '<='} {g['bound']:.4f}"
        ci = f"{g['ci'][0]:.4f}-{g['ci'][1]:.4f}" if g.get("ci") else ""
        result = "pass" if g["passed"] else "**FAIL**"
        lines.append(f"| {g['name']} | {_fmt(g['value'])} | {bound} | {ci} | {result} |")
    c = verdict["champion"]
    lines += ["", "## Against the champion", ""]
    if c.get("status") == "compared":
        lines += [f"| metric | candidate | champion {c['version']} | difference | {100 * c['ci_level']:g}% CI | "
                  f"p ({c['test']}) | result |", "| --- | --- | --- | --- | --- | --- | --- |",
                  f"| {c['metric']} ({c['direction']} is better) | {c['candidate']:.4f} | {c['champion']:.4f} | "
                  f"{c['delta']:+.4f} | {c['ci'][0]:+.4f} to {c['ci'][1]:+.4f} | {c['p_value']:.3g} | "
                  f"{'pass' if c['passed'] else '**FAIL**'} |", "",
                  f"Paired on {c['n']} test images: {c['mcnemar']['candidate_only_right']} only the candidate gets "
                  f"right, {c['mcnemar']['champion_only_right']} only the champion. Allowed drop {c['max_drop']:g} "
                  f"({c['drop_basis']}); significant improvement {'required' if c['require_significant'] else 'not required'}.",
                  ""]
    lines.append(f"{'pass' if c['passed'] else '**FAIL**'}: {c['reason']}")
    cand = verdict.get("candidate") or {}
    if cand.get("registry"):
        lines += ["", f"Judged against registry `{cand['registry']}` as it was at gate time; to judge again against a "
                      "newer champion: `dvc repro -f -s gate`."]
    return "\n".join(lines) + "\n"


# ---- the stage ----------------------------------------------------------------------------


def read_predictions(path: Path, classes: list[str]) -> tuple[pd.DataFrame, np.ndarray, np.ndarray, np.ndarray]:
    """The candidate's per-image test predictions: (rows, y, predicted, probabilities)."""
    df = read_table(path)
    require_labels(df, path, "actual")
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(df["actual"]) - set(index) | set(df["predicted"]) - set(index))
    if unknown:
        raise ValueError(f"{path}: labels {unknown} are not among the model's classes {classes}")
    prob_cols = [f"p_{c}" for c in classes]
    probs = df[prob_cols].astype(float).to_numpy() if all(col in df for col in prob_cols) else None
    return df, df["actual"].map(index).to_numpy(), df["predicted"].map(index).to_numpy(), probs


def champion_probabilities(onnx_path: Path, image_paths: list[Path], workers: int = 4,
                           max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[list[str], np.ndarray]:
    """Score the champion's ONNX model with ONNX Runtime on `image_paths`, through the inference module
    (the one decode path, at the preprocessing its metadata states; softmax from the graph)."""
    model = OnnxClassifier(onnx_path)
    rows = []
    for pred in model.predict_files(image_paths, workers=workers, max_pixels=max_pixels):
        if pred.error is not None:
            raise ValueError(pred.error)
        rows.append(pred.probabilities)
    return model.classes, np.stack(rows) if rows else np.zeros((0, len(model.classes)), np.float32)


def judge_champion(cfg: GateParams, root: Path, checkpoint_sha256: str, predictions: Path, classes: list[str],
                   test_paths: list[str], images_dir: Path, workers: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
    """Find the champion, score it on the candidate's test images and compare; never raises for a
    broken registry or champion model (the verdict says what is wrong)."""
    if cfg.champion.metric is None:
        return champion_off()
    version = None
    try:
        alias = registry.read_champion(root)
        if alias is None:
            return no_champion(cfg.first_run, root)
        version = alias["version"]
        meta = registry.read_metadata(root, version)
        if meta.get("checkpoint_sha256") and meta["checkpoint_sha256"] == checkpoint_sha256:
            return same_as_champion(version)
        rows, y, cand_pred, cand_probs = read_predictions(predictions, classes)
        if sorted(rows["path"]) != sorted(test_paths):
            return champion_unusable(version, f"{predictions} does not cover the manifest's test split; rerun evaluate")
        onnx = Path(root) / "versions" / version / "model.onnx"
        log.info("gate: scoring champion %s (%s) on the candidate's %d test images", version, onnx, len(rows))
        champ_classes, champ_probs = champion_probabilities(onnx, [Path(images_dir) / p for p in rows["path"]], workers,
                                                            max_pixels)
        if champ_classes != classes:
            return champion_unusable(version, f"champion {version} predicts {champ_classes}, the candidate {classes}: "
                                     "not comparable (set gates.champion.metric: null to judge on the absolute gates)")
        return compare(cfg.champion, version, y, cand_pred, champ_probs.argmax(1), len(classes), cand_probs, champ_probs)
    except Exception as exc:  # a verdict is always written; it names the problem
        return champion_unusable(version, str(exc).strip() or type(exc).__name__)


def run(metrics_path: Path, cfg: GateParams, verdict_path: Path, report_path: Path, *,
        predictions_path: Path | None = None, checkpoint_path: Path | None = None, manifest_path: Path | None = None,
        images_dir: Path | None = None, registry_root: Path | None = None, workers: int = 4,
        max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
    """The gate stage: judge, always write the verdict and the report, raise GateFailed on failure."""
    metrics = read_json(metrics_path)
    candidate = {"metrics": str(metrics_path), "metrics_sha256": sha256_file(metrics_path)}
    if checkpoint_path is not None and Path(checkpoint_path).exists():
        candidate["checkpoint_sha256"] = sha256_file(checkpoint_path)
    if predictions_path is not None and Path(predictions_path).exists():
        candidate["predictions_sha256"] = sha256_file(predictions_path)
    if registry_root is None:
        champion = champion_off() if cfg.champion.metric is None else champion_unusable(None, "no registry given")
    else:
        candidate["registry"] = str(registry_root)
        test_paths = []
        if manifest_path is not None:
            manifest = read_manifest(manifest_path)
            test_paths = manifest.loc[manifest["split"] == "test", "path"].astype(str).tolist()
        champion = judge_champion(cfg, Path(registry_root), candidate.get("checkpoint_sha256", ""),
                                  Path(predictions_path), list(metrics.get("classes") or []), test_paths,
                                  Path(images_dir or "."), workers, max_pixels)
    verdict = judge(metrics, cfg, champion)
    verdict["candidate"] = candidate
    write_json(verdict_path, verdict)
    atomic_write(report_path, report_markdown(verdict))
    (log.info if verdict["passed"] else log.error)("gate: %s", verdict["reason"])
    if not verdict["passed"]:
        raise GateFailed(verdict["reason"])
    return verdict


def main(argv: list[str] | None = None) -> None:
    stage_main("gate", __doc__, argv, _from_params)


def _from_params(p: Params, args: Namespace) -> None:
    out = args.out_dir
    run(args.metrics, p.gates, out / "verdict.json", out / "verdict.md", predictions_path=args.predictions,
        checkpoint_path=args.checkpoint, manifest_path=args.manifest, images_dir=args.images,
        registry_root=registry.resolve_root(args.params, p.registry.root), workers=p.data.workers,
        max_pixels=p.data.max_pixels)


if __name__ == "__main__":
    main()
