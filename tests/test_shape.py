"""The shape of the code: stages depend only on what they run, layers import downward, no cycles,
no patched library internals, and the inference module stays free of torch and prefect."""

from __future__ import annotations

import contextlib
import importlib
import io
import subprocess
import sys

import pytest
import yaml

from tasks import stages
from tests.importgraph import (
    REPO,
    closure,
    files,
    find_cycle,
    imports_of,
    module_file,
    project_modules,
    runs_of,
    stage_code,
    stage_modules,
)

# The stage modules (or packages); a stage may import shared modules, never another stage.
STAGES = tuple(s.command for s in stages.STAGES)


def stage_of(module: str) -> str | None:
    return next((s for s in STAGES if module == s or module.startswith(s + ".")), None)


def dvc_code_deps(stage: str) -> set[str]:
    deps = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]["deps"]
    return {d for d in deps if d.startswith(("tasks/", "flows/", "deploy/", "finetune/"))}


@pytest.mark.parametrize("stage", list(stage_modules()))
def test_each_dvc_stage_lists_exactly_the_code_it_runs(stage):
    expected = stage_code(stage_modules()[stage])
    listed = dvc_code_deps(stage)
    assert listed == expected, (f"dvc.yaml stage '{stage}': missing {sorted(expected - listed)}, "
                                f"not run {sorted(listed - expected)} (`python -m tests.importgraph --write` fixes dvc.yaml)")


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_imports_shared_modules_only_never_another_stage(stage):
    entry = f"{stage}.__main__" if module_file(f"{stage}.__main__") else stage
    others = {m: stage_of(m) for m in closure(entry) if stage_of(m) not in (None, stage)}
    assert not others, f"{stage} runs code of other stages: {others}"


def test_layers_import_downward_only():
    """finetune (the CLI) -> flows, deploy -> tasks. Nothing imports the CLI; tasks import no upper layer;
    deploy uses only the torch-free consumer modules."""
    allowed_in_deploy = {"tasks", "tasks.inference", "tasks.preprocess", "tasks.images", "tasks.registry",
                         "tasks.files", "tasks.manifest", "tasks.entry", "tasks.params", "tasks.drift"}
    for module in project_modules():
        top = module.split(".")[0]
        targets = imports_of(module)
        assert not any(t.split(".")[0] == "finetune" for t in targets) or top == "finetune", (module, targets)
        if top == "tasks":
            assert all(t.split(".")[0] == "tasks" for t in targets), (module, targets)
        if top == "flows":
            assert all(t.split(".")[0] in ("tasks", "flows") for t in targets), (module, targets)
            assert not any(stage_of(t) for t in targets), f"{module} imports a stage module: {targets}"
        if top == "deploy":
            assert all(t in allowed_in_deploy or t.split(".")[0] == "deploy" for t in targets), (module, targets)


def test_the_one_upward_edge_is_a_process_and_the_graph_sees_it():
    """The CLI imports deploy (serve, predict, export-triton); tasks never import it, but the promote stage's infra
    check starts `python -m deploy.server` as a process. The graph records that edge, so dvc.yaml's promote stage
    depends on the server's code (and no other stage does)."""
    started = {m: runs_of(m) for m in project_modules() if runs_of(m)}
    assert started == {"tasks.promote.serving_check": frozenset({"deploy.server"})}, started
    assert any(t.startswith("deploy") for t in imports_of("finetune.cli"))
    deploy_code = {f for f in stage_code("tasks.promote.__main__") if f.startswith("deploy/")}
    assert "deploy/server.py" in deploy_code and deploy_code <= dvc_code_deps("promote")
    assert not any(d.startswith("deploy/") for s in stages.NAMES if s != "promote" for d in dvc_code_deps(s))


def test_no_import_cycles():
    assert find_cycle() is None, f"import cycle: {' -> '.join(find_cycle())}"


def test_no_mocks_or_patches_in_shipped_code():
    offenders = []
    for module in project_modules():
        text = module_file(module).read_text()
        if "unittest" in text or "mock.patch" in text or "import mock" in text:
            offenders.append(module)
    assert not offenders


def test_no_module_shadows_the_standard_library():
    shadows = [m for m in project_modules() if m.split(".")[-1] in sys.stdlib_module_names]
    assert not shadows, shadows


@pytest.mark.parametrize("module", ["tasks.inference", "tasks.preprocess", "tasks.registry", "tasks.drift",
                                    "tasks.promote.serving_check", "deploy.server", "deploy.predict", "deploy.triton",
                                    "deploy.drift_batch"])
