"""Gates with hand-built metrics where the right verdict is known."""

from __future__ import annotations

import json

import pytest

from tasks.gate import GateFailed, judge, run

BOUNDS = {"accuracy": 0.9, "macro_recall": 0.8, "macro_f1": 0.8}


def metrics(acc=0.95, rec=0.9, f1=0.9):
    return {"accuracy": acc, "macro_recall": rec, "macro_f1": f1}


def test_all_pass():
    v = judge(metrics(), BOUNDS)
    assert v["passed"] and v["reason"] == "all gates passed"


@pytest.mark.parametrize("name", list(BOUNDS))
def test_each_gate_passes_at_its_bound_and_fails_just_below(name):
    at = metrics(**{"acc": 0.95, "rec": 0.9, "f1": 0.9})
    at[name] = BOUNDS[name]
    assert judge(at, BOUNDS)["passed"]
    below = dict(at, **{name: BOUNDS[name] - 1e-6})
    v = judge(below, BOUNDS)
    assert not v["passed"] and name in v["reason"]
    assert [g["metric"] for g in v["gates"] if not g["passed"]] == [name]


def test_gate_off_and_missing_metric():
    v = judge({"accuracy": 0.1}, {"accuracy": None, "macro_f1": 0.5})
    assert not v["passed"]
    off, missing = v["gates"]
    assert off["passed"] and "off" in off["reason"]
    assert not missing["passed"] and "missing" in missing["reason"]


def test_run_always_writes_the_verdict_and_raises_on_failure(tmp_path):
    m = tmp_path / "metrics.json"
    m.write_text(json.dumps(metrics(acc=0.5)))
    with pytest.raises(GateFailed, match=r"accuracy 0.5000 < 0.9000"):
        run(m, BOUNDS, tmp_path / "verdict.json", tmp_path / "verdict.md")
    verdict = json.loads((tmp_path / "verdict.json").read_text())
    assert verdict["passed"] is False
    assert "FAILED" in (tmp_path / "verdict.md").read_text()
