"""The pipeline's stages and the files that pass between them, declared once.

Read by each stage's command line (its path options and their defaults, `tasks.entry.stage_main`), the
`finetune stage ...` commands, the Prefect flow (order, which stages retry, the files it publishes) and the
tests; `tests/test_shape.py` checks dvc.yaml's commands and outputs against this table. A path here is
relative to the project folder, as dvc.yaml writes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# name -> (default path, what it is): every file or folder one stage writes and another reads or a person looks at
FILES: dict[str, tuple[str, str]] = {
    "images": ("data/images", "materialised image folder (ingest)"),
    "manifest": ("data/manifest.csv", "split manifest (ingest)"),
    "classes": ("data/classes.json", "the classes the source declares (ingest)"),
    "validated": ("data/validated.csv", "validated manifest (validate)"),
    "validation": ("reports/validation", "validation results, summary and Data Docs (validate)"),
    "validation_json": ("reports/validation/validation.json", "validation results (validate)"),
    "validation_md": ("reports/validation/validation.md", "validation summary (validate)"),
    "data_docs": ("reports/validation/docs", "Great Expectations Data Docs (validate)"),
    "base": ("models/base", "pretrained weights and their metadata (fetch_model)"),
    "label_reviewed": ("data/label_reviewed.csv", "files a person accepted as labelled (path,note; yours to edit: "
                       "label_issues does not flag them again)"),
    "label_issues": ("reports/label_issues", "likely label errors, near-duplicates and outliers (label_issues)"),
    "label_issues_json": ("reports/label_issues/label_issues.json", "label-issue results (label_issues)"),
    "label_issues_md": ("reports/label_issues/label_issues.md", "label-issue report (label_issues)"),
    "label_issues_png": ("reports/label_issues/label_issues.png", "thumbnails of the likely label errors "
                         "(label_issues)"),
    "label_issues_csv": ("data/label_issues.csv", "the flagged files as a manifest: path,label,split + the suggested "
                         "label (label_issues)"),
    "checkpoint": ("models/model.pt", "trained checkpoint (train)"),
    "train_summary": ("reports/train/summary.json", "training summary (train)"),
    "history": ("reports/train/history.csv", "per-epoch CSV (train)"),
    "eval": ("reports/eval", "test metrics, predictions and plots (evaluate)"),
    "metrics": ("reports/eval/metrics.json", "test metrics (evaluate)"),
    "predictions": ("reports/eval/predictions.csv", "per-image test predictions (evaluate)"),
    "confusion": ("reports/eval/confusion.png", "confusion matrix (evaluate)"),
    "gate": ("reports/gate", "the gate's verdict, JSON + Markdown (gate)"),
    "verdict": ("reports/gate/verdict.json", "the gate's verdict (gate)"),
    "verdict_md": ("reports/gate/verdict.md", "the gate's verdict for people (gate)"),
    "model": ("models/model.onnx", "the exported ONNX model (export)"),
    "model_int8": ("models/int8", "the INT8 model's folder (export)"),
    "model_card": ("models/model_card.md", "the model card (export)"),
    "drift_reference": ("models/drift_reference.npz", "the drift reference beside the model: PCA of the training "
                        "embeddings, validation outputs (export; the model's metadata names it)"),
    "export_report": ("reports/export.json", "parity + INT8 report (export)"),
    "promotion": ("reports/promote.json", "what was registered and promoted (promote)"),
}


def path(name: str) -> str:
    """The default path of a pipeline file, by its name in FILES."""
    return FILES[name][0]


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: the module that runs it, its path options (option -> FILES name, in the command's order)
    and the files it writes (FILES names)."""

    name: str  # the DVC stage name
    module: str  # the module holding `main`; `python -m` runs its package when it is a package's `stage` module
    summary: str
    options: dict[str, str]
    writes: tuple[str, ...]
    retries: bool = False  # its failures can be transient (reads data, fetches weights, writes the registry)
    extra_help: dict[str, str] = field(default_factory=dict)  # option -> help, where the FILES text is not enough

    @property
    def command(self) -> str:
        """What `python -m` runs (dvc.yaml)."""
        return self.module.removesuffix(".stage")

    @property
    def cli_name(self) -> str:
        """The `finetune stage` subcommand."""
        return self.name.replace("_", "-")

    def argv(self) -> list[str]:
        """dvc.yaml's command for this stage, word by word."""
        words = ["python", "-m", self.command, "--params", "params.yaml"]
        for option, file in self.options.items():
            words += ["--" + option.replace("_", "-"), path(file)]
        return words

    def path_options(self) -> dict[str, tuple[str, str]]:
        """option -> (default, help), for the stage's argument parser."""
        out = {}
        for option, file in self.options.items():
            default, text = FILES[file]
            out[option] = (default, self.extra_help.get(option, text + (" (output)" if file in self.writes else "")))
        return out


