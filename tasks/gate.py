"""Gate stage: test metrics vs the lower bounds in `gates.*` -> a verdict, always written.

The verdict JSON lists every gate (metric, value, bound, pass/fail, reason) and a Markdown
report says the same for people. A failing gate makes the stage exit non-zero, so `dvc repro`
stops before export and a Prefect flow run ends Failed with the reason.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tasks.io import atomic_write, read_json, write_json

log = logging.getLogger(__name__)


class GateFailed(RuntimeError):
    """At least one gate failed; the message is the one-line reason."""


def judge(metrics: dict, bounds: dict[str, float | None]) -> dict:
    """Compare `metrics` with lower `bounds` (None = gate off); pure, no I/O."""
    gates = []
    for name, bound in bounds.items():
        value = metrics.get(name)
        if bound is None:
            gates.append({"metric": name, "value": value, "bound": None, "passed": True,
                          "reason": f"{name} gate is off (no bound set)"})
            continue
        if value is None:
            gates.append({"metric": name, "value": None, "bound": bound, "passed": False,
                          "reason": f"{name} missing from the metrics"})
            continue
        passed = value >= bound
        gates.append({"metric": name, "value": value, "bound": bound, "passed": passed,
                      "reason": f"{name} {value:.4f} {'>=' if passed else '<'} {bound:.4f}"})
    failed = [g for g in gates if not g["passed"]]
    reason = ("all gates passed" if not failed else "gate failed: " + "; ".join(g["reason"] for g in failed))
    return {"passed": not failed, "reason": reason, "gates": gates}


def report_markdown(verdict: dict) -> str:
    head = "PASSED" if verdict["passed"] else "FAILED"
    lines = [f"# Gate verdict: {head}", "", verdict["reason"], "", "| gate | value | bound | result |", "| --- | --- | --- | --- |"]
    for g in verdict["gates"]:
        value = "n/a" if g["value"] is None else f"{g['value']:.4f}"
        bound = "off" if g["bound"] is None else f">= {g['bound']:.4f}"
        lines.append(f"| {g['metric']} | {value} | {bound} | {'pass' if g['passed'] else '**FAIL**'} |")
    return "\n".join(lines) + "\n"


def run(metrics_path: Path, bounds: dict[str, float | None], verdict_path: Path, report_path: Path) -> dict:
    verdict = judge(read_json(metrics_path), bounds)
    write_json(verdict_path, verdict)
    atomic_write(report_path, report_markdown(verdict))
    (log.info if verdict["passed"] else log.error)("gate: %s", verdict["reason"])
    if not verdict["passed"]:
        raise GateFailed(verdict["reason"])
    return verdict
