"""Gates with hand-built predictions where the right verdict is known: absolute bounds, the per-class
floor, the champion comparison (tolerance, direction, relative change, zero baseline, significance,
ties), the first-run policy, and the stage scoring a real ONNX champion on the same test images."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from tasks import registry
from tasks.gate import GateFailed, compare, judge, no_champion, run, same_as_champion
from tasks.metrics import evaluation_metrics
from tasks.params import ChampionGate, GateParams
from tests.conftest import brightness_onnx

CLASSES = ["defective", "functional"]


def gates(**kw) -> GateParams:
    base = {"min": {"accuracy": 0.9, "macro_recall": 0.8, "macro_f1": 0.8}, "per_class_recall_floor": 0.5}
    return GateParams.model_validate({**base, **kw})


def onehot_probs(pred, k=2, conf=0.9):
    """Probabilities whose argmax is `pred`, with confidence `conf`."""
    pred = np.asarray(pred)
    p = np.full((len(pred), k), (1 - conf) / (k - 1))
    p[np.arange(len(pred)), pred] = conf
    return p


def metrics_of(y, pred, classes=CLASSES, conf=0.9):
    return evaluation_metrics(np.asarray(y), onehot_probs(pred, len(classes), conf), classes, resamples=200)


def failed(verdict):
    return [g["name"] for g in verdict["gates"] if not g["passed"]]


# ---- absolute gates --------------------------------------------------------------------------

# 100 images, 50 per class; `wrong` of each class predicted as the other class
def balanced(wrong0: int, wrong1: int):
    y = np.r_[np.zeros(50, int), np.ones(50, int)]
    pred = y.copy()
    pred[:wrong0] = 1
    pred[50 : 50 + wrong1] = 0
    return y, pred


def test_a_good_model_passes_every_gate_and_says_why():
    v = judge(metrics_of(*balanced(2, 3)), gates())
    assert v["passed"] and v["reason"].startswith("all gates passed (")
    assert all(g["reason"] for g in v["gates"])
    acc = next(g for g in v["gates"] if g["name"] == "accuracy")
    assert acc["value"] == 0.95 and acc["bound"] == 0.9 and acc["direction"] == "higher" and len(acc["ci"]) == 2


@pytest.mark.parametrize("metric", ["accuracy", "balanced_accuracy", "macro_recall", "macro_f1", "macro_precision"])
def test_each_lower_bound_passes_at_its_bound_and_fails_just_above_it(metric):
    m = metrics_of(*balanced(5, 5))  # every one of these metrics is exactly 0.9
    assert m[metric] == pytest.approx(0.9)
    cfg = {"min": {"accuracy": None, "macro_recall": None, "macro_f1": None, metric: m[metric]},
           "per_class_recall_floor": None}
    assert judge(m, GateParams.model_validate(cfg))["passed"]
    cfg["min"][metric] = m[metric] + 1e-6
    v = judge(m, GateParams.model_validate(cfg))
    assert not v["passed"] and failed(v) == [metric]
    assert v["reason"].startswith(f"gate failed: {metric} 0.9000 < 0.9000")


@pytest.mark.parametrize("metric", ["roc_auc", "pr_auc"])
def test_score_gates(metric):
    m = metrics_of(*balanced(0, 0))  # perfectly separated scores
    assert m[metric] == pytest.approx(1.0)
    assert judge(m, gates(min={metric: 1.0}))["passed"]
    m[metric] = 0.7
    assert failed(judge(m, gates(min={metric: 0.75}))) == [metric]


def test_upper_bound_for_a_lower_is_better_metric():
    m = metrics_of(*balanced(10, 10), conf=0.99)  # 80% right at 99% confidence: ECE 0.19
    assert m["ece"] == pytest.approx(0.19)
    ok = judge(m, GateParams.model_validate({"min": {"accuracy": None}, "max": {"ece": 0.19}}))
    assert ok["passed"]
    bad = judge(m, GateParams.model_validate({"min": {"accuracy": None}, "max": {"ece": 0.1}}))
    assert failed(bad) == ["ece"] and "ece 0.1900 > 0.1000" in bad["reason"]
    row = bad["gates"][[g["name"] for g in bad["gates"]].index("ece")]
    assert row["direction"] == "lower"


def test_per_class_floor_catches_a_model_that_ignores_one_class():
    classes = ["a", "b", "c", "crack"]
    y = np.r_[np.zeros(30, int), np.ones(30, int), np.full(30, 2), np.full(10, 3)]
    pred = np.where(y == 3, 0, y)  # never says 'crack': accuracy 0.90, macro recall 0.75, macro F1 0.71
    m = metrics_of(y, pred, classes)
    cfg = {"min": {"accuracy": 0.85, "macro_recall": 0.7, "macro_f1": 0.7}}
    v = judge(m, gates(**cfg))
    assert not v["passed"] and failed(v) == ["recall[crack]"]
    assert v["reason"].startswith("gate failed: recall[crack] 0.0000 < 0.5000")
    assert judge(m, gates(**cfg, per_class_recall_floor=None))["passed"]  # the averages alone let it through


def test_a_class_with_no_test_images_cannot_pass_the_floor():
    y, pred = np.zeros(20, int), np.zeros(20, int)  # all right, but no 'functional' image to be right about
    m = metrics_of(y, pred)
    assert m["balanced_accuracy"] == 1.0 and m["macro_recall"] == 0.5  # macro recall counts the empty class as 0
    v = judge(m, gates(min={"accuracy": 0.9, "balanced_accuracy": 0.9, "macro_recall": None, "macro_f1": None}))
    assert failed(v) == ["recall[functional]"]
    assert "no test images of class 'functional'" in v["reason"]
    # a score metric undefined on such a split fails its gate with a reason, never a NaN comparison
    v = judge(metrics_of(y, pred), gates(min={"accuracy": None, "macro_recall": None, "macro_f1": None, "roc_auc": 0.5},
                                         per_class_recall_floor=None))
    assert failed(v) == ["roc_auc"] and "undefined" in v["reason"]


def test_no_thresholds_still_gives_a_verdict_with_a_reason_per_gate():
    off = {"min": {k: None for k in ("accuracy", "macro_recall", "macro_f1")}, "per_class_recall_floor": None}
    v = judge(metrics_of(*balanced(30, 30)), GateParams.model_validate(off))
    assert v["passed"] and "0 absolute gates" in v["reason"]
    assert all(g["passed"] and "gate off" in g["reason"] for g in v["gates"])


def test_conservative_judges_the_pessimistic_end_of_the_ci():
    m = metrics_of(*balanced(4, 4))  # accuracy 0.92; the CI's lower end is below 0.9
    assert m["ci"]["accuracy"][0] < 0.9 < m["accuracy"]
    assert judge(m, gates())["passed"]
    v = judge(m, gates(conservative=True, per_class_recall_floor=None))
    assert failed(v) == ["accuracy"] and "95% CI lower end" in v["reason"]
    v = judge(m, gates(conservative=True, min={"macro_precision": 0.5}, per_class_recall_floor=None))
    row = next(g for g in v["gates"] if g["name"] == "macro_precision")
    assert row["passed"] and "no CI: judged on the estimate" in row["reason"]


def test_missing_metric_fails():
    v = judge({"accuracy": 0.95}, GateParams.model_validate({"min": {"macro_f1": 0.5}, "per_class_recall_floor": None}))
    assert failed(v) == ["macro_recall", "macro_f1"] and "macro_f1: missing from the metrics" in v["reason"]


# ---- the champion comparison ------------------------------------------------------------------


def champion_case(extra_right: int, extra_wrong: int = 0, n: int = 200):
    """y, champion and candidate predictions: both right on the same 150 of 200 images; the candidate
    is also right on `extra_right` images the champion misses, and wrong on `extra_wrong` it gets."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, n)
    champ = y.copy()
    champ[150:] = 1 - y[150:]
    cand = champ.copy()
    cand[150 : 150 + extra_right] = y[150 : 150 + extra_right]
    cand[:extra_wrong] = 1 - y[:extra_wrong]
    return y, cand, champ