def test_consumer_modules_import_neither_torch_nor_prefect(module):
    """What serving needs loads in a fresh interpreter without torch or prefect (a small serving image)."""
    code = (f"import sys, {module}; heavy = sorted(m for m in ('torch', 'prefect', 'torchvision', 'timm') "
            "if m in sys.modules); print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"importing {module} loaded {out.stdout.strip()}"


# ---- one table per fact ---------------------------------------------------------------------------------------


def dvc_stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def declared_outputs(stage: dict) -> set[str]:
    out = set()
    for key in ("outs", "metrics", "plots"):
        for item in stage.get(key, []):
            out.add(next(iter(item)) if isinstance(item, dict) else item)
    return out


def test_dvc_yaml_runs_the_stage_table_in_order_with_its_paths():
    """dvc.yaml's stages are tasks.stages' stages, in order; each command is the table's module with its path
    options at their defaults, and each stage's outputs are files the table says it writes."""
    found = dvc_stages()
    assert list(found) == list(stages.NAMES)
    for spec in stages.STAGES:
        assert found[spec.name]["cmd"].split() == spec.argv(), spec.name
        written = {stages.path(f) for f in spec.writes}
        for out in declared_outputs(found[spec.name]):
            assert out in written or any(out.startswith(w + "/") for w in written), (spec.name, out)
        for w in written:  # each file the table names is an output, or a folder holding outputs
            assert any(o == w or o.startswith(w + "/") or w.startswith(o + "/")
                       for o in declared_outputs(found[spec.name])), (spec.name, w)


def test_every_reader_of_the_stage_list_reads_the_table():
    """The CLI's `finetune stage` commands, the flow's order and retries, and each stage's path options come from
    tasks.stages (the stage's `--help` shows the table's defaults)."""
    from typer.main import get_command

    from finetune.cli import stage_app
    from flows import pipeline

    assert sorted(get_command(stage_app).commands) == sorted(s.cli_name for s in stages.STAGES)
    assert pipeline.STAGES is stages.STAGES
    for spec in stages.STAGES:  # each stage's `main` (what `python -m` runs), in this process: one torch import
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exited:
            importlib.import_module(spec.module).main(["--help"])
        assert exited.value.code == 0 and out.getvalue().startswith(f"usage: python -m {spec.command} "), spec.name
        for option, file in spec.options.items():
            assert f"--{option.replace('_', '-')}" in out.getvalue() and stages.path(file) in out.getvalue(), \
                (spec.name, option)


def test_pipeline_paths_are_spelt_once_in_shipped_code():
    """A pipeline file's path (data/validated.csv, reports/eval/metrics.json...) is written in tasks/stages.py
    only; everything else reads it from there."""
    paths = {default for default, _ in stages.FILES.values() if "/" in default}
    offenders = []
    for module in project_modules():
        if module == "tasks.stages":
            continue
        text = module_file(module).read_text()
        offenders += [(module, p) for p in paths if f'"{p}"' in text or f"'{p}'" in text]
    assert not offenders, offenders


def test_modules_and_functions_stay_small():
    """No shipped module over 450 lines, no function over 80 (bench/ excepted: scripts read top to bottom)."""
    import ast

    long_modules, long_functions = [], []
    for module in project_modules():
        path = module_file(module)
        text = path.read_text()
        if len(text.splitlines()) > 450:
            long_modules.append((module, len(text.splitlines())))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80:
                long_functions.append((module, node.name, node.end_lineno - node.lineno + 1))
    assert not long_modules, long_modules
    assert not long_functions, long_functions


def test_params_name_exactly_the_registered_sources():
    """`data.source` and `model.source` accept exactly the sources their registries hold. The data source's values
    are built from its registry (a light module every stage may load); the backbone registry imports torch, which the
    params cannot, so this test holds the two lists together."""
    from typing import get_args

    import tasks.backbones
    import tasks.sources
    from tasks.params import DataParams, ModelParams
    from tasks.params import schema
    from tasks.sources.readers import READERS

    assert schema.SOURCES is tasks.sources.SOURCES  # built from the registry, not a copy of its names
    assert get_args(DataParams.model_fields["source"].annotation) == tuple(tasks.sources.SOURCES)
    assert set(READERS) == set(tasks.sources.SOURCES)
    assert set(get_args(ModelParams.model_fields["source"].annotation)) == set(tasks.backbones.SOURCES)


def test_the_source_registry_loads_no_reader():
    """Every stage loads the params and so the source registry: it must not pull in the readers (or pandas/PIL),
    else editing a reader would rerun training."""
    from tests.importgraph import closure

    assert not {m for m in closure("tasks.params") if m.startswith("tasks.sources.")}
    code = "import sys, tasks.params; print(','.join(m for m in ('pandas', 'PIL') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "", out.stderr or out.stdout
