"""The backbone factory: the bundled Lite0 weights are really loaded; bad weights are refused; every family
builds through public APIs and rebuilds from its metadata alone."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from tasks import backbones as models
from tasks.backbones import torchvision_models
from tasks.backbones.catalog import catalog
from tasks.backbones.timm_models import BUNDLED_SHA256
from tasks.backbones.weights import check_hash_prefix
from tasks.images import resize_square
from tasks.tensors import normalise


@pytest.fixture(scope="module")
def lite0():
    model, meta = models.create("bundled", "efficientnet_lite0", "imagenet")
    return model.eval(), meta


@pytest.mark.parametrize(
    "photo, expected",
    [("chelsea", {"Egyptian cat", "tabby, tabby cat", "tiger cat"}), ("coffee", {"espresso", "cup"})],
)
def test_bundled_imagenet_head_classifies_real_photos(lite0, photo, expected):
    """A wrong key mapping gives the same junk class for everything; the right one sees a cat."""
    import skimage.data
    from PIL import Image
    from timm.data import ImageNetInfo

    model, meta = lite0
    img = Image.fromarray(getattr(skimage.data, photo)())
    x = normalise(torch.from_numpy(resize_square(img, 224))[None], meta["preprocessing"]["mean"],
                  meta["preprocessing"]["std"])
    with torch.no_grad():
        top = model(x).softmax(-1)[0].argmax().item()
    assert ImageNetInfo().index_to_description(top) in expected


def test_bundled_metadata(lite0):
    _, meta = lite0
    assert meta["sha256"] == BUNDLED_SHA256["efficientnet_lite0"]
    assert 4_600_000 < meta["num_params"] < 4_700_000  # the 4.7M-parameter Lite0
    assert meta["num_classes"] == 1000


def test_new_head_and_backbone_groups(lite0):
    model, meta = lite0
    m = models.build(meta)
    m.load_state_dict(model.state_dict())
    models.with_new_head(m, 3, seed=0)
    assert m(torch.zeros(1, 3, 64, 64)).shape == (1, 3)
    groups = models.backbone_blocks(m)
    head = {id(p) for p in m.get_classifier().parameters()}
    names = dict(m.named_parameters())
    flat = [n for g in groups for n in g]
    assert groups[0][0].startswith("conv_stem") and len(groups) >= 7
    assert not any(id(names[n]) in head for n in flat)
    assert len(flat) + len(head) == len(names)  # every parameter is backbone or head


def _state(tmp_path, obj, name="w.pt"):
    path = tmp_path / name
    torch.save(obj, path)
    return path


def test_checkpoint_source_requires_matching_sha256(tmp_path):
    import timm

    state = timm.create_model("efficientnet_lite0").state_dict()
    path = _state(tmp_path, state)
    from tasks.files import sha256_file

    good = sha256_file(path)
    model, meta = models.create("checkpoint", "efficientnet_lite0", str(path), good)
    assert meta["sha256"] == good
    with pytest.raises(models.WeightsError, match="sha256 mismatch"):
        models.create("checkpoint", "efficientnet_lite0", str(path), "0" * 64)
    with pytest.raises(models.WeightsError, match="sha256 is required"):
        models.create("checkpoint", "efficientnet_lite0", str(path), None)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickle_that_would_run_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"x": _Evil()}, f)
    from tasks.files import sha256_file

    with pytest.raises(models.WeightsError, match="weights_only"):
        models.create("checkpoint", "efficientnet_lite0", str(path), sha256_file(path))


def test_missing_weights_file_says_how_to_provide_it(tmp_path):
    with pytest.raises(models.WeightsError, match="not found.*model.weights"):
        models.create("checkpoint", "efficientnet_lite0", str(tmp_path / "absent.pth"), "ab" * 32)


# ---- helpers: caches populated the way torch.hub / huggingface_hub populate them ------------

import copy  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from torch import nn  # noqa: E402

from tasks.files import sha256_file  # noqa: E402

RESNET18_FILE = "resnet18-f37072fd.pth"  # ResNet18_Weights.IMAGENET1K_V1's published file name


@pytest.fixture(scope="module")
def resnet18_state():
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18().state_dict()


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """An empty TORCH_HOME; returns its hub/checkpoints folder (where torchvision caches weights)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    return checkpoints


