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