def cmp(cfg: dict, y, cand, champ, **kw):
    return compare(ChampionGate.model_validate(cfg), "v0001", y, cand, champ, 2, **kw)


def test_worse_than_the_champion_by_more_than_the_tolerance_fails():
    y, cand, champ = champion_case(0, extra_wrong=4)  # accuracy 0.73 vs 0.75
    r = cmp({"metric": "accuracy", "max_drop": 0.01}, y, cand, champ)
    assert not r["passed"] and r["delta"] == pytest.approx(-0.02)
    assert "worse by 0.0200 > allowed 0.0100" in r["reason"]
    assert cmp({"metric": "accuracy", "max_drop": 0.02}, y, cand, champ)["passed"]  # exactly at the tolerance


def test_relative_tolerance_and_a_zero_champion_baseline():
    y, cand, champ = champion_case(0, extra_wrong=4)  # -0.02 absolute = -2.67% of 0.75
    assert not cmp({"metric": "accuracy", "max_drop": 0.025, "relative": True}, y, cand, champ)["passed"]
    assert cmp({"metric": "accuracy", "max_drop": 0.03, "relative": True}, y, cand, champ)["passed"]
    y = np.zeros(10, int)
    always_wrong, half = np.ones(10, int), np.r_[np.zeros(5, int), np.ones(5, int)]
    r = cmp({"metric": "accuracy", "max_drop": 0.01, "relative": True}, y, half, always_wrong)
    assert r["passed"] and r["champion"] == 0 and "relative change is undefined" in r["drop_basis"]
    r = cmp({"metric": "accuracy", "max_drop": 0.01, "relative": True}, y, always_wrong, always_wrong)
    assert r["passed"] and r["delta"] == 0