@pytest.fixture
def resnet18_cached(torch_home, resnet18_state):
    """TORCH_HOME holding a random-init resnet18 under the published IMAGENET1K_V1 file name.

    Its sha256 cannot start with the published prefix 'f37072fd' (finding such a file means
    ~2^32 tries), so the prefix check refuses it; pinning its full sha256 makes it acceptable.
    """
    path = torch_home / RESNET18_FILE
    torch.save(resnet18_state, path)
    return path


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "hf"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def put_in_hf_cache(cache: Path, repo_id: str, filename: str, state: dict) -> Path:
    """The huggingface_hub cache layout: blobs named by sha256, snapshots symlinking to them."""
    import safetensors.torch

    repo = cache / f"models--{repo_id.replace('/', '--')}"
    revision = "0" * 40
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    tmp = repo / "blobs" / "tmp"
    safetensors.torch.save_file(dict(state), str(tmp))
    blob = tmp.rename(repo / "blobs" / sha256_file(tmp))
    snapshot = repo / "snapshots" / revision / filename
    snapshot.parent.mkdir(parents=True)
    snapshot.symlink_to(os.path.relpath(blob, snapshot.parent))
    return blob


def weights_name(arch: str) -> str:
    import torchvision

    w = torchvision.models.get_model_weights(arch).DEFAULT
    return f"{type(w).__name__}.{w.name}"


# ---- torchvision through its cache (TORCH_HOME) --------------------------------------------


def test_torchvision_cache_file_must_match_the_hash_prefix_in_its_name(resnet18_cached):
    with pytest.raises(models.WeightsError, match="hash prefix 'f37072fd'.*model.sha256="):
        models.create("torchvision", "resnet18", "DEFAULT", offline=True)


def test_check_hash_prefix_accepts_a_file_named_by_its_own_hash(tmp_path):
    path = tmp_path / "w.pth"
    torch.save({"w": torch.ones(3)}, path)
    digest = sha256_file(path)
    named = path.rename(tmp_path / f"net-{digest[:8]}.pth")
    assert check_hash_prefix(named) == digest[:8]
    assert check_hash_prefix(named.rename(tmp_path / "plain.pth")) is None
    with pytest.raises(models.WeightsError, match="substituted"):
        check_hash_prefix((tmp_path / "plain.pth").rename(tmp_path / "net-00000000.pth"))


def test_torchvision_cached_weights_pinned_by_sha256_load_with_their_preprocessing(resnet18_cached, resnet18_state):
    import torchvision

    digest = sha256_file(resnet18_cached)
    model, meta = models.create("torchvision", "resnet18", "IMAGENET1K_V1", digest, offline=True)
    assert isinstance(model, torchvision_models.TorchvisionClassifier)
    assert meta["weights_name"] == "ResNet18_Weights.IMAGENET1K_V1" and meta["sha256"] == digest
    assert meta["weights_file"] == str(resnet18_cached) and meta["num_classes"] == 1000
    assert meta["pretrained"] | {"from": None} == {
        "input_size": 224, "resize_size": 256, "crop": "center", "interpolation": "bilinear",
        "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "from": None}
    assert meta["preprocessing"]["size"] == 224 and meta["builder"] == {"num_classes": 1000}
    assert model.pretrained_cfg["mean"] == (0.485, 0.456, 0.406)
    # the file's tensors, not a random init: same function as torchvision's own model with that state
    reference = torchvision.models.resnet18()
    reference.load_state_dict(resnet18_state)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), reference.eval()(x))
    # rebuilt from the metadata alone (what training and export do), then given the saved state
    rebuilt = models.build(meta)
    rebuilt.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), model(x))


