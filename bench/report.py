"""Render docs/benchmarks.md from every benchmark JSON under bench/results/ (`make bench` runs it last).

Each section names the exact command that produced its numbers, the date, the commit and the machine (as the
JSON records them; older JSONs without a date show the file's modification time). A section whose JSON is missing
says 'not measured' with the command that measures it; the GPU section says 'not measured (no GPU lent)' unless
bench/results/gpu_check.json exists. Written to a temporary file, then renamed.

    .venv/bin/python bench/report.py                          # bench/results/ -> docs/benchmarks.md
    .venv/bin/python bench/report.py --results DIR --out FILE
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def pct(v, ci=None) -> str:
    if v is None:
        return "n/a"
    return f"{100 * v:.2f}%" + (f" ({100 * ci[0]:.1f}-{100 * ci[1]:.1f})" if ci else "")


def num(v, fmt: str = ".1f") -> str:
    return "n/a" if v is None else format(v, fmt)


def provenance(data: dict, path: Path, default_command: str) -> str:
    m = data.get("machine") or data.get("info", {})
    machine = ", ".join(str(x) for x in (
        m.get("cpu") or m.get("gpu") or m.get("device"), f"{m['cores']} cores" if m.get("cores") else None,
        f"{m['threads']} threads" if m.get("threads") else None,
        f"load {m['loadavg_before'][0]} before / {m['loadavg_after'][0]} after" if m.get("loadavg_before") else None,
    ) if x) or "not recorded"
    date = data.get("date") or datetime.datetime.fromtimestamp(
        path.stat().st_mtime, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC") + " (file time)"
    command = data.get("command") or f"{default_command} (not recorded in the JSON: the script's default)"
    if not command.startswith((".venv", "python", "bench/.venv")):
        command = f".venv/bin/python {command if command.startswith('bench/') else 'bench/' + command}"
    return (f"Command: `{command}`  \nDate: {date}; commit: {data.get('commit') or 'not recorded'}; "
            f"machine: {machine}; JSON: `bench/results/{path.name}`\n")


# ---- sections: (title, json file, command that produces it, renderer) ----------------------------------------


def elpv(d: dict) -> list[str]:
    lines = [f"Protocol: {d.get('protocol', '')}.", "",
             "| task | cells | n | accuracy (95% CI) | balanced accuracy | macro recall | macro F1 |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    keys = ("accuracy", "balanced_accuracy", "macro_recall", "macro_f1")
    for task, r in d.get("results", {}).items():
        m = r["metrics"]
        for name, row in [("all", m), *sorted(m.get("per_type", {}).items())]:
            lines.append(f"| {task} | {name} | {row['n']} | " + " | ".join(pct(row[k], row['ci'].get(k)) for k in keys)
                         + " |")
    levels = [(task, level, row) for task, r in d.get("results", {}).items()
              for level, row in r["metrics"].get("per_probability", {}).items()]
    if levels:
        lines += ["", "Accuracy per expert defect probability (the experts' own certainty: 1/3 and 2/3 are the cells "
                  "they were unsure of):", "", "| task | defect probability | n | errors | accuracy (95% CI) |",
                  "| --- | --- | --- | --- | --- |"]
        lines += [f"| {task} | {level} | {row['n']} | {row['errors']} | {pct(row['accuracy'], row['ci'])} |"
                  for task, level, row in levels]
    lines += ["", "| task | per-class recall | parameters | ONNX bytes | train wall s | image px |",
              "| --- | --- | --- | --- | --- | --- |"]
    for task, r in d.get("results", {}).items():
        recall = ", ".join(f"{c} {pct(v)}" for c, v in r["metrics"]["per_class_recall"].items())
        s = r["size"]
        onnx_bytes = f"{s['onnx_bytes']:,}" if s.get("onnx_bytes") else "n/a"
        lines.append(f"| {task} | {recall} | {s['parameters']:,} | {onnx_bytes} | {num(r['train_wall_s'])} | "
                     f"{r['image_size']} |")
    lines += ["", "Published, beside ours:", ""]
    for p in d.get("published", []):
        lines.append(f"- {p['task']}: {p['method']}: **{100 * p['value']:.2f}%** {p['metric']}. Note: {p['note']}.")
    return lines


def peers(d: dict) -> list[str]:
    s = d["setup"]
    c = s.get("counts", {})
    lines = [f"{c.get('train', '?')} train / {c.get('val', '?')} val / {c.get('test', '?')} test images, {s['size']} px, "
             f"batch {s['batch_size']}, {s['frozen_epochs']} frozen + {s['unfrozen_epochs']} unfrozen epochs, "
             f"{s['threads']} threads, {s.get('augment', '')}; versions: "
             + ", ".join(f"{k} {v}" for k, v in d.get("versions", {}).items() if v), "",
             "| run | wall s | images/s | test accuracy (95% CI) | macro recall | macro F1 | ours x faster | "
             "accuracy vs ours |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in d["rows"]:
        if r.get("status", "ok") != "ok":
            lines.append(f"| {r['label']} | {r['status']} | | | | | | |")
            continue
        t, v = r["test"], r.get("vs_ours")
        faster = f"{1 / v['images_per_s']:.2f}x" if v else "-"
        delta = f"{v['accuracy_pt']:+.2f} pt" if v else "-"
        lines.append(f"| {r['label']} | {num(r['wall_s'])} | {num(r['images_per_s'])} | "
                     f"{pct(t['accuracy'], t.get('ci', {}).get('accuracy'))} | {pct(t['macro_recall'])} | "
                     f"{t['macro_f1']:.4f} | {faster} | {delta} |")
    lines += ["", "Recipes: " + "; ".join(f"{r['label']}: {r['recipe']}" for r in d["rows"] if r.get("recipe"))]
    return lines


def onnx(d: dict) -> list[str]:
    lines = ["| engine | batch | p50 ms | images/s | x eager | accuracy |", "| --- | --- | --- | --- | --- | --- |"]
    for name, r in d.get("results", {}).items():
        for b, t in r.get("timing", {}).items():
            lines.append(f"| {name} | {b} | {num(t.get('p50_ms'))} | {num(t.get('images_per_s'))} | "
                         f"{num(t.get('speedup_vs_eager'), '.2f')}x | {pct(r.get('accuracy'))} |")
    return lines


def train(d: dict) -> list[str]:
    lines = ["| method | stage | epochs | images/s | wall s | val acc |", "| --- | --- | --- | --- | --- | --- |"]
    for r in d.get("runs", []):
        method = r["method"] + (f" ({r['variant']})" if r.get("variant") else "")
        lines.append(f"| {method} | {r['stage']} | {r['epochs']} | {num(r['images_per_s'])} | {num(r['wall_s'])} | "
                     f"{pct(r.get('val_accuracy'))} |")
    lines += ["", "Ratios (images/s): " + ", ".join(f"{k} {v:.2f}x" for k, v in d.get("ratios", {}).items())]
    return lines


def serving(d: dict) -> list[str]:
    lines = ["| setting | clients | requests/s | p50 ms | p99 ms | errors |", "| --- | --- | --- | --- | --- | --- |"]
    for label, run in d.get("server", {}).items():
        for clients, lvl in run.get("binary", {}).items():
            lines.append(f"| {label} | {clients} | {num(lvl.get('requests_per_s'))} | {num(lvl.get('p50_ms'))} | "
                         f"{num(lvl.get('p99_ms'))} | {lvl.get('errors')} |")
    for label, run in ((d.get("int8") or {}).get("server") or {}).items():  # --int8: the INT8 file, same server
        for clients, lvl in run.get("binary", {}).items():
            lines.append(f"| INT8 model (`--precision int8`), {label} | {clients} | {num(lvl.get('requests_per_s'))} | "
                         f"{num(lvl.get('p50_ms'))} | {num(lvl.get('p99_ms'))} | {lvl.get('errors')} |")
    ref = d.get("ort_reference", {})
    lines += ["", f"ONNX Runtime alone (reference): {num(ref.get('images_per_s'))} images/s"
              + (f" (INT8: {num(d['int8']['ort_reference'].get('images_per_s'))})" if d.get("int8") else "")
              + ". Targets: " + json.dumps(d.get("targets"))]
    return lines


def recipes(d: dict) -> list[str]:
    lines = ["| recipe | stages | test accuracy (95% CI) | macro recall | macro F1 | train s |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in d.get("rows", []):
        lines.append(f"| {r['recipe']} | {r['stages']} | {pct(r['accuracy'], r.get('accuracy_ci'))} | "
                     f"{pct(r['macro_recall'])} | {r['macro_f1']:.4f} | {num(r['train_s'], '.0f')} |")
    return lines


def selection(d: dict) -> list[str]:
    seeds = ", ".join(d.get("seeds", {}))
    lines = [f"The default recipe trained once per seed ({seeds}); for {d.get('halvings')} random halvings of the "
             "validation split per seed, each rule picks the kept weights on one half and is scored on the other "
             "(validation only; the test split is not used).", "",
             "| kept weights | accuracy on the other half (mean over seeds, sd) | macro F1 (mean, sd) |",
             "| --- | --- | --- |"]
    for rule, r in d.get("summary", {}).items():
        lines.append(f"| {rule} | {pct(r['accuracy'])} ({r['accuracy_sd'] * 100:.2f}) | {pct(r['macro_f1'])} "
                     f"({r['macro_f1_sd'] * 100:.2f}) |")
    return lines


def scale(d: dict) -> list[str]:
    lines = ["| images | store | wall s | images/s | peak RSS MB | weights equal |", "| --- | --- | --- | --- | --- | --- |"]
    for r in d.get("results", []):
        for t in r.get("runs", []):
            lines.append(f"| {r['images']:,} | {t['store']} | {t['wall_s']} | {t['images_per_s']} | {t['peak_rss_mb']} "
                         f"| {r.get('weights_equal')} |")
    return lines + ["", *data_stages(d)] if any("stages" in r for r in d.get("results", [])) else lines


def data_stages(d: dict) -> list[str]:
    lines = ["| images | stage | wall s | images/s | peak RSS MB |", "| --- | --- | --- | --- | --- |"]
    for r in d.get("results", []):
        for stage, t in r.get("stages", {}).items():
            lines.append(f"| {r['images']:,} | {stage} | {t['wall_s']} | {t['images_per_s']} | {t['peak_rss_mb']} |")
    return lines


def tta(d: dict) -> list[str]:
    lines = [f"Checkpoint `{d.get('checkpoint')}` at {d.get('image_size')} px; `export.tta` applies the chosen mode in "
             "evaluation and inside the exported ONNX graph.", "",
             "| split | tta | variants | accuracy (95% CI) | macro recall | macro F1 | ms / image (PyTorch, CPU) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in d.get("rows", []):
        lines.append(f"| {r['split']} | {r['tta']} | {r['variants']} | {pct(r['accuracy'], r.get('accuracy_ci'))} | "
                     f"{pct(r['macro_recall'])} | {pct(r['macro_f1'])} | {num(r['ms_per_image'])} |")
    return lines


def label_issues(d: dict) -> list[str]:
    b, s, f = d["backbone"], d["separation"], d["flagged"]
    lines = [f"The label_issues stage (`python -m tasks.label_issues`, a fresh process, as dvc.yaml runs it) on the "
             f"{s['n']} validated ELPV cells, {b['arch']} features at {b['size']} px, {s['folds']}-fold logistic "
             f"regression (out-of-fold accuracy {pct(s['oof_accuracy'])}).", "",
             "| run | wall s | features | flagged label errors | near-duplicate pairs | outliers |",
             "| --- | --- | --- | --- | --- | --- |",
             f"| cold (no feature cache) | {num(d['cold_s'])} | computed | {d['counts']['label_issues']} | "
             f"{d['counts']['near_duplicates']} | {d['counts']['outliers']} |",
             f"| warm (features cached) | {num(d['warm_s'])} | cached | {d['counts']['label_issues']} | "
             f"{d['counts']['near_duplicates']} | {d['counts']['outliers']} |", "",
             f"Warm timings inside the stage (s): {', '.join(f'{k} {v}' for k, v in d['timings_warm'].items())}.", "",
             f"How well the label-quality score separates the {s['unsure']} cells the experts rated 1/3 or 2/3 from "
             "those rated 0 or 1 (AUROC of 1 - score; 0.5 = no better than chance):", "",
             "| score | all cells | " + " | ".join(f"given {c}" for c in next(iter(s["auroc"].values())) if c != "all")
             + " |", "| --- | --- |" + " --- |" * (len(next(iter(s["auroc"].values()))) - 1)]
    for method, row in s["auroc"].items():
        lines.append(f"| {method} | " + " | ".join(f"{v:.4f}" for v in row.values()) + " |")
    if len({tuple(row.values()) for row in s["auroc"].values()}) == 1:
        lines += ["", "With two classes the three scores are monotone in the probability of the given label, so they "
                  "rank the cells alike."]
    lines += ["", f"Flagged: {f['flagged']} cells, {f['flagged_unsure']} of them rated 1/3 or 2/3 "
              f"({pct(f['flagged_unsure'] / max(1, f['flagged']))}; base rate {pct(f['base_rate_unsure'])}); per split "
              + ", ".join(f"{k} {v}" for k, v in f["per_split"].items())
              + (f"; flagged test cells the pipeline's current model (reports/eval/predictions.csv) gets wrong: "
                 f"{f['flagged_test_cells_the_default_model_gets_wrong']} (it gets {f['default_model_test_errors']} "
                 "test cells wrong)" if "default_model_test_errors" in f else "") + "."]
    if "retrain" in d:
        r = d["retrain"]
        lines += ["", f"The default recipe trained on all train images and without the {r['dropped_train_images']} "
                  "flagged ones (validation and test splits untouched):", "",
                  "| train images | val accuracy | val macro F1 | test accuracy (95% CI) | test macro F1 | train s |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for row in (r["all"], r["without_flagged"]):
            lines.append(f"| {row['n_train']} | {pct(row['val_accuracy'])} | {pct(row['val_macro_f1'])} | "
                         f"{pct(row['test_accuracy'], row['test_accuracy_ci'])} | {pct(row['test_macro_f1'])} | "
                         f"{num(row['train_s'], '.0f')} |")
    return lines


def drift(d: dict) -> list[str]:
    s, r, fa, cs, cost = d["settings"], d["reference"], d["false_alarms"], d["clean_streams"], d["cost"]
    lines = [f"Model `{d['model']}`; reference: {r['n']} {r.get('reference_split')} cells, PCA to {r['components']} "
             f"components on {r.get('n_fit')} {r.get('fit_split')} cells. Server settings: window {s['window']}, a test "
             f"every {s['every']} requests, alpha {s['alpha']} per test (Bonferroni), {s['consecutive']} rejections in a "
             f"row raise the alarm. Clean traffic: the {d['test_images']} test cells.", "",
             "| traffic | detected within 100 requests | requests until the alarm (median / p90) | median p-values of "
             "a whole shifted window: embedding / softmax / image |", "| --- | --- | --- | --- |"]
    for name, x in d["shifts"].items():
        p = x["full_window_pvalues"]
        med = "-" if x["requests_median"] is None else f"{x['requests_median']:.0f} / {x['requests_p90']:.0f}"
        image = f"{p['image']:.1e}" if "image" in p else "-"  # a reference without image statistics: not tested
        lines.append(f"| {name} | {pct(x['detected_within_100'])} of {x['trials']} | {med} | "
                     f"{p['embedding']:.1e} / {p['softmax']:.1e} / {image} |")
    arl = (f"ARL0 {cs['arl0_requests']:,.0f} requests" if cs["arl0_requests"] else
           f"no alarm: ARL0 > {cs['arl0_lower_95']:,.0f} requests (95%)")
    lines += ["", "| without drift | result |", "| --- | --- |",
              f"| single tests on {fa['windows']} random clean windows of {fa['window']}: rejecting | "
              + ", ".join(f"{pct(v)} at alpha {a}" for a, v in fa["rejected"].items()) + " |",
              f"| {cs['streams']} clean streams, {cs['requests']:,} requests, {cs['tests']:,} tests | "
              f"{pct(cs['rejection_rate'])} of tests reject, {cs['alarms']} alarms; {arl} |",
              "| mono reference, clean mono windows: rejecting | " + ", ".join(
                  f"{pct(v)} at alpha {a}" for a, v in d["mono_reference"]["false_alarms"]["rejected"].items()) + " |",
              f"| cost of one test (window {cost['window']}, in-process"
              + (f", the image statistics of the {cost['every']} new images included"
                 if "image" in cost.get("detectors", ()) else "")
              + f") | mean {num(cost['mean_ms'], '.2f')} ms, p99 {num(cost['p99_ms'], '.2f')} ms"
              + (f"; image statistics {num(cost['image_statistics_ms_per_image'], '.3f')} ms an image"
                 if "image_statistics_ms_per_image" in cost else "") + " |"]
    if "throughput" in d:
        t = d["throughput"]
        sc = t.get("server_test_cost") or {}
        cpu = t.get("server_cpu_ms_per_request") or {}
        lines.append(f"| server throughput, monitoring on / off ({t['clients']} clients, binary tensors, "
                     f"{t.get('rounds', 2)} runs of {t['seconds']:g} s each, alternating) | "
                     f"{num(t['requests_per_s']['on'])} / {num(t['requests_per_s']['off'])} requests/s: ratio "
                     f"{t['ratio_on_off']:.3f}"
                     + (f"; a test in the server {num(sc['mean_ms'], '.2f')} ms ({sc['tests']} tests)" if sc else "")
                     + (f"; server CPU per request {num(cpu['on'], '.2f')} / {num(cpu['off'], '.2f')} ms: ratio "
                        f"{t['cpu_ratio_on_off']:.3f}" if cpu.get("on") and cpu.get("off") else "") + " |")
    if d.get("sweep"):
        names = list(d["sweep"][0]["shifts"])
        lines += ["", "The false-alarm control's trade-off: other per-test levels and alarm rules on the same outputs "
                  "(clean streams as above; detection trials as above, fewer):", "",
                  "| alpha, rejections in a row | alarms in clean streams | ARL0 (requests) | "
                  + " | ".join(f"{n}: within 100, median requests" for n in names) + " |",
                  "| --- | --- | --- |" + " --- |" * len(names)]
        rows = [{"alpha": s["alpha"], "consecutive": s["consecutive"], "alarms": cs["alarms"], "requests": cs["requests"],
                 "arl0_requests": cs["arl0_requests"], "arl0_lower_95": cs["arl0_lower_95"], "shifts": d["shifts"],
                 "default": True}] + d["sweep"]
        for row in rows:
            arl = f"{row['arl0_requests']:,.0f}" if row["arl0_requests"] else f"> {row['arl0_lower_95']:,.0f} (95%)"
            found = [(row["shifts"][n]["detected_within_100"], row["shifts"][n]["requests_median"]) for n in names]
            lines.append(f"| {row['alpha']}, {row['consecutive']}{' (default)' if row.get('default') else ''} | "
                         f"{row['alarms']} in {row['requests']:,} | {arl} | "
                         + " | ".join(f"{pct(w)}, {num(m, '.0f')}" for w, m in found) + " |")
    return lines


def gpu(d: dict) -> list[str]:
    lines = ["```", json.dumps(d.get("info", {}), indent=1)[:2000], "```", ""]
    for r in d.get("results", []):
        lines.append(f"- {json.dumps(r)[:400]}")
    return lines


SECTIONS = [
    ("ELPV reference (Deitsch et al. protocol)", "elpv.json", ".venv/bin/python bench/bench_elpv.py", elpv),
    ("Test-time augmentation (export.tta)", "tta.json", ".venv/bin/python bench/bench_tta.py", tta),
    ("Ours vs peers: plain PyTorch, fastai, Lightning", "peers.json", ".venv/bin/python bench/bench_peers.py", peers),
    ("Training throughput: our trainer vs a plain loop", "bench_train.json",
     ".venv/bin/python bench/bench_train.py", train),
    ("Inference: ONNX Runtime fp32/INT8 vs PyTorch eager", "onnx.json", ".venv/bin/python bench/bench_onnx.py", onnx),
    ("Serving under load", "serving.json", ".venv/bin/python bench/bench_serving.py", serving),
    ("Staged vs single-stage recipes", "recipes.json", ".venv/bin/python bench/bench_recipes.py", recipes),
    ("Which epoch's weights to keep", "selection.json", ".venv/bin/python bench/bench_selection.py", selection),
    ("Label issues on ELPV: cost and agreement with the experts' uncertainty", "label_issues.json",
     ".venv/bin/python bench/bench_label_issues.py", label_issues),
    ("Drift monitoring on ELPV: false alarms, detection, cost", "drift.json", ".venv/bin/python bench/bench_drift.py",
     drift),
    ("Training memory vs data size", "scale.json", ".venv/bin/python bench/bench_scale.py", scale),
    ("Ingest and validation memory vs data size", "scale_data.json",
     ".venv/bin/python bench/bench_scale.py --data-only --with-100k", data_stages),
]
GPU = ("GPU", "gpu_check.json", "python bench/gpu_check.py   # on a CUDA machine", gpu)


def render(results: Path) -> str:
    out = ["# Benchmarks", "",
           "Generated by `make bench` (`bench/report.py`) from the JSON under `bench/results/`; do not edit by hand. "
           "Every number below comes with the command that produced it and the machine it ran on. "
           "How each benchmark works and how to read it: [bench/README.md](../bench/README.md).", ""]
    for title, name, command, renderer in [*SECTIONS, GPU]:
        out += [f"## {title}", ""]
        path = results / name
        if not path.exists():
            why = "not measured (no GPU lent)" if renderer is gpu else "not measured"
            out += [f"{why}: `{command}` writes `bench/results/{name}`.", ""]
            continue
        try:
            data = json.loads(path.read_text())
            body = renderer(data)
        except (ValueError, KeyError, TypeError) as exc:
            out += [f"`bench/results/{name}` could not be rendered ({type(exc).__name__}: {exc}); rerun `{command}`.", ""]
            continue
        out += [provenance(data, path, command.split("   #")[0]), *body, ""]
    return "\n".join(out).rstrip() + "\n"


def write(text: str, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=REPO / "bench/results")
    ap.add_argument("--out", type=Path, default=REPO / "docs/benchmarks.md")
    args = ap.parse_args(argv)
    write(render(args.results), args.out)
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