def test_direction_lower_is_better_for_ece():
    y, cand, champ = champion_case(0)
    calibrated = onehot_probs(champ, conf=0.75)  # right 75% of the time at 75% confidence: ECE 0
    overconfident = onehot_probs(cand, conf=0.99)  # same predictions, ECE 0.24
    r = cmp({"metric": "ece", "max_drop": 0.05}, y, cand, champ, cand_probs=overconfident, champ_probs=calibrated)
    assert not r["passed"] and r["direction"] == "lower" and r["delta"] == pytest.approx(0.24)
    r = cmp({"metric": "ece", "max_drop": 0.05}, y, champ, cand, cand_probs=calibrated, champ_probs=overconfident)
    assert r["passed"] and r["delta"] == pytest.approx(-0.24)


@pytest.mark.parametrize("test", ["mcnemar", "bootstrap"])
def test_better_but_not_significantly_is_kept_out_when_significance_is_required(test):
    y, cand, champ = champion_case(3)  # right on 3 more images of 200: McNemar mid-p 0.25
    cfg = {"metric": "accuracy", "test": test, "require_significant": True}
    r = cmp(cfg, y, cand, champ)
    assert r["delta"] == pytest.approx(0.015) and not r["significant"]
    assert not r["passed"] and "not a significant improvement" in r["reason"] and "champion kept" in r["reason"]
    assert cmp({**cfg, "require_significant": False}, y, cand, champ)["passed"]  # only not-worse required
    y, cand, champ = champion_case(20)  # 20 more right, none fewer: significant by either test
    r = cmp(cfg, y, cand, champ)
    assert r["passed"] and r["significant"] and r["p_value"] < 0.001 and "significantly better" in r["reason"]
    assert r["mcnemar"] == {"candidate_only_right": 20, "champion_only_right": 0, "p_exact": pytest.approx(2 * 0.5 ** 20),
                            "p_mid": pytest.approx(0.5 ** 20)}


def test_a_tie_with_the_champion():
    y, cand, champ = champion_case(0)
    r = cmp({"metric": "macro_f1"}, y, cand, champ)
    assert r["passed"] and r["delta"] == 0 and r["p_value"] == 1.0 and r["ci"] == [0.0, 0.0]
    r = cmp({"metric": "macro_f1", "require_significant": True}, y, cand, champ)
    assert not r["passed"] and "not a significant improvement" in r["reason"]


def test_first_run_policy_and_the_candidate_that_is_already_champion():
    m = metrics_of(*balanced(2, 2))
    v = judge(m, gates(), no_champion("absolute_only", "registry"))
    assert v["passed"] and "no champion yet: the absolute gates decide" in v["reason"]
    v = judge(m, gates(first_run="block"), no_champion("block", "registry"))
    assert not v["passed"] and "gates.first_run is 'block'" in v["reason"]
    v = judge(m, gates(), same_as_champion("v0003"))
    assert v["passed"] and "already the champion (v0003" in v["reason"]
    # a failing champion gate and a failing absolute gate are both in the one-line reason
    y, cand, champ = champion_case(0, extra_wrong=10)
    v = judge(metrics_of(y, cand), gates(), cmp({"metric": "accuracy"}, y, cand, champ))
    assert not v["passed"] and "accuracy 0.7000 < 0.9000" in v["reason"] and "vs champion v0001" in v["reason"]


# ---- the stage, with a real ONNX champion in a registry ------------------------------------------