def test_torchvision_offline_without_the_file_says_which_file_and_how_to_provide_it(torch_home):
    with pytest.raises(models.WeightsError) as err:
        models.create("torchvision", "resnet50", "IMAGENET1K_V2", offline=True)
    message = str(err.value)
    for needle in ("ResNet50_Weights.IMAGENET1K_V2", str(torch_home / "resnet50-11ad3fa6.pth"),
                   "https://download.pytorch.org/models/resnet50-11ad3fa6.pth", "TORCH_HOME", "model.weights="):
        assert needle in message


def test_fetch_stage_offline_fails_with_one_line_and_non_zero_exit(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("model:\n  source: torchvision\n  arch: resnet50\n  weights: DEFAULT\n")
    env = dict(os.environ, FINETUNE_OFFLINE="1", TORCH_HOME=str(tmp_path / "torch"), FINETUNE_DEBUG="0")
    proc = subprocess.run([sys.executable, "-m", "tasks.fetch_model", "--params", str(params),
                           "--out-dir", str(tmp_path / "base")], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "resnet50-11ad3fa6.pth" in errors[0] and "TORCH_HOME" in errors[0], proc.stderr
    assert not (tmp_path / "base" / "meta.json").exists()


def test_fetch_stage_records_weights_origin_and_preprocessing(resnet18_cached, tmp_path):
    from tasks import fetch_model
    from tasks.files import read_json

    digest = sha256_file(resnet18_cached)
    fetch_model.run("torchvision", "resnet18", "DEFAULT", digest, tmp_path / "base", offline=True)
    meta = read_json(tmp_path / "base" / "meta.json")
    assert {"source", "arch", "weights", "sha256", "num_params", "preprocessing"} <= set(meta)
    assert meta["sha256"] == digest and meta["num_params"] == 11_689_512
    model = models.build(meta)
    model.load_state_dict(torch.load(tmp_path / "base" / "weights.pt", weights_only=True))


def test_torchvision_checkpoint_file_in_its_own_naming(tmp_path, torch_home, resnet18_state):
    """A torchvision state_dict given as a path: head size from the file, preprocessing assumed from DEFAULT."""
    state = {**resnet18_state, "fc.weight": torch.zeros(5, 512), "fc.bias": torch.zeros(5)}
    path = _state(tmp_path, state, "mine.pth")
    model, meta = models.create("torchvision", "resnet18", str(path), sha256_file(path))
    assert model.num_classes == 5 and meta["weights_name"] is None
    assert meta["pretrained"]["from"].startswith("assumed") and meta["builder"] == {"num_classes": 5}
    rebuilt = models.build(meta)
    rebuilt.load_state_dict(model.state_dict())


# ---- timm through the Hugging Face cache ---------------------------------------------------


def test_timm_weights_from_the_hub_cache_verified_by_blob_name(hf_cache):
    import timm

    state = timm.create_model("test_resnet").state_dict()
    blob = put_in_hf_cache(hf_cache, "timm/test_resnet.r160_in1k", "model.safetensors", state)
    model, meta = models.create("timm", "test_resnet", "r160_in1k", offline=True)
    assert meta["sha256"] == blob.name and meta["weights_name"] == "test_resnet.r160_in1k"
    assert torch.equal(model.fc.weight, state["fc.weight"])
    assert torch.equal(model.conv1[0].weight, state["conv1.0.weight"])
    pre = meta["pretrained"]
    assert (pre["input_size"], pre["resize_size"], pre["interpolation"]) == (160, 168, "bilinear")
    assert meta["preprocessing"]["size"] == 160
    assert pre["mean"] == pre["std"] == [0.5] * 3
    assert "state_dict" not in model.pretrained_cfg
    assert any(r["source"] == "timm" and r["arch"] == "test_resnet" and r["offline"] for r in catalog())

    blob.write_bytes(blob.read_bytes() + b"tampered")
    with pytest.raises(models.WeightsError, match="sha256 mismatch"):
        models.create("timm", "test_resnet", "r160_in1k", offline=True)


def test_timm_offline_without_the_file_says_how_to_provide_it(hf_cache):
    with pytest.raises(models.WeightsError, match=r"timm/test_vit\.r160_in1k.*hf download.*model\.weights="):
        models.create("timm", "test_vit", "default", offline=True)


@pytest.mark.parametrize("source, arch, weights, match", [
    ("torchvision", "resnet18", "IMAGENET9K", "choose one of DEFAULT, IMAGENET1K_V1"),
    ("torchvision", "resnet5", "DEFAULT", "not a torchvision classification model"),
    ("torchvision", "resnet18", "ResNet50_Weights.DEFAULT", "not weights of resnet18"),
    ("timm", "test_vit", "in22k", "tags for test_vit: r160_in1k"),
    ("timm", "no_such_net", "default", "unknown timm architecture"),
    ("hub", "resnet18", "DEFAULT", "not supported"),
])
def test_unknown_names_are_refused_with_the_choices(source, arch, weights, match):
    with pytest.raises(models.WeightsError, match=match):
        models.create(source, arch, weights, offline=True)


# ---- local and remote checkpoints ------------------------------------------------------------


def test_checkpoint_from_a_url_is_downloaded_once_verified_and_cached(tmp_path, torch_home):
    """fsspec's in-process memory:// filesystem stands in for https:// or s3:// (same code path)."""
    import fsspec
    import timm

    state = timm.create_model("test_efficientnet").state_dict()
    path = _state(tmp_path, state, "eff.pt")
    digest, data = sha256_file(path), path.read_bytes()
    memory = fsspec.filesystem("memory")
    memory.pipe("/remote/eff.pt", data)
    try:
        with pytest.raises(models.WeightsError, match="sha256 mismatch.*nothing was cached"):
            models.create("checkpoint", "test_efficientnet", "memory://remote/eff.pt", "0" * 64, offline=False)
        assert list(torch_home.iterdir()) == []
        model, meta = models.create("checkpoint", "test_efficientnet", "memory://remote/eff.pt", digest, offline=False)
        assert Path(meta["weights_file"]).parent == torch_home and meta["sha256"] == digest
    finally:
        memory.rm("/remote", recursive=True)
    again, _ = models.create("checkpoint", "test_efficientnet", "memory://remote/eff.pt", digest, offline=True)
    assert torch.equal(again.conv_stem.weight, state["conv_stem.weight"])
    local, _ = models.create("timm", "test_efficientnet", path.as_uri(), digest)  # file:// URL, used in place
    assert torch.equal(local.classifier.weight, state["classifier.weight"])


def test_checkpoint_from_a_plain_http_server_without_range_support(tmp_path, torch_home):
    """Issue 32: `python -m http.server` answers every request with the whole file (no Range support); fsspec's
    default random-access reader refused it. A download reads the file once, in order: streamed, it works."""
    import functools
    import http.server
    import threading

    from tasks.backbones.weights import fetch_file

    class Quiet(http.server.SimpleHTTPRequestHandler):  # the standard library's server: no Range support
        def log_message(self, *args):
            pass

    path = tmp_path / "www" / "eff.pt"
    path.parent.mkdir()
    path.write_bytes(os.urandom(7 << 20))  # over fsspec's 5 MiB block: its reader would ask for a range
    digest = sha256_file(path)
    handler = functools.partial(Quiet, directory=str(path.parent))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            url = f"http://127.0.0.1:{server.server_port}/eff.pt"
            file, sha = fetch_file(url, digest, offline=False)
        finally:
            server.shutdown()
            thread.join(30)
    assert sha == digest and file.parent == torch_home and sha256_file(file) == digest


def test_checkpoint_head_size_comes_from_the_file(tmp_path):
    import timm

    for classes in (2, 0):  # a fine-tuned 2-class model; a backbone without classifier
        state = timm.create_model("test_efficientnet", num_classes=classes).state_dict()
        path = _state(tmp_path, state, f"c{classes}.pt")
        model, meta = models.create("checkpoint", "test_efficientnet", str(path), sha256_file(path))
        assert model.num_classes == meta["num_classes"] == classes
        assert torch.equal(model.conv_stem.weight, state["conv_stem.weight"])


def test_torchvision_pickle_that_would_run_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"x": _Evil()}, f)
    with pytest.raises(models.WeightsError, match="weights_only"):
        models.create("torchvision", "resnet18", str(path), sha256_file(path))