STAGES: tuple[Stage, ...] = (
    Stage("ingest", "tasks.ingest", "Materialise the data source as an image folder + split manifest.",
          {"images": "images", "manifest": "manifest", "classes": "classes", "reviewed": "label_reviewed"},
          writes=("images", "manifest", "classes"), retries=True,
          extra_help={"reviewed": "the label review list (path,note), created empty when there is none"}),
    Stage("validate", "tasks.validate.stage", "Run the Great Expectations suite; write the validated manifest "
          "and reports.",
          {"manifest": "manifest", "images": "images", "classes": "classes", "out_manifest": "validated",
           "out_dir": "validation"},
          writes=("validated", "validation", "validation_json", "validation_md", "data_docs")),
    Stage("fetch_model", "tasks.fetch_model", "Resolve and verify the pretrained weights named in `model.*`.",
          {"out_dir": "base"}, writes=("base",), retries=True),
    Stage("label_issues", "tasks.label_issues.stage", "Find likely label errors, near-duplicates across splits and "
          "outliers on frozen pretrained features; block mode stops the run before training.",
          {"manifest": "validated", "images": "images", "base": "base", "reviewed": "label_reviewed",
           "out_dir": "label_issues", "flagged": "label_issues_csv"},
          writes=("label_issues", "label_issues_json", "label_issues_md", "label_issues_png", "label_issues_csv")),
    Stage("train", "tasks.train.stage", "Staged fine-tuning (frozen, then unfrozen); writes the checkpoint.",
          {"manifest": "validated", "images": "images", "base": "base", "checkpoint": "checkpoint",
           "metrics": "train_summary", "history": "history"},
          writes=("checkpoint", "train_summary", "history")),
    Stage("evaluate", "tasks.evaluate", "Score the checkpoint on the held-out test split (metrics, predictions, "
          "plots).",
          {"checkpoint": "checkpoint", "manifest": "validated", "images": "images", "out_dir": "eval"},
          writes=("eval", "metrics", "predictions", "confusion")),
    Stage("gate", "tasks.gate", "Judge the candidate against the gates and the champion; exit 1 when a gate fails.",
          {"metrics": "metrics", "predictions": "predictions", "checkpoint": "checkpoint", "manifest": "validated",
           "images": "images", "out_dir": "gate"},
          writes=("gate", "verdict", "verdict_md"),
          extra_help={"images": "test images (the champion is scored on them)"}),
    Stage("export", "tasks.export.stage", "Export to ONNX, verify it against PyTorch, optional INT8, model card.",
          {"checkpoint": "checkpoint", "manifest": "validated", "images": "images", "verdict": "verdict",
           "metrics": "metrics", "onnx_path": "model", "int8_dir": "model_int8", "model_card": "model_card",
           "report": "export_report"},
          writes=("model", "model_int8", "model_card", "export_report", "drift_reference")),
    Stage("promote", "tasks.promote.stage", "Register the exported model and make it the champion.",
          {"onnx_path": "model", "int8_dir": "model_int8", "model_card": "model_card", "verdict": "verdict",
           "metrics": "metrics", "predictions": "predictions", "images": "images", "report": "promotion"},
          writes=("promotion",), retries=True,
          extra_help={"images": "test images (the infra check sends some to the candidate's server)"}),
)
BY_NAME = {s.name: s for s in STAGES}
NAMES = tuple(BY_NAME)


def stage(name: str) -> Stage:
    return BY_NAME[name]
