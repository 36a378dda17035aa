"""What cannot run here (no Docker engine, no Triton, no Kubernetes), checked structurally: the container
ships exactly the server's code and dependencies, the Triton repository is one Triton parses and that
matches the ONNX model, and the KServe manifests match the server's options, port and routes."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from google.protobuf import text_format

from deploy.server import TOKEN_ENV, build_parser
from deploy.triton import TritonExportError, export
from tasks import registry
from tasks.inference import ModelError, OnnxClassifier
from tests.conftest import REPO, brightness_onnx
from tests.importgraph import closure, files, module_file

DEPLOY = REPO / "deploy"
FINETUNE = str(Path(sys.executable).parent / "finetune")
# import name -> distribution name, where they differ
DISTRIBUTIONS = {"PIL": "pillow", "onnxruntime": "onnxruntime", "prometheus_client": "prometheus-client",
                 "pythonjsonlogger": "python-json-logger", "multipart": "python-multipart",
                 "python_multipart": "python-multipart"}


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) per instruction, continuation lines joined, comments dropped."""
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def requirements() -> set[str]:
    names = set()
    for line in (DEPLOY / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            names.add(line.split(";")[0].split("[")[0].split(">")[0].split("<")[0].split("=")[0].strip().lower())
    return names


def third_party_imports(modules: set[str]) -> set[str]:
    found = set()
    for module in modules:
        tree = ast.parse(module_file(module).read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else []
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ("tasks", "deploy", "__future__"):
                    found.add(top)
    return found


def test_the_image_copies_exactly_the_servers_code():
    server_files = files(closure("deploy.server"))
    copied = set()
    for word, args in dockerfile():
        if word == "COPY":
            *sources, dest = args.split()
            copied |= {s for s in sources if s.endswith(".py")}
            if dest.endswith("/"):  # into the same folder as in the repository
                assert all(dest.rstrip("/") == Path(s).parent.as_posix() for s in sources), args
    assert copied == server_files, f"missing {sorted(server_files - copied)}, extra {sorted(copied - server_files)}"


def test_the_image_installs_the_servers_dependencies_and_not_torch_or_prefect():
    needed = {DISTRIBUTIONS.get(top, top).lower().replace("_", "-") for top in third_party_imports(closure("deploy.server"))}
    needed |= {"python-multipart", "httptools", "uvloop"}  # used by FastAPI / uvicorn without an import of ours
    have = requirements()
    assert needed <= have, f"deploy/requirements.txt lacks {sorted(needed - have)}"
    assert not have & {"torch", "torchvision", "timm", "prefect", "dvc", "great-expectations"}
    pyproject = (REPO / "pyproject.toml").read_text().lower()
    assert all(f'"{name}' in pyproject for name in have), "every serving requirement is a project dependency too"


def test_the_image_is_slim_non_root_healthchecked_and_runs_the_server():
    steps = dockerfile()
    words = [w for w, _ in steps]
    assert steps[0] == ("FROM", "python:3.11-slim")
    user = [a for w, a in steps if w == "USER"]
    assert user and user[-1] not in ("root", "0")
    assert words.index("USER") > max(i for i, w in enumerate(words) if w in ("RUN", "COPY"))
    health = next(a for w, a in steps if w == "HEALTHCHECK")
    assert "/v2/health/ready" in health and "8080" in health
    assert any(w == "RUN" and "pip install -r deploy/requirements.txt" in a for w, a in steps)
    entry = yaml.safe_load(next(a for w, a in steps if w == "ENTRYPOINT"))
    cmd = yaml.safe_load(next(a for w, a in steps if w == "CMD"))
    assert entry[:3] == ["python", "-m", "deploy.server"]
    args = build_parser().parse_args(entry[3:] + cmd)  # options the server really has
    assert (args.host, args.port, args.model) == ("0.0.0.0", 8080, "champion")
    assert any(w == "EXPOSE" and a == "8080" for w, a in steps)
    # every interface needs a token (the server refuses without one): the file shows how to pass it
    assert not args.allow_unauthenticated and args.token_file is None
    text = (DEPLOY / "Dockerfile").read_text()
    assert "--token-file /run/secrets/serve-token" in text and "FINETUNE_SERVE_TOKEN=" in text


def test_kserve_manifest_runs_our_container_with_options_routes_and_port_the_server_has():
    isvc = yaml.safe_load((DEPLOY / "kserve/inferenceservice.yaml").read_text())
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["kind"] == "InferenceService"
    container = isvc["spec"]["predictor"]["containers"][0]
    assert container["name"] == "kserve-container"
    args = build_parser().parse_args(["--host", "0.0.0.0", "--port", "8080", *container["args"]])
    assert args.model.startswith("/mnt/models/")  # where KServe's storage initializer puts STORAGE_URI
    assert any(e["name"] == "STORAGE_URI" for e in container["env"])
    token = next(e for e in container["env"] if e["name"] == TOKEN_ENV)  # the server binds 0.0.0.0: a token, from a
    assert set(token["valueFrom"]["secretKeyRef"]) == {"name", "key"}    # Secret, not the manifest
    assert not args.allow_unauthenticated
    assert [p["containerPort"] for p in container["ports"]] == [8080]
    routes = route_paths()
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] == 8080 and container[probe]["httpGet"]["path"] in routes
    assert isvc["metadata"]["annotations"]["prometheus.kserve.io/path"] in routes


def route_paths() -> set[str]:
    """The server's routes, read from its route modules (no model needed)."""
    trees = [ast.parse(module.read_text()) for module in sorted((DEPLOY / "routes").glob("*.py"))]
    return {d.args[0].value for tree in trees for node in ast.walk(tree) if isinstance(node, ast.AsyncFunctionDef)
            for d in node.decorator_list if isinstance(d, ast.Call) and d.args and isinstance(d.args[0], ast.Constant)}


def test_kserve_triton_manifest_uses_the_v2_onnx_runtime():
    isvc = yaml.safe_load((DEPLOY / "kserve/inferenceservice-triton.yaml").read_text())
    model = isvc["spec"]["predictor"]["model"]
    assert isvc["kind"] == "InferenceService" and model["modelFormat"]["name"] == "onnx"
    assert model["protocolVersion"] == "v2" and model["storageUri"]


def triton_config_proto():
    """Triton's own ModelConfig message, from the tritonclient package (its grpc extra is not installed)."""
    import tritonclient

    path = Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py"
    spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_export_triton_writes_a_repository_triton_parses_matching_the_onnx_model(tmp_path):
    reg = tmp_path / "registry"
    for i in range(3):
        registry.register(reg, {"model.onnx": brightness_onnx(tmp_path / f"m{i}.onnx", ["ok", f"crack{i}"], size=24 + i)},
                          {})
    registry.promote(reg, "3")
    proc = subprocess.run([FINETUNE, "export-triton", "champion", "--registry", str(reg), "--out", str(tmp_path / "repo"),
                           "--name", "cells", "--max-batch-size", "16"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    folder = tmp_path / "repo/cells"
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) == \
        ["3", "3/model.onnx", "config.pbtxt", "labels.txt"]
    pb = triton_config_proto()
    config = text_format.Parse((folder / "config.pbtxt").read_text(), pb.ModelConfig())
    onnx = OnnxClassifier(folder / "3/model.onnx")
    assert config.name == "cells" and config.platform == "onnxruntime_onnx" and config.max_batch_size == 16
    assert [(i.name, pb.DataType.Name(i.data_type), list(i.dims)) for i in config.input] == [("image", "TYPE_UINT8", [3, 26, 26])]
    assert [i.name for i in onnx.session.get_inputs()] == ["image"] and onnx.preprocessing.size == 26
    assert [(o.name, pb.DataType.Name(o.data_type), list(o.dims), o.label_filename) for o in config.output] == \
        [("logits", "TYPE_FP32", [2], "labels.txt"), ("probabilities", "TYPE_FP32", [2], "labels.txt")]
    assert config.HasField("dynamic_batching") and config.dynamic_batching.max_queue_delay_microseconds == 100
    assert config.instance_group[0].kind == pb.ModelInstanceGroup.KIND_CPU
    assert (folder / "labels.txt").read_text().splitlines() == onnx.classes == ["ok", "crack2"]
    assert (folder / "3/model.onnx").read_bytes() == (reg / "versions/v0003/model.onnx").read_bytes()


def test_export_triton_refuses_to_overwrite_without_force_and_replaces_with_it(tmp_path):
    onnx = brightness_onnx(tmp_path / "m.onnx", ["a", "b"])
    first = export(str(onnx), tmp_path / "repo", name="m")
    assert first.version == 1 and (first.model_dir / "1/model.onnx").is_file()
    with pytest.raises(TritonExportError, match="exists; use --force"):
        export(str(onnx), tmp_path / "repo", name="m")
    again = export(str(onnx), tmp_path / "repo", name="m", max_batch_size=0, force=True)
    pb = triton_config_proto()
    config = text_format.Parse(again.config, pb.ModelConfig())
    assert config.max_batch_size == 0 and list(config.input[0].dims) == [-1, 3, 32, 32]
    assert not config.HasField("dynamic_batching")
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == ["m"]  # no staging or old folders left
    with pytest.raises(TritonExportError, match="not a usable model name"):
        export(str(onnx), tmp_path / "repo", name="../x")
    three = brightness_onnx(tmp_path / "three.onnx", ["a", "b", "c"])  # 2 outputs, 3 class names
    with pytest.raises(ModelError, match=r"expected \(2, 3\) for its 3 classes"):
        export(str(three), tmp_path / "repo", name="three")


def test_serve_and_export_triton_help_explain_themselves():
    for cmd, needles in ((["serve", "--help"], ["--model", "champion", "--registry", "--token-file", "--batching",
                                                 "--port", "hot-swaps"]),
                         (["export-triton", "--help"], ["--out", "--max-batch-size", "labels.txt"])):
        proc = subprocess.run([FINETUNE, *cmd], capture_output=True, text=True, timeout=120)
        out = " ".join(proc.stdout.split())
        assert proc.returncode == 0 and all(n in out for n in needles), (cmd, out)
    proc = subprocess.run([FINETUNE, "serve", "--model", "missing.onnx"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "error: missing.onnx: no such ONNX file" in proc.stderr