# ---- the registry's contract, across families ----------------------------------------------

FAMILIES = [  # (source, arch, input size): small variants, random init, to stay fast on CPU
    ("timm", "test_resnet", 64),
    ("timm", "mobilenetv3_small_050", 64),
    ("timm", "test_efficientnet", 64),
    ("timm", "test_convnext", 64),
    ("timm", "test_vit", 160),
    ("torchvision", "resnet18", 64),
    ("torchvision", "mobilenet_v3_small", 64),
    ("torchvision", "efficientnet_b0", 64),
    ("torchvision", "convnext_tiny", 64),
    ("torchvision", "vit_b_16", 224),
]


def arch_meta(source: str, arch: str) -> dict:
    """The metadata `create` records, minus the weights (build() needs nothing else)."""
    meta = {"source": source, "arch": arch, "num_classes": 1000, "weights_name": None,
            "preprocessing": {"size": 224, "mean": [0.5] * 3, "std": [0.5] * 3}}
    if source == "torchvision":
        import torchvision

        weights = torchvision.models.get_model_weights(arch).DEFAULT
        meta.update(weights_name=weights_name(arch), builder=torchvision_models.builder_kwargs(arch, weights))
    return meta


@pytest.mark.parametrize("source, arch, size", FAMILIES, ids=[f"{s}-{a}" for s, a, _ in FAMILIES])
def test_every_family_swaps_its_head_and_reports_backbone_blocks(source, arch, size):
    meta = arch_meta(source, arch)
    model = models.with_new_head(models.build(meta), 3, seed=0).eval()
    head = model.get_classifier()
    assert isinstance(head, nn.Linear) and head.out_features == model.num_classes == 3
    assert isinstance(model.drop_rate, float) and len(model.pretrained_cfg["mean"]) == 3
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        logits = model(x)
        features = model.forward_features(x)
        torch.testing.assert_close(model.forward_head(features), logits)
        assert model.forward_head(features, pre_logits=True).shape == (1, head.in_features)
    assert logits.shape == (1, 3)

    groups = models.parameter_groups(model)
    assert groups["head"] == [n for n, p in model.named_parameters() if any(p is q for q in head.parameters())]
    assert set(groups["head"]).isdisjoint(groups["backbone"])
    assert len(groups["head"]) + len(groups["backbone"]) == len(dict(model.named_parameters()))
    blocks = models.backbone_blocks(model)
    order = {name: i for i, name in enumerate(groups["backbone"])}
    assert sorted(n for b in blocks for n in b) == sorted(groups["backbone"])  # each backbone parameter once
    assert len(blocks) >= 4 and groups["backbone"][0] in blocks[0]  # stem first
    starts = [min(order[n] for n in b) for b in blocks]
    assert starts == sorted(starts)  # in forward order: the last blocks are the deepest

    again = models.with_new_head(models.build(meta, num_classes=3), 3, seed=0)
    assert torch.equal(again.get_classifier().weight, head.weight)  # seeded head
    again.load_state_dict(model.state_dict())  # a checkpoint of one loads into the other (strict)