@pytest.fixture
def stage_inputs(tiny_folder, tmp_path):
    """A test split of the tiny folder, a candidate's predictions on it, and an empty registry."""
    from tasks.images import load_for_model

    classes = ["bright", "dark"]
    rows = [{"path": f"{c}/{p.name}", "label": c, "split": "test"}
            for c in classes for p in sorted((tiny_folder / c).iterdir())]
    manifest = tmp_path / "validated.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    y = np.array([classes.index(r["label"]) for r in rows])
    means = np.array([load_for_model(tiny_folder / r["path"], 32).mean() for r in rows])
    pred = np.where(means > 128, 0, 1)
    pred[:2] = 1 - pred[:2]  # the candidate gets two bright images wrong that the champion gets right
    probs = onehot_probs(pred)
    pd.DataFrame({"path": [r["path"] for r in rows], "actual": [classes[i] for i in y],
                  "predicted": [classes[i] for i in pred], "p_bright": probs[:, 0], "p_dark": probs[:, 1]}
                 ).to_csv(tmp_path / "predictions.csv", index=False)
    metrics = evaluation_metrics(y, probs, classes, resamples=200)
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"candidate checkpoint")
    return {"metrics_path": tmp_path / "metrics.json", "predictions_path": tmp_path / "predictions.csv",
            "checkpoint_path": ckpt, "manifest_path": manifest, "images_dir": tiny_folder,
            "registry_root": tmp_path / "registry", "verdict_path": tmp_path / "gate/verdict.json",
            "report_path": tmp_path / "gate/verdict.md", "tmp": tmp_path, "metrics": metrics}


def stage(inputs, cfg):
    keys = ("predictions_path", "checkpoint_path", "manifest_path", "images_dir", "registry_root")
    return run(inputs["metrics_path"], cfg, inputs["verdict_path"], inputs["report_path"], workers=2,
               **{k: inputs[k] for k in keys})


def test_stage_scores_the_champion_onnx_on_the_same_images(stage_inputs):
    s = stage_inputs
    low = {"min": {"accuracy": 0.5, "macro_recall": 0.5, "macro_f1": 0.5}}
    # first run: no champion, the absolute gates decide
    v = stage(s, gates(**low))
    assert v["passed"] and v["champion"]["status"] == "none"
    # a perfect champion: the candidate is 2 images worse on accuracy (48 images) -> fails at max_drop 0.01
    onnx = brightness_onnx(s["tmp"] / "champ.onnx", ["bright", "dark"])
    version, _ = registry.register(s["registry_root"], {"model.onnx": onnx}, {"checkpoint_sha256": "other"})
    registry.promote(s["registry_root"], version)
    with pytest.raises(GateFailed, match=r"accuracy 0.9583 vs champion v0001 1.0000 .*worse by 0.0417"):
        stage(s, gates(**low, champion={"metric": "accuracy"}))
    verdict = json.loads(s["verdict_path"].read_text())
    c = verdict["champion"]
    assert not verdict["passed"] and c["version"] == "v0001" and c["n"] == 48
    assert c["mcnemar"]["champion_only_right"] == 2 and c["mcnemar"]["candidate_only_right"] == 0
    report = s["report_path"].read_text()
    assert report.startswith("# Gate verdict: FAILED\n\n**gate failed: accuracy 0.9583 vs champion v0001")
    assert "dvc repro -f -s gate" in report
    # a looser tolerance passes
    assert stage(s, gates(**low, champion={"metric": "accuracy", "max_drop": 0.05}))["passed"]


def test_stage_recognises_the_champion_and_reports_a_broken_registry(stage_inputs):
    from tasks.files import sha256_file

    s = stage_inputs
    onnx = brightness_onnx(s["tmp"] / "champ.onnx", ["bright", "dark"])
    version, _ = registry.register(s["registry_root"], {"model.onnx": onnx},
                                   {"checkpoint_sha256": sha256_file(s["checkpoint_path"])})
    registry.promote(s["registry_root"], version)
    v = stage(s, gates(min={"accuracy": 0.5}))
    assert v["passed"] and "candidate is already the champion (v0001" in v["champion"]["reason"]
    (s["registry_root"] / "champion.json").write_text("{broken")
    with pytest.raises(GateFailed, match="champion comparison failed: .*champion.json is not valid JSON"):
        stage(s, gates(min={"accuracy": 0.5}))
    assert json.loads(s["verdict_path"].read_text())["passed"] is False  # the verdict is written anyway


def test_stage_refuses_a_champion_with_other_classes(stage_inputs):
    s = stage_inputs
    onnx = brightness_onnx(s["tmp"] / "champ.onnx", ["light", "shadow"])
    registry.promote(s["registry_root"], registry.register(s["registry_root"], {"model.onnx": onnx}, {})[0])
    with pytest.raises(GateFailed, match=r"predicts \['light', 'shadow'\], the candidate \['bright', 'dark'\]"):
        stage(s, gates(min={"accuracy": 0.5}))
    assert stage(s, gates(min={"accuracy": 0.5}, champion={"metric": None}))["passed"]