def test_wrapped_torchvision_model_trains_with_cached_features_and_exports_to_onnx(tmp_path):
    """The consumers of the contract: staged training (feature cache exact) and ONNX export."""
    from tasks.export.onnx_graph import Deployable, export_onnx
    from tasks.inference import session
    from tasks.params import DIHEDRAL_AUGMENT, StageParams, TrainParams
    from tasks.preprocess import Preprocessing
    from tests.conftest import fit

    meta = arch_meta("torchvision", "mobilenet_v3_small")
    base = models.build(meta)
    g = torch.Generator().manual_seed(0)
    y = torch.arange(16) % 2
    x = (torch.rand((16, 3, 64, 64), generator=g) * 80 + 40 + 120 * y.view(-1, 1, 1, 1)).to(torch.uint8)
    stage = StageParams(name="frozen", epochs=2, trainable="head", lr=1e-2)
    results = []
    for cache in (True, False):
        m = models.with_new_head(copy.deepcopy(base), 2, seed=0)
        p = TrainParams(batch_size=8, image_size=64, cpu_image_size=64, stages=[stage], cache_features=cache,
                        augment=DIHEDRAL_AUGMENT)
        fit(m, ["a", "b"], x, y, x, y, p, [0.5] * 3, [0.5] * 3)
        results.append(m)
    trained, uncached = results
    for (name, a), b in zip(trained.state_dict().items(), uncached.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    changed = {n for n, v in trained.state_dict().items() if not torch.equal(v, base.state_dict().get(n, -v))}
    assert changed == {"head.weight", "head.bias"}

    module = Deployable(trained.eval(), Preprocessing(64, mean=(0.5,) * 3, std=(0.5,) * 3)).eval()
    onnx_path = tmp_path / "m.onnx"
    export_onnx(module, 64, onnx_path, 18)
    ort_logits = session(onnx_path).run(["logits"], {"image": x[:4].numpy()})[0]
    with torch.no_grad():
        torch_logits = module(x[:4])[0].numpy()
    assert np.abs(ort_logits - torch_logits).max() < 1e-3


def test_builder_arguments_and_key_renames_follow_torchvision():
    """What torchvision's builders do with weights, done through `get_model(arch, weights=None, **kwargs)`."""
    import torchvision

    w = torchvision.models
    assert torchvision_models.builder_kwargs("vit_b_16", w.ViT_B_16_Weights.IMAGENET1K_SWAG_E2E_V1) == {
        "num_classes": 1000, "image_size": 384}
    assert torchvision_models.builder_kwargs("googlenet", w.GoogLeNet_Weights.DEFAULT) == {
        "num_classes": 1000, "transform_input": True, "aux_logits": False, "init_weights": False}
    old = {"features.denseblock1.denselayer1.norm.1.weight": torch.ones(1), "aux1.fc.weight": torch.ones(1),
           "features.conv0.weight": torch.ones(1)}
    assert set(torchvision_models._fit_keys("densenet121", old)) == {
        "features.denseblock1.denselayer1.norm1.weight", "features.conv0.weight"}


def test_no_library_internals_are_patched():
    source = "\n".join(p.read_text() for p in Path(models.__file__).parent.glob("*.py"))
    assert "unittest" not in source and "mock" not in source


# ---- `finetune models` ---------------------------------------------------------------------


def test_models_command_marks_what_works_offline(resnet18_cached, tmp_path):
    listed = {(r["source"], r["arch"]) for r in catalog()}
    assert ("torchvision", "resnet18") in listed and ("torchvision", "resnet50") not in listed  # only cached ones
    env = dict(os.environ, TORCH_HOME=str(resnet18_cached.parents[2]), HF_HUB_CACHE=str(tmp_path / "hf"))
    proc = subprocess.run([sys.executable, "-m", "finetune", "models", "--all"], capture_output=True, text=True,
                          env=env, cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = {tuple(line.split()[:3]): line.split() for line in proc.stdout.splitlines() if line.strip()}
    assert rows[("bundled", "efficientnet_lite0", "imagenet")][3] == "yes"
    assert rows[("torchvision", "resnet18", "IMAGENET1K_V1")][3:5] == ["(DEFAULT)", "yes"]
    assert rows[("torchvision", "resnet50", "IMAGENET1K_V2")][3:5] == ["(DEFAULT)", "no"]
